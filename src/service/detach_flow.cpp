#include "detach_flow.hpp"

#include "attach_sequence.hpp"
#include "device_objects.hpp"
#include "errors.hpp"
#include "kernel/loop_device.hpp"
#include "udev_tags.hpp"

#include <loopd/error.hpp>
#include <loopd/log.hpp>

namespace loopd::service {

DetachFlow::DetachFlow(Services& services, Callers& callers) : s_(services), callers_(callers) {}

void DetachFlow::request(VoidResult&& result, const CallOrigin& from, uint64_t diskseq, const core::OptionMap& options)
{
    const auto& sender = from.sender;
    const auto name = "diskseq " + std::to_string(diskseq);
    core::DetachOptions parsed;
    try {
        parsed = core::parseDetachOptions(options);
    } catch (const Error& e) {
        throw Error(e.code(), "cannot detach " + name + ": " + e.what());
    }
    const auto* device = s_.table.find(diskseq);
    if (!device)
        throw Error(Errc::NotFound, "no loopd device with " + name);
    const auto id = s_.nextId();
    auto& pending =
        pending_.emplace(id, Pending{std::move(result), diskseq, RemovalReason::Detached, sender}).first->second;
    pending.deferred = parsed.deferred;
    pending.about = device->about();
    pending.about.request = id;
    pending.started = core::Clock::now();
    // Authorization first: until it is given, the device stays as it is (its
    // owner's own Detach is not refused as Busy meanwhile).
    const auto what = "detaching " + device->describe();
    Callers::Details details{{"loopd.device", device->describe()},
                             {"loopd.file", device->info.backingFile},
                             {"loopd.owner-uid", std::to_string(device->ownerUid)}};
    callers_.authorize(
        from, core::Action::Detach, what, std::move(details),
        [this, id](std::exception_ptr error, Caller caller) {
            pending_.at(id).about.callerUid = caller.uid;
            if (error)
                return reply(id, error);
            start(id);
        },
        device->ownerUid);
}

void DetachFlow::own(uint64_t diskseq, RemovalReason reason)
{
    const auto id = s_.nextId();
    auto& pending = pending_.emplace(id, Pending{std::nullopt, diskseq, reason, {}}).first->second;
    if (const auto* device = s_.table.find(diskseq))
        pending.about = device->about();
    pending.about.request = id;
    pending.started = core::Clock::now();
    start(id);
}

void DetachFlow::clientLeft(const std::string& name)
{
    for (const auto diskseq : s_.table.diskseqs()) {
        auto& device = *s_.table.find(diskseq);
        if (device.owner != name || !device.tiedToClient())
            continue;
        device.ownerGone = true; // a detach in progress that is refused detaches it after all
        if (device.state != DeviceState::Ready)
            continue;
        log::info("client left the bus, detaching its device sender={} diskseq={}", name, diskseq);
        own(diskseq, RemovalReason::ClientVanished);
    }
}

void DetachFlow::unlessOwnerAlive(uint64_t diskseq)
{
    const auto owner = s_.table.find(diskseq)->owner;
    callers_.checkAlive(owner, [this, diskseq, owner](bool alive) {
        const auto* device = s_.table.find(diskseq);
        if (alive || !device || device->state != DeviceState::Ready)
            return;
        log::info("client left the bus while loopd was down sender={} diskseq={}", owner, diskseq);
        own(diskseq, RemovalReason::ClientVanished);
    });
}

void DetachFlow::start(core::RequestId id)
{
    const auto& pending = pending_.at(id);
    log::Scope about{pending.about};
    const auto diskseq = pending.diskseq;
    auto* device = s_.table.find(diskseq);
    try {
        if (!device)
            throw Error(Errc::NotFound, "diskseq " + std::to_string(diskseq) + " is no longer attached");
        if (device->state != DeviceState::Ready)
            throw Error(Errc::Busy,
                        device->describe() + (device->state == DeviceState::Attaching  ? " is still attaching"
                                              : device->state == DeviceState::Resizing ? " is being resized"
                                                                                       : " is being detached already"));
        // Its release is the kernel's already (an earlier deferred detach): loopd
        // holds no fd of it any more that a clear could go through.
        if (!*device->lockFd) {
            if (!pending_.at(id).deferred)
                throw Error(Errc::Busy, device->describe() + " is in use; its release is deferred to its last close");
            return reply(id, nullptr);
        }
    } catch (...) {
        return reply(id, std::current_exception());
    }
    device->state = DeviceState::Detaching;
    pending_.at(id).startedUsec = realtimeUsec();
    if (pending.sender.empty())
        log::info("detaching dev={} diskseq={}: {}", kernel::loopDevNode(device->info.number), diskseq,
                  reasonName(pending.reason));
    else
        log::info("detach of dev={} diskseq={} asked by uid={} sender={}", kernel::loopDevNode(device->info.number),
                  diskseq, pending.about.callerUid.value_or(0), pending.sender);
    writeRecord(s_.records, device->record(core::Record::State::Detaching));
    // A thread of its own: removing partitions waits seconds for transient
    // openers, and taking a device back reads the caller's image.
    s_.workers.spawn([this, id, fd = device->lockFd, info = device->info, deferred = pending.deferred,
                      about = pending.about] {
        log::Scope scope{about};
        DetachSteps steps;
        try {
            const auto outcome = deferred ? detachDeferred(*fd, info, steps) : service::detach(*fd, info, steps);
            return WorkerPool::Continuation([this, id, outcome, steps] { kernelDone(id, nullptr, outcome, steps); });
        } catch (...) {
            return WorkerPool::Continuation([this, id, error = std::current_exception(), steps] {
                kernelDone(id, error, DetachOutcome::TakenBack, steps);
            });
        }
    });
}

void DetachFlow::kernelDone(core::RequestId id, std::exception_ptr error, DetachOutcome outcome, DetachSteps steps)
{
    auto& pending = pending_.at(id);
    pending.steps = steps;
    log::Scope about{pending.about};
    auto& device = *s_.table.find(pending.diskseq);
    if (error) { // nothing was changed: loopd still owns the device, as it was
        device.state = DeviceState::Ready;
        writeRecord(s_.records, device.record(core::Record::State::Owned));
        if (s_.watchOpens)
            s_.watchOpens(device);
        reply(id, error);
        return detachIfOrphaned(device);
    }
    if (outcome == DetachOutcome::TakenBack)
        return takenBack(id);
    if (outcome == DetachOutcome::Deferred && pending_.at(id).deferred)
        return deferredToLastClose(id);
    if (outcome == DetachOutcome::Deferred) {
        const auto diskseq = pending_.at(id).diskseq;
        reply(id, std::make_exception_ptr(Error(
                      Errc::Busy, device.describe() + " is open elsewhere and could not be taken back; the kernel "
                                                      "releases it at its last close")));
        return s_.table.remove(diskseq, RemovalReason::Autoclear);
    }
    const auto now = core::Clock::now();
    s_.settle(s_.registry.expect(id, core::Goal::Released, device.watch(), now + releaseTimeout, now + nudgeAfter));
}

// Open elsewhere: the partitions were removed and added again, so the Busy reply
// waits until udev has them again, as "stays ready" promises. Only udev entries
// written after the detach began count (startedUsec).
void DetachFlow::takenBack(core::RequestId id)
{
    auto& pending = pending_.at(id);
    auto& device = *s_.table.find(pending.diskseq);
    pending.takingBack = true;
    device.startedUsec = pending.startedUsec;
    const auto now = core::Clock::now();
    s_.settle(s_.registry.expect(id, core::Goal::Ready, device.watch(), now + releaseTimeout, now + nudgeAfter));
    if (pending_.count(id))
        s_.resync(device.info.number);
}

// Detach deferred, in use: the kernel releases the device at its last close. It
// stays listed, owned and Ready, with Autoclear=true; that release comes as the
// kernel's events for it (change, partition removes), after which sysfs shows no
// backing file: EventRepair::checkOwned reports it with reason autoclear (the
// device's options say autoclear now). No polling: the uevents carry it.
void DetachFlow::deferredToLastClose(core::RequestId id)
{
    auto& device = *s_.table.find(pending_.at(id).diskseq);
    device.info.autoclear = true;
    device.options.autoclear = true;
    device.state = DeviceState::Ready;
    writeRecord(s_.records, device.record(core::Record::State::Owned));
    log::info("detach deferred to the last close dev={} sender={}", device.describe(), pending_.at(id).sender);
    reply(id, nullptr);
    if (device.object)
        device.object->propertiesChanged({"Autoclear"});
    // Released between loopd's close and now, its events came while it was
    // Detaching and were passed over: look once.
    s_.resync(device.info.number);
}

void DetachFlow::readyAgain(core::RequestId id)
{
    auto& device = *s_.table.find(pending_.at(id).diskseq);
    device.state = DeviceState::Ready;
    writeRecord(s_.records, device.record(core::Record::State::Owned));
    if (s_.watchOpens) // its partitions were removed and added again: new nodes
        s_.watchOpens(device);
    reply(id, std::make_exception_ptr(Error(Errc::Busy, device.describe() + " is open elsewhere; it stays attached "
                                                                            "as it was")));
    detachIfOrphaned(device);
}

// Its client left the bus while the device was being detached (and the detach
// was refused): lifetime=client still holds.
void DetachFlow::detachIfOrphaned(const Device& device)
{
    if (device.ownerGone && device.tiedToClient() && device.state == DeviceState::Ready)
        own(device.info.diskseq, RemovalReason::ClientVanished);
}

bool DetachFlow::settle(const core::Outcome& outcome)
{
    const auto it = pending_.find(outcome.request);
    if (it == pending_.end())
        return false;
    log::Scope about{it->second.about};
    if (it->second.takingBack) {
        if (outcome.kind != core::Outcome::Kind::Ready)
            log::warn("dev=loop{} diskseq={} taken back after a refused detach, but not seen ready again",
                      outcome.watch.number, outcome.watch.diskseq);
        readyAgain(outcome.request);
    } else {
        confirmed(outcome.request, outcome.kind == core::Outcome::Kind::TimedOut);
    }
    return true;
}

void DetachFlow::confirmed(core::RequestId id, bool timedOut)
{
    auto& pending = pending_.at(id);
    const auto diskseq = pending.diskseq;
    const auto reason = timedOut ? RemovalReason::Timeout : pending.reason;
    const auto dev = s_.table.find(diskseq)->describe();
    const auto at = [&pending](core::Clock::time_point then) {
        if (then == core::Clock::time_point{})
            return std::string("-");
        return fmt::format("{:.1f}", std::chrono::duration<double, std::milli>(then - pending.started).count());
    };
    const auto& steps = pending.steps;
    const auto who = pending.sender.empty()
                         ? std::string("loopd itself")
                         : fmt::format("uid={} sender={}", pending.about.callerUid.value_or(0), pending.sender);
    log::info("detached dev={} reason={} by {}{} in {} ms: claims checked {}, cleared {}, released {}, confirmed {}",
              dev, reasonName(reason), who, timedOut ? " (release not confirmed in time)" : "", at(core::Clock::now()),
              at(steps.claimsChecked), at(steps.cleared), at(steps.released), at(core::Clock::now()));
    // udev's properties of a hidden device go before the reply says it is gone
    // (the table's removal below, which also drops them, comes after it).
    if (s_.table.find(diskseq)->options.hidden)
        s_.udevTags->remove(diskseq);
    // Reply first: a Device.Detach call's reply needs its object still registered.
    reply(id, timedOut ? std::make_exception_ptr(Error(Errc::Timeout, dev + " was released, but udev did not "
                                                                            "confirm the removal in time"))
                       : nullptr);
    s_.table.remove(diskseq, reason);
}

void DetachFlow::reply(core::RequestId id, std::exception_ptr error)
{
    auto node = pending_.extract(id);
    auto& pending = node.mapped();
    log::Scope about{pending.about};
    if (error)
        log::warn("detach of diskseq={} refused sender={}: {}", pending.diskseq, pending.sender,
                  toDbusError(error, "cannot detach").getMessage());
    if (!pending.result)
        return;
    if (error)
        pending.result->returnError(toDbusError(error, "cannot detach diskseq " + std::to_string(pending.diskseq)));
    else
        pending.result->returnResults();
}

} // namespace loopd::service
