#pragma once

#include "core/registry.hpp"

#include <loopd/device_info.hpp>

#include <cstdint>
#include <string>
#include <vector>

// The blocking kernel sequence of Device.Resize. Worker threads only.
namespace loopd::service {

struct ResizedDevice {
    uint64_t size = 0;                // bytes, after LOOP_SET_CAPACITY
    std::vector<unsigned> partitions; // the partitions now, in number order
};

// Throws Error(Busy), changing nothing, when the new size would cut off a
// partition in use (mounted, claimed) or shrink a disk in use without partitions.
// Else LOOP_SET_CAPACITY through loopFd, the table probed (confined, by the
// deadline) and the kernel's partitions made to match it with BLKPG, then a
// "change" uevent tagged SYNTH_UUID=uuid asked for the disk and every partition.
ResizedDevice resize(int loopFd, const DeviceInfo& info, unsigned maxPartitions, core::Clock::time_point deadline,
                     const std::string& uuid);

} // namespace loopd::service
