#include "attach_sequence.hpp"

#include "kernel/loop_device.hpp"
#include "kernel/sysfs.hpp"

#include <loopd/error.hpp>
#include <loopd/log.hpp>

#include <fcntl.h>
#include <sys/file.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <optional>
#include <random>
#include <system_error>
#include <thread>

namespace loopd::service {
namespace {

constexpr int maxAllocationAttempts = 64;

kernel::LoopConfig configOf(const kernel::BackingFile& backing, const AttachOptions& options,
                            const std::string& fileName)
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
        .fileName = fileName,
    };
}

// How long a table read again (a detach taken back, an adoption) may take.
constexpr std::chrono::seconds reprobeLimit{10};

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

struct Configured {
    UniqueFd holdFd; // the configuring fd, LOCK_SH
    unsigned number = 0;
    uint64_t diskseq = 0;
};

// Right after LOOP_CONFIGURE, on the same fd: BLKGETDISKSEQ names this attachment
// with no window for a detach and re-attach in between. That fd (writable: a
// read-only one makes LOOP_CONFIGURE set the device read-only) is the one loopd
// keeps, under LOCK_SH, for as long as it owns the device: udev then never gets the
// LOCK_EX it needs for BLKRRPART after someone's close-after-write, which on a
// kernel without partition parsers wipes the BLKPG partitions.
//
// Swapping it for a read-only fd would spare a crash's close-after-write, but the
// close of the writable fd makes udev (it watches loop devices) synthesize change
// events for the disk and every partition in the middle of each attach, queued
// before the partitions' own. A restart re-adds whatever partitions a crash cost
// instead (reopenOwned).
Configured identify(UniqueFd configuringFd, unsigned number)
{
    try {
        const auto diskseq = kernel::diskseq(configuringFd.get());
        kernel::lockFd(configuringFd.get(), LOCK_SH);
        return {std::move(configuringFd), number, diskseq};
    } catch (...) {
        kernel::clear(configuringFd.get());
        throw;
    }
}

// Under the loop-control lock: the free device `number`, locked LOCK_EX without
// waiting; if someone holds it locked (udev probing it, any tool), the next
// unbound number above, made with LOOP_CTL_ADD when it does not exist yet.
// nullopt after a few locked ones (the caller backs off and tries again).
std::optional<UniqueFd> lockedFreeDevice(kernel::LoopControl& control, unsigned& number, bool readOnly)
{
    constexpr unsigned maxLooked = 64;
    for (unsigned looked = 0; looked < maxLooked; ++looked, ++number) {
        if (looked > 0 && !std::filesystem::exists("/sys/block/loop" + std::to_string(number)))
            control.add(number);
        // Not openable: another attachment of this number is being released
        // (a passed-over bound one, or the free one taken and detached meanwhile).
        auto fd = kernel::tryOpenLoop(number, readOnly);
        if (!fd)
            continue;
        if (!kernel::tryLockFd(fd->get(), LOCK_EX)) {
            log::debug("dev=loop{} is locked by someone else; passing it over", number);
            continue;
        }
        if (looked == 0 || !kernel::getStatus(fd->get())) // above the free one, bound ones are skipped
            return std::move(*fd);
    }
    return std::nullopt;
}

// Under the loop-control lock: picks a free device and configures it. nullopt
// when someone not using the lock took that number first.
std::optional<Configured> tryConfigure(const kernel::LoopConfig& config)
{
    unsigned number;
    std::optional<UniqueFd> loopFd;
    {
        kernel::LoopControl control;
        try {
            number = control.getFree();
        } catch (const std::system_error& e) {
            throw Error(Errc::NoFreeDevice, std::string("no free loop device: ") + e.what());
        }
        // LOCK_EX keeps udev away while the device is half set up: stale
        // partitions, and the unconfigured window of the pre-5.8 fallback. Never
        // waited for under the control lock: a device someone else holds locked
        // would stall every attach. It is passed over for the next unbound number.
        loopFd = lockedFreeDevice(control, number, config.readOnly);
        if (!loopFd || kernel::getStatus(loopFd->get()))
            return std::nullopt;
    }
    // The control lock is let go here: the device is ours by its LOCK_EX (another
    // loopd attach passes it over; a tool that waits for its lock then finds it
    // bound). On kernels with partition parsers LOOP_CONFIGURE with partscan reads
    // the caller's image, which may take as long as its filesystem likes: under
    // the control lock that would stall every attach.
    removeStalePartitions(loopFd->get(), number);
    // Downgraded at once after (identify): udevd requeues the change event of a
    // device it finds LOCK_EX-locked and retries only every 200 ms (udev 252),
    // measured here as 200-400 ms per attach when the lock was held through
    // probing and BLKPG. Under LOCK_SH udev probes the disk while loopd adds
    // partitions; their own events follow.
    if (!kernel::configure(loopFd->get(), config))
        return std::nullopt;
    return identify(std::move(*loopFd), number);
}

