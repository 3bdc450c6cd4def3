#pragma once

#include "services.hpp"

#include <functional>
#include <set>
#include <vector>

// Start-up after a restart: adopt what loopd owned, clean up what a crash left half
// done (DESIGN.md, "Restart"). Runs before the bus name is owned, so nothing else
// is served yet and the blocking kernel calls here delay no caller.
namespace loopd::service {

class Recovery {
public:
    explicit Recovery(Services& services);

    // Reads every record and acts on it. Returns the adopted devices whose client
    // (lifetime=client) must be checked for life.
    std::vector<uint64_t> run();
    // Adopted devices whose partitions a crash cost were re-added; they are listed
    // only ready, so wait (up to 5 s) until udev has processed them. `pump` reads
    // the event sockets once, waiting at most `ms`.
    void awaitReadded(const std::function<void(int ms)>& pump, const std::function<void(unsigned)>& resync);

    bool settle(const core::Outcome& outcome);

private:
    bool adoptOrRelease(const core::Record& record);
    bool adopt(const core::Record& record);

    Services& s_;
    std::vector<uint64_t> readded_;
    std::set<core::RequestId> adopting_;
    std::vector<uint64_t> clients_;
};

} // namespace loopd::service
