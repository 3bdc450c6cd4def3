#pragma once

#include <loopd/log.hpp>

#include "services.hpp"

#include "kernel/node_watch.hpp"

#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

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

    // udevd wrote its database entry of a device of loopN: the event follows at
    // once unless it is lost. Looked at after a short grace (checkDatabase).
    void databaseWritten(unsigned number, core::Clock::time_point now);
    [[nodiscard]] std::optional<core::Clock::time_point> nextDatabaseCheck() const;
    // The entries whose grace passed and whose event still did not come: udev's
    // database decides, by the rules of resync().
    void checkDatabase(core::Clock::time_point now);
    // A udevd answers again: what requests waiting for udev lack is asked for
    // again, so that it processes them now (the old one may have died with them).
    void udevReturned();
    // Right after the kernel work of an attach, with the kernel's socket drained:
    // every uevent of LOOP_CONFIGURE and BLKPG was sent before the worker
    // returned, so what the kernel view lacks now, the kernel did not send.
    void afterConfigure(const core::Watch& watch);
    // Someone else detached (or asked to detach) a device loopd owns: let go of it.
    void foreignDetach(uint64_t diskseq);
    // What the kernel was seen to do differently (the KernelQuirks property).
    [[nodiscard]] const std::vector<std::string>& kernelQuirks() const { return quirks_; }
    std::function<void()> onQuirk; // a quirk was learned (PropertiesChanged)

private:
    // The journal's fields of a repair's messages: the attachment's own (its ref,
    // owner, request) when the table has it, else its diskseq and node.
    [[nodiscard]] log::Context about(uint64_t diskseq, unsigned number) const;
    void trigger(unsigned number, uint64_t diskseq, bool disk, const std::vector<unsigned>& partitions,
                 const char* why);
    void learn(const std::string& quirk, const std::string& evidence);
    [[nodiscard]] core::EventLedger::View udevSnapshot(unsigned number, uint64_t diskseq,
                                                       const core::EventLedger::Partitions& present) const;
    void checkOwned(unsigned number);
    void checkReleased(unsigned number);

    Services& s_;
    kernel::NodeWatch nodeWatch_;
    std::map<unsigned, core::Clock::time_point> databaseDue_; // loop number -> when to look
    std::vector<std::string> quirks_;
};

} // namespace loopd::service
