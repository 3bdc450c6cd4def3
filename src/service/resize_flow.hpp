#pragma once

#include "bus_objects.hpp"
#include "callers.hpp"
#include "services.hpp"

#include <loopd/uevent.hpp>

#include <atomic>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

// Device.Resize (API.md): after the backing file grew or shrank, LOOP_SET_CAPACITY,
// the table probed again, partitions added, resized or removed to match it, and
// the reply once udev has processed the disk and every partition at their new
// sizes. Loop thread; the kernel work runs on a thread of its own.
//
// "Ready after resize": a resize keeps the diskseq, so the attach's events (same
// DISKSEQ) prove nothing about the new sizes. BLKPG_RESIZE_PARTITION sends no
// uevent at all. So once the kernel work is done loopd asks the kernel for a
// "change" uevent of the disk and of every partition, tagged with a SYNTH_UUID of
// this resize, and replies when udev's processed event with that SYNTH_UUID came
// for each: udev handles a device's events in order, so by then it has seen the
// capacity change, the added partitions' "add" events, and the new sizes.
namespace loopd::service {

class ResizeFlow {
public:
    ResizeFlow(Services& services, Callers& callers);

    // Throws Error for a call refused at once; otherwise answered later, once.
    void request(ResizeResult&& result, const CallOrigin& from, uint64_t diskseq, const core::OptionMap& options);
    // Every uevent (both sources): those carrying a resize's SYNTH_UUID count.
    void onEvent(const Uevent& event);
    [[nodiscard]] bool idle() const { return pending_.empty(); }

private:
    struct Resized {
        uint64_t size = 0;
        std::vector<unsigned> partitions;
    };
    struct Pending {
        ResizeResult result;
        uint64_t diskseq = 0;
        std::string sender;
        std::string uuid;        // SYNTH_UUID of this resize's change events
        std::set<unsigned> seen; // disk (0) and partitions whose event came
        bool kernelDone = false; // the kernel work came back
        Resized resized;
        std::shared_ptr<std::atomic<bool>> done = std::make_shared<std::atomic<bool>>(false);
    };

    void start(core::RequestId id);
    void kernelDone(core::RequestId id, std::exception_ptr error, Resized resized);
    void checkDone(core::RequestId id);
    void timedOut(core::RequestId id);
    void finish(core::RequestId id, std::exception_ptr error);

    Services& s_;
    Callers& callers_;
    std::map<core::RequestId, Pending> pending_;
};

} // namespace loopd::service
