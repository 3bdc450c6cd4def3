#include "daemon.hpp"

#include "errors.hpp"
#include "kernel/loop_device.hpp"
#include "kernel/partitions.hpp"
#include "kernel/sysfs.hpp"

#include <loopd/error.hpp>
#include <loopd/log.hpp>

#include <malloc.h>
#include <poll.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <random>
#include <system_error>

namespace loopd::service {
namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

// Detach confirmation: the remove events follow LOOP_CLR_FD within milliseconds.
constexpr auto releaseTimeout = 10s;
// How long an attach waits for its events before asking the kernel to send them
// again (kernels 5.19-6.14 drop some loop uevents; sockets drop them under load).
// Readiness takes ~10 ms here, so a second means something was lost.
constexpr auto nudgeAfter = 1s;
// The nudge (counted from 1, a second apart) at which loopd also re-triggers what
// udev still lacks though the kernel announced it: udev may have lost it.
constexpr unsigned lastResortAttempt = 3;
// How often udevd is checked for life (ReadinessSource follows it).
constexpr auto housekeepingInterval = 1s;
// How often owned devices are checked for a foreign `losetup -d` that the node
// watch did not see (LOOP_CLR_FD through an fd opened long before). A safety net:
// it reads sysfs for every owned device.
constexpr auto releaseScanInterval = 5s;

// A random RFC 4122 version 4 UUID, for SYNTH_UUID.
std::string makeUuid()
{
    static std::mt19937_64 random(std::random_device{}());
    const uint64_t hi = (random() & ~0xf000ULL) | 0x4000ULL;
    const uint64_t lo = (random() & ~(3ULL << 62)) | (2ULL << 62);
    char text[37];
    std::snprintf(text, sizeof(text), "%08llx-%04llx-%04llx-%04llx-%012llx", static_cast<unsigned long long>(hi >> 32),
                  static_cast<unsigned long long>((hi >> 16) & 0xffff), static_cast<unsigned long long>(hi & 0xffff),
                  static_cast<unsigned long long>(lo >> 48), static_cast<unsigned long long>(lo & 0xffffffffffffULL));
    return text;
}

uint64_t realtimeUsec()
{
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
            .count());
}

long long millisSince(core::Clock::time_point start)
{
    return std::chrono::duration_cast<std::chrono::milliseconds>(core::Clock::now() - start).count();
}

std::string describe(const DeviceInfo& info)
{
    return kernel::loopDevNode(info.number) + " (diskseq " + std::to_string(info.diskseq) + ")";
}

// The path the kernel has for an open file, for humans; nullopt if it has none.
std::optional<std::string> fdPath(int fd)
{
    std::error_code ec;
    auto path = fs::read_symlink("/proc/self/fd/" + std::to_string(fd), ec);
    if (ec || path.empty() || path.native().front() != '/')
        return std::nullopt;
    return path.string();
}

UniqueFd makeSignalFd()
{
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    UniqueFd fd(::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
    if (!fd)
        throw std::system_error(errno, std::generic_category(), "signalfd");
    return fd;
}

} // namespace

core::Watch Daemon::Device::watch() const
{
    return core::Watch{info.diskseq, info.number, info.partitions, source};
}

core::Record Daemon::Device::record(core::Record::State state) const
{
    core::Record r;
    r.state = state;
    r.token = token;
    r.fileName = core::loFileName(options.ref, token);
    r.info = info;
    r.ref = options.ref;
    r.lifetime = options.lifetime;
    r.owner = owner;
    r.ownerUid = ownerUid;
    r.readyTimestamp = readyTimestamp;
    return r;
}

Daemon::Daemon(DaemonConfig config)
    // Subscribe before anything else, so no event of an attachment can pass unseen.
    : config_(std::move(config)), udevMonitor_(EventSource::Udev, config_.receiveBufferBytes, config_.drops),
      kernelMonitor_(EventSource::Kernel, config_.receiveBufferBytes, config_.kernelDrops),
      connection_(sdbus::createSystemBusConnection()),
      busProxy_(sdbus::createProxy(*connection_, "org.freedesktop.DBus", "/org/freedesktop/DBus")),
      polkitProxy_(
          sdbus::createProxy(*connection_, "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority")),
      workers_(config_.workers), signalFd_(makeSignalFd()), records_(config_.runtimeDir + "/records")
{
    busProxy_->uponSignal("NameOwnerChanged")
        .onInterface("org.freedesktop.DBus")
        .call([this](const std::string& name, const std::string&, const std::string& newOwner) {
            onNameOwnerChanged(name, newOwner);
        });
    busProxy_->finishRegistration();
    manager_ = std::make_unique<ManagerObject>(*connection_, *this);

    loop_.watch(udevMonitor_.fd(), [this] { onUevents(udevMonitor_); });
    loop_.watch(kernelMonitor_.fd(), [this] { onUevents(kernelMonitor_); });
    loop_.watch(workers_.fd(), [this] { workers_.runContinuations(); });
    loop_.watch(signalFd_.get(), [this] { onSignal(); });
    loop_.watch(nodeWatch_.fd(), [this] {
        for (const auto number : nodeWatch_.closed())
            checkReleased(number);
    });
    loop_.setPrepare([this] { return prepare(); });
    loop_.setOnBus([] {}); // prepare() drains the bus every iteration

    recover();
    awaitReadded();
    udevSeen_ = uevent::udevRunning();
    if (config_.drops.any() || config_.kernelDrops.any())
        log::warn("test fault injection is on: udev events are dropped on purpose");

    // Last: with Type=dbus, owning the name is what tells systemd loopd is up.
    connection_->requestName(busName);
    log::info("loopd {} on the system bus as {}, readiness source {}", LOOPD_VERSION, busName, readinessSource());
}

