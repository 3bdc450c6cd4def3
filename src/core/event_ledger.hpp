#pragma once

#include <loopd/uevent.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <unordered_map>
#include <vector>

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
    // A few partition numbers, kept sorted in one small vector: a std::set spends
    // a heap node on each, and the ledger holds two views per device for as long
    // as loopd owns it (measured: 1000 devices, tests/bench/RESULTS.md).
    class Partitions {
    public:
        Partitions() = default;
        Partitions(std::initializer_list<unsigned> numbers) : Partitions(numbers.begin(), numbers.end()) {}
        template <typename It> Partitions(It first, It last)
        {
            for (; first != last; ++first)
                insert(*first);
        }
        void insert(unsigned p)
        {
            const auto it = std::lower_bound(numbers_.begin(), numbers_.end(), p);
            if (it == numbers_.end() || *it != p)
                numbers_.insert(it, p);
        }
        void erase(unsigned p)
        {
            const auto it = std::lower_bound(numbers_.begin(), numbers_.end(), p);
            if (it != numbers_.end() && *it == p)
                numbers_.erase(it);
        }
        [[nodiscard]] std::size_t count(unsigned p) const
        {
            return std::binary_search(numbers_.begin(), numbers_.end(), p) ? 1 : 0;
        }
        [[nodiscard]] bool empty() const { return numbers_.empty(); }
        [[nodiscard]] std::size_t size() const { return numbers_.size(); }
        bool operator==(const Partitions&) const = default;
        [[nodiscard]] auto begin() const { return numbers_.begin(); }
        [[nodiscard]] auto end() const { return numbers_.end(); }

    private:
        std::vector<unsigned> numbers_;
    };

    struct View {
        uint64_t diskseq = 0;
        bool disk = false;
        Partitions partitions;
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
