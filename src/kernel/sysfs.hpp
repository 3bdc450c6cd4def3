#pragma once

#include <cstdint>
#include <optional>
#include <string>

// /sys/block/loopN. The reads are cheap and non-blocking: the loop thread uses
// them. triggerChange writes, making the kernel emit a uevent: workers call it.
namespace loopd::kernel {

// The device's current diskseq; nullopt if loopN does not exist.
std::optional<uint64_t> sysfsDiskseq(unsigned number);
// loop/backing_file; nullopt when the device is unbound.
std::optional<std::string> sysfsBackingFile(unsigned number);
// loop/autoclear; nullopt when the device is unbound. `losetup -d` on a device
// that loopd holds open only sets this (the release waits for loopd's close).
std::optional<bool> sysfsAutoclear(unsigned number);
// N when fd is a block device that is /dev/loopN or one of its partitions
// (/sys/dev/block/MAJ:MIN names it); nullopt for anything else.
std::optional<unsigned> loopNumberOf(int fd);
// The same for a device number (major:minor), e.g. of a udev database entry.
std::optional<unsigned> loopNumberOfDevt(unsigned major, unsigned minor);

// Asks the kernel to send the "change" uevent of loopN (partition 0) or loopNpK
// again, tagged SYNTH_UUID=uuid, by writing "change <uuid>" to its uevent file.
void triggerChange(unsigned number, unsigned partition, const std::string& uuid);

} // namespace loopd::kernel