Daemon::~Daemon()
{
    devices_.clear(); // objects go before the connection
    manager_.reset();
}

void Daemon::run()
{
    loop_.run();
    log::info("loopd stopping; {} device(s) stay attached", devices_.size());
}

EventLoop::Wait Daemon::prepare()
{
    while (connection_->processPendingRequest()) {
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
    for (const auto& due : registry_.nudges(now, nudgeAfter))
        nudge(due);
    if (now >= nextHousekeeping_)
        housekeeping(now);
    if (stopping_ && attaches_.empty() && detaches_.empty())
        loop_.stop();

    const auto poll = connection_->getEventLoopPollData();
    EventLoop::Wait wait{poll.fd, static_cast<uint32_t>(poll.events), registry_.nextDeadline()};
    if (const auto ping = std::min(watchdog_.ping(now), nextHousekeeping_); !wait.deadline || ping < *wait.deadline)
        wait.deadline = ping;
    if (const auto relative = poll.getRelativeTimeout()) {
        const auto busDeadline = core::Clock::now() + *relative;
        if (!wait.deadline || busDeadline < *wait.deadline)
            wait.deadline = busDeadline;
    }
    return wait;
}

void Daemon::onUevents(uevent::Monitor& monitor)
{
    auto batch = monitor.receive();
    std::set<unsigned> owned;
    for (const auto& event : batch.events) {
        log::trace("uevent source={} action={} dev=loop{}{} diskseq={}{}",
                   event.source == EventSource::Udev ? "udev" : "kernel", static_cast<int>(event.action), event.number,
                   event.partition ? "p" + std::to_string(event.partition) : "", event.diskseq,
                   event.synthUuid.empty() ? "" : " synth_uuid=" + event.synthUuid);
        settle(registry_.onEvent(event));
        if (numbers_.count(event.number))
            owned.insert(event.number);
    }
    // A "change" with the old diskseq is sent on attach and on detach alike: only
    // sysfs tells whether someone else released or replaced an owned device.
    for (const auto number : owned)
        checkOwned(number);
    if (batch.overflow)
        resyncAll();
}

void Daemon::onSignal()
{
    signalfd_siginfo info{};
    while (::read(signalFd_.get(), &info, sizeof(info)) == sizeof(info))
        log::info("signal {} received, finishing calls in progress", info.ssi_signo);
    stopping_ = true;
    for (auto& [id, waiter] : waiters_) {
        registry_.cancel(id);
        waiter.first.returnError(makeDbusError(Errc::Failed, "loopd is stopping"));
    }
    waiters_.clear();
    std::vector<core::RequestId> configured;
    for (const auto& [id, job] : attaches_)
        if (job.diskseq != 0)
            configured.push_back(id);
    for (const auto id : configured) {
        registry_.cancel(id);
        abandonAttach(id, Errc::Failed, "loopd is stopping", true);
    }
}

void Daemon::onNameOwnerChanged(const std::string& name, const std::string& newOwner)
{
    if (!newOwner.empty() || name.empty() || name.front() != ':')
        return;
    callers_.erase(name);
    for (auto& [id, job] : attaches_)
        if (job.sender == name)
            job.vanished = true;
    std::vector<uint64_t> theirs;
    for (const auto& [diskseq, device] : devices_)
        if (device.owner == name && device.options.lifetime == Lifetime::Client && device.state == State::Ready)
            theirs.push_back(diskseq);
    for (const auto diskseq : theirs) {
        log::info("client left the bus, detaching its device sender={} diskseq={}", name, diskseq);
        detachOwn(diskseq, "client-vanished");
    }
}

void Daemon::settle(const std::vector<core::Outcome>& outcomes)
{
    using Kind = core::Outcome::Kind;
    for (const auto& outcome : outcomes) {
        const auto id = outcome.request;
        if (attaches_.count(id)) {
            if (outcome.kind == Kind::Ready)
                attachReady(id);
            else if (outcome.kind == Kind::Changed)
                abandonAttach(id, Errc::DeviceChanged, "was detached or replaced by someone else while attaching",
                              false);
            else
                abandonAttach(id, Errc::Timeout, "was not ready in time; it was detached again", true);
        } else if (detaches_.count(id)) {
            detachConfirmed(id, outcome.kind == Kind::TimedOut);
        } else if (adopting_.erase(id)) {
            if (outcome.kind != Kind::Ready)
                log::warn("re-added partitions of dev=loop{} not confirmed by udev", outcome.watch.number);
        } else if (auto waiter = waiters_.extract(id)) {
            auto& [result, diskseq] = waiter.mapped();
            const auto it = devices_.find(diskseq);
            if (outcome.kind == Kind::Ready && it != devices_.end())
                replyReady(result, it->second);
            else if (outcome.kind == Kind::Changed)
                result.returnError(makeDbusError(Errc::DeviceChanged, "diskseq " + std::to_string(diskseq) +
                                                                          " was replaced by someone else"));
            else
                result.returnError(makeDbusError(Errc::Timeout, "diskseq " + std::to_string(diskseq) +
                                                                    " was not ready within the timeout"));
        }
    }
}

// ---- after a restart ---------------------------------------------------------

// Start-up, before the name is owned (so nothing else is served yet, and the
// blocking kernel calls here delay no caller): adopt what loopd owned, clean up
// what a crash left half done.
void Daemon::recover()
{
    auto records = records_.loadAll();
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
                log::info("finishing an attach or detach a restart interrupted dev={}", describe(record.info));
                releaseRecorded(record);
                break;
            case core::Record::State::Intent:
                // Matched by the intent's unique lo_file_name: another record naming
                // the same number may be stale (its device released long ago).
                releaseIntent(record, adopted);
                break;
            }
            records_.remove(record);
        } catch (const std::exception& e) {
            // Kept: the next start tries again rather than forget a device.
            log::error("recovery of dev={} failed, record kept: {}", describe(record.info), e.what());
        }
    }
}

