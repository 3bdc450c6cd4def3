#include "bus_write.hpp"

#include <loopd/log.hpp>

#include <systemd/sd-bus.h>

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <cerrno>
#include <chrono>
#include <cstring>

namespace loopd::service {
namespace {

// dbus-daemon takes a message as fast as it comes unless it has stopped
// reading loopd (its limit on loopd's messages still queued for clients that
// do not read them); once begun, a message cannot be left for later, as sd-bus
// would write its next one into the middle of it.
constexpr int stalledAfterMs = 10'000;

} // namespace

// Writing to sd-bus's socket is sound only between its messages: when its write
// queue is empty (a message it could not finish stays there), and from the loop
// thread, its only user. The connection loopd opens (sd_bus_open_system) reads
// and writes one stream socket, which is what sd_bus_get_fd names; anything else
// is left to sd-bus.
bool writeBetweenMessages(sd_bus* bus, const std::string& header, const std::string& body)
{
    uint64_t queued = 1;
    int type = 0;
    socklen_t length = sizeof type;
    const int fd = sd_bus_get_fd(bus);
    if (sd_bus_get_n_queued_write(bus, &queued) < 0 || queued != 0 || fd < 0 ||
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) < 0 || type != SOCK_STREAM)
        return false;
    const std::size_t total = header.size() + body.size();
    std::size_t sent = 0;
    const auto stalled = std::chrono::steady_clock::now() + std::chrono::milliseconds(stalledAfterMs);
    while (sent < total) {
        iovec parts[2];
        msghdr message{};
        message.msg_iov = parts;
        if (sent < header.size()) {
            parts[0] = {const_cast<char*>(header.data()) + sent, header.size() - sent};
            parts[1] = {const_cast<char*>(body.data()), body.size()};
            message.msg_iovlen = 2;
        } else {
            parts[0] = {const_cast<char*>(body.data()) + (sent - header.size()), total - sent};
            message.msg_iovlen = 1;
        }
        const ssize_t n = ::sendmsg(fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0) {
            sent += static_cast<std::size_t>(n);
            continue;
        }
        if (errno == EINTR)
            continue;
        if (sent == 0)
            return false; // not begun: sd-bus queues it, and waits without blocking anyone
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(stalled - std::chrono::steady_clock::now());
        if (errno == EAGAIN && left.count() > 0) {
            pollfd out{fd, POLLOUT, 0};
            ::poll(&out, 1, static_cast<int>(left.count()));
            continue;
        }
        // Cut off mid-message: the stream cannot go on after it, so it is shut,
        // and sd-bus finds the connection lost at its next read or write (loopd
        // exits, to be started again and adopt its devices).
        log::error("GetManagedObjects reply cut off after {} of {} bytes: {}; closing the bus connection", sent, total,
                   errno == EAGAIN ? fmt::format("the bus stopped reading for {} s", stalledAfterMs / 1000)
                                   : std::string(std::strerror(errno)));
        ::shutdown(fd, SHUT_RDWR);
        return true;
    }
    return true;
}

} // namespace loopd::service
