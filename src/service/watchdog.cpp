#include "watchdog.hpp"

#include <systemd/sd-daemon.h>

namespace loopd::service {

Watchdog::Watchdog()
{
    uint64_t usec = 0;
    if (sd_watchdog_enabled(0, &usec) > 0)
        interval_ = std::chrono::microseconds(usec / 2);
}

std::optional<Watchdog::Clock::time_point> Watchdog::ping(Clock::time_point now)
{
    if (interval_.count() == 0)
        return std::nullopt;
    if (now >= next_) {
        sd_notify(0, "WATCHDOG=1");
        next_ = now + interval_;
    }
    return next_;
}

} // namespace loopd::service
