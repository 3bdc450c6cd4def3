#include "autoclear_watch.hpp"

#include "kernel/loop_device.hpp"
#include "kernel/partitions.hpp"

#include <loopd/log.hpp>

#include <sys/epoll.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <system_error>

namespace loopd::service {
namespace {

// udevd's workers are its children; the programs a rule runs are theirs.
constexpr int ancestorsLookedAt = 8;

std::vector<std::string> nodesOf(const DeviceInfo& info)
{
    std::vector<std::string> nodes{kernel::loopDevNode(info.number)};
    for (const auto partition : info.partitions)
        nodes.push_back(kernel::partitionDevNode(info.number, partition));
    return nodes;
}

} // namespace

AutoclearWatch::AutoclearWatch(Services& services, EventLoop& loop) : s_(services), loop_(loop)
{
    try {
        watch_.emplace();
    } catch (const std::exception& e) {
        log::warn("opens of autoclear devices cannot be watched ({}): such a device is let go of only at its first "
                  "Device.Open",
                  e.what());
    }
}

AutoclearWatch::~AutoclearWatch()
{
    if (mounts_)
        loop_.unwatch(mounts_->fd());
    for (const auto& [diskseq, pidFds] : openers_)
        for (const auto& [pid, pidFd] : pidFds)
            loop_.unwatch(pidFd->get());
}

void AutoclearWatch::track(const Device& device)
{
    if (letGoWhenReady_.erase(device.info.diskseq))
        return letGo(device.info.diskseq);
    if (!watch_ || !device.options.autoclear || device.options.lifetime == Lifetime::Fd || !device.lockFd ||
        !*device.lockFd || device.state != DeviceState::Ready)
        return;
    try {
        watch_->add(device.info.number, nodesOf(device.info));
    } catch (const std::exception& e) {
        log::warn("opens of dev={} are not watched ({}): it is let go of only at its first Device.Open",
                  device.describe(), e.what());
        return;
    }
    tracked_.insert(device.info.diskseq);
    if (mounts_)
        return;
    try {
        mounts_.emplace();
        loop_.watch(
            mounts_->fd(), [this] { onMounts(); }, EPOLLPRI);
    } catch (const std::exception& e) {
        mounts_.reset();
        log::warn("mounts are not watched ({}): a mount that opens no device node does not count as a use of an "
                  "autoclear device",
                  e.what());
    }
}

void AutoclearWatch::untrack(uint64_t diskseq)
{
    tracked_.erase(diskseq);
    if (!tracked_.empty() || !mounts_)
        return;
    loop_.unwatch(mounts_->fd());
    mounts_.reset();
}

void AutoclearWatch::onMounts()
{
    std::set<dev_t> mounted;
    try {
        mounted = mounts_->devices();
    } catch (const std::exception& e) {
        log::warn("reading the mount table failed: {}", e.what());
        return;
    }
    const std::vector<uint64_t> tracked(tracked_.begin(), tracked_.end());
    for (const auto diskseq : tracked) {
        const auto* device = s_.table.find(diskseq);
        if (!device || device->state != DeviceState::Ready)
            continue;
        for (const auto& node : nodesOf(device->info)) {
            struct stat st {};
            if (::stat(node.c_str(), &st) == 0 && S_ISBLK(st.st_mode) && mounted.count(st.st_rdev)) {
                log::info("{} is mounted: loopd lets go of {} (autoclear)", node, device->describe());
                letGo(diskseq);
                break;
            }
        }
    }
}

void AutoclearWatch::forget(unsigned number)
{
    if (watch_)
        watch_->remove(number);
    std::vector<uint64_t> gone;
    for (const auto diskseq : tracked_)
        if (const auto* device = s_.table.find(diskseq); !device || device->info.number == number)
            gone.push_back(diskseq);
    for (const auto diskseq : gone)
        untrack(diskseq);
    for (auto it = openers_.begin(); it != openers_.end();) {
        const auto* device = s_.table.find(it->first);
        if (device && device->info.number != number) {
            ++it;
            continue;
        }
        for (const auto& [pid, pidFd] : it->second)
            loop_.unwatch(pidFd->get());
        it = openers_.erase(it);
    }
    std::erase_if(letGoWhenReady_, [this](uint64_t diskseq) { return !s_.table.find(diskseq); });
}

void AutoclearWatch::onOpens()
{
    bool overflow = false;
    for (const auto& open : watch_->read(overflow)) {
        auto* device = s_.table.owner(open.number);
        // Not Ready: loopd's own flows (detach, resize, Open) are at work on it.
        if (!device || !device->options.autoclear || !device->lockFd || !*device->lockFd ||
            device->state != DeviceState::Ready || ownOrUdev(open.pid))
            continue;
        openedBy(*device, open.pid);
    }
    if (overflow)
        log::warn("fanotify queue overflow: opens of autoclear devices were lost");
}

// loopd itself (its worker threads share its pid), the probe children it forks,
// and udevd with its workers and the programs they run.
bool AutoclearWatch::ownOrUdev(pid_t pid) const
{
    if (pid <= 0)
        return false;
    const auto self = ::getpid();
    const auto udevd = udevPid ? udevPid() : 0;
    for (int depth = 0; depth < ancestorsLookedAt && pid > 1; ++depth) {
        if (pid == self || (udevd > 0 && pid == udevd))
            return true;
        pid = kernel::parentPid(pid);
    }
    return false;
}

void AutoclearWatch::openedBy(Device& device, pid_t pid)
{
    const auto diskseq = device.info.diskseq;
    if (openers_[diskseq].count(pid)) // opened again by the same process
        return;
    log::Scope about{device.about()};
    // 0: a process in a pid namespace loopd cannot see: it cannot be waited for.
    UniqueFd pidFd(pid > 0 ? static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)) : -1);
    if (!pidFd) {
        log::info("dev={} opened by pid={}, which is gone already: loopd lets go of it (autoclear)", device.describe(),
                  pid);
        return letGo(diskseq);
    }
    log::info("dev={} opened by pid={}: loopd lets go of it when that process exits (autoclear)", device.describe(),
              pid);
    auto shared = std::make_shared<UniqueFd>(std::move(pidFd));
    openers_[diskseq].emplace(pid, shared);
    loop_.watch(shared->get(), [this, diskseq] { letGo(diskseq); });
}

