#pragma once

#include <loopd/uevent.hpp>

#include <memory>
#include <optional>
#include <vector>

struct udev;
struct udev_monitor;

// The netlink monitors for block uevents of loop devices (libudev). Runs on the
// loop thread: receive() never blocks.
namespace loopd::uevent {

class Monitor {
public:
    // source Udev: events udevd broadcasts after processing; Kernel: the kernel's
    // own. receiveBufferBytes sizes the socket buffer (udevd itself uses 128 MiB).
    Monitor(EventSource source, int receiveBufferBytes);
    ~Monitor();
    Monitor(const Monitor&) = delete;
    Monitor& operator=(const Monitor&) = delete;

    [[nodiscard]] int fd() const;

    struct Batch {
        std::vector<Uevent> events;
        bool overflow = false; // ENOBUFS: the kernel dropped events for us
    };
    // Everything readable now, loop devices only.
    Batch receive();

private:
    EventSource source_;
    udev* udev_;
    udev_monitor* monitor_;
};

// Parses "loopN" / "loopNpK" into (N, K); nullopt for other devices.
std::optional<std::pair<unsigned, unsigned>> parseLoopName(const char* sysname);

// Whether a udevd is running and processing events (its control socket exists).
bool udevRunning();

} // namespace loopd::uevent
