#pragma once

#include <loopd/uevent.hpp>

#include <optional>
#include <utility>

// Pure parsing of uevents into loopd::Uevent: no libudev, no sockets. libudev
// parses the netlink message (kernel's or udevd's) and filters the subsystem; the
// monitor hands the properties it gives to makeUevent. The unit tests and the
// registry fuzzer call makeUevent too, so what is tested is what the daemon runs.
namespace loopd::uevent {

// Parses "loopN" / "loopNpK" into (N, K); nullopt for other devices.
std::optional<std::pair<unsigned, unsigned>> parseLoopName(const char* sysname);

// "add", "change", "remove"; anything else (or null) is Other.
UeventAction parseAction(const char* action);

// DISKSEQ= as the kernel prints it (%llu): plain decimal digits that fit in 64 bits.
// Anything else is 0, "absent": a malformed value must not look like a newer
// attachment, which would fail every request waiting on that device.
uint64_t parseDiskseq(const char* text);

// One event of a loop block device from its properties as libudev has them (the
// action, the sysname, DISKSEQ=, SYNTH_UUID=; null when absent); nullopt for other
// devices.
std::optional<Uevent> makeUevent(EventSource source, const char* action, const char* sysname, const char* diskseq,
                                 const char* synthUuid);

} // namespace loopd::uevent
