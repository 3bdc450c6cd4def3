#include "resize_sequence.hpp"

#include "kernel/loop_device.hpp"
#include "kernel/partitions.hpp"
#include "kernel/sysfs.hpp"

#include <loopd/error.hpp>
#include <loopd/log.hpp>
#include <loopd/unique_fd.hpp>

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <optional>
#include <system_error>

namespace loopd::service {
namespace {

// The backing file as sysfs names it now (d_path follows a rename), if it is
// still the attached file: the same device and inode.
std::optional<uint64_t> backingSize(const DeviceInfo& info)
{
    const auto path = kernel::sysfsBackingFile(info.number);
    if (!path)
        return std::nullopt;
    UniqueFd fd(::open(path->c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
    struct stat st {};
    if (!fd || ::fstat(fd.get(), &st) < 0 || st.st_dev != info.backingDevice || st.st_ino != info.backingInode)
        return std::nullopt;
    if (S_ISREG(st.st_mode))
        return static_cast<uint64_t>(st.st_size);
    uint64_t size = 0;
    if (S_ISBLK(st.st_mode) && ::ioctl(fd.get(), BLKGETSIZE64, &size) == 0)
        return size;
    return std::nullopt;
}

// What LOOP_SET_CAPACITY will make of it (the kernel's get_size(): file size less
// offset, up to the size limit, in whole 512-byte sectors); nullopt if unknown.
std::optional<uint64_t> newSize(const DeviceInfo& info)
{
    const auto file = backingSize(info);
    if (!file)
        return std::nullopt;
    uint64_t size = *file > info.offset ? *file - info.offset : 0;
    if (info.sizeLimit != 0 && info.sizeLimit < size)
        size = info.sizeLimit;
    return size / 512 * 512;
}

// An O_EXCL open fails with EBUSY while the node is mounted or claimed.
bool claimed(const std::string& node)
{
    const auto noForks = kernel::holdOffForks(); // a forked copy would keep our claim check alive
    UniqueFd probe(::open(node.c_str(), O_RDONLY | O_CLOEXEC | O_EXCL | O_NONBLOCK));
    return !probe && errno == EBUSY;
}

void checkShrink(const DeviceInfo& info)
{
    const auto disk = kernel::loopDevNode(info.number);
    const auto size = newSize(info);
    if (size && *size >= info.size)
        return; // a grow (or no change) cuts nothing off
    const auto why = size ? "would shrink to " + std::to_string(*size) + " bytes"
                          : std::string("has a backing file loopd cannot size");
    for (const auto partition : info.partitions) {
        const auto spec = kernel::existingPartition(info.number, partition);
        const auto node = kernel::partitionDevNode(info.number, partition);
        if (spec && (!size || spec->startBytes + spec->sizeBytes > *size) && claimed(node))
            throw Error(Errc::Busy, disk + " (diskseq " + std::to_string(info.diskseq) + ") " + why + ", cutting off " +
                                        node + ", which is in use; nothing was changed");
    }
    if (info.partitions.empty() && claimed(disk))
        throw Error(Errc::Busy, disk + " (diskseq " + std::to_string(info.diskseq) + ") " + why +
                                    " while it is in use; nothing was changed");
}

// The kernel's partitions made to match the table: removed, re-placed, resized,
// added. BLKPG, because this kernel has no partition parsers (and LOOP_SET_CAPACITY
// rescans nothing on any kernel).
void matchTable(int loopFd, unsigned number, const std::vector<kernel::PartitionSpec>& table)
{
    auto inTable = [&table](unsigned p) {
        return std::any_of(table.begin(), table.end(), [p](const auto& spec) { return spec.number == p; });
    };
    const auto existing = kernel::existingPartitions(number);
    for (auto it = existing.rbegin(); it != existing.rend(); ++it)
        if (!inTable(*it))
            kernel::removePartition(loopFd, *it);
    for (const auto& spec : table) {
        const auto now = kernel::existingPartition(number, spec.number);
        if (now && now->startBytes != spec.startBytes)
            kernel::removePartition(loopFd, spec.number);
        if (!now || now->startBytes != spec.startBytes)
            kernel::addPartition(loopFd, spec);
        else if (now->sizeBytes != spec.sizeBytes)
            kernel::resizePartition(loopFd, spec);
    }
}

} // namespace

ResizedDevice resize(int loopFd, const DeviceInfo& info, unsigned maxPartitions, core::Clock::time_point deadline,
                     const std::string& uuid)
{
    checkShrink(info);
    kernel::setCapacity(loopFd);
    ResizedDevice resized;
    resized.size = kernel::sizeBytes(loopFd);
    if (info.partscan) {
        // The table was written to the file, not through the device: what the
        // device cached of it is stale.
        kernel::flushBuffers(loopFd);
        const auto table = kernel::probePartitionsConfined(loopFd, deadline);
        if (table.size() > maxPartitions)
            throw Error(Errc::LimitExceeded, kernel::loopDevNode(info.number) + ": the resized image's table has " +
                                                 std::to_string(table.size()) + " partitions, more than " +
                                                 std::to_string(maxPartitions) + " (max-partitions)");
        matchTable(loopFd, info.number, table);
        for (const auto& spec : table)
            resized.partitions.push_back(spec.number);
    }
    kernel::triggerChange(info.number, 0, uuid);
    for (const auto partition : resized.partitions)
        kernel::triggerChange(info.number, partition, uuid);
    return resized;
}

} // namespace loopd::service
