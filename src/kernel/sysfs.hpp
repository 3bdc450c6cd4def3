#pragma once

#include <cstdint>
#include <optional>
#include <string>

// Reads of /sys/block/loopN. Cheap, non-blocking on sysfs.
namespace loopd::kernel {

// The device's current diskseq; nullopt if loopN does not exist.
std::optional<uint64_t> sysfsDiskseq(unsigned number);
// loop/backing_file; nullopt when the device is unbound.
std::optional<std::string> sysfsBackingFile(unsigned number);

} // namespace loopd::kernel
