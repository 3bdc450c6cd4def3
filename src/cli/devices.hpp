#pragma once

#include "errors.hpp"

#include <nlohmann/json.hpp>
#include <sdbus-c++/sdbus-c++.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
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

// A device's properties by name, sorted (as --json prints them). One flat
// vector, not a std::map: 4096 devices have 78 000 properties, and a node each
// made loopctl list allocate, fault in and free a node per property.
class Properties {
public:
    using Entry = std::pair<std::string, Value>;

    Properties() = default;
    Properties(std::initializer_list<Entry> entries)
    {
        for (const auto& [name, value] : entries)
            emplace(name, value);
    }

    // A name given twice keeps its first value, as std::map::emplace does.
    void emplace(std::string name, Value value);
    // Null when there is none.
    [[nodiscard]] const Value* find(std::string_view name) const;
    [[nodiscard]] std::vector<Entry>::const_iterator begin() const { return entries_.begin(); }
    [[nodiscard]] std::vector<Entry>::const_iterator end() const { return entries_.end(); }
    void reserve(std::size_t count) { entries_.reserve(count); }

private:
    std::vector<Entry> entries_;
};

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
// being detached comes before the newer one on its number). With `only`, each
// device keeps just those properties (Number and DiskSeq among them): the rest
// are skipped unread, which at 4096 devices is most of loopctl list's time.
std::vector<Device> listDevices(sdbus::IConnection& connection, const std::vector<std::string>& only = {});
// A device named by devnode, diskseq (all digits) or ref, in that order (API.md).
// Throws Failure (org.loopd1.Error.NotFound) when none is.
Device findDevice(sdbus::IConnection& connection, const std::string& name);

} // namespace loopctl
