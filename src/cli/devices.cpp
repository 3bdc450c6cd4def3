#include "devices.hpp"

#include <algorithm>

namespace loopctl {

namespace {

const sdbus::Variant& property(const Device& device, const char* key)
{
    const auto it = device.props.find(key);
    if (it == device.props.end())
        throw Failure(std::string(device.object) + ": loopd sent no property " + key);
    return it->second;
}

template <typename T> T typed(const Device& device, const char* key, const char* type)
{
    const auto& value = property(device, key);
    if (value.peekValueType() != type)
        throw Failure(std::string(device.object) + ": property " + key + " has type '" + value.peekValueType() +
                      "', not '" + type + "'");
    return value.get<T>();
}

} // namespace

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

Json toJson(const sdbus::Variant& value)
{
    const auto type = value.peekValueType();
    if (type == "s" || type == "o")
        return value.get<std::string>();
    if (type == "t")
        return value.get<uint64_t>();
    if (type == "u")
        return value.get<uint32_t>();
    if (type == "b")
        return value.get<bool>();
    if (type == "as")
        return value.get<std::vector<std::string>>();
    return "(" + type + ")";
}

std::string toText(const sdbus::Variant& value)
{
    const auto json = toJson(value);
    if (json.is_string())
        return json.get<std::string>();
    if (json.is_array()) {
        std::string joined;
        for (const auto& item : json)
            joined += (joined.empty() ? "" : " ") + item.get<std::string>();
        return joined;
    }
    return json.dump();
}

Json deviceJson(const Device& device)
{
    Json out{{"Object", std::string(device.object)}};
    for (const auto& [key, value] : device.props)
        out[key] = toJson(value);
    return out;
}

std::vector<Device> listDevices(sdbus::IConnection& connection)
{
    // A proxy on a connection it does not own starts no thread (sdbus-c++ 1.2).
    auto proxy = sdbus::createProxy(connection, busName, managerPath);
    std::map<sdbus::ObjectPath, std::map<std::string, Properties>> objects;
    proxy->callMethod("GetManagedObjects").onInterface("org.freedesktop.DBus.ObjectManager").storeResultsTo(objects);
    std::vector<Device> devices;
    for (auto& [path, interfaces] : objects)
        if (const auto it = interfaces.find(deviceInterface); it != interfaces.end())
            devices.push_back({path, std::move(it->second)});
    std::sort(devices.begin(), devices.end(), [](const Device& a, const Device& b) {
        return std::pair(a.u32("Number"), a.u64("DiskSeq")) < std::pair(b.u32("Number"), b.u64("DiskSeq"));
    });
    return devices;
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