// Start-up: adopted devices whose partitions a crash cost (udev's BLKRRPART after
// the crash closed loopd's writable fd) had them re-added; they are listed only
// ready, so wait here, before the name is owned, until udev has processed them.
void Daemon::awaitReadded()
{
    if (readded_.empty())
        return;
    const auto deadline = core::Clock::now() + 5s;
    std::set<core::RequestId> waiting;
    for (const auto diskseq : readded_) {
        const auto id = nextId_++;
        waiting.insert(id);
        adopting_.insert(id);
        settle(registry_.expect(id, core::Goal::Ready, devices_.at(diskseq).watch(), deadline));
    }
    auto pending = [&] {
        return std::any_of(waiting.begin(), waiting.end(), [&](auto id) { return adopting_.count(id) != 0; });
    };
    std::array<pollfd, 2> fds{pollfd{udevMonitor_.fd(), POLLIN, 0}, pollfd{kernelMonitor_.fd(), POLLIN, 0}};
    while (pending()) {
        for (const auto diskseq : readded_)
            resync(devices_.at(diskseq).info.number);
        if (!pending() || ::poll(fds.data(), fds.size(), 100) < 0)
            break;
        onUevents(udevMonitor_);
        onUevents(kernelMonitor_);
        settle(registry_.onTime(core::Clock::now()));
    }
    readded_.clear();
}

// Adopts an owned device, or releases it when it cannot be adopted (a device loopd
// owned but does not list would be an orphan). True when adopted.
bool Daemon::adoptOrRelease(const core::Record& record)
{
    try {
        return adopt(record);
    } catch (const std::exception& e) {
        log::error("cannot adopt dev={}: {}; releasing it", describe(record.info), e.what());
    }
    try {
        releaseRecorded(record);
        records_.remove(record);
    } catch (const std::exception& e) {
        log::error("cannot release dev={} either, record kept: {}", describe(record.info), e.what());
    }
    return false;
}

bool Daemon::adopt(const core::Record& record)
{
    const auto before = realtimeUsec();
    bool readded = false;
    auto fd = reopenOwned(record, readded);
    if (!fd) {
        log::info("not adopting dev={}: released or replaced while loopd was not running", describe(record.info));
        records_.remove(record);
        return false;
    }
    Device device;
    device.info = record.info;
    device.lockFd = std::make_shared<UniqueFd>(std::move(*fd));
    device.options.ref = record.ref;
    device.options.lifetime = record.lifetime;
    device.options.autoclear = record.info.autoclear;
    device.source = uevent::udevRunning() ? EventSource::Udev : EventSource::Kernel;
    device.owner = record.owner;
    device.ownerUid = record.ownerUid;
    device.state = State::Ready;
    device.listed = true;
    ++listed_;
    device.token = record.token;
    device.readyTimestamp = record.readyTimestamp;
    const auto diskseq = record.info.diskseq;
    auto& stored = devices_.emplace(diskseq, std::move(device)).first->second;
    numbers_[stored.info.number] = diskseq;
    if (readded) {
        stored.startedUsec = before;
        readded_.push_back(diskseq);
    }
    if (!record.ref.empty())
        refs_.insert(record.ref);
    linkRef(stored);
    exportDevice(stored);
    watchNode(stored);
    log::info("adopted dev={} owner={}", describe(stored.info), record.owner);
    if (record.lifetime == Lifetime::Client)
        checkClientAlive(diskseq, record.owner);
    return true;
}

// Subscribed to NameOwnerChanged first (constructor), then asked: a client that
// leaves in between is seen either way.
void Daemon::checkClientAlive(uint64_t diskseq, const std::string& owner)
{
    busProxy_->callMethodAsync("NameHasOwner")
        .onInterface("org.freedesktop.DBus")
        .withArguments(owner)
        .uponReplyInvoke([this, diskseq, owner](const sdbus::Error* error, bool alive) {
            const auto it = devices_.find(diskseq);
            if (error || alive || it == devices_.end() || it->second.state != State::Ready)
                return;
            log::info("client left the bus while loopd was down sender={} diskseq={}", owner, diskseq);
            detachOwn(diskseq, "client-vanished");
        });
}

// ---- when events lie --------------------------------------------------------

// Events were lost (ENOBUFS): what they would have said is read from sysfs and
// udev's database instead, for every device someone waits on or loopd owns.
void Daemon::resyncAll()
{
    std::set<unsigned> numbers;
    for (const auto number : registry_.watchedNumbers())
        numbers.insert(number);
    for (const auto& [number, diskseq] : numbers_)
        numbers.insert(number);
    log::warn("uevents were lost (receive buffer overflow); re-enumerating {} device(s)", numbers.size());
    for (const auto number : numbers)
        resync(number);
}

