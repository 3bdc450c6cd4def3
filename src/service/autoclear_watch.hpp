#pragma once

#include "event_loop.hpp"
#include "services.hpp"

#include "kernel/open_watch.hpp"

#include <sys/types.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <vector>

// Attach option autoclear (API.md): "once the device has been opened by someone
// else, the kernel releases it at the last close". loopd keeps its LOCK_SH fd of
// an autoclear device (DESIGN.md, step 6) until someone else has used it, then
// closes it: from then on the kernel releases the device at the last close of
// anyone's, and EventRepair reports that release from its uevents with reason
// autoclear. Loop thread; nothing here blocks or wakes loopd while nobody opens
// a watched node.
//
// "Used" is an open of the disk's or a partition's node (fanotify, see
// kernel::OpenWatch) by a process that is neither loopd (nor a child of it) nor
// udevd or one of its workers (udev opens a device for every event it processes:
// `udevadm trigger` must not release it). loopd lets go once that opener has
// exited, not at its open: `mount /dev/loopN` opens the node to probe it, closes
// it, and only then calls mount(2), whose own open of the block device passes no
// node. Let go at the probe's open, loopd's close could come between the probe's
// close and mount(2), release the device and fail the mount. Once the opener has
// exited, whatever it left holding the device (a mount, a child with the fd) makes
// the last close; if nothing, loopd's close is the last one and releases it then.
// A mount that opened no node (`mount -t ext4 /dev/loopN`, a mount unit) is seen
// in loopd's mount table instead, and let go of at once: the mount holds it.
namespace loopd::service {

class AutoclearWatch {
public:
    AutoclearWatch(Services& services, EventLoop& loop);
    AutoclearWatch(const AutoclearWatch&) = delete;
    AutoclearWatch& operator=(const AutoclearWatch&) = delete;
    ~AutoclearWatch();

    // The fanotify fd, -1 when fanotify is not available (then an autoclear
    // device is let go of only at its first Device.Open, and the log says so).
    [[nodiscard]] int fd() const { return watch_ ? watch_->fd() : -1; }
    // Readable fd: who opened which watched node.
    void onOpens();
    // The mount table changed (watched while an autoclear device is held).
    void onMounts();
    // A device is ready (attached, adopted, resized, taken back): its nodes are
    // watched if it is an autoclear device loopd still holds.
    void track(const Device& device);
    // It left the table (or loopd let go of it): nothing of it is watched.
    void forget(unsigned number);
    // The udevd that runs now (its pid, 0 if none): its processes' opens are udev's.
    std::function<pid_t()> udevPid;

private:
    void openedBy(Device& device, pid_t pid);
    [[nodiscard]] bool ownOrUdev(pid_t pid) const;
    void letGo(uint64_t diskseq);
    void dropOpeners(uint64_t diskseq);
    void untrack(uint64_t diskseq);

    Services& s_;
    EventLoop& loop_;
    std::optional<kernel::OpenWatch> watch_;
    // Openers waited for, per diskseq: pid -> pidfd, readable when it exits. A pid
    // is taken from the event and opened as a pidfd after: one that exited and
    // whose number was reused meanwhile is waited for instead (then loopd lets go
    // later, never earlier).
    std::map<uint64_t, std::map<pid_t, std::shared_ptr<UniqueFd>>> openers_;
    // Openers gone while the device was busy (resizing): let go once it is ready.
    std::set<uint64_t> letGoWhenReady_;
    // Held autoclear devices whose nodes are watched; while there is one, the
    // mount table is watched too.
    std::set<uint64_t> tracked_;
    std::optional<kernel::MountTable> mounts_;
};

} // namespace loopd::service
