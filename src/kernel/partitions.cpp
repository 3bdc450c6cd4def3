#include "partitions.hpp"

#include <blkid/blkid.h>
#include <linux/blkpg.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <system_error>
#include <thread>

namespace loopd::kernel {
namespace {

// How long removePartition waits for a transient opener (udev's probe) to let go.
constexpr std::chrono::seconds busyRetryLimit{5};

using Probe = std::unique_ptr<std::remove_pointer_t<blkid_probe>, decltype(&blkid_free_probe)>;

[[noreturn]] void fail(int err, const std::string& what)
{
    throw std::system_error(err, std::generic_category(), what);
}

int blkpg(int fd, int op, const PartitionSpec& spec)
{
    blkpg_partition part{};
    part.pno = static_cast<int>(spec.number);
    part.start = static_cast<long long>(spec.startBytes);
    part.length = static_cast<long long>(spec.sizeBytes);
    blkpg_ioctl_arg arg{};
    arg.op = op;
    arg.datalen = sizeof(part);
    arg.data = &part;
    int r;
    do
        r = ::ioctl(fd, BLKPG, &arg);
    while (r < 0 && errno == EINTR);
    return r;
}

} // namespace

std::vector<PartitionSpec> probePartitions(int fd)
{
    Probe probe(blkid_new_probe(), blkid_free_probe);
    if (!probe)
        fail(ENOMEM, "blkid_new_probe");
    if (blkid_probe_set_device(probe.get(), fd, 0, 0) < 0)
        fail(errno ? errno : EIO, "blkid_probe_set_device");
    blkid_probe_enable_superblocks(probe.get(), 0);
    blkid_probe_enable_partitions(probe.get(), 1);
    blkid_probe_set_partitions_flags(probe.get(), BLKID_PARTS_ENTRY_DETAILS);

    // 1: nothing found; -2: ambiguous (e.g. two tables): attach without partitions,
    // as the kernel would. Only a real I/O error is an error.
    const int r = blkid_do_safeprobe(probe.get());
    if (r == -1)
        fail(errno ? errno : EIO, "probing the partition table");
    std::vector<PartitionSpec> specs;
    blkid_partlist list = r == 0 ? blkid_probe_get_partitions(probe.get()) : nullptr;
    if (!list)
        return specs;

    // libblkid reports in 512-byte sectors whatever the device's block size.
    const int count = blkid_partlist_numof_partitions(list);
    for (int i = 0; i < count; ++i) {
        blkid_partition part = blkid_partlist_get_partition(list, i);
        if (blkid_partition_is_extended(part))
            continue;
        const auto number = blkid_partition_get_partno(part);
        const auto start = blkid_partition_get_start(part);
        const auto size = blkid_partition_get_size(part);
        if (number <= 0 || start < 0 || size <= 0)
            continue;
        specs.push_back(
            {static_cast<unsigned>(number), static_cast<uint64_t>(start) * 512, static_cast<uint64_t>(size) * 512});
    }
    std::sort(specs.begin(), specs.end(), [](auto& a, auto& b) { return a.number < b.number; });
    return specs;
}

bool addPartition(int fd, const PartitionSpec& spec)
{
    if (blkpg(fd, BLKPG_ADD_PARTITION, spec) == 0)
        return true;
    if (errno == EBUSY)
        return false;
    fail(errno, "BLKPG_ADD_PARTITION " + std::to_string(spec.number));
}

void removePartition(int fd, unsigned number)
{
    // BLKPG_DEL_PARTITION fails with EBUSY while anyone has the partition open, and
    // udev's workers open every new partition to probe it. Seen on Debian 12's 6.1
    // (kernel matrix, qemu): a 32-partition attach that timed out while udev was
    // still probing could not be undone ("BLKPG_DEL_PARTITION 31: EBUSY") and the
    // device leaked. A probe lets go within milliseconds (seconds under emulation),
    // so retry for a while; a partition that stays open (mounted) still fails.
    using namespace std::chrono_literals;
    const auto deadline = std::chrono::steady_clock::now() + busyRetryLimit;
    auto pause = 5ms;
    while (blkpg(fd, BLKPG_DEL_PARTITION, PartitionSpec{number, 0, 0}) != 0) {
        if (errno == ENXIO)
            return;
        if (errno != EBUSY || std::chrono::steady_clock::now() + pause > deadline)
            fail(errno, "BLKPG_DEL_PARTITION " + std::to_string(number));
        std::this_thread::sleep_for(pause);
        pause = std::min<std::chrono::milliseconds>(pause * 2, 200ms);
    }
}

std::vector<unsigned> existingPartitions(unsigned loopNumber)
{
    namespace fs = std::filesystem;
    const std::string disk = "loop" + std::to_string(loopNumber);
    const std::string prefix = disk + "p";
    std::vector<unsigned> numbers;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator("/sys/block/" + disk, ec)) {
        const auto name = entry.path().filename().string();
        if (name.rfind(prefix, 0) == 0 && name.size() > prefix.size())
            numbers.push_back(static_cast<unsigned>(std::stoul(name.substr(prefix.size()))));
    }
    std::sort(numbers.begin(), numbers.end());
    return numbers;
}

} // namespace loopd::kernel
