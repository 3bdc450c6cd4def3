#pragma once

#include "services.hpp"

#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <optional>
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
    // Adopted devices whose partitions a crash cost were re-added are not listed
    // until udev has processed those partitions (a listed device is ready): this
    // starts waiting for them, without blocking, so that the bus name and every
    // other device are served meanwhile. `resync` reads udev's database once.
    void awaitReadded(const std::function<void(unsigned)>& resync);
    // Such a device became ready (or 5 s passed): it is listed; or someone else
    // released it meanwhile (onReleased).
    bool settle(const core::Outcome& outcome);

    std::function<void(uint64_t diskseq)> onListed;
    std::function<void(uint64_t diskseq)> onReleased;

    // An owned record's device as the kernel has it now (reopenOwned): found for
    // every record before any is adopted, on a few threads at once.
    struct Reopened {
        std::optional<UniqueFd> fd;
        bool readded = false;
        bool locked = false;
        uint64_t before = 0; // CLOCK_REALTIME µs when its reopen began
        std::exception_ptr failed;
    };

private:
    bool adoptOrRelease(const core::Record& record, Reopened& reopened);
    bool adopt(const core::Record& record, Reopened& reopened);
    void lockLater(const std::shared_ptr<UniqueFd>& fd, unsigned number);

    struct Readded {
        uint64_t diskseq = 0;
        uint64_t readyTimestamp = 0; // of the record: it was ready before the crash
    };

    Services& s_;
    std::map<core::RequestId, Readded> readded_;
    std::vector<uint64_t> clients_;
};

} // namespace loopd::service
