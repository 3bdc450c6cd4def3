#pragma once

#include "worker_pool.hpp"

#include <loopd/uevent.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

// udev properties of loopd's devices (attach option "hidden", API.md) and the
// wait for udev to have them. udev/90-loopd.rules imports
// /run/loopd/udev/<diskseq> into every event of that attachment's disk and
// partitions; the file is written after LOOP_CONFIGURE (the diskseq is known
// only then), so the attach's own events may have been processed without it.
// confirm() therefore asks the kernel for each device's "change" event again,
// tagged with a SYNTH_UUID, and reports when udev has processed all of them:
// udev handles one device's events in order, so by then its database has the
// properties. Loop thread (the files are on tmpfs; the triggers go to a worker).
namespace loopd::service {

class UdevTags {
public:
    enum class Confirmation {
        Confirmed,   // udev processed every event, with the properties
        TimedOut,    // not all of them in time
        NotImported, // processed without them: 90-loopd.rules is not installed
    };
    using Then = std::function<void(Confirmation)>;

    UdevTags(std::filesystem::path dir, WorkerPool& workers);

    // KEY=value lines for udev's IMPORT{file}. Logs (does not throw) a failure:
    // the attach then times out waiting for what udev cannot show.
    void write(uint64_t diskseq, const std::map<std::string, std::string>& properties) const noexcept;
    void remove(uint64_t diskseq) const noexcept;

    // Triggers "change" for the disk (0) and `partitions` of loopN, then `then`
    // once events of `source` with DISKSEQ=diskseq and this request's SYNTH_UUID
    // came for all of them (or a udev one came without the properties), or at the
    // timeout.
    void confirm(unsigned number, uint64_t diskseq, const std::vector<unsigned>& partitions, EventSource source,
                 std::chrono::milliseconds timeout, Then then);
    // Every uevent, both sources.
    void onEvent(const Uevent& event);

private:
    struct Pending {
        uint64_t diskseq = 0;
        EventSource source = EventSource::Udev;
        std::set<unsigned> missing;
        Then then;
        std::shared_ptr<std::atomic<bool>> done; // ends the deadline's thread
    };

    std::filesystem::path dir_;
    WorkerPool& workers_;
    std::map<std::string, Pending> pending_; // by SYNTH_UUID
};

} // namespace loopd::service
