#pragma once

#include <loopd/unique_fd.hpp>

#include <sys/epoll.h>

#include <chrono>
#include <functional>
#include <map>
#include <optional>

namespace loopd::service {

// epoll over a few fds plus one deadline source; single-threaded. The D-Bus
// connection's fd and events change as sdbus-c++ wants, so they are re-read every
// iteration through the prepare hook; the bus fd only wakes the loop, and the next
// prepare() processes what arrived.
class EventLoop {
public:
    using Clock = std::chrono::steady_clock;
    struct Wait {
        int fd = -1;         // the bus fd, or -1
        uint32_t events = 0; // its epoll events
        std::optional<Clock::time_point> deadline;
    };

    EventLoop();

    // `events`: EPOLLIN, or EPOLLPRI for files that are always readable and signal
    // a change that way (/proc/self/mountinfo).
    void watch(int fd, std::function<void()> onReadable, uint32_t events = EPOLLIN);
    // Before the fd is closed (a closed fd leaves epoll by itself, its handler not).
    void unwatch(int fd);
    // Called at the top of every iteration: does pending work, says what to wait for.
    void setPrepare(std::function<Wait()> prepare) { prepare_ = std::move(prepare); }

    void run();
    void stop() { running_ = false; }

private:
    void armBus(const Wait& wait);

    UniqueFd epoll_;
    std::map<int, std::function<void()>> handlers_;
    std::function<Wait()> prepare_;
    int busFd_ = -1;
    uint32_t busEvents_ = 0;
    bool running_ = true;
};

} // namespace loopd::service
