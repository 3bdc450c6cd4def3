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

} // namespace

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

    // udev's database keeps no DISKSEQ: the disk's by-diskseq link says which
    // attachment udev processed it for, and a partition entry counts only if udev
    // wrote it after the attach began (older ones are of an earlier attachment).
    const auto* owner = s_.table.owner(number);
    const auto since = owner ? owner->startedUsec : UINT64_MAX;
    core::EventLedger::View udevView{*diskseq, false, {}};
    for (const auto& [partition, entry] : uevent::readUdevDatabase(number)) {
        if (!entry.initialized)
            continue;
        if (partition == 0)
            udevView.disk = entry.linkedDiskseq == *diskseq;
        else if (kernelView.partitions.count(partition) && entry.processedRealtimeUsec >= since)
            udevView.partitions.insert(partition);
    }
    s_.settle(s_.registry.resync(number, EventSource::Udev, udevView));
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

void EventRepair::scanReleased()
{
    // A sysfs read per owned device (10 ms with 1000 held): on a worker, so the
    // loop answers meanwhile. Only the devices found marked are looked at again.
    s_.workers.submit([this, owned = s_.table.ownedNumbers()] {
        std::vector<unsigned> marked;
        for (const auto number : owned)
            if (kernel::sysfsAutoclear(number).value_or(true)) // unreadable: gone, look again
                marked.push_back(number);
        return WorkerPool::Continuation([this, marked = std::move(marked)] {
            for (const auto number : marked)
                checkReleased(number);
        });
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
    log::Scope about{{.diskseq = due.watch.diskseq, .device = node}};
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
    if (!disk && partitions.empty())
        return;
    const auto uuid = makeUuid();
    std::string missing = disk ? "disk" : "";
    for (const auto p : partitions)
        missing += (missing.empty() ? "p" : ",p") + std::to_string(p);
    log::info("synthetic trigger dev={} diskseq={} uuid={} missing={}", node, due.watch.diskseq, uuid, missing);
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

} // namespace loopd::service
