#include "bus_objects.hpp"

#include "errors.hpp"
#include "kernel/loop_device.hpp"

#include <loopd/log.hpp>

#include <systemd/sd-bus.h>

namespace loopd::service {
namespace {

core::OptionValue toOptionValue(const sdbus::Variant& variant)
{
    const auto type = variant.peekValueType();
    if (type == "b")
        return variant.get<bool>();
    if (type == "u")
        return variant.get<uint32_t>();
    if (type == "t")
        return variant.get<uint64_t>();
    if (type == "s")
        return variant.get<std::string>();
    return core::OtherType{type};
}

// sdbus-c++ 1.2 drops the whole connection when a handler throws anything but
// sdbus::Error: every handler goes through here.
template <typename Result, typename F> void guarded(Result& result, const char* method, F&& body)
{
    try {
        body();
    } catch (...) {
        const auto error = toDbusError(std::current_exception(), method);
        log::warn("{} refused: {}", method, error.getMessage());
        result.returnError(error);
    }
}

// sdbus-c++ 1.2 shows no accessor for the message's flags; its raw sd-bus message
// is a protected member, reached the standard way: through a pointer to member
// named in a derived class.
struct RawMessage : sdbus::Message {
    static sd_bus_message* of(const sdbus::Message& message)
    {
        return static_cast<sd_bus_message*>(message.*(&RawMessage::msg_));
    }
};

} // namespace

CallOrigin originOf(const sdbus::Message& message)
{
    CallOrigin origin{message.getSender(), false};
    if (auto* raw = RawMessage::of(message))
        origin.interactive = sd_bus_message_get_allow_interactive_authorization(raw) > 0;
    return origin;
}

std::string devicePath(uint64_t diskseq)
{
    return std::string(managerPath) + "/device/" + std::to_string(diskseq);
}

std::vector<std::string> partitionNodes(const DeviceInfo& info)
{
    std::vector<std::string> nodes;
    for (const auto partition : info.partitions)
        nodes.push_back(kernel::partitionDevNode(info.number, partition));
    return nodes;
}

core::OptionMap toOptionMap(const DbusOptions& options)
{
    core::OptionMap map;
    for (const auto& [key, value] : options)
        map.emplace(key, toOptionValue(value));
    return map;
}

ManagerObject::ManagerObject(sdbus::IConnection& connection, Handlers& handlers)
    : AdaptorInterfaces(connection, managerPath), handlers_(handlers)
{
    registerAdaptor();
}

ManagerObject::~ManagerObject()
{
    unregisterAdaptor();
}

void ManagerObject::devicesChanged()
{
    emitPropertiesChangedSignal(org::loopd1::Manager_adaptor::INTERFACE_NAME, {"Devices"});
}

void ManagerObject::readinessSourceChanged()
{
    emitPropertiesChangedSignal(org::loopd1::Manager_adaptor::INTERFACE_NAME, {"ReadinessSource"});
}

void ManagerObject::kernelQuirksChanged()
{
    emitPropertiesChangedSignal(org::loopd1::Manager_adaptor::INTERFACE_NAME, {"KernelQuirks"});
}

CallOrigin ManagerObject::origin() const
{
    return originOf(*getObject().getCurrentlyProcessedMessage());
}

void ManagerObject::Attach(AttachResult&& result, std::string path, DbusOptions options)
{
    guarded(result, "Attach",
            [&] { handlers_.attachPath(std::move(result), origin(), std::move(path), toOptionMap(options)); });
}

void ManagerObject::AttachFd(AttachResult&& result, sdbus::UnixFd fd, DbusOptions options)
{
    guarded(result, "AttachFd",
            [&] { handlers_.attachFd(std::move(result), origin(), std::move(fd), toOptionMap(options)); });
}

void ManagerObject::Detach(VoidResult&& result, uint64_t diskseq, DbusOptions options)
{
    guarded(result, "Detach", [&] { handlers_.detach(std::move(result), origin(), diskseq, toOptionMap(options)); });
}

void ManagerObject::WaitReady(AttachResult&& result, std::string device, uint64_t timeoutUsec)
{
    guarded(result, "WaitReady", [&] { handlers_.waitReady(std::move(result), std::move(device), timeoutUsec); });
}

std::string ManagerObject::Version()
{
    return LOOPD_VERSION;
}

std::string ManagerObject::ReadinessSource()
{
    return handlers_.readinessSource();
}

std::vector<std::string> ManagerObject::KernelQuirks()
{
    return handlers_.kernelQuirks();
}

uint32_t ManagerObject::Devices()
{
    return handlers_.deviceCount();
}

DeviceObject::DeviceObject(sdbus::IConnection& connection, DeviceProperties properties, Handlers& handlers)
    : AdaptorInterfaces(connection, devicePath(properties.info.diskseq)), p_(std::move(properties)), handlers_(handlers)
{
    registerAdaptor();
    emitInterfacesAddedSignal({org::loopd1::Device_adaptor::INTERFACE_NAME});
}

DeviceObject::~DeviceObject()
{
    try {
        emitInterfacesRemovedSignal({org::loopd1::Device_adaptor::INTERFACE_NAME});
    } catch (const sdbus::Error& e) {
        log::warn("InterfacesRemoved not sent diskseq={}: {}", p_.info.diskseq, e.getMessage());
    }
    unregisterAdaptor();
}

void DeviceObject::Detach(VoidResult&& result, DbusOptions options)
{
    guarded(result, "Detach", [&] {
        handlers_.detach(std::move(result), originOf(*getObject().getCurrentlyProcessedMessage()), p_.info.diskseq,
                         toOptionMap(options));
    });
}

std::string DeviceObject::DevNode()
{
    return kernel::loopDevNode(p_.info.number);
}

} // namespace loopd::service
