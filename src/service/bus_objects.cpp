#include "bus_objects.hpp"

#include "device_objects.hpp"
#include "errors.hpp"
#include "kernel/loop_device.hpp"

#include <loopd/log.hpp>

#include <systemd/sd-bus.h>

#include <cstring>

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

// sdbus-c++ 1.2 shows no accessor for the message's flags; its raw sd-bus message
// is a protected member, reached the standard way: through a pointer to member
// named in a derived class.
struct RawMessage : sdbus::Message {
    static sd_bus_message* of(const sdbus::Message& message)
    {
        return static_cast<sd_bus_message*>(message.*(&RawMessage::msg_));
    }
    static sdbus::internal::ISdBus* sdbusOf(const sdbus::Message& message) { return message.*(&RawMessage::sdbus_); }
};

// MethodCall's constructors from a raw message are protected: a derived class
// calls one, and the call is sliced back to the MethodCall it is. The one taken
// (Message's, which takes a reference) leaves out the connection, which only
// calls loopd sends would need; its reply needs the message and sdbus only.
struct AdoptedCall : sdbus::MethodCall {
    AdoptedCall(sd_bus_message* call, sdbus::internal::ISdBus* sdbus) : MethodCall(call, sdbus) {}
};

} // namespace

sd_bus_message* rawMessage(const sdbus::Message& message)
{
    return RawMessage::of(message);
}

sdbus::internal::ISdBus* sdbusOf(const sdbus::Message& message)
{
    return RawMessage::sdbusOf(message);
}

sdbus::MethodCall adoptCall(sd_bus_message* call, sdbus::internal::ISdBus* sdbus)
{
    return AdoptedCall(call, sdbus);
}

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
    devices = std::make_unique<DeviceObjects>(getObject(), handlers);
}

ManagerObject::~ManagerObject()
{
    devices.reset();
    unregisterAdaptor();
}

// Queued, not refused: after a SIGKILL the bus may not have processed the old
// loopd's hang-up when the new one asks (test_crash saw FileExists in CI), and a
// queued name passes on the moment it does. Another live loopd is ruled out by
// the runtime dir's lock, taken before anything else.
bool ManagerObject::requestName(const char* name)
{
    const auto probe = getObject().createSignal(org::loopd1::Manager_adaptor::INTERFACE_NAME, "DeviceRemoved");
    const int r = sd_bus_request_name(sd_bus_message_get_bus(rawMessage(probe)), name, SD_BUS_NAME_QUEUE);
    if (r < 0)
        throw sdbus::Error(SD_BUS_ERROR_FAILED, std::string("cannot request ") + name + ": " + std::strerror(-r));
    return r > 0;
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

void ManagerObject::Find(FindResult&& result, std::string path)
{
    guarded(result, "Find", [&] { handlers_.find(std::move(result), origin(), std::move(path)); });
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

} // namespace loopd::service
