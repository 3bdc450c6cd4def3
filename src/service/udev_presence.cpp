#include "udev_presence.hpp"

#include "kernel/sysfs.hpp"

namespace loopd::service {
namespace {

using namespace std::chrono_literals;

// How long requests that count udev's events wait for a udevd to return before
// readiness=auto ones count the kernel's: a restart (a systemd upgrade) takes a
// few hundred ms, and one that comes back completes them under udev readiness.
constexpr auto udevReturnGrace = 1s;
// A control socket that did not accept yet is asked again this often, this long.
constexpr auto reprobeInterval = 10ms;
constexpr auto reprobeLimit = 2s;

} // namespace

UdevPresence::UdevPresence(uevent::UdevWatch& watch, EventLoop& loop, Hooks hooks)
    : watch_(watch), loop_(loop), hooks_(std::move(hooks)), running_(watch.running())
{
    loop_.watch(watch_.fd(), [this] { onWatch(); });
    watchPid();
}

// udev's runtime dir or database changed.
void UdevPresence::onWatch()
{
    const auto now = core::Clock::now();
    const auto changes = watch_.read();
    if (changes.control) {
        watch_.probe();
        if (!watch_.running()) { // a socket between bind and listen, or a dead one
            reprobeUntil_ = now + reprobeLimit;
            nextReprobe_ = now + reprobeInterval;
        }
        update(now);
    }
    for (const auto& [major, minor] : changes.written)
        if (const auto number = kernel::loopNumberOfDevt(major, minor))
            hooks_.written(*number, now);
    if (changes.overflow)
        for (const auto number : hooks_.watchedNumbers())
            hooks_.written(number, now);
}

void UdevPresence::onTime(core::Clock::time_point now)
{
    if (reprobeUntil_ && now >= nextReprobe_) {
        nextReprobe_ = now + reprobeInterval;
        watch_.probe();
        update(now);
        if (reprobeUntil_ && (watch_.running() || now >= *reprobeUntil_))
            reprobeUntil_.reset();
    }
    if (fallBackAt_ && now >= *fallBackAt_) {
        fallBackAt_.reset();
        if (!running_)
            hooks_.fallBack();
    }
}

std::optional<core::Clock::time_point> UdevPresence::nextDeadline() const
{
    if (reprobeUntil_ && (!fallBackAt_ || nextReprobe_ < *fallBackAt_))
        return nextReprobe_;
    return fallBackAt_;
}

// The pidfd of the udevd that was running becomes readable when it exits.
void UdevPresence::watchPid()
{
    if (pidFd_ == watch_.pidFd())
        return;
    if (pidFd_ >= 0)
        loop_.unwatch(pidFd_);
    pidFd_ = watch_.pidFd();
    if (pidFd_ >= 0)
        loop_.watch(pidFd_, [this] {
            loop_.unwatch(pidFd_);
            pidFd_ = -1;
            watch_.lost();
            // A new udevd may have taken over already (its socket made before
            // this one's exit was read): ask the socket, not only the pidfd.
            watch_.probe();
            update(core::Clock::now());
        });
}

void UdevPresence::update(core::Clock::time_point now)
{
    watchPid();
    if (watch_.running() == running_)
        return;
    running_ = watch_.running();
    if (running_)
        fallBackAt_.reset();
    else
        fallBackAt_ = now + udevReturnGrace;
    hooks_.changed(running_);
}

} // namespace loopd::service
