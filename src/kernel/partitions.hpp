#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <shared_mutex>
#include <vector>

// Partition tables and block-device partitions. probePartitions, addPartition and
// removePartition do I/O on the device and block (removePartition for seconds):
// workers only. existingPartitions is a sysfs directory listing, cheap and
// non-blocking: the loop thread uses it too.
namespace loopd::kernel {

struct PartitionSpec {
    unsigned number = 0;
    uint64_t startBytes = 0;
    uint64_t sizeBytes = 0;
};

// The partition table libblkid finds on the device behind fd, in number order;
// empty when there is none. Extended (container) MBR partitions are skipped: the
// kernel exposes them as 1 KiB stubs that are of no use to anyone.
std::vector<PartitionSpec> probePartitions(int fd);

// The same, parsed where attacker-controlled bytes can hurt nothing: a forked
// child with no capabilities, no other fds and a seccomp filter that allows
// reading, memory and the answer. Its answer is checked as untrusted input. Past
// the deadline it is killed and this throws ETIMEDOUT (once the child is gone: one
// stuck in a read of the device goes only when the read returns).
std::vector<PartitionSpec> probePartitionsConfined(int fd, std::chrono::steady_clock::time_point deadline);

// A forked child holds a copy of every fd loopd had at the fork until it closes
// them (the probe child does so first, but may not be scheduled for a while). A
// copy of an O_EXCL open keeps the claim alive after loopd's own close (a detach
// then saw its own probe as "in use"), and a copy of a loop fd is one more opener
// (LOOP_CLR_FD only sets autoclear). A sequence that needs its closes to take
// effect holds this; the probe's fork waits for it, and holds new ones off until
// the child has dropped its copies.
std::shared_lock<std::shared_mutex> holdOffForks();

// BLKPG_ADD_PARTITION. Returns false if the partition already exists (EBUSY: the
// kernel's own parser created it, on kernels that have one).
bool addPartition(int fd, const PartitionSpec& spec);

// BLKPG_DEL_PARTITION; a partition that does not exist (ENXIO) is fine. EBUSY (the
// partition is open) is retried for up to a few seconds before it is an error.
void removePartition(int fd, unsigned number);

// BLKPG_RESIZE_PARTITION: a partition's new size, same start. The kernel sends
// no uevent for it.
void resizePartition(int fd, const PartitionSpec& spec);

// Where the kernel has partition K of loopN now (sysfs start and size); nullopt if
// it has none. Non-blocking.
std::optional<PartitionSpec> existingPartition(unsigned loopNumber, unsigned partition);

// Partition numbers the kernel has for loopN now (from sysfs), in order. Non-blocking.
std::vector<unsigned> existingPartitions(unsigned loopNumber);

} // namespace loopd::kernel
