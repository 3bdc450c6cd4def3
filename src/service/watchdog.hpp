#pragma once

#include <chrono>
#include <optional>

namespace loopd::service {

// systemd's service watchdog (WatchdogSec=). Pinged from the loop thread, at half
// the interval: if the loop is stuck, the pings stop and systemd restarts loopd.
class Watchdog {
public:
    using Clock = std::chrono::steady_clock;
    Watchdog();
    // Pings if due; returns when to call again (never when disabled: an idle
    // loopd outside systemd's watchdog sleeps until something happens).
    std::optional<Clock::time_point> ping(Clock::time_point now);

private:
    std::chrono::microseconds interval_{0};
    Clock::time_point next_{};
};

} // namespace loopd::service
