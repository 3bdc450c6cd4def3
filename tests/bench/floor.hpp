#pragma once

#include "contender.hpp"

#include "core/registry.hpp"
#include "uevent/monitor.hpp"

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

// The floor: the raw kernel sequence in this process, no IPC, no records, no
// authorization. What any tool that keeps its promise ("ready when I return") must
// at least do on this machine:
//   subscribe to udev's events (once, at start),
//   LOOP_CTL_GET_FREE + LOOP_CONFIGURE + BLKGETDISKSEQ under the loop-control lock,
//   libblkid probe + BLKPG for the partitions (the kernel here has no parsers),
//   wait for udev's events of the disk and every partition carrying that diskseq;
// and for detach BLKPG delete, LOOP_CLR_FD, wait for the partitions' remove events.
// Readiness is decided by loopd's own core::Registry, fed from one monitor thread.
namespace loopd::bench {

class Floor final : public Contender {
public:
    Floor();
    ~Floor() override;
    Floor(const Floor&) = delete;
    Floor& operator=(const Floor&) = delete;

    std::unique_ptr<Client> client() override;

    Attachment attach(const std::string& image, const AttachOptions& options);
    void detach(Attachment& attachment);

    // How often the monitor socket overflowed (ENOBUFS) and the floor re-read sysfs
    // and udev's database instead.
    [[nodiscard]] unsigned overflows() const { return overflows_; }

private:
    core::Outcome::Kind await(core::Goal goal, const core::Watch& watch);
    void monitorLoop();
    void resync(unsigned number);
    void record(const std::vector<core::Outcome>& outcomes);

    uevent::Monitor monitor_;
    UniqueFd stopFd_;
    std::mutex mutex_;
    std::condition_variable settled_;
    core::Registry registry_;                             // under mutex_
    std::map<core::RequestId, core::Outcome::Kind> done_; // under mutex_
    std::atomic<core::RequestId> nextId_{1};
    std::atomic<unsigned> overflows_{0};
    std::thread thread_;
};

} // namespace loopd::bench
