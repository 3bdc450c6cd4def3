#include "devices.hpp"

#include <systemd/sd-bus.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace loopctl {

namespace {

const Value& property(const Device& device, const char* key)
{
    const auto* value = device.props.find(key);
    if (!value)
        throw Failure(std::string(device.object) + ": loopd sent no property " + key);
    return *value;
}

template <typename T> T typed(const Device& device, const char* key, const char* type)
{
    const auto& value = property(device, key);
    if (value.type() != type)
        throw Failure(std::string(device.object) + ": property " + key + " has type '" + value.type() + "', not '" +
                      type + "'");
    return value.get<T>();
}

// sdbus-c++ 1.2 shows no accessor for a reply's sd-bus message; it is a protected
// member, reached the standard way: through a pointer to member named in a
// derived class.
struct RawMessage : sdbus::Message {
    static sd_bus_message* of(const sdbus::Message& message)
    {
        return static_cast<sd_bus_message*>(message.*(&RawMessage::msg_));
    }
};

void check(int r, const char* what)
{
    if (r < 0)
        throw Failure(std::string("cannot read loopd's GetManagedObjects reply (") + what + "): " + std::strerror(-r));
}

// Enters a container the reply must have here.
void enter(sd_bus_message* m, char type, const char* contents)
{
    check(sd_bus_message_enter_container(m, type, contents), contents);
}

void exit(sd_bus_message* m)
{
    check(sd_bus_message_exit_container(m), "container");
}

template <typename T> T basic(sd_bus_message* m, char type)
{
    T value{};
    check(sd_bus_message_read_basic(m, type, &value), "value");
    return value;
}

std::string text(sd_bus_message* m, char type)
{
    return basic<const char*>(m, type);
}

// The value inside a variant; types the contract does not use are skipped.
Value readVariant(sd_bus_message* m)
{
    const char* contents = nullptr;
    check(sd_bus_message_peek_type(m, nullptr, &contents), "variant");
    const std::string type = contents;
    enter(m, 'v', contents);
    Value value;
    if (type == "s" || type == "o")
        value = Value(type, text(m, type[0]));
    else if (type == "t")
        value = Value(basic<uint64_t>(m, 't'));
    else if (type == "u")
        value = Value(basic<uint32_t>(m, 'u'));
    else if (type == "b")
        value = Value(basic<int>(m, 'b') != 0); // sd-bus reads 'b' as an int
    else if (type == "as") {
        std::vector<std::string> items;
        enter(m, 'a', "s");
        const char* item = nullptr;
        int r;
        while ((r = sd_bus_message_read_basic(m, 's', &item)) > 0)
            items.emplace_back(item);
        check(r, "as");
        exit(m);
        value = Value(std::move(items));
    } else {
        check(sd_bus_message_skip(m, contents), contents);
        value = Value(type, std::monostate{});
    }
    exit(m);
    return value;
}

// a{sv}; with `only`, the properties it names and no others.
Properties readProperties(sd_bus_message* m, const std::vector<std::string>& only)
{
    Properties props;
    props.reserve(only.empty() ? 24 : only.size()); // loopd sends 19
    enter(m, 'a', "{sv}");
    int r;
    while ((r = sd_bus_message_enter_container(m, 'e', "sv")) > 0) {
        const char* key = basic<const char*>(m, 's');
        if (only.empty() || std::find(only.begin(), only.end(), key) != only.end())
            props.emplace(key, readVariant(m));
        else
            check(sd_bus_message_skip(m, "v"), "v");
        exit(m);
    }
    check(r, "{sv}");
    exit(m);
    return props;
}

// a{oa{sa{sv}}}: the org.loopd1.Device objects, nothing of other interfaces.
std::vector<Device> readDevices(sd_bus_message* m, const std::vector<std::string>& only)
{
    std::vector<Device> devices;
    enter(m, 'a', "{oa{sa{sv}}}");
    int r;
    while ((r = sd_bus_message_enter_container(m, 'e', "oa{sa{sv}}")) > 0) {
        sdbus::ObjectPath object(text(m, 'o'));
        enter(m, 'a', "{sa{sv}}");
        int e;
        while ((e = sd_bus_message_enter_container(m, 'e', "sa{sv}")) > 0) {
            if (std::strcmp(basic<const char*>(m, 's'), deviceInterface) == 0)
                devices.push_back({object, readProperties(m, only)});
            else
                check(sd_bus_message_skip(m, "a{sv}"), "a{sv}");
            exit(m);
        }
        check(e, "{sa{sv}}");
        exit(m);
        exit(m);
    }
    check(r, "{oa{sa{sv}}}");
    exit(m);
    return devices;
}

bool byName(const Properties::Entry& entry, std::string_view name)
{
    return entry.first < name;
}

} // namespace

