#include "attach_sequence.hpp"

#include "kernel/loop_device.hpp"
#include "kernel/sysfs.hpp"

#include <loopd/error.hpp>

#include <fcntl.h>
#include <sys/file.h>

#include <cerrno>
#include <chrono>
#include <random>
#include <spdlog/spdlog.h>
#include <system_error>
#include <thread>

namespace loopd::service {
namespace {

constexpr int maxAllocationAttempts = 64;

kernel::LoopConfig configOf(const kernel::BackingFile& backing, const AttachOptions& options, const std::string& what)
{
    return kernel::LoopConfig{
        .backingFd = backing.fd.get(),
        .offset = options.offset,
        .sizeLimit = options.sizeLimit,
        .sectorSize = options.sectorSize,
        .readOnly = options.readOnly || !backing.writable,
        .directIo = options.directIo,
        .partscan = options.partscan,
        .autoclear = options.autoclear,
        .fileName = options.ref.empty() ? what : options.ref,
    };
}

// Someone not using the loop-control lock (losetup) may take the number between
// LOOP_CTL_GET_FREE and LOOP_CONFIGURE; back off a little and take another.
void backOff()
{
    thread_local std::minstd_rand random(std::random_device{}());
    std::this_thread::sleep_for(std::chrono::microseconds(random() % 10'000));
}

// Partitions left on an unbound device by an earlier attachment without partscan
// (the kernel drops them only when partscan was on) would otherwise reappear as
// ours; they are ours to clear now, as the device is unbound and locked.
void removeStalePartitions(int loopFd, unsigned number)
{
    for (const auto partition : kernel::existingPartitions(number))
        kernel::removePartition(loopFd, partition);
}

// Picks a free device under the loop-control lock and configures it. Returns the
// locked fd and the device number.
std::pair<UniqueFd, unsigned> allocateAndConfigure(const kernel::LoopConfig& config)
{
    for (int attempt = 0; attempt < maxAllocationAttempts; ++attempt) {
        unsigned number;
        UniqueFd loopFd;
        {
            kernel::LoopControl control;
            try {
                number = control.getFree();
            } catch (const std::system_error& e) {
                throw Error(Errc::NoFreeDevice, std::string("no free loop device: ") + e.what());
            }
            loopFd = kernel::openLoop(number, config.readOnly);
            // LOCK_EX keeps udev away while the device is half set up: stale
            // partitions, and the unconfigured window of the pre-5.8 fallback.
            kernel::lockFd(loopFd.get(), LOCK_EX);
            if (!kernel::getStatus(loopFd.get())) {
                removeStalePartitions(loopFd.get(), number);
                if (kernel::configure(loopFd.get(), config)) {
                    // Downgrade at once: udevd requeues the change event of a device
                    // it finds LOCK_EX-locked and retries only every 200 ms (udev 252),
                    // which measured here as 200-400 ms per attach when the lock was
                    // held through probing and BLKPG. Under LOCK_SH udev probes the
                    // disk while we add partitions; their own events follow.
                    //
                    // The shared lock stays for as long as loopd owns the device: udev
                    // then never gets LOCK_EX for its BLKRRPART after a
                    // close-after-write, which on a kernel without partition parsers
                    // would wipe the partitions added with BLKPG.
                    kernel::lockFd(loopFd.get(), LOCK_SH);
                    return {std::move(loopFd), number};
                }
            }
        }
        backOff();
    }
    throw Error(Errc::NoFreeDevice, "no loop device stayed free long enough to configure it");
}

void addPartitions(int loopFd, DeviceInfo& info)
{
    for (const auto& spec : kernel::probePartitions(loopFd)) {
        // false: the kernel's own parser created it already (EBUSY), fine.
        kernel::addPartition(loopFd, spec);
        info.partitions.push_back(spec.number);
    }
}

void readBack(int loopFd, const kernel::BackingFile& backing, DeviceInfo& info)
{
    const auto status = kernel::getStatus(loopFd);
    const auto node = kernel::loopDevNode(info.number);
    if (!status)
        throw Error(Errc::DeviceChanged, node + " was detached by someone else while attaching");
    if (status->backingDevice != backing.device || status->backingInode != backing.inode)
        throw Error(Errc::DeviceChanged, node + " is backed by another file than the one attached");
    info.backingDevice = status->backingDevice;
    info.backingInode = status->backingInode;
    info.offset = status->offset;
    info.sizeLimit = status->sizeLimit;
    info.readOnly = status->readOnly;
    info.directIo = status->directIo;
    info.autoclear = status->autoclear;
    info.partscan = status->partscan;
    info.size = kernel::sizeBytes(loopFd);
    info.sectorSize = kernel::logicalBlockSize(loopFd);
    info.backingFile = kernel::sysfsBackingFile(info.number).value_or("");
}

void removePartitions(int loopFd, const DeviceInfo& info)
{
    for (auto it = info.partitions.rbegin(); it != info.partitions.rend(); ++it)
        kernel::removePartition(loopFd, *it);
}

// A partition that is mounted or otherwise claimed cannot be removed (BLKPG says
// EBUSY): find out before touching anything, so a refused detach changes nothing.
void checkPartitionsUnclaimed(const DeviceInfo& info)
{
    for (const auto partition : info.partitions) {
        const auto node = kernel::partitionDevNode(info.number, partition);
        UniqueFd probe(::open(node.c_str(), O_RDONLY | O_CLOEXEC | O_EXCL | O_NONBLOCK));
        if (!probe && errno == EBUSY)
            throw Error(Errc::Busy, node + " is in use (mounted or claimed)");
    }
}

} // namespace

kernel::BackingFile openBacking(const std::string& path, const AttachOptions& options,
                                const kernel::Credentials& caller)
{
    if (path.empty() || path.front() != '/')
        throw Error(Errc::InvalidArgument, "'" + path + "' is not an absolute path");
    return checkBacking(kernel::openAs(path, options.readOnly, caller), path, options);
}

kernel::BackingFile checkBacking(UniqueFd fd, const std::string& what, const AttachOptions& options)
{
    return kernel::inspect(std::move(fd), what, options.offset);
}

Attached attach(const kernel::BackingFile& backing, const AttachOptions& options, const std::string& what)
{
    auto [loopFd, number] = allocateAndConfigure(configOf(backing, options, what));
    Attached attached{std::move(loopFd), DeviceInfo{}};
    auto& info = attached.info;
    info.number = number;
    try {
        info.diskseq = kernel::diskseq(attached.lockFd.get());
        readBack(attached.lockFd.get(), backing, info);
        if (options.partscan)
            addPartitions(attached.lockFd.get(), info);
    } catch (...) {
        undo(std::move(attached.lockFd), info);
        throw;
    }
    return attached;
}

bool detach(UniqueFd& lockFd, const DeviceInfo& info)
{
    checkPartitionsUnclaimed(info);
    removePartitions(lockFd.get(), info);
    // Cleared through the one fd loopd holds, then closed: with no other opener the
    // kernel (6.11+) releases the device at this close; with others it only sets
    // autoclear and the release waits for their last close.
    kernel::clear(lockFd.get());
    lockFd.reset();
    return !(kernel::sysfsDiskseq(info.number) == info.diskseq && kernel::sysfsBackingFile(info.number));
}

void undo(UniqueFd lockFd, const DeviceInfo& info) noexcept
{
    try {
        // If someone detached and re-attached the device meanwhile, it is theirs now.
        if (info.diskseq != 0 && kernel::diskseq(lockFd.get()) != info.diskseq)
            return;
        removePartitions(lockFd.get(), info);
        kernel::clear(lockFd.get());
    } catch (const std::exception& e) {
        spdlog::warn("undo of an attach failed dev={} diskseq={}: {}", kernel::loopDevNode(info.number), info.diskseq,
                     e.what());
    }
}

} // namespace loopd::service
