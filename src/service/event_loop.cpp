#include "event_loop.hpp"

#include <loopd/log.hpp>

#include <sys/epoll.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <system_error>

namespace loopd::service {
namespace {
[[noreturn]] void fail(const char* what)
{
    throw std::system_error(errno, std::generic_category(), what);
}
} // namespace

EventLoop::EventLoop() : epoll_(::epoll_create1(EPOLL_CLOEXEC))
{
    if (!epoll_)
        fail("epoll_create1");
}

void EventLoop::watch(int fd, std::function<void()> onReadable, uint32_t events)
{
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = fd;
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) < 0)
        fail("epoll_ctl");
    handlers_[fd] = std::move(onReadable);
}

void EventLoop::unwatch(int fd)
{
    if (handlers_.erase(fd) == 0)
        return;
    // ENOENT/EBADF: already gone with its file; nothing else can fail here.
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
}

void EventLoop::armBus(const Wait& wait)
{
    if (wait.fd == busFd_ && wait.events == busEvents_)
        return;
    epoll_event ev{};
    ev.events = wait.events;
    ev.data.fd = wait.fd;
    const int op = busFd_ < 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    if (::epoll_ctl(epoll_.get(), op, wait.fd, &ev) < 0)
        fail("epoll_ctl bus");
    busFd_ = wait.fd;
    busEvents_ = wait.events;
}

void EventLoop::run()
{
    std::array<epoll_event, 16> events{};
    while (running_) {
        const auto wait = prepare_();
        if (!running_)
            break;
        armBus(wait);
        int timeoutMs = -1;
        if (wait.deadline) {
            const auto left = std::chrono::ceil<std::chrono::milliseconds>(*wait.deadline - Clock::now());
            // No cap beyond int's range: idle, loopd sleeps until something happens.
            timeoutMs = static_cast<int>(std::clamp<long long>(left.count(), 0, INT_MAX));
        }
        const int n = ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), timeoutMs);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fail("epoll_wait");
        }
        for (int i = 0; i < n; ++i) {
            const int fd = events[static_cast<std::size_t>(i)].data.fd;
            const auto it = handlers_.find(fd); // none for the bus fd: prepare() reads it
            if (it == handlers_.end())
                continue;
            // A handler's failure (a reply the bus refused, a sysfs read that went
            // wrong) is logged where it happened or here; the daemon serves on.
            try {
                // A copy: a handler may unwatch its own fd (the udevd pidfd does).
                const auto handler = it->second;
                handler();
            } catch (const std::exception& e) {
                log::error("event handler failed: {}", e.what());
            }
        }
    }
}

} // namespace loopd::service