void Properties::emplace(std::string name, Value value)
{
    const auto at = std::lower_bound(entries_.begin(), entries_.end(), std::string_view(name), byName);
    if (at == entries_.end() || at->first != name)
        entries_.emplace(at, std::move(name), std::move(value));
}

const Value* Properties::find(std::string_view name) const
{
    const auto at = std::lower_bound(entries_.begin(), entries_.end(), name, byName);
    return at != entries_.end() && at->first == name ? &at->second : nullptr;
}

Value::Value(const sdbus::Variant& variant)
{
    const auto type = variant.peekValueType();
    if (type == "s" || type == "o")
        *this = Value(type, variant.get<std::string>());
    else if (type == "t")
        *this = Value(variant.get<uint64_t>());
    else if (type == "u")
        *this = Value(variant.get<uint32_t>());
    else if (type == "b")
        *this = Value(variant.get<bool>());
    else if (type == "as")
        *this = Value(variant.get<std::vector<std::string>>());
    else
        *this = Value(type, std::monostate{});
}

std::string Device::text(const char* key) const
{
    return toText(property(*this, key));
}
uint64_t Device::u64(const char* key) const
{
    return typed<uint64_t>(*this, key, "t");
}
uint32_t Device::u32(const char* key) const
{
    return typed<uint32_t>(*this, key, "u");
}
bool Device::flag(const char* key) const
{
    return typed<bool>(*this, key, "b");
}
std::vector<std::string> Device::strings(const char* key) const
{
    return typed<std::vector<std::string>>(*this, key, "as");
}

Json toJson(const Value& value)
{
    return std::visit(
        [&](const auto& data) -> Json {
            if constexpr (std::is_same_v<std::decay_t<decltype(data)>, std::monostate>)
                return "(" + value.type() + ")";
            else
                return data;
        },
        value.data());
}

Json toJson(const sdbus::Variant& value)
{
    return toJson(Value(value));
}

std::string toText(const Value& value)
{
    // As toJson would print it, without making JSON of every cell of a list.
    return std::visit(
        [&](const auto& data) -> std::string {
            using T = std::decay_t<decltype(data)>;
            if constexpr (std::is_same_v<T, std::monostate>)
                return "(" + value.type() + ")";
            else if constexpr (std::is_same_v<T, std::string>)
                return data;
            else if constexpr (std::is_same_v<T, bool>)
                return data ? "true" : "false";
            else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
                std::string joined;
                for (const auto& item : data)
                    joined += (joined.empty() ? "" : " ") + item;
                return joined;
            } else
                return std::to_string(data);
        },
        value.data());
}

std::string toText(const sdbus::Variant& value)
{
    return toText(Value(value));
}

Json deviceJson(const Device& device)
{
    Json out{{"Object", std::string(device.object)}};
    for (const auto& [key, value] : device.props)
        out[key] = toJson(value);
    return out;
}

std::vector<Device> listDevices(sdbus::IConnection& connection, const std::vector<std::string>& only)
{
    // A proxy on a connection it does not own starts no thread (sdbus-c++ 1.2).
    auto proxy = sdbus::createProxy(connection, busName, managerPath);
    auto call = proxy->createMethodCall("org.freedesktop.DBus.ObjectManager", "GetManagedObjects");
    const auto reply = proxy->callMethod(call);
    auto devices = readDevices(RawMessage::of(reply), only);
    // Keys looked up once per device, not twice per comparison.
    std::vector<std::pair<std::pair<uint32_t, uint64_t>, std::size_t>> order;
    order.reserve(devices.size());
    for (std::size_t i = 0; i < devices.size(); ++i)
        order.push_back({{devices[i].u32("Number"), devices[i].u64("DiskSeq")}, i});
    std::sort(order.begin(), order.end());
    std::vector<Device> sorted;
    sorted.reserve(devices.size());
    for (const auto& [key, i] : order)
        sorted.push_back(std::move(devices[i]));
    return sorted;
}

Device findDevice(sdbus::IConnection& connection, const std::string& name)
{
    const bool digits = !name.empty() && name.find_first_not_of("0123456789") == std::string::npos;
    const char* key = name.rfind("/dev/", 0) == 0 ? "DevNode" : digits ? "DiskSeq" : "Ref";
    // Several objects may show one devnode for a moment (an attachment still being
    // detached, and the newer one on its number): the newest is meant.
    const Device* found = nullptr;
    const auto devices = listDevices(connection);
    for (const auto& device : devices) {
        const auto diskseq = device.u64("DiskSeq");
        const auto value = digits ? std::to_string(diskseq) : device.text(key);
        if (!name.empty() && value == name && (!found || diskseq > found->u64("DiskSeq")))
            found = &device;
    }
    if (found)
        return *found;
    throw Failure("org.loopd1.Error.NotFound: no loopd device '" + name + "'");
}

} // namespace loopctl
