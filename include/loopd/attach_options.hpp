#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace loopd {

// Fd: as Client until Device.Open first hands out an fd, then while any fd of it
// is open (the kernel's autoclear).
enum class Lifetime { Persistent, Client, Fd };
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
    bool hidden = false; // UDISKS_IGNORE=1 (and LOOPD_REF, LOOPD_OWNER_UID) in udev's database
    Lifetime lifetime = Lifetime::Persistent;
    std::string ref;
    std::chrono::microseconds timeout = std::chrono::seconds(10);
    ReadinessMode readiness = ReadinessMode::Auto;
};

// Longest ref: 63 bytes, as a file name of by-ref/ (and once lo_file_name's size).
inline constexpr std::size_t maxRefLength = 63;
// Longest readiness deadline (timeout-usec, WaitReady): past a day a deadline is a
// mistake, not a wish; it also keeps clocks from overflowing.
inline constexpr uint64_t maxTimeoutUsec = 86'400'000'000ULL;

// "persistent", "client" or "fd", as the Attach option "lifetime" spells it.
inline const char* lifetimeName(Lifetime lifetime) noexcept
{
    return lifetime == Lifetime::Client ? "client" : lifetime == Lifetime::Fd ? "fd" : "persistent";
}

} // namespace loopd
