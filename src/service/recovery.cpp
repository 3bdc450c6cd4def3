#include "recovery.hpp"

#include "attach_sequence.hpp"
#include "bus_objects.hpp"
#include "core/options.hpp"
#include "uevent/monitor.hpp"

#include <loopd/error.hpp>
#include <loopd/log.hpp>

#include <algorithm>

namespace loopd::service {

using namespace std::chrono_literals;

Recovery::Recovery(Services& services) : s_(services) {}

std::vector<uint64_t> Recovery::run()
{
    // Every by-ref link is of an earlier run and may name a loop number that is
    // someone else's attachment by now: adopted devices are linked again.
    s_.table.links().removeAll();
    auto records = s_.records.loadAll();
    // Owned devices first: their numbers are not searched for a crash's leftovers.
    std::set<unsigned> adopted;
    for (const auto& record : records)
        if (record.state == core::Record::State::Owned && adoptOrRelease(record))
            adopted.insert(record.info.number);
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
bool Recovery::adoptOrRelease(const core::Record& record)
{
    try {
        return adopt(record);
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

bool Recovery::adopt(const core::Record& record)
{
    const auto before = realtimeUsec();
    bool readded = false;
    auto fd = reopenOwned(record, readded);
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
    device.options.ref = record.ref;
    device.options.lifetime = record.lifetime;
    device.options.autoclear = record.info.autoclear;
    device.options.hidden = record.hidden;
    // Known since start-up (udevWatch_): asking udevd's socket for each of 4096
    // devices was a socket, connect and close each.
    device.source = s_.udevRunning ? EventSource::Udev : EventSource::Kernel;
    device.owner = record.owner;
    device.ownerUid = record.ownerUid;
    device.state = DeviceState::Ready;
    device.token = record.token;
    device.tag = record.fileName;
    device.readyTimestamp = std::max<uint64_t>(record.readyTimestamp, 1);
    device.startedUsec = readded ? before : 0;
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
    exportDevice(s_, stored);
    if (readded)
        readded_.push_back(diskseq);
    log::Scope about{stored.about()};
    log::info("adopted dev={} owner={} uid={}", stored.describe(), record.owner, record.ownerUid);
    if (stored.tiedToClient())
        clients_.push_back(diskseq);
    return true;
}

void Recovery::awaitReadded(const std::function<void(int)>& pump, const std::function<void(unsigned)>& resync)
{
    if (readded_.empty())
        return;
    const auto deadline = core::Clock::now() + 5s;
    std::set<core::RequestId> waiting;
    for (const auto diskseq : readded_) {
        const auto id = s_.nextId();
        waiting.insert(id);
        adopting_.insert(id);
        s_.settle(s_.registry.expect(id, core::Goal::Ready, s_.table.find(diskseq)->watch(), deadline));
    }
    auto pending = [&] {
        return std::any_of(waiting.begin(), waiting.end(), [&](auto id) { return adopting_.count(id) != 0; });
    };
    while (pending()) {
        for (const auto diskseq : readded_)
            if (const auto* device = s_.table.find(diskseq))
                resync(device->info.number);
        if (!pending())
            break;
        pump(100);
        s_.settle(s_.registry.onTime(core::Clock::now()));
    }
    readded_.clear();
}

bool Recovery::settle(const core::Outcome& outcome)
{
    if (!adopting_.erase(outcome.request))
        return false;
    if (outcome.kind != core::Outcome::Kind::Ready)
        log::warn("re-added partitions of dev=loop{} not confirmed by udev", outcome.watch.number);
    return true;
}

} // namespace loopd::service
