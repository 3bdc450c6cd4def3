#pragma once

#include "errors.hpp"

#include <nlohmann/json.hpp>
#include <sdbus-c++/sdbus-c++.h>

#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

// loopd's devices as loopctl sees them: the org.loopd1.Device objects and their
// properties, read with one GetManagedObjects call.
namespace loopctl {

inline constexpr const char* busName = "org.loopd1";
inline constexpr const char* managerPath = "/org/loopd1";
inline constexpr const char* managerInterface = "org.loopd1.Manager";
inline constexpr const char* deviceInterface = "org.loopd1.Device";

using Json = nlohmann::ordered_json;

// One property's value as loopd sends it, read straight from the reply. Not an
// sdbus::Variant: each of those is an sd-bus message of its own, and a list of
// 4096 devices has 78 000 properties. Holds the types the contract uses; any
// other is kept by its signature alone and printed as "(signature)".
class Value {
public:
    using Data = std::variant<std::monostate, std::string, uint64_t, uint32_t, bool, std::vector<std::string>>;

    Value() = default;
    Value(std::string value) : type_("s"), data_(std::move(value)) {}
    Value(const char* value) : Value(std::string(value)) {}
    Value(uint64_t value) : type_("t"), data_(value) {}
    Value(uint32_t value) : type_("u"), data_(value) {}
    Value(bool value) : type_("b"), data_(value) {}
    Value(std::vector<std::string> value) : type_("as"), data_(std::move(value)) {}
    Value(std::string type, Data data) : type_(std::move(type)), data_(std::move(data)) {}
    explicit Value(const sdbus::Variant& variant);

    // The D-Bus signature ("s", "o", "t", "u", "b", "as", ...).
    [[nodiscard]] const std::string& type() const { return type_; }
    [[nodiscard]] const Data& data() const { return data_; }
    template <typename T> [[nodiscard]] const T& get() const { return std::get<T>(data_); }

private:
    std::string type_;
    Data data_;
};

// Transparent: looked up by a C string without making a std::string of it.
using Properties = std::map<std::string, Value, std::less<>>;

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

Json toJson(const Value& value);
Json toJson(const sdbus::Variant& value);
// A value as one line of text: strings as they are, arrays joined by spaces.
std::string toText(const Value& value);
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
