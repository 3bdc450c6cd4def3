#include "udev_watch.hpp"

#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <system_error>

namespace loopd::uevent {
namespace {

constexpr uint32_t dirEvents = IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF;

int addWatch(int inotify, const std::string& path, uint32_t mask)
{
    // ENOENT: not there (yet); the parent's watch says when it comes.
    return ::inotify_add_watch(inotify, path.c_str(), mask | IN_ONLYDIR);
}

// "b259:3" -> (259, 3); block devices only (udev names others c..., n..., +...).
bool parseEntryName(std::string_view name, std::pair<unsigned, unsigned>& devt)
{
    unsigned major = 0, minor = 0;
    char tail = 0;
    if (name.size() < 4 || name.front() != 'b' ||
        std::sscanf(std::string(name.substr(1)).c_str(), "%u:%u%c", &major, &minor, &tail) != 2)
        return false;
    devt = {major, minor};
    return true;
}

} // namespace

UdevWatch::UdevWatch(std::string runtimeDir)
    : runtimeDir_(std::move(runtimeDir)), inotify_(::inotify_init1(IN_CLOEXEC | IN_NONBLOCK))
{
    if (!inotify_)
        throw std::system_error(errno, std::generic_category(), "inotify_init1");
    addWatches();
    probe();
}

void UdevWatch::addWatches()
{
    if (runtimeWatch_ < 0)
        runtimeWatch_ = addWatch(inotify_.get(), runtimeDir_, dirEvents);
    if (runtimeWatch_ < 0) {
        // No udev runtime dir yet (udevd never ran): its parent says when it comes.
        const auto slash = runtimeDir_.find_last_of('/');
        const auto parent = slash == 0 ? std::string("/") : runtimeDir_.substr(0, slash);
        if (parentWatch_ < 0)
            parentWatch_ = addWatch(inotify_.get(), parent, IN_CREATE | IN_MOVED_TO);
        return;
    }
    if (parentWatch_ >= 0) {
        ::inotify_rm_watch(inotify_.get(), parentWatch_);
        parentWatch_ = -1;
    }
    // Renames into place (udevd's db writes) and plain writes, nothing else: a
    // removed entry (a remove event processed) readies nothing.
    if (dataWatch_ < 0)
        dataWatch_ = addWatch(inotify_.get(), runtimeDir_ + "/data", IN_MOVED_TO | IN_CLOSE_WRITE | IN_DELETE_SELF);
}

UdevWatch::Changes UdevWatch::read()
{
    Changes changes;
    alignas(inotify_event) std::array<char, 16384> buffer{};
    for (;;) {
        const auto n = ::read(inotify_.get(), buffer.data(), buffer.size());
        if (n <= 0)
            break; // EAGAIN: drained
        for (ssize_t offset = 0; offset < n;) {
            const auto* event = reinterpret_cast<const inotify_event*>(buffer.data() + offset);
            offset += static_cast<ssize_t>(sizeof(inotify_event) + event->len);
            const std::string_view name = event->len ? std::string_view(event->name) : std::string_view();
            if (event->mask & IN_Q_OVERFLOW) {
                changes.overflow = changes.control = true;
                continue;
            }
            if (event->mask & IN_IGNORED) { // the dir went away (or was replaced)
                if (event->wd == runtimeWatch_)
                    runtimeWatch_ = -1, changes.control = true;
                if (event->wd == dataWatch_)
                    dataWatch_ = -1;
                if (event->wd == parentWatch_)
                    parentWatch_ = -1;
                continue;
            }
            if (event->wd == dataWatch_) {
                if (std::pair<unsigned, unsigned> devt; parseEntryName(name, devt))
                    changes.written.insert(devt);
            } else if (event->wd == runtimeWatch_ && (name == "control" || name == "data")) {
                changes.control = changes.control || name == "control";
            } else if (event->wd == parentWatch_) {
                changes.control = true;
            }
        }
    }
    if (runtimeWatch_ < 0 || dataWatch_ < 0)
        addWatches();
    return changes;
}

bool UdevWatch::probe()
{
    // The socket file outlives a udevd that was killed; only a listener accepts.
    // A non-blocking connect answers at once either way, and SO_PEERCRED names the
    // process that listens (set at connect, no accept needed).
    const UniqueFd sock(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!sock)
        return running();
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    const auto path = runtimeDir_ + "/control";
    std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
    if (::connect(sock.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 && errno != EAGAIN &&
        errno != EINPROGRESS) {
        // ECONNREFUSED: a socket file nobody listens on (a udevd killed, or one
        // between bind and listen: the caller asks again shortly).
        pidFd_.reset();
        return false;
    }
    ucred peer{};
    socklen_t length = sizeof(peer);
    if (::getsockopt(sock.get(), SOL_SOCKET, SO_PEERCRED, &peer, &length) != 0 || peer.pid <= 0)
        return running();
    if (running() && peer.pid == pid_)
        return true; // the same udevd: its pidfd is watched already
    UniqueFd pidFd(static_cast<int>(::syscall(SYS_pidfd_open, peer.pid, 0)));
    if (!pidFd) // gone between connect and here: the next control change says more
        return running();
    pidFd_ = std::move(pidFd);
    pid_ = peer.pid;
    return true;
}

} // namespace loopd::uevent
