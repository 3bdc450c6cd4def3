#pragma once

#include "attach_sequence.hpp"
#include "core/options.hpp"

#include "callers.hpp"
#include "errors.hpp"
#include "org.loopd1-adaptor.h"

#include <loopd/log.hpp>
#include <sdbus-c++/sdbus-c++.h>
#include <systemd/sd-bus.h>

#include <functional>
#include <map>
#include <memory>
#include <string>

// The D-Bus objects. Handlers run on the loop thread (sdbus-c++ dispatches from
// processPendingRequest()); they only forward to the daemon.
namespace loopd::service {

// The origin of the message being handled (sender, interactive-authorization flag).
CallOrigin originOf(const sdbus::Message& message);

// sdbus-c++ 1.2 internals, reached where it offers no accessor (bus_objects.cpp
// says how): a message's sd-bus message and sd-bus wrapper, and a call sd-bus
// handed to loopd directly (DeviceObjects) as sdbus-c++'s MethodCall, so that the
// flows answer it through sdbus::Result like any other.
sd_bus_message* rawMessage(const sdbus::Message& message);
sdbus::internal::ISdBus* sdbusOf(const sdbus::Message& message);
sdbus::MethodCall adoptCall(sd_bus_message* call, sdbus::internal::ISdBus* sdbus);

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

using AttachResult = sdbus::Result<sdbus::ObjectPath, std::string, uint64_t, std::vector<std::string>>;
using VoidResult = sdbus::Result<>;
using FindResult = sdbus::Result<std::vector<sdbus::ObjectPath>>;
using ResizeResult = sdbus::Result<uint64_t, std::vector<std::string>>;
using OpenResult = sdbus::Result<sdbus::UnixFd>;
using DbusOptions = std::map<std::string, sdbus::Variant>;

inline constexpr const char* busName = "org.loopd1";
inline constexpr const char* managerPath = "/org/loopd1";

std::string devicePath(uint64_t diskseq);
// Device nodes of a device's partitions, in number order.
std::vector<std::string> partitionNodes(const DeviceInfo& info);
// a{sv} reduced to the types options may have (pure parsing lives in core).
core::OptionMap toOptionMap(const DbusOptions& options);

// What the Manager and Device objects ask of the daemon.
class Handlers {
public:
    virtual ~Handlers() = default;
    virtual void attachPath(AttachResult&& result, const CallOrigin& from, std::string path,
                            core::OptionMap options) = 0;
    virtual void attachFd(AttachResult&& result, const CallOrigin& from, sdbus::UnixFd fd, core::OptionMap options) = 0;
    virtual void detach(VoidResult&& result, const CallOrigin& from, uint64_t diskseq, core::OptionMap options) = 0;
    virtual void waitReady(AttachResult&& result, std::string device, uint64_t timeoutUsec) = 0;
    virtual void find(FindResult&& result, const CallOrigin& from, std::string path) = 0;
    virtual void resize(ResizeResult&& result, const CallOrigin& from, uint64_t diskseq, core::OptionMap options) = 0;
    virtual void open(OpenResult&& result, const CallOrigin& from, uint64_t diskseq, core::OptionMap options) = 0;
    virtual std::string readinessSource() const = 0;
    virtual uint32_t deviceCount() const = 0;
    virtual std::vector<std::string> kernelQuirks() const = 0;
};

class DeviceObjects;

class ManagerObject final : public sdbus::AdaptorInterfaces<org::loopd1::Manager_adaptor, sdbus::ObjectManager_adaptor,
                                                            sdbus::Properties_adaptor> {
public:
    ManagerObject(sdbus::IConnection& connection, Handlers& handlers);
    ~ManagerObject();
    // Owns `name`, or queues for it behind an owner that has not left the bus
    // yet (false). Throws on anything else.
    bool requestName(const char* name);
    void devicesChanged();
    void readinessSourceChanged();
    void kernelQuirksChanged();
    using org::loopd1::Manager_adaptor::emitDeviceRemoved;

private:
    void Attach(AttachResult&& result, std::string path, DbusOptions options) override;
    void AttachFd(AttachResult&& result, sdbus::UnixFd fd, DbusOptions options) override;
    void Detach(VoidResult&& result, uint64_t diskseq, DbusOptions options) override;
    void WaitReady(AttachResult&& result, std::string device, uint64_t timeoutUsec) override;
    void Find(FindResult&& result, std::string path) override;
    std::string Version() override;
    std::string ReadinessSource() override;
    uint32_t Devices() override;
    std::vector<std::string> KernelQuirks() override;
    CallOrigin origin() const;

    Handlers& handlers_;

public:
    std::unique_ptr<DeviceObjects> devices; // under /org/loopd1/device
};

// Everything a Device object shows. The references are
// into the daemon's own record of the device, which outlives the object and does
// not move (a std::map node): one copy per device, not two.
struct DeviceProperties {
    const DeviceInfo& info;
    const std::string& ref;
    uint32_t ownerUid = 0;
    const char* lifetime = "";
    uint64_t readyTimestamp = 0;
};

} // namespace loopd::service
