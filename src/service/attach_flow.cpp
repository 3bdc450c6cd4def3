#include "attach_flow.hpp"

#include "attach_sequence.hpp"
#include "errors.hpp"
#include "kernel/loop_device.hpp"
#include "kernel/sysfs.hpp"
#include "udev_tags.hpp"

#include <loopd/log.hpp>

#include <algorithm>

namespace loopd::service {
namespace {

// "12.3": milliseconds from start to then, or "-" for a step that did not happen.
std::string millisBetween(core::Clock::time_point start, core::Clock::time_point then)
{
    if (then == core::Clock::time_point{})
        return "-";
    return fmt::format("{:.1f}", std::chrono::duration<double, std::milli>(then - start).count());
}

std::string partitionList(const DeviceInfo& info)
{
    if (info.partitions.empty())
        return "none";
    std::string list;
    for (const auto number : info.partitions)
        list += (list.empty() ? "p" : " p") + std::to_string(number);
    return list;
}

// Which events count for a request: udev's when it runs (and was not declined).
EventSource eventSourceFor(ReadinessMode mode, bool udev)
{
    if (mode == ReadinessMode::Udev && !udev)
        throw Error(Errc::Failed, "readiness=udev was asked for, but no udevd is running to confirm it");
    return mode == ReadinessMode::Kernel || !udev ? EventSource::Kernel : EventSource::Udev;
}

// `losetup -d` of a device loopd holds open only sets autoclear and sends no
// event; an autoclear loopd was not asked for is someone else's detach.
bool releasedMeanwhile(unsigned number, const AttachOptions& options)
{
    return !options.autoclear && kernel::sysfsAutoclear(number).value_or(true);
}

} // namespace

AttachFlow::AttachFlow(Services& services, Callers& callers) : s_(services), callers_(callers) {}

void AttachFlow::start(AttachResult&& result, const CallOrigin& from, std::string what, Source source,
                       const core::OptionMap& optionMap)
{
    const auto& sender = from.sender;
    AttachOptions options;
    EventSource events;
    try {
        if (s_.stopping)
            throw Error(Errc::Failed, "loopd is stopping");
        options = core::parseAttachOptions(optionMap);
        // Refused early; reserved only once authorized.
        if (!options.ref.empty() && s_.table.refInUse(options.ref))
            throw Error(Errc::InvalidArgument, "ref '" + options.ref + "' is already used by another loopd device");
        s_.table.checkRef(options.ref);
        events = eventSourceFor(options.readiness, s_.udevRunning);
    } catch (const Error& e) {
        throw Error(e.code(), "cannot attach " + what + ": " + e.what());
    }
    // From here on nothing throws: the result belongs to the pending call.
    const auto id = s_.nextId();
    const auto now = core::Clock::now();
    Pending job{std::move(result), sender, std::move(what), std::move(source), std::move(options), events};
    job.started = now;
    job.startedRealtimeUsec = realtimeUsec();
    job.deadline = now + job.options.timeout;
    job.record.token = makeUuid();
    job.record.fileName = core::loFileName(job.record.token);
    job.record.ref = job.options.ref;
    job.record.lifetime = job.options.lifetime;
    job.record.owner = sender;
    job.about = {.ref = job.options.ref, .request = id};
    const auto denied = "attaching " + job.what;
    // For polkit's rules and the agent's prompt: what is attached, and how.
    Callers::Details details{{"loopd.file", job.what}, {"loopd.read-only", job.options.readOnly ? "true" : "false"}};
    if (!job.options.ref.empty())
        details.emplace("loopd.ref", job.options.ref);
    attaches_.emplace(id, std::move(job));
    callers_.authorize(from, core::Action::Attach, denied, std::move(details),
                       [this, id](std::exception_ptr error, Caller caller) {
                           if (error)
                               return failed(id, error);
                           authorized(id, caller);
                       });
}

// Authorization first, state second: nothing is reserved before this point.
void AttachFlow::authorized(core::RequestId id, const Caller& caller)
{
    auto& job = attaches_.at(id);
    job.about.callerUid = caller.uid;
    job.times.authorized = core::Clock::now();
    log::Scope about{job.about};
    try {
        if (s_.stopping)
            throw Error(Errc::Failed, "cannot attach " + job.what + ": loopd is stopping");
        // The caller left while polkit thought: cancelling the check does not stop a
        // rule that is already running (polkitd runs rules to the end, then answers
        // yes). Nobody would get the reply, so nothing is attached for it.
        if (job.vanished)
            throw Error(Errc::Failed, "cannot attach " + job.what + ": its caller " + job.sender +
                                          " left the bus before the attach was authorized");
        // A path means what it means to the caller: loopd cannot resolve it in
        // another process's root or mount namespace (a chroot, PrivateTmp=,
        // InaccessiblePaths=), so it does not resolve it in its own instead.
        if (std::holds_alternative<std::string>(job.source) && !caller.privileged && !caller.sameMounts)
            throw Error(Errc::AccessDenied, "cannot attach " + job.what +
                                                ": the path would be resolved in loopd's root and mount namespace, "
                                                "not the caller's; open the file and pass the fd with AttachFd "
                                                "(as loopctl attach does)");
        if (!caller.privileged && heldBy(caller.uid) >= s_.limits.devicesPerUser)
            throw Error(Errc::LimitExceeded, "cannot attach " + job.what + ": uid " + std::to_string(caller.uid) +
                                                 " holds or is attaching " + std::to_string(s_.limits.devicesPerUser) +
                                                 " loop devices already (max-devices-per-user)");
        // No identity to open the file with: refused, never a stand-in group.
        if (!caller.privileged && caller.groups.empty())
            throw Error(Errc::Failed, "cannot attach " + job.what + ": the bus did not report the groups of uid " +
                                          std::to_string(caller.uid));
        s_.table.reserveRef(job.options.ref);
        job.reserved = true;
    } catch (...) {
        return failed(id, std::current_exception());
    }
    job.ownerUid = caller.uid;
    job.record.ownerUid = caller.uid;
    log::info("attach of {} asked by uid={} sender={}{}{}", job.what, caller.uid, job.sender,
              job.options.ref.empty() ? "" : " ref=" + job.options.ref, job.options.readOnly ? " read-only" : "");
    // The readiness deadline starts now: time a user spends answering polkit's
    // password prompt is not the kernel's.
    job.deadline = core::Clock::now() + job.options.timeout;
    run(id, caller);
}

void AttachFlow::run(core::RequestId id, const Caller& caller)
{
    auto& job = attaches_.at(id);
    struct Work {
        std::string path;
        UniqueFd fd;
        std::string what;
        AttachOptions options;
        kernel::Credentials credentials;
        core::Record record;
        unsigned maxPartitions = 0;
        core::Clock::time_point deadline;
    };
    auto work = std::make_shared<Work>();
    work->maxPartitions = s_.limits.partitions;
    work->deadline = job.deadline;
    if (auto* path = std::get_if<std::string>(&job.source))
        work->path = *path;
    else
        work->fd = UniqueFd(std::get<sdbus::UnixFd>(job.source).release());
    job.working = true;
    work->what = job.what;
    work->options = job.options;
    work->record = job.record;
    // The groups of the calling process as the bus saw them (its gid among them):
    // fsgid is one of them and the rest are supplementary, so access checks see
    // exactly the process's groups (none known: refused in authorized(), unless
    // privileged, whose open needs no identity switch).
    work->credentials = kernel::Credentials{caller.uid,
                                            caller.groups.empty() ? 0 : caller.groups.front(),
                                            {caller.groups.begin(), caller.groups.end()},
                                            caller.privileged};

    // Worker thread: only the captured work and pure kernel calls.
    // A thread of its own: opening and probing the caller's image may block for as
    // long as its filesystem likes (a FUSE read that never returns). Past the
    // deadline the call is answered without it (onTime) and whatever it did is
    // undone when it returns. It copies what it uses (the record store is a
    // directory name), as it may return after loopd let go of everything.
    s_.workers.spawn([this, id, work, records = s_.records, about = job.about]() -> WorkerPool::Continuation {
        log::Scope scope{about};
        try {
            auto backing = work->fd ? checkBacking(std::move(work->fd), work->what, work->options)
                                    : openBacking(work->path, work->options, work->credentials);
            auto attached = std::make_shared<Attached>(
                attach(backing, work->options, work->record, records, work->maxPartitions, work->deadline));
            return [this, id, attached, work] {
                auto& job = attaches_.at(id);
                job.working = false;
                job.record = work->record;
                if (job.answered)
                    return dropLate(id, attached);
                configured(id, attached);
            };
        } catch (...) {
            return [this, id, error = std::current_exception()] {
                attaches_.at(id).working = false;
                failed(id, error);
            };
        }
    });
}

// The kernel work came back after its caller was answered with Timeout: undo it.
void AttachFlow::dropLate(core::RequestId id, const std::shared_ptr<Attached>& attached)
{
    auto node = attaches_.extract(id);
    auto& job = node.mapped();
    log::Scope about{job.about};
    log::warn("attach of {} came back after its deadline dev=loop{} diskseq={}: undoing it", job.what,
              attached->info.number, attached->info.diskseq);
    if (job.reserved)
        s_.table.releaseRef(job.options.ref);
    s_.workers.spawn([attached, record = job.record, records = s_.records] {
        undo(std::move(attached->lockFd), attached->info);
        records.remove(record);
        return WorkerPool::Continuation([] {});
    });
}

// Devices a uid holds in the table, and attaches of its own still in the kernel.
std::size_t AttachFlow::heldBy(uint32_t uid) const
{
    const auto working = std::count_if(attaches_.begin(), attaches_.end(), [uid](const auto& entry) {
        return entry.second.working && entry.second.ownerUid == uid;
    });
    return s_.table.countOwnedBy(uid) + static_cast<std::size_t>(working);
}

bool AttachFlow::idle() const
{
    return std::all_of(attaches_.begin(), attaches_.end(), [](const auto& entry) { return entry.second.answered; });
}

std::optional<core::Clock::time_point> AttachFlow::nextDeadline() const
{
    std::optional<core::Clock::time_point> next;
    for (const auto& [id, job] : attaches_)
        if (job.working && !job.answered && (!next || job.deadline < *next))
            next = job.deadline;
    return next;
}

void AttachFlow::onTime(core::Clock::time_point now)
{
    for (auto& [id, job] : attaches_) {
        if (!job.working || job.answered || job.deadline > now)
            continue;
        job.answered = true;
        log::Scope about{job.about};
        const auto message = "cannot attach " + job.what +
                             ": the backing file did not answer within the deadline; whatever was set up is undone "
                             "once it does";
        log::warn("attach timed out in the kernel sender={}: {}", job.sender, message);
        job.result.returnError(makeDbusError(Errc::Timeout, message));
    }
}

void AttachFlow::configured(core::RequestId id, const std::shared_ptr<Attached>& attached)
{
    auto& job = attaches_.at(id);
    job.times.configured = attached->configured;
    job.times.partitionsAdded = attached->partitionsAdded;
    job.about.diskseq = attached->info.diskseq;
    job.about.device = kernel::loopDevNode(attached->info.number);
    log::Scope about{job.about};
    Device device;
    device.info = attached->info;
    device.lockFd = std::make_shared<UniqueFd>(std::move(attached->lockFd));
    device.options = job.options;
    device.source = job.events;
    device.owner = job.sender;
    device.ownerUid = job.ownerUid;
    device.token = job.record.token;
    device.tag = job.record.fileName;
    device.startedUsec = job.startedRealtimeUsec;
    device.request = id;
    const auto info = device.info;
    const auto lockFd = device.lockFd;
    try {
        s_.table.add(std::move(device)); // refuses a ref whose partition links collide
    } catch (...) {
        // Not in the table: undone here, the ref given back, the call failed.
        auto error = std::current_exception();
        const auto record = job.record;
        return s_.workers.spawn([this, id, error, info, lockFd, record, records = s_.records] {
            undo(std::move(*lockFd), info);
            records.remove(record);
            return WorkerPool::Continuation([this, id, error] { failed(id, error); });
        });
    }
    job.diskseq = info.diskseq;
    log::info("configured dev={} diskseq={} file={} offset={} size-limit={}{}{} partitions added: {}",
              kernel::loopDevNode(info.number), info.diskseq, job.what, info.offset, info.sizeLimit,
              info.readOnly ? " read-only" : "", info.directIo ? " direct-io" : "", partitionList(info));
    if (s_.stopping)
        return abandon(id, Errc::Failed, "loopd is stopping", true);
    // A `losetup -d` between LOOP_CONFIGURE and now closed the node before the
    // table's inotify watch on it existed: its only trace is autoclear.
    if (releasedMeanwhile(info.number, job.options))
        return abandon(id, Errc::DeviceChanged, "was detached or replaced by someone else while attaching", false);
    // Every event the kernel sent for this attach is in the sockets by now.
    s_.drainEvents();
    auto& stored = *s_.table.find(info.diskseq);
    if (job.options.hidden) // before readiness: udev must see it in the events it is asked for
        s_.udevTags->write(info.diskseq, {{"UDISKS_IGNORE", "1"},
                                          {"LOOPD_REF", job.options.ref},
                                          {"LOOPD_OWNER_UID", std::to_string(job.ownerUid)}});
    const auto watch = stored.watch();
    s_.settle(s_.registry.expect(id, core::Goal::Ready, watch, job.deadline, core::Clock::now() + nudgeAfter));
    if (attaches_.count(id) && !attaches_.at(id).abandoning)
        s_.afterConfigure(watch);
}

void AttachFlow::ready(core::RequestId id)
{
    auto& job = attaches_.at(id);
    log::Scope about{job.about};
    // A `losetup -d` meanwhile only set autoclear (loopd holds the device open)
    // and sent no event: look before saying ready.
    if (const auto* device = s_.table.find(job.diskseq); releasedMeanwhile(device->info.number, device->options))
        return abandon(id, Errc::DeviceChanged, "was detached or replaced by someone else while attaching", false);
    if (awaitUdevTags(id))
        return;
    auto node = attaches_.extract(id);
    auto& done = node.mapped();
    s_.table.markReady(done.diskseq, realtimeUsec());
    auto& device = *s_.table.find(done.diskseq);
    writeRecord(s_.records, device.record(core::Record::State::Owned));
    exportDevice(s_, device);
    if (s_.watchOpens) // before the reply: an open by the caller that follows it is seen
        s_.watchOpens(device);
    replyReady(done.result, device);
    s_.manager->devicesChanged();
    const auto& t = done.times;
    const auto at = [&done](core::Clock::time_point then) { return millisBetween(done.started, then); };
    log::info("attached dev={} diskseq={} partitions={} file={} uid={} sender={} in {} ms: authorized {}, "
              "configured {}, partitions added {}, disk ready {}, last partition ready {}, reply {} ({} {} events)",
              kernel::loopDevNode(device.info.number), done.diskseq, device.info.partitions.size(), done.what,
              done.ownerUid, done.sender, at(core::Clock::now()), at(t.authorized), at(t.configured),
              at(t.partitionsAdded), at(t.diskEvent), device.info.partitions.empty() ? "-" : at(t.lastPartitionEvent),
              at(core::Clock::now()), t.events, done.events == EventSource::Udev ? "udev" : "kernel");
    if (done.vanished && device.tiedToClient() && onOrphaned)
        onOrphaned(done.diskseq);
}

// A hidden device is ready once udev has processed its properties too: events
// asked for after they were written (UdevTags). True while that is awaited.
bool AttachFlow::awaitUdevTags(core::RequestId id)
{
    auto& job = attaches_.at(id);
    if (!job.options.hidden || job.tagged)
        return false;
    job.tagged = true;
    const auto& device = *s_.table.find(job.diskseq);
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(job.deadline - core::Clock::now());
    s_.udevTags->confirm(device.info.number, job.diskseq, device.info.partitions, device.source,
                         std::max(left, std::chrono::milliseconds(1)), [this, id](UdevTags::Confirmation result) {
                             const auto it = attaches_.find(id);
                             if (it == attaches_.end() || it->second.abandoning)
                                 return;
                             if (result == UdevTags::Confirmation::TimedOut)
                                 return abandon(id, Errc::Timeout,
                                                "udev did not process its properties (hidden) in time", true);
                             if (result == UdevTags::Confirmation::NotImported)
                                 return abandon(id, Errc::Failed,
                                                "udev processed it without loopd's properties (hidden): the rule "
                                                "90-loopd.rules is not in udev's rules directories",
                                                true);
                             ready(id);
                         });
    return true;
}

// Before configure (or configure failed): nothing of the attach is in the table.
void AttachFlow::failed(core::RequestId id, std::exception_ptr error)
{
    auto node = attaches_.extract(id);
    auto& job = node.mapped();
    log::Scope about{job.about};
    if (job.reserved) // another attach's reservation of the same name is not ours to drop
        s_.table.releaseRef(job.options.ref);
    if (job.answered)
        return;
    auto reply = toDbusError(error, "cannot attach " + job.what);
    if (reply.getMessage().find(job.what) == std::string::npos) // NoFreeDevice and the like name no file
        reply = sdbus::Error(reply.getName(), "cannot attach " + job.what + ": " + reply.getMessage());
    log::warn("attach failed file={} sender={}: {}", job.what, job.sender, reply.getMessage());
    job.result.returnError(reply);
}

// The attachment was configured but will not become ready: undo it (or, when
// someone else took the device, only let go of it), then fail the call. At most
// once per attach: a timeout and a SIGTERM may both ask.
void AttachFlow::abandon(core::RequestId id, Errc code, const std::string& why, bool clear)
{
    auto& job = attaches_.at(id);
    if (job.abandoning)
        return;
    log::Scope about{job.about};
    job.abandoning = true;
    s_.registry.cancel(id);
    s_.table.setState(job.diskseq, DeviceState::Detaching);
    const auto& device = *s_.table.find(job.diskseq);
    s_.workers.spawn([this, id, code, clear, fd = device.lockFd, info = device.info,
                      message = device.describe() + " for " + job.what + ": " + why,
                      record = device.record(core::Record::State::Configured), records = s_.records]() mutable {
        if (clear)
            message += "; " + describe(undo(std::move(*fd), info), info);
        else
            letGo(std::move(*fd), info);
        records.remove(record);
        return WorkerPool::Continuation([this, id, code, message] {
            auto node = attaches_.extract(id);
            auto& job = node.mapped();
            log::Scope about{job.about};
            deviceGone(job.diskseq, message);
            s_.table.remove(job.diskseq, RemovalReason::Abandoned);
            log::warn("attach abandoned: {}", message);
            job.result.returnError(makeDbusError(code, message));
        });
    });
}

bool AttachFlow::settle(const core::Outcome& outcome)
{
    using Kind = core::Outcome::Kind;
    const auto id = outcome.request;
    if (waiters_.count(id)) {
        settleWaiter(id, outcome);
        return true;
    }
    const auto it = attaches_.find(id);
    if (it == attaches_.end())
        return false;
    if (it->second.abandoning)
        return true;
    if (outcome.kind == Kind::Ready)
        ready(id);
    else if (outcome.kind == Kind::Changed)
        abandon(id, Errc::DeviceChanged, "was detached or replaced by someone else while attaching", false);
    else
        abandon(id, Errc::Timeout, "was not ready in time", true);
    return true;
}

void AttachFlow::sawEvent(const Uevent& event)
{
    if (event.diskseq == 0 || (event.action != UeventAction::Add && event.action != UeventAction::Change))
        return;
    for (auto& [id, job] : attaches_) {
        if (job.diskseq != event.diskseq || job.events != event.source)
            continue;
        auto& t = job.times;
        ++t.events;
        if (event.partition == 0 && t.diskEvent == core::Clock::time_point{})
            t.diskEvent = core::Clock::now();
        else if (event.partition != 0)
            t.lastPartitionEvent = core::Clock::now();
    }
}

void AttachFlow::callerLeft(const std::string& sender)
{
    for (auto& [id, job] : attaches_)
        if (job.sender == sender)
            job.vanished = true;
}

void AttachFlow::stop()
{
    for (auto& [id, waiter] : waiters_) {
        s_.registry.cancel(id);
        waiter.result.returnError(makeDbusError(Errc::Failed, "diskseq " + std::to_string(waiter.diskseq) +
                                                                  " is no longer waited for: loopd is stopping"));
    }
    waiters_.clear();
    std::vector<core::RequestId> configured;
    for (const auto& [id, job] : attaches_)
        if (job.diskseq != 0)
            configured.push_back(id);
    for (const auto id : configured)
        abandon(id, Errc::Failed, "loopd is stopping", true);
}

} // namespace loopd::service