void AutoclearWatch::dropOpeners(uint64_t diskseq)
{
    const auto it = openers_.find(diskseq);
    if (it == openers_.end())
        return;
    for (const auto& [pid, pidFd] : it->second)
        loop_.unwatch(pidFd->get());
    openers_.erase(it);
}

// Closes loopd's fd on a worker (a last close may run the kernel's release, which
// flushes the device). Meanwhile the device is Resizing: no detach or resize may
// use that fd. Then its release, at once or at the others' last close, is seen
// in its uevents (EventRepair::checkOwned, reason autoclear).
void AutoclearWatch::letGo(uint64_t diskseq)
{
    dropOpeners(diskseq);
    auto* device = s_.table.find(diskseq);
    if (!device)
        return;
    if (!device->lockFd || !*device->lockFd) { // let go of already (Detach deferred)
        untrack(diskseq);
        return;
    }
    if (device->state != DeviceState::Ready) { // a resize or refused detach: when it is done (track)
        letGoWhenReady_.insert(diskseq);
        return;
    }
    if (watch_)
        watch_->remove(device->info.number);
    untrack(diskseq);
    device->state = DeviceState::Resizing;
    s_.workers.submit([this, diskseq, lockFd = device->lockFd]() -> WorkerPool::Continuation {
        {
            const auto noForks = kernel::holdOffForks(); // no probe child keeps a copy of it open
            lockFd->reset();
        }
        return [this, diskseq] {
            auto* device = s_.table.find(diskseq);
            if (!device)
                return;
            device->state = DeviceState::Ready;
            writeRecord(s_.records, device->record(core::Record::State::Owned));
            log::info("autoclear: loopd let go of dev={}; the kernel releases it at the last close",
                      device->describe());
            // Released at loopd's own close, its events came while it was not
            // Ready and were passed over: look once.
            s_.resync(device->info.number);
        };
    });
}

} // namespace loopd::service
