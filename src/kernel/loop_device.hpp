#pragma once

#include <loopd/unique_fd.hpp>

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>

// Thin wrappers over the loop driver's ioctls. loopDevNode and partitionDevNode
// only format a path (no syscall): the loop thread uses them too. Everything else
// (open, flock, ioctl) may block and runs on worker threads. Failures throw
// std::system_error with the syscall named.
namespace loopd::kernel {

// What LOOP_CONFIGURE is asked to apply.
struct LoopConfig {
    int backingFd = -1;
    uint64_t offset = 0;
    uint64_t sizeLimit = 0;
    uint32_t sectorSize = 512;
    bool readOnly = false;
    bool directIo = false;
    bool partscan = true;
    bool autoclear = false;
    std::string fileName; // lo_file_name: the ref, or the path for humans
};

// What LOOP_GET_STATUS64 reports about a bound device.
struct LoopStatus {
    dev_t backingDevice = 0;
    ino_t backingInode = 0;
    uint64_t offset = 0;
    uint64_t sizeLimit = 0;
    bool readOnly = false;
    bool directIo = false;
    bool partscan = false;
    bool autoclear = false;
    std::string fileName; // lo_file_name
};

// "/dev/loopN" and "/dev/loopNpK": string formatting only, safe on any thread.
std::string loopDevNode(unsigned number);
std::string partitionDevNode(unsigned number, unsigned partition);

// /dev/loop-control, locked with LOCK_EX while held: systemd's loop code takes the
// same lock, so two cooperating allocators never race for one number.
class LoopControl {
public:
    LoopControl();
    // LOOP_CTL_GET_FREE: a number that is unbound right now (it may be taken by
    // someone not using the lock before we configure it; configure() says so).
    unsigned getFree();
    // LOOP_CTL_ADD: makes /dev/loopN exist (fine if it does already).
    void add(unsigned number);

private:
    UniqueFd fd_;
};

UniqueFd openLoop(unsigned number, bool readOnly);
// nullopt when the kernel refuses new openers (ENXIO): the device is being
// released (Lo_rundown, 6.11+: between LOOP_CLR_FD or an autoclear last close and
// the unbound state) or is being removed. Any other failure throws.
std::optional<UniqueFd> tryOpenLoop(unsigned number, bool readOnly);

// flock() on an fd; op is LOCK_EX, LOCK_SH or LOCK_UN. Retries EINTR.
// flock(op | LOCK_NB): false when someone else holds a conflicting lock.
bool tryLockFd(int fd, int op);
void lockFd(int fd, int op);

// nullopt when the device is unbound (ENXIO).
std::optional<LoopStatus> getStatus(int loopFd);

// LOOP_CONFIGURE, falling back to LOOP_SET_FD + LOOP_SET_STATUS64 on kernels before
// 5.8. Returns false when the device was bound by someone else meanwhile (EBUSY),
// so the caller can pick another number.
bool configure(int loopFd, const LoopConfig& config);

// BLKGETDISKSEQ (5.15+) on the fd that configured the device: the attachment's
// identity, read without any window for a detach and re-attach in between.
uint64_t diskseq(int loopFd);
uint64_t sizeBytes(int loopFd);
uint32_t logicalBlockSize(int loopFd);

// LOOP_CLR_FD. Since 6.11 the release happens at the last close; with other
// openers it only marks the device autoclear.
void clear(int loopFd);

// LOOP_SET_CAPACITY: the device takes the backing file's present size (less the
// offset, up to the size limit). The kernel sends the disk's "change" uevent
// (RESIZE=1) when the size changed; partitions are left as they are.
void setCapacity(int loopFd);

// BLKFLSBUF: the device's page cache written back and dropped, so a read after
// the backing file was changed behind the device (sfdisk on the image) sees it.
void flushBuffers(int loopFd);

// LOOP_SET_STATUS64 with LO_FLAGS_AUTOCLEAR set or cleared, the rest as it is: takes
// back the autoclear a LOOP_CLR_FD left on a device that is still open elsewhere.
void setAutoclear(int loopFd, bool on);

} // namespace loopd::kernel
