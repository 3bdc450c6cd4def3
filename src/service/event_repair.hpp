#pragma once

#include "services.hpp"

#include "kernel/node_watch.hpp"

#include <set>

// When the event stream lies (DESIGN.md): lost events (ENOBUFS, dropped uevents)
// are made up for from sysfs and udev's database; a missing event is asked for
// again; a device someone else released or replaced is let go of. Loop thread.
namespace loopd::service {

class EventRepair {
public:
    explicit EventRepair(Services& services);

    // The node watch (inotify): readable when an owned device's node was closed.
    [[nodiscard]] int nodeWatchFd() const { return nodeWatch_.fd(); }
    void onNodeClosed();
    // A device joined or left the table: its node is watched while loopd owns it.
    void watch(const Device& device);
    void unwatch(unsigned number);

    // Events arrived for these owned numbers: sysfs says what they meant.
    void afterEvents(const std::set<unsigned>& numbers);
    // Events were lost: re-read every device someone waits on or loopd owns.
    void resyncAll();
    // Reads sysfs and udev's database for one device (no waiting).
    void resync(unsigned number, bool kernelToo = true);
    void nudge(const core::Nudge& due);
    // The safety net for a `losetup -d` the node watch missed: reads sysfs for
    // every owned device on a worker.
    void scanReleased();

private:
    void checkOwned(unsigned number);
    void checkReleased(unsigned number);
    void foreignDetach(uint64_t diskseq);

    Services& s_;
    kernel::NodeWatch nodeWatch_;
};

} // namespace loopd::service
