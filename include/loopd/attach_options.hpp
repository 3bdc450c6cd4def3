#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace loopd {

enum class Lifetime { Persistent, Client };
enum class ReadinessMode { Auto, Udev, Kernel };

// The Attach options of org.loopd1.Manager, with their documented defaults.
struct AttachOptions {
    bool readOnly = false;
    uint64_t offset = 0;
    uint64_t sizeLimit = 0;
    uint32_t sectorSize = 512;
    bool directIo = false;
    bool partscan = true;
    bool autoclear = false;
    Lifetime lifetime = Lifetime::Persistent;
    std::string ref;
    std::chrono::microseconds timeout = std::chrono::seconds(10);
    ReadinessMode readiness = ReadinessMode::Auto;
};

// Longest ref: it is stored in lo_file_name, which holds 64 bytes with the NUL.
inline constexpr std::size_t maxRefLength = 63;

const char* lifetimeName(Lifetime lifetime) noexcept;

} // namespace loopd