// Loop thread: sysfs and /run/udev reads, no waiting.
void Daemon::resync(unsigned number, bool kernelToo)
{
    const auto diskseq = kernel::sysfsDiskseq(number);
    if (!diskseq)
        return;
    const auto partitions = kernel::existingPartitions(number);
    core::EventLedger::View kernelView{*diskseq, true, {partitions.begin(), partitions.end()}};
    if (kernelToo)
        settle(registry_.resync(number, EventSource::Kernel, kernelView));

    // udev's database keeps no DISKSEQ: the disk's by-diskseq link says which
    // attachment udev processed it for, and a partition entry counts only if udev
    // wrote it after the attach began (older ones are of an earlier attachment).
    const auto owned = numbers_.find(number);
    const auto since = owned == numbers_.end() ? UINT64_MAX : devices_.at(owned->second).startedUsec;
    core::EventLedger::View udevView{*diskseq, false, {}};
    for (const auto& [partition, entry] : uevent::readUdevDatabase(number)) {
        if (!entry.initialized)
            continue;
        if (partition == 0)
            udevView.disk = entry.linkedDiskseq == *diskseq;
        else if (kernelView.partitions.count(partition) && entry.processedRealtimeUsec >= since)
            udevView.partitions.insert(partition);
    }
    settle(registry_.resync(number, EventSource::Udev, udevView));
    checkOwned(number);
}

// An owned, ready device whose diskseq moved on or that lost its backing file was
// released or replaced by someone else.
void Daemon::checkOwned(unsigned number)
{
    const auto it = numbers_.find(number);
    if (it == numbers_.end())
        return;
    const auto& device = devices_.at(it->second);
    if (device.state != State::Ready)
        return;
    if (kernel::sysfsDiskseq(number) == device.info.diskseq && kernel::sysfsBackingFile(number))
        return;
    foreignDetach(device.info.diskseq);
}

// Someone else detached (or asked to detach) a device loopd owns: let go of it
// without touching it further. Closing loopd's fd completes a `losetup -d`, whose
// LOOP_CLR_FD only marked the device for release at its last close.
void Daemon::foreignDetach(uint64_t diskseq)
{
    auto& device = devices_.at(diskseq);
    device.state = State::Detaching;
    log::info("foreign detach dev={}", describe(device.info));
    workers_.submit([this, diskseq, fd = device.lockFd] {
        fd->reset();
        return WorkerPool::Continuation([this, diskseq] { removeDevice(diskseq, "foreign-detach"); });
    });
}

