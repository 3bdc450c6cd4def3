#include "recovery.hpp"

#include "attach_sequence.hpp"
#include "bus_objects.hpp"
#include "core/options.hpp"
#include "kernel/loop_device.hpp"
#include "uevent/monitor.hpp"

#include <loopd/error.hpp>
#include <loopd/log.hpp>

#include <algorithm>
#include <sys/file.h>

namespace loopd::service {

using namespace std::chrono_literals;

Recovery::Recovery(Services& services) : s_(services) {}

namespace {

// reopenOwned for each owned record: the kernel's part of adoption (sysfs
// diskseq, open, LOOP_GET_STATUS64, flock; a repair where partitions are
// missing), half of a restart's CPU with 4096 devices held and independent from
// device to device. Spread over threads; the table is then filled in record
// order on the calling thread, as before.
std::vector<Recovery::Reopened> reopenAll(const std::vector<core::Record>& records)
{
    std::vector<Recovery::Reopened> reopened(records.size());
    spread(records.size(), [&](std::size_t i) {
        if (records[i].state != core::Record::State::Owned)
            return;
        auto& r = reopened[i];
        r.before = realtimeUsec(); // re-added partitions count from here (Recovery::adopt)
        try {
            r.fd = reopenOwned(records[i], r.readded, r.locked);
        } catch (...) {
            r.failed = std::current_exception();
        }
    });
    return reopened;
}

} // namespace

std::vector<uint64_t> Recovery::run()
{
    // Every by-ref link is of an earlier run and may name a loop number that is
    // someone else's attachment by now: adopted devices are linked again.
    s_.table.links().removeAll();
    auto records = s_.records.loadAll();
    auto reopened = reopenAll(records);
    // Owned devices first: their numbers are not searched for a crash's leftovers.
    std::set<unsigned> adopted;
    for (std::size_t i = 0; i < records.size(); ++i)
        if (records[i].state == core::Record::State::Owned && adoptOrRelease(records[i], reopened[i]))
            adopted.insert(records[i].info.number);
    for (const auto& record : records) {
        try {
            switch (record.state) {
            case core::Record::State::Owned:
                continue;
            case core::Record::State::Configured:
            case core::Record::State::Detaching:
                log::info("finishing an attach or detach a restart interrupted dev=loop{} diskseq={}",
                          record.info.number, record.info.diskseq);
                releaseRecorded(record);
                break;
            case core::Record::State::Intent:
                // Matched by the intent's unique tag: another record naming the same
                // number may be stale (its device released long ago).
                releaseIntent(record, adopted);
                break;
            }
            s_.records.remove(record);
        } catch (const std::exception& e) {
            // Kept: the next start tries again rather than forget a device.
            log::error("recovery of dev=loop{} diskseq={} failed, record kept: {}", record.info.number,
                       record.info.diskseq, e.what());
        }
    }
    return std::move(clients_);
}

// Adopts an owned device, or releases it when it cannot be adopted (a device loopd
// owned but does not list would be an orphan). True when adopted.
bool Recovery::adoptOrRelease(const core::Record& record, Reopened& reopened)
{
    try {
        return adopt(record, reopened);
    } catch (const std::exception& e) {
        log::error("cannot adopt dev=loop{} diskseq={}: {}; releasing it", record.info.number, record.info.diskseq,
                   e.what());
    }
    try {
        releaseRecorded(record);
        s_.records.remove(record);
    } catch (const std::exception& e) {
        log::error("cannot release dev=loop{} either, record kept: {}", record.info.number, e.what());
    }
    return false;
}

bool Recovery::adopt(const core::Record& record, Reopened& reopened)
{
    const auto before = reopened.before;
    if (reopened.failed)
        std::rethrow_exception(reopened.failed);
    const bool readded = reopened.readded;
    const bool locked = reopened.locked;
    auto& fd = reopened.fd;
    if (!fd) {
        log::info("not adopting dev=loop{} diskseq={}: released or replaced while loopd was not running",
                  record.info.number, record.info.diskseq);
        s_.records.remove(record);
        return false;
    }
    Device device;
    device.info = record.info;
    // A device loopd let go of (Detach deferred, lifetime=fd after Open) is not
    // held again: loopd's fd would keep the kernel from releasing it.
    if (record.letGo)
        fd->reset();
    device.lockFd = std::make_shared<UniqueFd>(std::move(*fd));
    if (!locked && *device.lockFd)
        lockLater(device.lockFd, record.info.number);
    device.options.ref = record.ref;
    device.options.lifetime = record.lifetime;
    device.options.autoclear = record.info.autoclear;
    device.options.hidden = record.hidden;
    // Known since start-up (udevWatch_): asking udevd's socket for each of 4096
    // devices was a socket, connect and close each.
    device.source = s_.udevRunning ? EventSource::Udev : EventSource::Kernel;
    device.owner = record.owner;
    device.ownerUid = record.ownerUid;
    // Re-added partitions are not ready before udev has processed them.
    device.state = readded ? DeviceState::Attaching : DeviceState::Ready;
    device.token = record.token;
    device.tag = record.fileName;
    device.readyTimestamp = readded ? 0 : std::max<uint64_t>(record.readyTimestamp, 1);
    device.startedUsec = readded ? before : 0;
    device.request = readded ? s_.nextId() : 0; // a foreign detach meanwhile settles it
    const auto diskseq = record.info.diskseq;
    // A record of an older loopd, whose refs were looser, or links that collide
    // with a device adopted before: the device is adopted all the same, unnamed.
    try {
        if (!device.options.ref.empty() && !core::isValidRef(device.options.ref))
            throw Error(Errc::InvalidArgument, "not a valid ref any more");
        if (!device.options.ref.empty() && s_.table.refInUse(device.options.ref))
            throw Error(Errc::InvalidArgument, "ref '" + device.options.ref + "' names another adopted device");
        s_.table.checkRef(device.options.ref, device.info.partitions);
    } catch (const Error& e) {
        log::warn("adopting dev=loop{} diskseq={} without its ref: {}", record.info.number, diskseq, e.what());
        device.options.ref.clear();
    }
    s_.table.add(std::move(device));
    auto& stored = *s_.table.find(diskseq);
    log::Scope about{stored.about()};
    if (readded) {
        readded_.emplace(stored.request, Readded{diskseq, record.readyTimestamp});
        log::info("adopted dev={} owner={} uid={}; listed once udev has its re-added partitions", stored.describe(),
                  record.owner, record.ownerUid);
        return true;
    }
    exportDevice(s_, stored);
    log::info("adopted dev={} owner={} uid={}", stored.describe(), record.owner, record.ownerUid);
    if (stored.tiedToClient())
        clients_.push_back(diskseq);
    return true;
}

// LOCK_SH on a thread of its own, which waits as long as the holder of LOCK_EX
// likes: it stalls nobody, and is abandoned if loopd stops first. The fd stays
// open while it waits (the shared_ptr), even if the device goes meanwhile.
void Recovery::lockLater(const std::shared_ptr<UniqueFd>& fd, unsigned number)
{
    log::info("dev=loop{} is locked by someone else: loopd takes its hold once they let go", number);
    s_.workers.spawn([fd, number] {
        try {
            kernel::lockFd(fd->get(), LOCK_SH);
        } catch (const std::exception& e) {
            log::warn("cannot hold dev=loop{}: {}", number, e.what());
        }
        return WorkerPool::Continuation([] {});
    });
}

void Recovery::awaitReadded(const std::function<void(unsigned)>& resync)
{
    const auto now = core::Clock::now();
    // A copy: settling lists a device at once when nothing is missing (and erases it).
    const auto waiting = readded_;
    for (const auto& [id, readded] : waiting) {
        const auto& device = *s_.table.find(readded.diskseq);
        const auto number = device.info.number;
        s_.settle(s_.registry.expect(id, core::Goal::Ready, device.watch(), now + 5s, now + nudgeAfter));
        resync(number); // the disk's events came before the crash: its database entry speaks for them
    }
}

bool Recovery::settle(const core::Outcome& outcome)
{
    auto node = readded_.extract(outcome.request);
    if (node.empty())
        return false;
    const auto [diskseq, readyTimestamp] = node.mapped();
    auto* device = s_.table.find(diskseq);
    if (!device || device->state != DeviceState::Attaching)
        return true;
    log::Scope about{device->about()};
    if (outcome.kind == core::Outcome::Kind::Changed) {
        if (onReleased)
            onReleased(diskseq);
        return true;
    }
    if (outcome.kind != core::Outcome::Kind::Ready)
        log::warn("re-added partitions of dev={} not confirmed by udev within 5 s; listed all the same",
                  device->describe());
    s_.table.markReady(diskseq, readyTimestamp);
    exportDevice(s_, *device);
    s_.manager->devicesChanged();
    log::info("dev={} listed again: udev has its re-added partitions", device->describe());
    if (onListed)
        onListed(diskseq);
    return true;
}

} // namespace loopd::service
