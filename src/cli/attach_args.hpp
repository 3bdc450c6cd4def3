#pragma once

#include "errors.hpp"

#include <cstdint>
#include <optional>
#include <string>

// What `loopctl attach` is asked to do: its command line, completed by an image
// configuration file (loopd-image@NAME.service).
namespace loopctl {

struct AttachArgs {
    std::string image;
    std::optional<std::string> config;
    bool readOnly = false;
    bool directIo = false;
    bool noPartscan = false;
    bool autoclear = false;
    bool hold = false;
    bool json = false;
    std::optional<uint64_t> offset;
    std::optional<uint64_t> sizeLimit;
    std::optional<uint32_t> sectorSize;
    std::optional<std::string> ref;
    std::optional<double> timeout;
};

// Reads args.config into args; what the command line gave wins. Throws UsageError
// naming the file and line.
void readConfig(AttachArgs& args);

} // namespace loopctl
