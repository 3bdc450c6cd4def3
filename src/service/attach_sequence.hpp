#pragma once

#include "kernel/backing_file.hpp"
#include "kernel/partitions.hpp"

#include <loopd/attach_options.hpp>
#include <loopd/unique_fd.hpp>

#include <cstdint>
#include <string>
#include <vector>

// The blocking kernel sequences of attach and detach (DESIGN.md, "The attach
// sequence"). Everything here runs on worker threads.
namespace loopd::service {

// What the kernel applied, as the Device properties report it.
struct DeviceInfo {
    unsigned number = 0;
    uint64_t diskseq = 0;
    std::string backingFile;
    uint64_t backingDevice = 0;
    uint64_t backingInode = 0;
    uint64_t offset = 0;
    uint64_t sizeLimit = 0;
    uint64_t size = 0;
    uint32_t sectorSize = 512;
    bool readOnly = false;
    bool directIo = false;
    bool autoclear = false;
    bool partscan = true;
    std::vector<unsigned> partitions;
};

struct Attached {
    UniqueFd lockFd; // the configuring fd, holding LOCK_SH while loopd owns the device
    DeviceInfo info;
};

// Opens the backing file (as the caller, for a path) and checks it.
kernel::BackingFile openBacking(const std::string& path, const AttachOptions& options,
                                const kernel::Credentials& caller);
kernel::BackingFile checkBacking(UniqueFd fd, const std::string& what, const AttachOptions& options);

// Allocates a loop device and configures it with the backing file, reads back its
// diskseq and what the kernel applied, and adds the partitions of its table.
// On failure nothing stays attached.
Attached attach(const kernel::BackingFile& backing, const AttachOptions& options, const std::string& what);

// Removes partitions, clears the device and closes lockFd. Throws Error(Busy) and
// leaves the device (and lockFd) as it was when a partition is in use. Returns false
// when the device is still open elsewhere: the kernel then releases it at that
// opener's last close (autoclear).
bool detach(UniqueFd& lockFd, const DeviceInfo& info);

// Undoes a failed attach: the same as detach, but best effort.
void undo(UniqueFd lockFd, const DeviceInfo& info) noexcept;

} // namespace loopd::service
