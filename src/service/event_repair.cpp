#include "event_repair.hpp"

#include "attach_sequence.hpp"

#include "kernel/loop_device.hpp"
#include "kernel/partitions.hpp"
#include "kernel/sysfs.hpp"
#include "uevent/monitor.hpp"

#include <loopd/log.hpp>

#include <algorithm>

namespace loopd::service {
namespace {

// The nudge (counted from 1, a second apart) at which loopd also re-triggers what
// udev still lacks though the kernel announced it: udev may have lost it.
constexpr unsigned lastResortAttempt = 3;

// The grace a database entry's event gets before the entry speaks for it: udevd
// broadcasts right after writing it (after RUN= programs, if any).
constexpr auto databaseGrace = std::chrono::milliseconds(20);

} // namespace

// udev's database keeps no DISKSEQ; what it says is tied to an attachment thus:
// - the disk counts when its disk/by-diskseq/S link is there (udev takes S from
//   the event it processes, never from sysfs);
// - a partition counts only once the disk does, if its entry describes
//   partition k of this disk (ID_PART_ENTRY_DISK, ID_PART_ENTRY_NUMBER), and if it
//   was written after the attach began. A partition's device number is reused by
//   any disk's next partition, so the entry under it may still be another
//   disk's (seen at 32 clients: loop5p2's entry read for a new loop2p1). udevd
//   runs the events of a disk and its partitions one at a time in kernel order
//   (a child's event waits for its parent's and the other way round), and every
//   event of an earlier attachment on this number - its partitions' remove
//   events, which delete their entries, among them - precedes this attachment's
//   events; so once udev has finished an event of the disk with S, an entry that
//   describes partition k of this disk is this attachment's. The time check
//   keeps out entries a udevd that was down left behind (its successor never saw
//   their remove events; tests/bench/RESULTS.md).
core::EventLedger::View EventRepair::udevSnapshot(unsigned number, uint64_t diskseq,
                                                  const core::EventLedger::Partitions& present) const
{
    const auto* owner = s_.table.owner(number);
    const auto since = owner ? owner->startedUsec : UINT64_MAX;
    core::EventLedger::View view{diskseq, false, {}};
    const auto entries = uevent::readUdevDatabase(number);
    const auto disk = entries.find(0);
    view.disk = disk != entries.end() && disk->second.initialized && disk->second.linkedDiskseq == diskseq;
    if (!view.disk)
        return view;
    for (const auto& [partition, entry] : entries)
        if (partition != 0 && entry.initialized && present.count(partition) && entry.processedRealtimeUsec >= since &&
            entry.partEntryDisk == disk->second.devnum && entry.partEntryNumber == partition)
            view.partitions.insert(partition);
    return view;
}

EventRepair::EventRepair(Services& services) : s_(services) {}

void EventRepair::watch(const Device& device)
{
    try {
        nodeWatch_.add(device.info.number);
    } catch (const std::exception& e) {
        log::warn("foreign detach of dev={} is noticed by polling only: {}", device.describe(), e.what());
    }
}

void EventRepair::unwatch(unsigned number)
{
    nodeWatch_.remove(number);
}

void EventRepair::onNodeClosed()
{
    for (const auto number : nodeWatch_.closed())
        checkReleased(number);
}

// A "change" with the old diskseq is sent on attach and on detach alike: only
// sysfs tells whether someone else released or replaced an owned device.
void EventRepair::afterEvents(const std::set<unsigned>& numbers)
{
    for (const auto number : numbers)
        checkOwned(number);
}

void EventRepair::resyncAll()
{
    std::set<unsigned> numbers;
    for (const auto number : s_.registry.watchedNumbers())
        numbers.insert(number);
    for (const auto number : s_.table.ownedNumbers())
        numbers.insert(number);
    log::warn("uevents were lost (receive buffer overflow); re-enumerating {} device(s)", numbers.size());
    for (const auto number : numbers)
        resync(number);
}

void EventRepair::resync(unsigned number, bool kernelToo)
{
    const auto diskseq = kernel::sysfsDiskseq(number);
    if (!diskseq)
        return;
    const auto partitions = kernel::existingPartitions(number);
    core::EventLedger::View kernelView{*diskseq, true, {partitions.begin(), partitions.end()}};
    if (kernelToo)
        s_.settle(s_.registry.resync(number, EventSource::Kernel, kernelView));

    auto udevView = udevSnapshot(number, *diskseq, kernelView.partitions);
    // Without the kernel's view (a database write, a nudge) nothing was lost on
    // the sockets: what udev's events said stands, the database only adds to it.
    if (const auto& known = s_.registry.ledger().view(number, EventSource::Udev);
        !kernelToo && known.diskseq == *diskseq) {
        udevView.disk = udevView.disk || known.disk;
        for (const auto p : known.partitions)
            udevView.partitions.insert(p);
    }
    s_.settle(s_.registry.resync(number, EventSource::Udev, std::move(udevView)));
    checkOwned(number);
}

// An owned, ready device whose diskseq moved on or that lost its backing file was
// released or replaced by someone else.
void EventRepair::checkOwned(unsigned number)
{
    const auto* device = s_.table.owner(number);
    if (!device || device->state != DeviceState::Ready)
        return;
    if (kernel::sysfsDiskseq(number) == device->info.diskseq && kernel::sysfsBackingFile(number))
        return;
    foreignDetach(device->info.diskseq);
}

// `losetup -d` on a device loopd holds open only sets autoclear: someone asked
// for it to go.
void EventRepair::checkReleased(unsigned number)
{
    const auto* device = s_.table.owner(number);
    if (!device || device->state == DeviceState::Detaching || device->options.autoclear ||
        !kernel::sysfsAutoclear(number).value_or(true))
        return;
    if (device->state == DeviceState::Ready)
        return foreignDetach(device->info.diskseq);
    // Still attaching: the caller must not be told it is ready.
    s_.registry.cancel(device->request);
    s_.settle({core::Outcome{device->request, core::Outcome::Kind::Changed, device->watch()}});
}

// Someone else detached (or asked to detach) a device loopd owns: let go of it
// without touching it further. Closing loopd's fd completes a `losetup -d`, whose
// LOOP_CLR_FD only marked the device for release at its last close.
void EventRepair::foreignDetach(uint64_t diskseq)
{
    auto& device = *s_.table.find(diskseq);
    log::Scope about{device.about()};
    device.state = DeviceState::Detaching;
    // With autoclear asked for at attach, the kernel's release is the one expected.
    const auto reason = device.options.autoclear ? RemovalReason::Autoclear : RemovalReason::ForeignDetach;
    log::info("released by someone else dev={} reason={}", device.describe(), reasonName(reason));
    s_.workers.submit([this, diskseq, reason, fd = device.lockFd, number = device.info.number] {
        fd->reset();
        awaitPartitionsDropped(number);
        return WorkerPool::Continuation([this, diskseq, reason] { s_.table.remove(diskseq, reason); });
    });
}

// An attach (or detach) waited a grace period for its events. What udev did may
// have been lost on our socket: read its database. What the kernel never sent
// (5.19-6.14 drop some loop uevents) is asked for again with a synthetic "change"
// (a sysfs write, on a worker: the kernel emits the uevent synchronously). A
// kernel event that came while udev's is still missing only means udev is slow:
// triggering more would flood it (seen under qemu: 158 triggers for one
// 32-partition attach).
void EventRepair::nudge(const core::Nudge& due)
{
    const auto number = due.watch.number;
    const auto node = kernel::loopDevNode(number);
    log::Scope scope{about(due.watch.diskseq, number)};
    if (due.goal == core::Goal::Released) {
        // Remove events cannot be asked for again; sysfs and udev know the outcome.
        log::info("remove events missing dev={} diskseq={}: re-enumerating", node, due.watch.diskseq);
        return resync(number);
    }
    const auto& kernelView = s_.registry.ledger().view(number, EventSource::Kernel);
    const bool current = kernelView.diskseq == due.watch.diskseq;
    bool disk = !current || !kernelView.disk;
    std::vector<unsigned> partitions;
    for (const auto p : due.watch.partitions)
        if (!current || kernelView.partitions.count(p) == 0)
            partitions.push_back(p);
    if (due.watch.source == EventSource::Udev) {
        log::info("events missing dev={} diskseq={}: re-enumerating udev's database", node, due.watch.diskseq);
        resync(number, false);
        // Once, after a few seconds with udev still short of something the kernel
        // did announce: ask for exactly what udev lacks.
        if (due.attempt == lastResortAttempt) {
            disk = disk || due.disk;
            for (const auto p : due.partitions)
                if (std::find(partitions.begin(), partitions.end(), p) == partitions.end())
                    partitions.push_back(p);
        }
    }
    trigger(number, due.watch.diskseq, disk, partitions, "missing");
}

// Asks the kernel to send the change events of the disk and these partitions
// again (a sysfs write, on a worker: the kernel emits the uevent synchronously).
void EventRepair::trigger(unsigned number, uint64_t diskseq, bool disk, const std::vector<unsigned>& partitions,
                          const char* why)
{
    if (!disk && partitions.empty())
        return;
    log::Scope scope{about(diskseq, number)};
    const auto uuid = makeUuid();
    std::string missing = disk ? "disk" : "";
    for (const auto p : partitions)
        missing += (missing.empty() ? "p" : ",p") + std::to_string(p);
    log::info("synthetic trigger dev={} diskseq={} uuid={} missing={} why={}", kernel::loopDevNode(number), diskseq,
              uuid, missing, why);
    s_.workers.submit([number, disk, partitions, uuid] {
        try {
            if (disk)
                kernel::triggerChange(number, 0, uuid);
            for (const auto p : partitions)
                kernel::triggerChange(number, p, uuid);
        } catch (const std::exception& e) {
            // The partition may be gone for a moment (double scan); the next nudge retries.
            log::debug("synthetic trigger dev={} failed: {}", kernel::loopDevNode(number), e.what());
        }
        return WorkerPool::Continuation([] {});
    });
}

void EventRepair::databaseWritten(unsigned number, core::Clock::time_point now)
{
    // Only a device someone waits for udev on; the first write starts the grace.
    const auto watches = s_.registry.watches(number);
    if (std::any_of(watches.begin(), watches.end(), [](const auto& w) { return w.source == EventSource::Udev; }))
        databaseDue_.emplace(number, now + databaseGrace);
}

std::optional<core::Clock::time_point> EventRepair::nextDatabaseCheck() const
{
    std::optional<core::Clock::time_point> next;
    for (const auto& [number, due] : databaseDue_)
        if (!next || due < *next)
            next = due;
    return next;
}

void EventRepair::checkDatabase(core::Clock::time_point now)
{
    for (auto it = databaseDue_.begin(); it != databaseDue_.end();) {
        if (it->second > now) {
            ++it;
            continue;
        }
        const auto number = it->first;
        it = databaseDue_.erase(it);
        // Still waiting for udev on it after the grace: the event was lost (or is
        // late); the database says what it would have said.
        const auto watches = s_.registry.watches(number);
        const auto& view = s_.registry.ledger().view(number, EventSource::Udev);
        const bool lacking = std::any_of(watches.begin(), watches.end(), [&](const core::Watch& w) {
            if (w.source != EventSource::Udev)
                return false;
            if (view.diskseq != w.diskseq || !view.disk)
                return true;
            return std::any_of(w.partitions.begin(), w.partitions.end(),
                               [&](unsigned p) { return view.partitions.count(p) == 0; });
        });
        if (!lacking)
            continue;
        const auto waited = std::find_if(watches.begin(), watches.end(),
                                         [](const core::Watch& w) { return w.source == EventSource::Udev; });
        log::Scope scope{about(waited->diskseq, number)};
        log::info("udev database written without its event dev={} diskseq={}: re-enumerating udev's database",
                  kernel::loopDevNode(number), waited->diskseq);
        resync(number, false);
    }
}

log::Context EventRepair::about(uint64_t diskseq, unsigned number) const
{
    if (const auto* device = s_.table.find(diskseq))
        return device->about();
    return {.diskseq = diskseq, .device = kernel::loopDevNode(number)};
}

void EventRepair::udevReturned()
{
    for (const auto& due : s_.registry.lacking(EventSource::Udev)) {
        resync(due.watch.number, false);
        trigger(due.watch.number, due.watch.diskseq, due.disk, due.partitions, "udevd-returned");
    }
}

void EventRepair::afterConfigure(const core::Watch& watch)
{
    // udev may have written its entries before the request was registered (the
    // loop thread lags its sockets under load): those writes found nobody
    // waiting, so the database is looked at once after the grace in any case.
    if (watch.source == EventSource::Udev)
        databaseDue_.emplace(watch.number, core::Clock::now() + databaseGrace);

    const auto& view = s_.registry.ledger().view(watch.number, EventSource::Kernel);
    const bool current = view.diskseq == watch.diskseq;
    const auto listed = kernel::existingPartitions(watch.number);
    const std::set<unsigned> present(listed.begin(), listed.end());
    std::vector<unsigned> partitions;
    for (const auto p : watch.partitions)
        if (present.count(p) && (!current || view.partitions.count(p) == 0))
            partitions.push_back(p);
    const bool disk = !current || !view.disk;
    if (disk)
        learn("no-disk-uevent-on-configure", "dev=" + kernel::loopDevNode(watch.number));
    // All of them: one partition re-added by a rescan at this very moment is not a habit.
    if (!watch.partitions.empty() && partitions.size() == watch.partitions.size())
        learn("no-partition-uevents-on-configure",
              "dev=" + kernel::loopDevNode(watch.number) + " partitions=" + std::to_string(partitions.size()));
    trigger(watch.number, watch.diskseq, disk, partitions, "not-sent-on-configure");
}

// Kernels 5.19 to 6.14 (before "loop: LOOP_CONFIGURE: send uevents for
// partitions", backported to some stable series) create the partitions inside
// LOOP_CONFIGURE with uevents suppressed. Seen once, it is said once.
void EventRepair::learn(const std::string& quirk, const std::string& evidence)
{
    if (std::find(quirks_.begin(), quirks_.end(), quirk) != quirks_.end())
        return;
    quirks_.push_back(quirk);
    log::warn("kernel quirk learned: {} ({}): the missing events are asked for at once", quirk, evidence);
    if (onQuirk)
        onQuirk();
}

} // namespace loopd::service