// Picks a free device and configures it, retrying when others race for it.
Configured allocateAndConfigure(const kernel::LoopConfig& config)
{
    for (int attempt = 0; attempt < maxAllocationAttempts; ++attempt) {
        if (auto configured = tryConfigure(config))
            return std::move(*configured);
        backOff(); // outside the loop-control lock, so others allocate meanwhile
    }
    throw Error(Errc::NoFreeDevice, "no loop device stayed free long enough to configure it");
}

// The table is read by a confined child (kernel::probePartitionsConfined): the
// image is the caller's, its bytes are parsed outside this privileged process.
void addPartitions(int loopFd, DeviceInfo& info, unsigned maxPartitions, core::Clock::time_point deadline)
{
    const auto table = kernel::probePartitionsConfined(loopFd, deadline);
    if (table.size() > maxPartitions)
        throw Error(Errc::LimitExceeded, kernel::loopDevNode(info.number) + ": the image's partition table has " +
                                             std::to_string(table.size()) + " partitions, more than " +
                                             std::to_string(maxPartitions) + " (max-partitions)");
    for (const auto& spec : table) {
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

// Closed when no probe child holds a copy of it (kernel::holdOffForks), so that
// the close is the last one when loopd's was.
void closeUncopied(UniqueFd& fd)
{
    const auto noForks = kernel::holdOffForks();
    fd.reset();
}

// A disk or partition that is mounted or otherwise claimed (an O_EXCL opener:
// mount, LVM, dm, mkfs) refuses a second exclusive open with EBUSY, and BLKPG
// could not remove such a partition anyway: find out before touching anything,
// so a refused detach changes nothing.
void checkUnclaimed(const DeviceInfo& info)
{
    // A probe child forked meanwhile would keep a claim alive past its close.
    const auto noForks = kernel::holdOffForks();
    auto check = [](const std::string& node) {
        UniqueFd probe(::open(node.c_str(), O_RDONLY | O_CLOEXEC | O_EXCL | O_NONBLOCK));
        if (!probe && errno == EBUSY)
            throw Error(Errc::Busy, node + " is in use (mounted or claimed); nothing was changed");
    };
    check(kernel::loopDevNode(info.number));
    for (const auto partition : info.partitions)
        check(kernel::partitionDevNode(info.number, partition));
}

// LOOP_CLR_FD found the disk open elsewhere (a plain open, not a claim): it only
// set autoclear. Take the device back as it was before the detach began: reopen
// it (an opener of our own keeps the release from happening meanwhile), clear
// autoclear, re-add the partitions, hold LOCK_SH again. nullopt when it was
// released after all (the other opener closed first).
std::optional<UniqueFd> takeBack(const DeviceInfo& info)
{
    UniqueFd fd(::open(kernel::loopDevNode(info.number).c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd && (errno == ENXIO || errno == ENOENT))
        return std::nullopt;
    if (!fd)
        throw std::system_error(errno, std::generic_category(), "open " + kernel::loopDevNode(info.number));
    if (kernel::diskseq(fd.get()) != info.diskseq || !kernel::getStatus(fd.get()))
        return std::nullopt;
    kernel::setAutoclear(fd.get(), false);
    for (const auto& spec : kernel::probePartitionsConfined(fd.get(), core::Clock::now() + reprobeLimit))
        if (std::find(info.partitions.begin(), info.partitions.end(), spec.number) != info.partitions.end())
            kernel::addPartition(fd.get(), spec);
    kernel::lockFd(fd.get(), LOCK_SH);
    return fd;
}

// Released is a newer diskseq in sysfs (or no device at all), not just a missing
// backing file: the kernel's release (6.18 __loop_clr_fd) drops the backing file
// first and bumps the diskseq a moment later, and a Detach reply in between let a
// caller see the old diskseq on a "released" device (soak: 1 in 9600 cycles).
bool released(const DeviceInfo& info)
{
    return kernel::sysfsDiskseq(info.number) != info.diskseq;
}

// With other openers, LOOP_CLR_FD (6.11+) releases at their last close. udev's
// workers open a device for a moment to probe it; the release follows their close
// within milliseconds. Give transient openers a short while before calling the
// device busy.
bool releasedSoon(const DeviceInfo& info)
{
    using namespace std::chrono_literals;
    auto pause = 2ms;
    for (auto waited = 0ms; waited < 2s;
         waited += pause, pause = std::min<std::chrono::milliseconds>(pause * 2, 100ms)) {
        if (released(info))
            return true;
        std::this_thread::sleep_for(pause);
    }
    // Every kernel with diskseq (5.15+) bumps it on release; should one not, a
    // device without its backing file is still released, only later.
    return released(info) || !kernel::sysfsBackingFile(info.number);
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

Attached attach(const kernel::BackingFile& backing, const AttachOptions& options, core::Record& record,
                const RecordStore& records, unsigned maxPartitions, core::Clock::time_point deadline)
{
    record.state = core::Record::State::Intent;
    record.info.backingDevice = backing.device;
    record.info.backingInode = backing.inode;
    records.write(record);
    Configured configured;
    try {
        configured = allocateAndConfigure(configOf(backing, options, record.fileName));
    } catch (...) {
        records.remove(record);
        throw;
    }
    Attached attached{std::move(configured.holdFd), DeviceInfo{}, core::Clock::now()};
    auto& info = attached.info;
    info.number = configured.number;
    info.diskseq = configured.diskseq;
    info.backingDevice = backing.device; // the configured record names its file, as the intent did
    info.backingInode = backing.inode;
    try {
        record.state = core::Record::State::Configured;
        record.info = info;
        records.write(record); // the same file: the intent becomes the configured record
        readBack(attached.lockFd.get(), backing, info);
        if (options.partscan)
            addPartitions(attached.lockFd.get(), info, maxPartitions, deadline);
        attached.partitionsAdded = core::Clock::now();
    } catch (...) {
        undo(std::move(attached.lockFd), info);
        records.remove(record);
        throw;
    }
    record.info = info;
    return attached;
}

// Partitions removed by a detach that then found one held open (a plain open,
// which checkUnclaimed cannot see) are put back, so that Busy changes nothing.
void removePartitionsOrRestore(int loopFd, const DeviceInfo& info)
{
    try {
        removePartitions(loopFd, info);
    } catch (const std::system_error& e) {
        if (e.code().value() != EBUSY)
            throw;
        for (const auto& spec : kernel::probePartitionsConfined(loopFd, core::Clock::now() + reprobeLimit))
            if (std::find(info.partitions.begin(), info.partitions.end(), spec.number) != info.partitions.end())
                kernel::addPartition(loopFd, spec); // false: still there
        throw Error(Errc::Busy, kernel::loopDevNode(info.number) + " (diskseq " + std::to_string(info.diskseq) +
                                    "): a partition is open elsewhere; nothing was changed");
    }
}

DetachOutcome detach(UniqueFd& lockFd, const DeviceInfo& info, DetachSteps& steps)
{
    checkUnclaimed(info);
    steps.claimsChecked = core::Clock::now();
    removePartitionsOrRestore(lockFd.get(), info);
    // Cleared through the one fd loopd holds, then closed: with no other opener the
    // kernel (6.11+) releases the device at this close; with others it only sets
    // autoclear and the release waits for their last close.
    kernel::clear(lockFd.get());
    closeUncopied(lockFd);
    steps.cleared = core::Clock::now();
    const bool released = releasedSoon(info);
    steps.released = core::Clock::now();
    if (released)
        return DetachOutcome::Released;
    try {
        auto back = takeBack(info);
        if (!back)
            return DetachOutcome::Released;
        lockFd = std::move(*back);
        return DetachOutcome::TakenBack;
    } catch (const std::exception& e) {
        // Cleared and let go of, but not taken back: the kernel releases it at the
        // other opener's last close (autoclear), loopd owns it no longer.
        log::warn("dev={} (diskseq {}) could not be taken back after a refused detach: {}",
                  kernel::loopDevNode(info.number), info.diskseq, e.what());
        return DetachOutcome::Deferred;
    }
}

DetachOutcome detachDeferred(UniqueFd& lockFd, const DeviceInfo& info, DetachSteps& steps)
{
    try {
        checkUnclaimed(info);
        steps.claimsChecked = core::Clock::now();
        removePartitionsOrRestore(lockFd.get(), info);
    } catch (const Error& e) {
        if (e.code() != Errc::Busy)
            throw;
        // In use (mounted, or a partition open): its partitions stay (BLKPG cannot
        // remove an open one; those removed were put back) and need no removing:
        // the kernel drops them at the release, LO_FLAGS_PARTSCAN being set on
        // every partscan device. Autoclear, then let go: the last close, the
        // holder's, releases it.
        kernel::setAutoclear(lockFd.get(), true);
        closeUncopied(lockFd);
        steps.cleared = core::Clock::now();
        return released(info) ? DetachOutcome::Released : DetachOutcome::Deferred;
    }
    // Not in use but maybe open: LOOP_CLR_FD releases it now or at that opener's
    // last close; either way it is not taken back.
    kernel::clear(lockFd.get());
    closeUncopied(lockFd);
    steps.cleared = core::Clock::now();
    const bool gone = releasedSoon(info);
    steps.released = core::Clock::now();
    return gone ? DetachOutcome::Released : DetachOutcome::Deferred;
}

void awaitPartitionsDropped(unsigned number) noexcept
{
    using namespace std::chrono_literals;
    auto pause = 1ms;
    for (auto waited = 0ms; waited < 2s && !kernel::existingPartitions(number).empty();
         waited += pause, pause = std::min<std::chrono::milliseconds>(pause * 2, 50ms))
        std::this_thread::sleep_for(pause);
}

void letGo(UniqueFd lockFd, const DeviceInfo& info) noexcept
{
    closeUncopied(lockFd);
    try {
        releasedSoon(info);
    } catch (const std::exception& e) {
        log::debug("dev={} after letting go: {}", kernel::loopDevNode(info.number), e.what());
    }
}

Undone undo(UniqueFd lockFd, const DeviceInfo& info) noexcept
{
    try {
        // If someone detached and re-attached the device meanwhile, it is theirs now.
        if (info.diskseq != 0 && kernel::diskseq(lockFd.get()) != info.diskseq)
            return Undone::NotOurs;
        try {
            removePartitions(lockFd.get(), info);
        } catch (const std::system_error& e) {
            if (e.code().value() != EBUSY)
                throw;
            // A partition held open past BLKPG's retries also holds the disk open:
            // LOOP_CLR_FD below only sets autoclear, and the kernel drops what is
            // left of the partitions at the holder's last close (LO_FLAGS_PARTSCAN).
            log::warn("undo of an attach dev={} diskseq={}: {}; it is released once that partition is closed",
                      kernel::loopDevNode(info.number), info.diskseq, e.what());
        }
        kernel::clear(lockFd.get());
        // The failed call's reply says nothing is left attached: wait for the
        // release that a udev worker still probing the device may delay briefly.
        closeUncopied(lockFd);
        if (releasedSoon(info))
            return Undone::Detached;
        log::warn("undo of an attach: dev={} diskseq={} is still open elsewhere; the kernel releases it at "
                  "its last close",
                  kernel::loopDevNode(info.number), info.diskseq);
        return Undone::AtLastClose;
    } catch (const std::exception& e) {
        log::warn("undo of an attach failed dev={} diskseq={}: {}", kernel::loopDevNode(info.number), info.diskseq,
                  e.what());
        return Undone::Failed;
    }
}

std::string describe(Undone undone, const DeviceInfo& info)
{
    const auto node = kernel::loopDevNode(info.number);
    switch (undone) {
    case Undone::Detached:
        return "it was detached again";
    case Undone::AtLastClose:
        return node + " or one of its partitions is held open elsewhere: it is detached at the last close";
    case Undone::NotOurs:
        return node + " was detached and re-attached by someone else meanwhile: left to them";
    case Undone::Failed:
        break;
    }
    return "undoing it failed (see loopd's log): " + node + " is left attached";
}

} // namespace loopd::service
