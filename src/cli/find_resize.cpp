#include "find_resize.hpp"

#include "org.loopd1-proxy.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>

namespace loopctl {
namespace {

constexpr const char* busName = "org.loopd1";
constexpr const char* managerPath = "/org/loopd1";
constexpr const char* deviceInterface = "org.loopd1.Device";

class Manager final : public sdbus::ProxyInterfaces<org::loopd1::Manager_proxy> {
public:
    explicit Manager(sdbus::IConnection& connection) : ProxyInterfaces(connection, busName, managerPath)
    {
        registerProxy();
    }
    ~Manager() { unregisterProxy(); }

private:
    void onDeviceRemoved(const sdbus::ObjectPath&, const uint64_t&, const std::string&) override {}
};

class Device final : public sdbus::ProxyInterfaces<org::loopd1::Device_proxy> {
public:
    Device(sdbus::IConnection& connection, const sdbus::ObjectPath& path) : ProxyInterfaces(connection, busName, path)
    {
        registerProxy();
    }
    ~Device() { unregisterProxy(); }
};

std::map<std::string, sdbus::Variant> properties(sdbus::IConnection& connection, const sdbus::ObjectPath& path)
{
    auto proxy = sdbus::createProxy(connection, busName, path);
    std::map<std::string, sdbus::Variant> props;
    proxy->callMethod("GetAll")
        .onInterface("org.freedesktop.DBus.Properties")
        .withArguments(deviceInterface)
        .storeResultsTo(props);
    return props;
}

// One line per device, as `losetup -j` does: the node, then the file as the
// kernel names it.
int find(sdbus::IConnection& connection, const FindResizeArgs& args)
{
    // loopd looks the path up as this caller: relative to this process's directory.
    const auto path = std::filesystem::absolute(args.image).lexically_normal().string();
    const auto devices = Manager(connection).Find(path);
    auto json = nlohmann::ordered_json::array();
    for (const auto& object : devices) {
        auto props = properties(connection, object);
        const auto devnode = props.at("DevNode").get<std::string>();
        const auto diskseq = props.at("DiskSeq").get<uint64_t>();
        const auto file = props.at("BackingFile").get<std::string>();
        if (args.json)
            json.push_back({{"Object", std::string(object)},
                            {"DevNode", devnode},
                            {"DiskSeq", diskseq},
                            {"BackingFile", file},
                            {"Ref", props.at("Ref").get<std::string>()}});
        else
            std::cout << devnode << ": diskseq " << diskseq << " (" << file << ")\n";
    }
    if (args.json)
        std::cout << json.dump(2) << std::endl;
    return devices.empty() ? 1 : 0;
}

// The name resolves as WaitReady resolves it (devnode, diskseq, ref); a ready
// device is answered at once.
int resize(sdbus::IConnection& connection, const FindResizeArgs& args)
{
    const auto [object, devnode, diskseq, before] = Manager(connection).WaitReady(args.name, 0);
    const auto [size, partitions] = Device(connection, object).Resize({});
    if (args.json) {
        std::cout << nlohmann::ordered_json{{"Object", std::string(object)},
                                            {"DevNode", devnode},
                                            {"DiskSeq", diskseq},
                                            {"Size", size},
                                            {"Partitions", partitions}}
                         .dump(2)
                  << std::endl;
        return 0;
    }
    std::cout << devnode << ": " << size << " bytes\n";
    for (const auto& partition : partitions)
        std::cout << partition << '\n';
    return 0;
}

} // namespace

void addFindResize(CLI::App& app, FindResizeArgs& args)
{
    args.find = app.add_subcommand("find", "list the loopd devices backed by IMAGE (the file it names now); exit "
                                           "status 1 if there are none");
    args.find->add_option("IMAGE", args.image, "image file or block device")->required();
    args.find->add_flag("--json", args.json, "print a JSON array");
    args.resize = app.add_subcommand("resize", "after the backing file grew or shrank: resize the device and its "
                                               "partitions; returns once udev has them at their new sizes");
    args.resize->add_option("DEVICE", args.name, "device node, ref or diskseq")->required();
    args.resize->add_flag("--json", args.json, "print a JSON object");
}

std::optional<int> runFindResize(sdbus::IConnection& connection, const FindResizeArgs& args)
{
    if (*args.find)
        return find(connection, args);
    if (*args.resize)
        return resize(connection, args);
    return std::nullopt;
}

} // namespace loopctl
