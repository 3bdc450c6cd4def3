#include "daemon.hpp"

#include "device_objects.hpp"

#include "kernel/backing_file.hpp"
#include "kernel/loop_device.hpp"

#include "errors.hpp"
#include "kernel/sysfs.hpp"

#include <loopd/error.hpp>
#include <loopd/log.hpp>
#include <loopd/signals.hpp>

#include <fcntl.h>
#include <malloc.h>
#include <sys/file.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <filesystem>
#include <optional>
#include <set>
#include <system_error>

namespace loopd::service {
namespace {

using namespace std::chrono_literals;

// Bus messages handled before the loop looks at its other fds again.
constexpr unsigned busMessagesPerTurn = 64;

UniqueFd makeSignalFd()
{
    const auto mask = stopSignals();
    UniqueFd fd(::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
    if (!fd)
        throw std::system_error(errno, std::generic_category(), "signalfd");
    return fd;
}

// One loopd per runtime dir: a second one's recovery would adopt or release what
// the first one owns. The kernel drops the lock at exit, also after SIGKILL.
UniqueFd lockRuntimeDir(const std::string& dir)
{
    std::filesystem::create_directories(dir);
    const auto path = dir + "/lock";
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!fd)
        throw std::system_error(errno, std::generic_category(), "open " + path);
    if (!kernel::tryLockFd(fd.get(), LOCK_EX))
        throw std::runtime_error("another loopd is running with runtime dir " + dir + " (it holds " + path + ")");
    return fd;
}

} // namespace

Daemon::Daemon(DaemonConfig config)
    // Subscribe before anything else, so no event of an attachment can pass unseen.
    : config_(std::move(config)), instanceLock_(lockRuntimeDir(config_.runtimeDir)),
      udevMonitor_(EventSource::Udev, config_.receiveBufferBytes, config_.drops),
      kernelMonitor_(EventSource::Kernel, config_.receiveBufferBytes, config_.kernelDrops), udevWatch_(),
      connection_(sdbus::createSystemBusConnection()),
      busProxy_(sdbus::createProxy(*connection_, "org.freedesktop.DBus", "/org/freedesktop/DBus")),
      workers_(config_.workers), signalFd_(makeSignalFd()), records_(config_.runtimeDir + "/records"),
      table_(RefLinks(config_.runtimeDir + "/by-ref")), udevTags_(config_.udevTagsDir, workers_),
      services_(*connection_, table_, registry_, workers_, records_, *this), callers_(*connection_, *busProxy_),
      attach_(services_, callers_), detach_(services_, callers_), repair_(services_), recovery_(services_),
      find_(services_, callers_), resize_(services_, callers_), open_(services_, callers_),
      autoclear_(services_, loop_),
      udevPresence_(udevWatch_, loop_,
                    {.changed = [this](bool running) { udevChanged(running); },
                     .written = [this](unsigned number, auto now) { repair_.databaseWritten(number, now); },
                     .watchedNumbers = [this] { return registry_.watchedNumbers(); },
                     .fallBack = [this] { attach_.fallBackToKernel(); }})
{
    services_.limits = config_.limits;
    services_.udevTags = &udevTags_;
    services_.settle = [this](const auto& outcomes) { settle(outcomes); };
    services_.resync = [this](unsigned number) { repair_.resync(number); };
    services_.drainEvents = [this] {
        onUevents(kernelMonitor_);
        onUevents(udevMonitor_);
    };
    services_.afterConfigure = [this](const core::Watch& watch) { repair_.afterConfigure(watch); };
    services_.udevRunning = udevPresence_.running();
    services_.watchOpens = [this](const Device& device) { autoclear_.track(device); };
    autoclear_.udevPid = [this] { return udevWatch_.pid(); };
    repair_.onQuirk = [this] {
        if (manager_)
            manager_->kernelQuirksChanged();
    };
    table_.onAdded = [this](const Device& device) { repair_.watch(device); };
    table_.onRemoved = [this](Device& device, RemovalReason reason) { onRemoved(device, reason); };
    attach_.onOrphaned = [this](uint64_t diskseq) { detach_.own(diskseq, RemovalReason::ClientVanished); };

    busProxy_->uponSignal("NameOwnerChanged")
        .onInterface("org.freedesktop.DBus")
        .call([this](const std::string& name, const std::string&, const std::string& newOwner) {
            onNameOwnerChanged(name, newOwner);
        });
    busProxy_->finishRegistration();
    manager_ = std::make_unique<ManagerObject>(*connection_, *this);
    services_.manager = manager_.get();

    loop_.watch(udevMonitor_.fd(), [this] { onUevents(udevMonitor_); });
    loop_.watch(kernelMonitor_.fd(), [this] { onUevents(kernelMonitor_); });
    loop_.watch(workers_.fd(), [this] { workers_.runContinuations(); });
    loop_.watch(signalFd_.get(), [this] { onSignal(); });
    loop_.watch(repair_.nodeWatchFd(), [this] { repair_.onNodeClosed(); });
    if (autoclear_.fd() >= 0)
        loop_.watch(autoclear_.fd(), [this] { autoclear_.onOpens(); });
    loop_.setPrepare([this] { return prepare(); });

    recovery_.onListed = [this](uint64_t diskseq) { adopted(diskseq); };
    recovery_.onReleased = [this](uint64_t diskseq) { repair_.foreignDetach(diskseq); };
    for (const auto diskseq : recovery_.run())
        detach_.unlessOwnerAlive(diskseq);
    for (const auto diskseq : table_.diskseqs()) // adopted autoclear devices loopd still holds
        if (const auto& device = *table_.find(diskseq); device.state == DeviceState::Ready)
            autoclear_.track(device);
    recovery_.awaitReadded([this](unsigned number) { repair_.resync(number); });
    if (config_.drops.any() || config_.kernelDrops.any())
        log::warn("test fault injection is on: udev events are dropped on purpose");

    // Last: with Type=dbus, owning the name is what tells systemd loopd is up.
    manager_->devices->announce();
    if (manager_->requestName(busName))
        log::info("loopd {} on the system bus as {}, readiness source {}", LOOPD_VERSION, busName, readinessSource());
    else
        log::warn("loopd {}: {} is still owned by a connection that has not left the bus (a killed loopd's, not "
                  "yet noticed by the bus); it passes to loopd when that one goes",
                  LOOPD_VERSION, busName);
}

Daemon::~Daemon()
{
    // Objects go before the connection.
    autoclear_.udevPid = nullptr;
    table_.onRemoved = nullptr;
    for (const auto diskseq : table_.diskseqs())
        table_.find(diskseq)->object.reset();
    manager_.reset();
}

void Daemon::run()
{
    loop_.run();
    log::info("loopd stopping; {} device(s) stay attached", table_.size());
}

EventLoop::Wait Daemon::prepare()
{
    // Bounded: under a flood of calls the event sockets, the workers' results and
    // the timers still get their turn every so many messages.
    bool busBehind = true;
    for (unsigned i = 0; i < busMessagesPerTurn; ++i)
        if (!connection_->processPendingRequest()) {
            busBehind = false;
            break;
        }
    const auto now = core::Clock::now();
    // Before a request times out or is nudged, read what the sockets already hold:
    // a loaded loop lags behind them (seen under qemu TCG: partition events queued
    // for over a second made loopd trigger events the kernel had long sent).
    if (const auto next = registry_.nextDeadline(); next && *next <= now) {
        onUevents(udevMonitor_);
        onUevents(kernelMonitor_);
    }
    settle(registry_.onTime(now));
    attach_.onTime(now);
    for (const auto& due : registry_.nudges(now, nudgeAfter))
        repair_.nudge(due);
    timers(now);
    if (services_.stopping && attach_.idle() && detach_.idle())
        loop_.stop();

    // Every deadline below exists only while something is pending: idle, loopd
    // sleeps in epoll_wait until an fd has news (issue 16).
    const auto poll = connection_->getEventLoopPollData();
    EventLoop::Wait wait{poll.fd, static_cast<uint32_t>(poll.events), registry_.nextDeadline()};
    auto consider = [&wait](std::optional<core::Clock::time_point> t) {
        if (t && (!wait.deadline || *t < *wait.deadline))
            wait.deadline = t;
    };
    consider(attach_.nextDeadline());
    consider(watchdog_.ping(now));
    consider(nextTimer());
    if (const auto relative = poll.getRelativeTimeout()) {
        const auto busDeadline = core::Clock::now() + *relative;
        if (!wait.deadline || busDeadline < *wait.deadline)
            wait.deadline = busDeadline;
    }
    if (busBehind) // more calls are queued: look at the other fds, then come back at once
        wait.deadline = now;
    return wait;
}

void Daemon::onUevents(uevent::Monitor& monitor)
{
    auto batch = monitor.receive();
    std::set<unsigned> owned;
    for (const auto& event : batch.events) {
        if (log::enabled(log::Level::trace)) {
            log::Scope about{{.diskseq = event.diskseq, .device = kernel::loopDevNode(event.number)}};
            log::trace("uevent source={} action={} dev=loop{}{} diskseq={}{}",
                       event.source == EventSource::Udev ? "udev" : "kernel", static_cast<int>(event.action),
                       event.number, event.partition ? "p" + std::to_string(event.partition) : "", event.diskseq,
                       event.synthUuid.empty() ? "" : " synth_uuid=" + event.synthUuid);
        }
        attach_.sawEvent(event);
        settle(registry_.onEvent(event));
        resize_.onEvent(event);
        udevTags_.onEvent(event);
        if (table_.owner(event.number))
            owned.insert(event.number);
    }
    repair_.afterEvents(owned);
    if (batch.overflow)
        repair_.resyncAll();
}

// A device adopted at start-up whose re-added partitions became ready: listed now.
void Daemon::adopted(uint64_t diskseq)
{
    const auto& device = *table_.find(diskseq);
    autoclear_.track(device);
    if (device.tiedToClient())
        detach_.unlessOwnerAlive(diskseq);
}

void Daemon::settle(const std::vector<core::Outcome>& outcomes)
{
    for (const auto& outcome : outcomes)
        attach_.settle(outcome) || detach_.settle(outcome) || recovery_.settle(outcome);
}

void Daemon::onSignal()
{
    signalfd_siginfo info{};
    while (::read(signalFd_.get(), &info, sizeof(info)) == sizeof(info))
        log::info("signal {} received, finishing calls in progress", info.ssi_signo);
    services_.stopping = true;
    attach_.stop();
}

void Daemon::onNameOwnerChanged(const std::string& name, const std::string& newOwner)
{
    if (!newOwner.empty() || name.empty() || name.front() != ':')
        return;
    callers_.forget(name);
    attach_.callerLeft(name);
    detach_.clientLeft(name);
}

// Whatever took the device out of the table, everyone who cares hears of it here.
void Daemon::onRemoved(Device& device, RemovalReason reason)
{
    if (!table_.owner(device.info.number)) {
        repair_.unwatch(device.info.number);
        autoclear_.forget(device.info.number);
    }
    if (device.options.hidden)
        udevTags_.remove(device.info.diskseq);
    const auto* name = reasonName(reason);
    if (!name) // abandoned while attaching: never listed, its attach flow has told its waiters
        return;
    records_.remove(device.record(core::Record::State::Owned));
    device.object.reset(); // InterfacesRemoved
    manager_->emitDeviceRemoved(sdbus::ObjectPath(devicePath(device.info.diskseq)), device.info.diskseq, name);
    manager_->devicesChanged();
    attach_.deviceGone(device.info.diskseq, device.describe() + " was removed (" + name + ")");
}

// What is due of loopd's own timers; each one is armed only while needed.
void Daemon::timers(core::Clock::time_point now)
{
    // Idle after a burst of requests: give the heap pages their transient
    // allocations freed back to the kernel (glibc keeps them otherwise).
    if (services_.issued() != trimmedAt_ && attach_.idle() && detach_.idle() && !attach_.waiting()) {
        trimmedAt_ = services_.issued();
        malloc_trim(0);
    }
    if (const auto due = repair_.nextDatabaseCheck(); due && *due <= now) {
        onUevents(udevMonitor_); // the event may be here by now
        repair_.checkDatabase(now);
    }
    udevPresence_.onTime(now);
}

std::optional<core::Clock::time_point> Daemon::nextTimer() const
{
    std::optional<core::Clock::time_point> next = repair_.nextDatabaseCheck();
    auto consider = [&next](std::optional<core::Clock::time_point> t) {
        if (t && (!next || *t < *next))
            next = t;
    };
    consider(udevPresence_.nextDeadline());
    return next;
}

// udevd went away or answers again: ReadinessSource, and what waits for udev.
void Daemon::udevChanged(bool running)
{
    services_.udevRunning = running;
    log::warn("udevd {}; readiness source is now {}", running ? "answers again" : "went away", readinessSource());
    manager_->readinessSourceChanged();
    if (running)
        repair_.udevReturned();
}

// ---- the D-Bus calls ----------------------------------------------------------

void Daemon::attachPath(AttachResult&& result, const CallOrigin& from, std::string path, core::OptionMap options)
{
    auto what = path;
    attach_.start(std::move(result), from, std::move(what), std::move(path), options);
}

void Daemon::attachFd(AttachResult&& result, const CallOrigin& from, sdbus::UnixFd fd, core::OptionMap options)
{
    // The file's path names it in messages (a procfs read, quick).
    const auto what = kernel::pathOfFd(fd.get()).value_or("the file descriptor passed by " + from.sender);
    // One of loopd's own devices (or a partition of one) under another: their
    // lives would be tied (and with a device given back to a later attach, could
    // loop). A sysfs lookup of the fd's block device, quick.
    if (const auto number = kernel::loopNumberOf(fd.get()); number && table_.owner(*number))
        throw Error(Errc::InvalidArgument, "cannot attach " + what + ": it is " + table_.owner(*number)->describe() +
                                               ", a device of loopd's own; attach its backing file instead");
    attach_.start(std::move(result), from, what, std::move(fd), options);
}

void Daemon::detach(VoidResult&& result, const CallOrigin& from, uint64_t diskseq, core::OptionMap options)
{
    detach_.request(std::move(result), from, diskseq, options);
}

void Daemon::waitReady(AttachResult&& result, std::string device, uint64_t timeoutUsec)
{
    attach_.waitReady(std::move(result), device, timeoutUsec);
}

void Daemon::find(FindResult&& result, const CallOrigin& from, std::string path)
{
    find_.request(std::move(result), from, std::move(path));
}

void Daemon::resize(ResizeResult&& result, const CallOrigin& from, uint64_t diskseq, core::OptionMap options)
{
    resize_.request(std::move(result), from, diskseq, options);
}

void Daemon::open(OpenResult&& result, const CallOrigin& from, uint64_t diskseq, core::OptionMap options)
{
    open_.request(std::move(result), from, diskseq, options);
}

std::string Daemon::readinessSource() const
{
    return services_.udevRunning ? "udev" : "kernel";
}

std::vector<std::string> Daemon::kernelQuirks() const
{
    return repair_.kernelQuirks();
}

uint32_t Daemon::deviceCount() const
{
    return table_.listedCount();
}

} // namespace loopd::service
