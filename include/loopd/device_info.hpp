#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loopd {

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

} // namespace loopd
