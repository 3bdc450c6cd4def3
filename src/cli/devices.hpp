#pragma once

#include "errors.hpp"

#include <nlohmann/json.hpp>
#include <sdbus-c++/sdbus-c++.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

// loopd's devices as loopctl sees them: the org.loopd1.Device objects and their
// properties, read with one GetManagedObjects call.
namespace loopctl {

inline constexpr const char* busName = "org.loopd1";
inline constexpr const char* managerPath = "/org/loopd1";
inline constexpr const char* managerInterface = "org.loopd1.Manager";
inline constexpr const char* deviceInterface = "org.loopd1.Device";

using Json = nlohmann::ordered_json;
using Properties = std::map<std::string, sdbus::Variant>;

// One org.loopd1.Device object. The getters throw Failure naming the object and
// the property when loopd did not send it with the type the contract gives.
struct Device {
    sdbus::ObjectPath object;
    Properties props;

    std::string text(const char* key) const;
    uint64_t u64(const char* key) const;
    uint32_t u32(const char* key) const;
    bool flag(const char* key) const;
    std::vector<std::string> strings(const char* key) const;
};

Json toJson(const sdbus::Variant& value);
// A variant as one line of text: strings as they are, arrays joined by spaces.
std::string toText(const sdbus::Variant& value);
// {"Object": path, <property>: <raw value>...}: what --json has always printed.
Json deviceJson(const Device& device);

// Every loopd device, sorted by loop number (then diskseq: an attachment still
// being detached comes before the newer one on its number).
std::vector<Device> listDevices(sdbus::IConnection& connection);
// A device named by devnode, diskseq (all digits) or ref, in that order (API.md).
// Throws Failure (org.loopd1.Error.NotFound) when none is.
Device findDevice(sdbus::IConnection& connection, const std::string& name);

} // namespace loopctl