void Daemon::housekeeping(core::Clock::time_point now)
{
    nextHousekeeping_ = now + housekeepingInterval;
    // Idle after a burst of requests: give the heap pages their transient
    // allocations freed back to the kernel (glibc keeps them otherwise).
    if (nextId_ != trimmedAt_ && attaches_.empty() && detaches_.empty() && waiters_.empty()) {
        trimmedAt_ = nextId_;
        malloc_trim(0);
    }
    if (const bool udev = uevent::udevRunning(); udev != udevSeen_) {
        udevSeen_ = udev;
        log::warn("udevd {}; readiness source is now {}", udev ? "is back" : "stopped", readinessSource());
        manager_->readinessSourceChanged();
    }
    if (now < nextReleaseScan_)
        return;
    nextReleaseScan_ = now + releaseScanInterval;
    std::vector<unsigned> owned;
    for (const auto& [number, diskseq] : numbers_)
        owned.push_back(number);
    // A sysfs read per owned device (10 ms with 1000 held): on a worker, so the
    // loop answers meanwhile. Only the devices found marked are looked at again.
    workers_.submit([this, owned = std::move(owned)] {
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

// `losetup -d` on a device loopd holds open only sets autoclear: someone asked
// for it to go.
void Daemon::checkReleased(unsigned number)
{
    const auto it = numbers_.find(number);
    if (it == numbers_.end())
        return;
    const auto& device = devices_.at(it->second);
    if (device.state == State::Detaching || device.options.autoclear || !kernel::sysfsAutoclear(number).value_or(true))
        return;
    if (device.state == State::Ready)
        return foreignDetach(device.info.diskseq);
    // Still attaching: the caller must not be told it is ready.
    for (const auto& [id, job] : attaches_)
        if (job.diskseq == device.info.diskseq) {
            registry_.cancel(id);
            return abandonAttach(id, Errc::DeviceChanged, "was detached or replaced by someone else while attaching",
                                 false);
        }
}

void Daemon::watchNode(const Device& device)
{
    try {
        nodeWatch_.add(device.info.number);
    } catch (const std::exception& e) {
        log::warn("foreign detach of dev={} is noticed by polling only: {}", describe(device.info), e.what());
    }
}

// Asks the kernel to resend the events an attach still misses (worker: sysfs
// writes make the kernel emit uevents synchronously).
// An attach (or detach) waited a grace period for its events. What udev did may
// have been lost on our socket: read its database. What the kernel never sent
// (5.19-6.14 drop some loop uevents) is asked for again with a synthetic "change".
// A kernel event that came while udev's is still missing only means udev is
// slow: triggering more would flood it (seen under qemu: 158 triggers for one
// 32-partition attach).
void Daemon::nudge(const core::Nudge& due)
{
    const auto number = due.watch.number;
    const auto node = kernel::loopDevNode(number);
    if (due.goal == core::Goal::Released) {
        // Remove events cannot be asked for again; sysfs and udev know the outcome.
        log::info("remove events missing dev={} diskseq={}: re-enumerating", node, due.watch.diskseq);
        return resync(number);
    }
    const auto& kernelView = registry_.ledger().view(number, EventSource::Kernel);
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
    workers_.submit([number, disk, partitions, uuid] {
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

// ---- attach ---------------------------------------------------------------

EventSource Daemon::eventSourceFor(ReadinessMode mode) const
{
    const bool udev = uevent::udevRunning();
    if (mode == ReadinessMode::Udev && !udev)
        throw Error(Errc::Timeout, "readiness=udev was asked for, but no udevd is running to confirm it");
    return mode == ReadinessMode::Kernel || !udev ? EventSource::Kernel : EventSource::Udev;
}

void Daemon::attachPath(AttachResult&& result, const std::string& sender, std::string path, core::OptionMap options)
{
    auto what = path;
    startAttach(std::move(result), sender, std::move(what), std::move(path), options);
}

void Daemon::attachFd(AttachResult&& result, const std::string& sender, sdbus::UnixFd fd, core::OptionMap options)
{
    // The file's path names it in messages and lo_file_name (a procfs read, quick).
    const auto what = fdPath(fd.get()).value_or("the file descriptor passed by " + sender);
    startAttach(std::move(result), sender, what, std::move(fd), options);
}

void Daemon::startAttach(AttachResult&& result, const std::string& sender, std::string what,
                         std::variant<std::string, sdbus::UnixFd> source, const core::OptionMap& optionMap)
{
    AttachOptions options;
    EventSource events;
    try {
        if (stopping_)
            throw Error(Errc::Failed, "loopd is stopping");
        options = core::parseAttachOptions(optionMap);
        if (!options.ref.empty() && refs_.count(options.ref))
            throw Error(Errc::InvalidArgument, "ref '" + options.ref + "' is already used by another loopd device");
        events = eventSourceFor(options.readiness);
    } catch (const Error& e) {
        throw Error(e.code(), "cannot attach " + what + ": " + e.what());
    }
    const auto now = core::Clock::now();

    // From here on nothing throws: the result belongs to the pending call.
    const auto id = nextId_++;
    if (!options.ref.empty())
        refs_.insert(options.ref);
    const auto deadline = now + options.timeout;
    core::Record record;
    record.token = makeUuid();
    record.fileName = core::loFileName(options.ref, record.token);
    record.ref = options.ref;
    record.lifetime = options.lifetime;
    record.owner = sender;
    attaches_.emplace(id,
                      PendingAttach{std::move(result), sender, std::move(what), std::move(source), std::move(options),
                                    events, deadline, 0, 0, now, realtimeUsec(), false, std::move(record)});
    const auto denied = "attaching " + attaches_.at(id).what;
    authorize(sender, "org.loopd1.attach", denied, [this, id](std::exception_ptr error, Caller caller) {
        auto& job = attaches_.at(id);
        if (!error && stopping_)
            error = std::make_exception_ptr(Error(Errc::Failed, "loopd is stopping"));
        if (error)
            return attachFailed(id, error);
        job.ownerUid = caller.uid;
        job.record.ownerUid = caller.uid;
        // The readiness deadline starts now: time a user spends answering polkit's
        // password prompt is not the kernel's.
        job.deadline = core::Clock::now() + job.options.timeout;
        runAttach(id, caller);
    });
}

void Daemon::authorize(const std::string& sender, const std::string& action, const std::string& what,
                       std::function<void(std::exception_ptr, Caller)> then)
{
    lookupCaller(sender, [this, sender, action, what, then](std::exception_ptr error, Caller caller) {
        if (error || caller.uid == 0)
            return then(error, std::move(caller));
        askPolkit(sender, action, [then, caller, action, what](std::exception_ptr error) {
            if (error)
                return then(std::make_exception_ptr(
                                Error(Errc::AccessDenied, what + " was not authorized (polkit action " + action +
                                                              ", uid " + std::to_string(caller.uid) + ")")),
                            caller);
            then(nullptr, caller);
        });
    });
}

// polkit's CheckAuthorization for the calling connection (subject
// "system-bus-name": polkit resolves the name itself, so no PID is trusted), with
// user interaction allowed so an agent may ask for a password. Asynchronous: the
// answer may take as long as the user does. `then` gets nullptr when authorized.
void Daemon::askPolkit(const std::string& sender, const std::string& action,
                       std::function<void(std::exception_ptr)> then)
{
    using Subject = sdbus::Struct<std::string, std::map<std::string, sdbus::Variant>>;
    using Answer = sdbus::Struct<bool, bool, std::map<std::string, std::string>>;
    constexpr uint32_t allowUserInteraction = 1;
    try {
        polkitProxy_->callMethodAsync("CheckAuthorization")
            .onInterface("org.freedesktop.PolicyKit1.Authority")
            .withTimeout(std::chrono::minutes(5))
            .withArguments(Subject{"system-bus-name", {{"name", sdbus::Variant(sender)}}}, action,
                           std::map<std::string, std::string>{}, allowUserInteraction, std::string{})
            .uponReplyInvoke([then, action, sender](const sdbus::Error* error, Answer answer) {
                if (error)
                    log::warn("polkit could not be asked action={} sender={}: {}", action, sender, error->getMessage());
                const bool authorized = !error && std::get<0>(answer);
                then(authorized ? nullptr : std::make_exception_ptr(Error(Errc::AccessDenied, "not authorized")));
            });
    } catch (...) {
        then(std::current_exception());
    }
}

void Daemon::lookupCaller(const std::string& sender, std::function<void(std::exception_ptr, Caller)> then)
{
    // A connection's credentials are fixed when it connects and its unique name is
    // never reused: ask the bus once per connection (forgotten when it leaves).
    if (const auto known = callers_.find(sender); known != callers_.end())
        return then(nullptr, known->second);
    try {
        // Asynchronous: the loop never waits for the bus daemon.
        busProxy_->callMethodAsync("GetConnectionCredentials")
            .onInterface("org.freedesktop.DBus")
            .withArguments(sender)
            .uponReplyInvoke(
                [this, sender, then](const sdbus::Error* error, std::map<std::string, sdbus::Variant> credentials) {
                    if (error)
                        return then(std::make_exception_ptr(*error), {});
                    Caller caller;
                    caller.uid =
                        credentials.count("UnixUserID") ? credentials.at("UnixUserID").get<uint32_t>() : UINT32_MAX;
                    if (credentials.count("UnixGroupIDs"))
                        caller.groups = credentials.at("UnixGroupIDs").get<std::vector<uint32_t>>();
                    callers_[sender] = caller;
                    then(nullptr, std::move(caller));
                });
    } catch (...) {
        then(std::current_exception(), {});
    }
}

void Daemon::runAttach(core::RequestId id, const Caller& caller)
{
    auto& job = attaches_.at(id);
    struct Work {
        std::string path;
        UniqueFd fd;
        std::string what;
        AttachOptions options;
        kernel::Credentials credentials;
        core::Record record;
    };
    auto work = std::make_shared<Work>();
    if (auto* path = std::get_if<std::string>(&job.source))
        work->path = *path;
    else
        work->fd = UniqueFd(std::get<sdbus::UnixFd>(job.source).release());
    work->what = job.what;
    work->options = job.options;
    work->record = job.record;
    // The groups of the calling process as the bus saw them (its gid among them):
    // fsgid is one of them and the rest are supplementary, so access checks see
    // exactly the process's groups. None known: the overflow group, granting nothing.
    work->credentials = kernel::Credentials{caller.uid,
                                            caller.groups.empty() ? 65534 : caller.groups.front(),
                                            {caller.groups.begin(), caller.groups.end()}};

    // Worker thread: only the captured work and pure kernel calls.
    workers_.submit([this, id, work]() -> WorkerPool::Continuation {
        try {
            auto backing = work->fd ? checkBacking(std::move(work->fd), work->what, work->options)
                                    : openBacking(work->path, work->options, work->credentials);
            auto attached = std::make_shared<Attached>(attach(backing, work->options, work->record, records_));
            return [this, id, attached, work] {
                attaches_.at(id).record = work->record;
                onAttached(id, attached);
            };
        } catch (...) {
            return [this, id, error = std::current_exception()] { attachFailed(id, error); };
        }
    });
}

void Daemon::onAttached(core::RequestId id, std::shared_ptr<Attached> attached)
{
    auto& job = attaches_.at(id);
    const auto diskseq = attached->info.diskseq;
    Device device;
    device.info = attached->info;
    device.lockFd = std::make_shared<UniqueFd>(std::move(attached->lockFd));
    device.options = job.options;
    device.source = job.events;
    device.owner = job.sender;
    device.ownerUid = job.ownerUid;
    device.token = job.record.token;
    device.startedUsec = job.startedRealtimeUsec;
    job.diskseq = diskseq;
    const auto& stored = devices_.emplace(diskseq, std::move(device)).first->second;
    numbers_[stored.info.number] = diskseq;
    log::debug("configured dev={} diskseq={} partitions={} file={}", kernel::loopDevNode(stored.info.number), diskseq,
               stored.info.partitions.size(), job.what);
    linkRef(stored);
    watchNode(stored);
    if (stopping_)
        return abandonAttach(id, Errc::Failed, "loopd is stopping", true);
    settle(registry_.expect(id, core::Goal::Ready, stored.watch(), job.deadline, core::Clock::now() + nudgeAfter));
}

void Daemon::attachReady(core::RequestId id)
{
    // A `losetup -d` meanwhile only set autoclear (loopd holds the device open)
    // and sent no event: look before saying ready.
    if (const auto& device = devices_.at(attaches_.at(id).diskseq);
        !device.options.autoclear && kernel::sysfsAutoclear(device.info.number).value_or(true))
        return abandonAttach(id, Errc::DeviceChanged, "was detached or replaced by someone else while attaching",
                             false);
    auto node = attaches_.extract(id);
    auto& job = node.mapped();
    auto& device = devices_.at(job.diskseq);
    device.state = State::Ready;
    device.listed = true;
    ++listed_;
    device.readyTimestamp = realtimeUsec();
    writeRecord(device.record(core::Record::State::Owned));
    exportDevice(device);
    replyReady(job.result, device);
    manager_->devicesChanged();
    log::info("attached dev={} diskseq={} partitions={} file={} sender={} ms={}",
              kernel::loopDevNode(device.info.number), job.diskseq, device.info.partitions.size(), job.what, job.sender,
              millisSince(job.started));
    if (job.vanished && device.options.lifetime == Lifetime::Client)
        detachOwn(job.diskseq, "client-vanished");
}

void Daemon::exportDevice(Device& device)
{
    try {
        device.object = std::make_unique<DeviceObject>(
            *connection_,
            DeviceProperties{device.info, device.options.ref, device.ownerUid, lifetimeName(device.options.lifetime),
                             device.readyTimestamp},
            *this);
    } catch (const sdbus::Error& e) {
        log::error("cannot export device object diskseq={}: {}", device.info.diskseq, e.getMessage());
    }
}

// Loop thread: one page rewritten in place in the page cache (see RecordStore).
void Daemon::writeRecord(const core::Record& record)
{
    try {
        records_.write(record);
    } catch (const std::exception& e) {
        log::error("cannot write the ownership record diskseq={}: {}", record.info.diskseq, e.what());
    }
}

void Daemon::attachFailed(core::RequestId id, std::exception_ptr error)
{
    auto node = attaches_.extract(id);
    auto& job = node.mapped();
    refs_.erase(job.options.ref);
    const auto reply = toDbusError(error, job.what);
    log::warn("attach failed file={} sender={}: {}", job.what, job.sender, reply.getMessage());
    job.result.returnError(reply);
}

// The attachment was configured but will not become ready: undo it (or, when
// someone else took the device, only let go of it), then fail the call.
void Daemon::abandonAttach(core::RequestId id, Errc code, const std::string& why, bool clear)
{
    auto& job = attaches_.at(id);
    auto& device = devices_.at(job.diskseq);
    device.state = State::Detaching;
    const auto message = describe(device.info) + " for " + job.what + ": " + why;
    workers_.submit([this, id, code, message, clear, fd = device.lockFd, info = device.info,
                     record = device.record(core::Record::State::Configured)] {
        if (clear)
            undo(std::move(*fd), info);
        else
            letGo(std::move(*fd), info);
        records_.remove(record);
        return WorkerPool::Continuation([this, id, code, message] {
            auto node = attaches_.extract(id);
            auto& job = node.mapped();
            auto device = devices_.extract(job.diskseq);
            forgetNumber(device.mapped());
            unlinkRef(device.mapped());
            refs_.erase(job.options.ref);
            failWaiters(job.diskseq, code, message);
            log::warn("attach abandoned: {}", message);
            job.result.returnError(makeDbusError(code, message));
        });
    });
}

void Daemon::replyReady(AttachResult& result, const Device& device)
{
    result.returnResults(sdbus::ObjectPath(devicePath(device.info.diskseq)), kernel::loopDevNode(device.info.number),
                         device.info.diskseq, partitionNodes(device.info));
}

// ---- detach ---------------------------------------------------------------

void Daemon::detach(VoidResult&& result, const std::string& sender, uint64_t diskseq, core::OptionMap options)
{
    try {
        core::parseDetachOptions(options);
    } catch (const Error& e) {
        throw Error(e.code(), "cannot detach diskseq " + std::to_string(diskseq) + ": " + e.what());
    }
    const auto it = devices_.find(diskseq);
    if (it == devices_.end())
        throw Error(Errc::NotFound, "no loopd device with diskseq " + std::to_string(diskseq));
    auto& device = it->second;
    if (device.state != State::Ready)
        throw Error(Errc::Busy, describe(device.info) +
                                    (device.state == State::Attaching ? " is still attaching" : " is being detached"));

    // From here on nothing throws. The state change keeps a second Detach out.
    device.state = State::Detaching;
    const auto id = nextId_++;
    detaches_.emplace(id, PendingDetach{std::move(result), diskseq, "detached"});
    auto finish = [this, id, sender](std::exception_ptr error) {
        auto& device = devices_.at(detaches_.at(id).diskseq);
        if (!error)
            return startDetach(id);
        device.state = State::Ready;
        log::warn("detach refused diskseq={} sender={}", device.info.diskseq, sender);
        replyDetach(id, error);
    };
    lookupCaller(sender, [this, id, sender, finish](std::exception_ptr error, Caller caller) {
        const auto& device = devices_.at(detaches_.at(id).diskseq);
        if (error || caller.uid == 0 || caller.uid == device.ownerUid)
            return finish(error);
        // Someone else's device: only with polkit's detach-others.
        const auto denied =
            Error(Errc::AccessDenied, describe(device.info) + " belongs to uid " + std::to_string(device.ownerUid) +
                                          ", not to uid " + std::to_string(caller.uid));
        askPolkit(sender, "org.loopd1.detach-others", [finish, denied](std::exception_ptr refused) {
            finish(refused ? std::make_exception_ptr(denied) : nullptr);
        });
    });
}

void Daemon::detachOwn(uint64_t diskseq, std::string reason)
{
    auto& device = devices_.at(diskseq);
    device.state = State::Detaching;
    const auto id = nextId_++;
    detaches_.emplace(id, PendingDetach{std::nullopt, diskseq, std::move(reason)});
    startDetach(id);
}

void Daemon::startDetach(core::RequestId id)
{
    auto& device = devices_.at(detaches_.at(id).diskseq);
    writeRecord(device.record(core::Record::State::Detaching));
    workers_.submit([this, id, fd = device.lockFd, info = device.info] {
        try {
            const bool released = service::detach(*fd, info);
            return WorkerPool::Continuation([this, id, released] { onDetachDone(id, nullptr, released); });
        } catch (...) {
            return WorkerPool::Continuation(
                [this, id, error = std::current_exception()] { onDetachDone(id, error, false); });
        }
    });
}

void Daemon::onDetachDone(core::RequestId id, std::exception_ptr error, bool released)
{
    auto& pending = detaches_.at(id);
    auto& device = devices_.at(pending.diskseq);
    if (error) { // nothing was changed: loopd still owns the device
        device.state = State::Ready;
        writeRecord(device.record(core::Record::State::Owned));
        return replyDetach(id, error);
    }
    if (!released) {
        const auto message = describe(device.info) + " is still open elsewhere; the kernel releases it at its last "
                                                     "close (autoclear is set)";
        const auto diskseq = pending.diskseq;
        replyDetach(id, std::make_exception_ptr(Error(Errc::Busy, message)));
        return removeDevice(diskseq, "autoclear");
    }
    const auto now = core::Clock::now();
    settle(registry_.expect(id, core::Goal::Released, device.watch(), now + releaseTimeout, now + nudgeAfter));
}

void Daemon::detachConfirmed(core::RequestId id, bool timedOut)
{
    auto& pending = detaches_.at(id);
    const auto diskseq = pending.diskseq;
    const auto reason = pending.reason;
    const auto dev = describe(devices_.at(diskseq).info);
    log::info("detached dev={} reason={}{}", dev, reason, timedOut ? " (remove events missing)" : "");
    // Reply first: a Device.Detach call's reply needs its object still registered.
    replyDetach(id, timedOut ? std::make_exception_ptr(Error(Errc::Timeout, dev + " was released, but udev did not "
                                                                                  "confirm the removal in time"))
                             : nullptr);
    removeDevice(diskseq, reason);
}

void Daemon::replyDetach(core::RequestId id, std::exception_ptr error)
{
    auto node = detaches_.extract(id);
    auto& result = node.mapped().result;
    if (!result)
        return;
    if (error)
        result->returnError(toDbusError(error, "diskseq " + std::to_string(node.mapped().diskseq)));
    else
        result->returnResults();
}

// The number may be another attachment's already: the kernel hands a released
// loop device out again at once, often before loopd has confirmed (or given up)
// the old attachment on it. Found by the soak: the new attachment lost its entry,
// so re-enumerations ignored its partitions and it timed out.
void Daemon::forgetNumber(const Device& device)
{
    const auto it = numbers_.find(device.info.number);
    if (it == numbers_.end() || it->second != device.info.diskseq)
        return;
    numbers_.erase(it);
    nodeWatch_.remove(device.info.number);
}

void Daemon::removeDevice(uint64_t diskseq, const std::string& reason)
{
    auto node = devices_.extract(diskseq);
    auto& device = node.mapped();
    if (device.listed)
        --listed_;
    forgetNumber(device);
    unlinkRef(device);
    refs_.erase(device.options.ref);
    records_.remove(device.record(core::Record::State::Owned));
    device.object.reset(); // InterfacesRemoved
    manager_->emitDeviceRemoved(sdbus::ObjectPath(devicePath(diskseq)), diskseq, reason);
    manager_->devicesChanged();
    failWaiters(diskseq, Errc::DeviceChanged, describe(device.info) + " was removed (" + reason + ")");
}

// ---- WaitReady ------------------------------------------------------------

Daemon::Device* Daemon::findDevice(const std::string& name)
{
    for (auto& [diskseq, device] : devices_) {
        if (kernel::loopDevNode(device.info.number) == name || std::to_string(diskseq) == name ||
            (!device.options.ref.empty() && device.options.ref == name))
            return &device;
    }
    return nullptr;
}

void Daemon::waitReady(AttachResult&& result, std::string name, uint64_t timeoutUsec)
{
    auto* device = findDevice(name);
    if (!device || device->state == State::Detaching)
        throw Error(Errc::NotFound, "no loopd device '" + name + "'");
    if (device->state == State::Ready)
        return replyReady(result, *device);
    const auto timeout = timeoutUsec ? std::chrono::microseconds(timeoutUsec) : std::chrono::microseconds(10s);
    const auto id = nextId_++;
    waiters_.emplace(id, std::pair{std::move(result), device->info.diskseq});
    settle(registry_.expect(id, core::Goal::Ready, device->watch(), core::Clock::now() + timeout));
}

void Daemon::failWaiters(uint64_t diskseq, Errc code, const std::string& message)
{
    for (auto it = waiters_.begin(); it != waiters_.end();) {
        if (it->second.second != diskseq) {
            ++it;
            continue;
        }
        registry_.cancel(it->first);
        it->second.first.returnError(makeDbusError(code, message));
        it = waiters_.erase(it);
    }
}

// ---- properties and by-ref links -------------------------------------------

std::string Daemon::readinessSource() const
{
    return uevent::udevRunning() ? "udev" : "kernel";
}

uint32_t Daemon::deviceCount() const
{
    return listed_;
}

// /run/loopd/by-ref/<ref> and <ref>-partN: stable names for units and scripts.
// tmpfs operations, cheap enough for the loop thread.
void Daemon::linkRef(const Device& device)
{
    if (device.options.ref.empty())
        return;
    const fs::path dir = fs::path(config_.runtimeDir) / "by-ref";
    std::error_code ec;
    fs::create_directories(dir, ec);
    auto link = [&](const std::string& name, const std::string& target) {
        fs::remove(dir / name, ec);
        fs::create_symlink(target, dir / name, ec);
        if (ec)
            log::warn("cannot link {}: {}", (dir / name).string(), ec.message());
    };
    link(device.options.ref, kernel::loopDevNode(device.info.number));
    for (const auto partition : device.info.partitions)
        link(device.options.ref + "-part" + std::to_string(partition),
             kernel::partitionDevNode(device.info.number, partition));
}

void Daemon::unlinkRef(const Device& device)
{
    if (device.options.ref.empty())
        return;
    const fs::path dir = fs::path(config_.runtimeDir) / "by-ref";
    std::error_code ec;
    fs::remove(dir / device.options.ref, ec);
    for (const auto partition : device.info.partitions)
        fs::remove(dir / (device.options.ref + "-part" + std::to_string(partition)), ec);
}

} // namespace loopd::service
