#pragma once

#include <loopd/unique_fd.hpp>

#include <set>
#include <string>
#include <utility>

// Notices what udevd does without asking it anything (issue 16: zero wake-ups when
// idle; issue 19: a lost event costs milliseconds). Loop thread; nothing blocks.
//
// - udevd's presence: inotify on its runtime dir (/run/udev) sees the control
//   socket made by a starting udevd (unlink + bind: IN_CREATE); a pidfd of the
//   udevd that listens on it (SO_PEERCRED of a connect, which needs no accept)
//   becomes readable when that process exits, SIGKILL included.
// - udev's database: udevd writes /run/udev/data/b<major>:<minor> (a temporary
//   file renamed into place: IN_MOVED_TO) before it broadcasts the event, so a
//   rename there is the trace of an event even when the event itself is lost.
namespace loopd::uevent {

class UdevWatch {
public:
    // runtimeDir is udev's (/run/udev; tests may point elsewhere).
    explicit UdevWatch(std::string runtimeDir = "/run/udev");
    UdevWatch(const UdevWatch&) = delete;
    UdevWatch& operator=(const UdevWatch&) = delete;

    // inotify: readable when udev's runtime or database dir changed.
    [[nodiscard]] int fd() const { return inotify_.get(); }
    // The pidfd of the udevd found running, -1 if none: readable when it exits.
    [[nodiscard]] int pidFd() const { return pidFd_.get(); }
    [[nodiscard]] bool running() const { return pidFd_.get() >= 0; }
    // The pid of the udevd found running, 0 if none.
    [[nodiscard]] int pid() const { return running() ? pid_ : 0; }

    struct Changes {
        bool control = false;                            // the control socket came or went
        std::set<std::pair<unsigned, unsigned>> written; // database entries written (major, minor)
        bool overflow = false;                           // IN_Q_OVERFLOW: entries may be missing
    };
    // Everything the inotify fd holds now.
    Changes read();
    // Connects to the control socket: running() afterwards says whether a udevd
    // listens (and its pidfd is then held). Cheap; call when read() says control.
    bool probe();
    // The pidfd said udevd exited.
    void lost() { pidFd_.reset(); }

private:
    void addWatches();

    std::string runtimeDir_;
    UniqueFd inotify_;
    UniqueFd pidFd_;
    int pid_ = 0;
    int runtimeWatch_ = -1;
    int dataWatch_ = -1;
    int parentWatch_ = -1; // on /run while udev's runtime dir does not exist
};

} // namespace loopd::uevent
