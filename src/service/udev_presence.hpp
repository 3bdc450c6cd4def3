#pragma once

#include "event_loop.hpp"

#include "core/registry.hpp"
#include "uevent/udev_watch.hpp"

#include <functional>
#include <optional>
#include <vector>

namespace loopd::service {

// Follows udevd's comings and goings and its database writes from events alone
// (inotify on /run/udev and its database, the running udevd's pidfd): no polling,
// so an idle loopd sleeps (issue 16). Tells the daemon when udevd left or answers
// again, and when requests that waited for udev should count the kernel's events.
// Loop thread.
class UdevPresence {
public:
    struct Hooks {
        std::function<void(bool running)> changed;                             // udevd left, or answers again
        std::function<void(unsigned number, core::Clock::time_point)> written; // a database entry of loopN
        std::function<std::vector<unsigned>()> watchedNumbers;                 // all of them, after an overflow
        std::function<void()> fallBack;                                        // udevd stayed away past the grace
    };

    UdevPresence(uevent::UdevWatch& watch, EventLoop& loop, Hooks hooks);
    UdevPresence(const UdevPresence&) = delete;
    UdevPresence& operator=(const UdevPresence&) = delete;

    [[nodiscard]] bool running() const { return running_; }
    // What is due of its timers (each armed only while needed), and when next.
    void onTime(core::Clock::time_point now);
    [[nodiscard]] std::optional<core::Clock::time_point> nextDeadline() const;

private:
    void onWatch();
    void update(core::Clock::time_point now);
    void watchPid();

    uevent::UdevWatch& watch_;
    EventLoop& loop_;
    Hooks hooks_;
    bool running_;
    int pidFd_ = -1; // the pidfd the loop watches now
    // A control socket appeared but did not answer yet (udevd between bind and
    // listen): asked again shortly, until then.
    std::optional<core::Clock::time_point> reprobeUntil_;
    core::Clock::time_point nextReprobe_{};
    // udevd went away with requests waiting for it: when they fall back to the
    // kernel's events unless a udevd answers first.
    std::optional<core::Clock::time_point> fallBackAt_;
};

} // namespace loopd::service
