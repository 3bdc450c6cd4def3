#pragma once

#include <loopd/unique_fd.hpp>

#include <sys/types.h>

#include <map>
#include <set>
#include <string>
#include <vector>

namespace loopd::kernel {

// fanotify on device nodes (/dev/loopN, /dev/loopNpK): who opens them. Loop
// thread: reads never block.
//
// FAN_REPORT_FID, never the fd-reporting mode: that one opens each marked file
// for the listener to hand it an event fd, and a block device's opener counts for
// its last close (autoclear): the listener's close could be the one that releases
// a device. With FID the event names the inode by its file handle and nothing is
// opened. devtmpfs (a tmpfs) takes FID marks on 6.18 and on Debian 12's 6.1 (both
// checked: an open of a marked /dev/loopN by dd reported with dd's pid).
// Kernel-internal opens by device number (mount(2) of a block device, dm) pass
// no node and are not reported.
class OpenWatch {
public:
    // Throws std::system_error when fanotify cannot be had (no CAP_SYS_ADMIN, a
    // seccomp filter, a kernel without FAN_REPORT_FID).
    OpenWatch();
    [[nodiscard]] int fd() const { return fd_.get(); }

    // Marks these nodes for FAN_OPEN, as `number`'s. Throws std::system_error
    // naming the node that could not be marked (ENODEV/EOPNOTSUPP: a /dev
    // without FID support).
    void add(unsigned number, const std::vector<std::string>& nodes);
    // Unmarks what add() marked for `number` (nodes gone already are skipped).
    void remove(unsigned number);

    struct Open {
        unsigned number = 0;
        pid_t pid = 0; // the opener's process (0: in a pid namespace loopd cannot see)
    };
    // The opens since the last call. `overflow` is set when the kernel's queue
    // overflowed (opens were lost).
    std::vector<Open> read(bool& overflow);

private:
    struct Marked {
        unsigned number;
        std::string node;
    };
    UniqueFd fd_;
    std::map<std::string, Marked> handles_; // file handle bytes (type + f_handle) -> node
};

// loopd's mount table (/proc/self/mountinfo): its fd signals EPOLLPRI when a
// mount or umount changed it. mount(2) of a block device opens it by device
// number, never through its node: that open is seen only here. Only mounts that
// reach loopd's mount namespace (under loopd.service, PrivateMounts=: what the
// host mounts propagates to it) are seen.
class MountTable {
public:
    MountTable();
    [[nodiscard]] int fd() const { return fd_.get(); }
    // The device numbers of every mounted filesystem now.
    std::set<dev_t> devices();

private:
    UniqueFd fd_;
};

// The parent of a process (procfs), 0 when it cannot be read (gone, hidden).
pid_t parentPid(pid_t pid);

} // namespace loopd::kernel
