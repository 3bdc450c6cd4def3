// After a restart (Recovery): adopting what loopd's records name, releasing what
// a crash left half-done. Worker threads; split from attach_sequence.cpp.
#include "attach_sequence.hpp"

#include "kernel/loop_device.hpp"
#include "kernel/partitions.hpp"
#include "kernel/sysfs.hpp"

#include <loopd/log.hpp>

#include <sys/file.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>

namespace loopd::service {
namespace {

// How long a table read again (an adoption) may take.
constexpr std::chrono::seconds reprobeLimit{10};

} // namespace

namespace {

// The device still carries the recorded attachment's diskseq, read again on an
// fd of its own (no detach and re-attach can slip in between the check and the
// use). Whether it is still bound is for isTagged(), whose LOOP_GET_STATUS64
// fails on an unbound device: no sysfs read of backing_file for that (4096 of
// them in a restart).
std::optional<UniqueFd> openIfStill(unsigned number, uint64_t diskseq)
{
    if (kernel::sysfsDiskseq(number) != diskseq)
        return std::nullopt;
    auto fd = kernel::tryOpenLoop(number, true);
    if (!fd || kernel::diskseq(fd->get()) != diskseq)
        return std::nullopt;
    return fd;
}

// Still loopd's: the recorded backing file and loopd's tag in lo_file_name
// (core::loFileName), which no other tool sets.
bool isTagged(int fd, const core::Record& record)
{
    const auto status = kernel::getStatus(fd);
    // Configured records of loopd 0.1 carry no backing file: the tag decides alone.
    const bool unknownFile = record.info.backingDevice == 0 && record.info.backingInode == 0;
    return status && status->fileName == record.fileName &&
           (unknownFile ||
            (status->backingDevice == record.info.backingDevice && status->backingInode == record.info.backingInode));
}

void releaseDevice(int fd, unsigned number)
{
    for (const auto partition : kernel::existingPartitions(number))
        kernel::removePartition(fd, partition);
    kernel::clear(fd);
}

} // namespace

std::optional<UniqueFd> reopenOwned(const core::Record& record, bool& readded, bool& locked)
{
    readded = false;
    const auto& info = record.info;
    auto fd = openIfStill(info.number, info.diskseq);
    if (!fd)
        return std::nullopt;
    if (!isTagged(fd->get(), record))
        return std::nullopt;
    // Not waited for: whoever holds LOCK_EX now (udev re-reading the table after a
    // close-after-write, or a neighbour that stalled holding it; test_crash saw a
    // SIGSTOPped udevd hold start-up 10 s) must not hold up the start. The hold is
    // then taken later, off the loop (Recovery::lockLater).
    locked = kernel::tryLockFd(fd->get(), LOCK_SH);
    // A device recorded without partitions has none to re-add: no readdir.
    if (info.partscan && !info.partitions.empty() &&
        kernel::existingPartitions(info.number).size() < info.partitions.size()) {
        for (const auto& spec : kernel::probePartitionsConfined(fd->get(), core::Clock::now() + reprobeLimit))
            kernel::addPartition(fd->get(), spec);
        readded = true;
    }
    return fd;
}

void releaseRecorded(const core::Record& record)
{
    if (auto fd = openIfStill(record.info.number, record.info.diskseq); fd && isTagged(fd->get(), record))
        releaseDevice(fd->get(), record.info.number);
}

void releaseIntent(const core::Record& intent, const std::set<unsigned>& skip)
{
    namespace fs = std::filesystem;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator("/sys/block", ec)) {
        const auto name = entry.path().filename().string();
        if (name.rfind("loop", 0) != 0 || !fs::exists(entry.path() / "loop"))
            continue;
        const auto number = static_cast<unsigned>(std::stoul(name.substr(4)));
        if (skip.count(number))
            continue;
        auto fd = kernel::tryOpenLoop(number, true);
        const auto status = fd ? kernel::getStatus(fd->get()) : std::nullopt;
        if (status && status->backingDevice == intent.info.backingDevice &&
            status->backingInode == intent.info.backingInode && status->fileName == intent.fileName) {
            log::info("releasing dev={} left by a crash during attach", kernel::loopDevNode(number));
            releaseDevice(fd->get(), number);
        }
    }
}

} // namespace loopd::service
