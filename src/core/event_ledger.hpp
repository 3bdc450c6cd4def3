#pragma once

#include <loopd/uevent.hpp>

#include <array>
#include <cstdint>
#include <set>
#include <unordered_map>

namespace loopd::core {

// What the event stream has said about each loop device, per source: the newest
// diskseq seen, whether the disk had an add/change event with it, and which of its
// partitions exist according to add/remove events with it. Events with a lower
// diskseq than the newest are stale and change nothing; a higher one starts over.
//
// Keeping state rather than a queue of events makes arrival order irrelevant: an
// event that came before loopd learned its attachment's diskseq is not lost, and a
// partition removed and re-added (the kernel's double scan) ends up present.
class EventLedger {
public:
    struct View {
        uint64_t diskseq = 0;
        bool disk = false;
        std::set<unsigned> partitions;
    };

    void feed(const Uevent& event);
    // Replaces what is known of loopN from one source with a snapshot of the
    // present state (after events were lost). A snapshot older than what events
    // already said is ignored.
    void resync(unsigned number, EventSource source, View snapshot);
    [[nodiscard]] const View& view(unsigned number, EventSource source) const;
    // The highest diskseq any source reported for loopN.
    [[nodiscard]] uint64_t newestDiskseq(unsigned number) const;

private:
    std::unordered_map<unsigned, std::array<View, 2>> views_;
};

} // namespace loopd::core
