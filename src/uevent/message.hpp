#pragma once

#include <loopd/uevent.hpp>

#include <optional>
#include <string_view>
#include <utility>

// Pure parsing of uevents into loopd::Uevent: no libudev, no sockets. The monitor
// (libudev) and the fuzzers share these, so what is fuzzed is what the daemon runs.
namespace loopd::uevent {

// Parses "loopN" / "loopNpK" into (N, K); nullopt for other devices.
std::optional<std::pair<unsigned, unsigned>> parseLoopName(const char* sysname);

// "add", "change", "remove"; anything else (or null) is Other.
UeventAction parseAction(const char* action);

// DISKSEQ= as the kernel prints it (%llu): plain decimal digits that fit in 64 bits.
// Anything else is 0, "absent": a malformed value must not look like a newer
// attachment, which would fail every request waiting on that device.
uint64_t parseDiskseq(const char* text);

// One event of a loop block device from its properties; nullopt for other devices.
std::optional<Uevent> makeUevent(EventSource source, const char* action, const char* sysname, const char* diskseq,
                                 const char* synthUuid);

// A raw kernel uevent as the kernel sends it on NETLINK_KOBJECT_UEVENT:
// "action@devpath\0ACTION=add\0DEVPATH=...\0SUBSYSTEM=block\0DISKSEQ=12\0...".
// nullopt unless it is a well-formed block uevent of loopN or loopNpK whose header
// agrees with its ACTION and DEVPATH. The sysname is DEVPATH's last component, as
// libudev has it.
std::optional<Uevent> parseKernelUevent(std::string_view message);

} // namespace loopd::uevent
