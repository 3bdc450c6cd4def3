#pragma once

#include "attach_sequence.hpp"
#include "core/options.hpp"

#include "callers.hpp"
#include "org.loopd1-adaptor.h"

#include <sdbus-c++/sdbus-c++.h>

#include <functional>
#include <map>
#include <string>

// The D-Bus objects. Handlers run on the loop thread (sdbus-c++ dispatches from
// processPendingRequest()); they only forward to the daemon.
namespace loopd::service {

// The origin of the message being handled (sender, interactive-authorization flag).
CallOrigin originOf(const sdbus::Message& message);

using AttachResult = sdbus::Result<sdbus::ObjectPath, std::string, uint64_t, std::vector<std::string>>;
using VoidResult = sdbus::Result<>;
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
    virtual std::string readinessSource() const = 0;
    virtual uint32_t deviceCount() const = 0;
    virtual std::vector<std::string> kernelQuirks() const = 0;
};

class ManagerObject final : public sdbus::AdaptorInterfaces<org::loopd1::Manager_adaptor, sdbus::ObjectManager_adaptor,
                                                            sdbus::Properties_adaptor> {
public:
    ManagerObject(sdbus::IConnection& connection, Handlers& handlers);
    ~ManagerObject();
    void devicesChanged();
    void readinessSourceChanged();
    void kernelQuirksChanged();
    using org::loopd1::Manager_adaptor::emitDeviceRemoved;

private:
    void Attach(AttachResult&& result, std::string path, DbusOptions options) override;
    void AttachFd(AttachResult&& result, sdbus::UnixFd fd, DbusOptions options) override;
    void Detach(VoidResult&& result, uint64_t diskseq, DbusOptions options) override;
    void WaitReady(AttachResult&& result, std::string device, uint64_t timeoutUsec) override;
    std::string Version() override;
    std::string ReadinessSource() override;
    uint32_t Devices() override;
    std::vector<std::string> KernelQuirks() override;
    CallOrigin origin() const;

    Handlers& handlers_;
};

// Everything a Device object shows, fixed once it is ready. The references are
// into the daemon's own record of the device, which outlives the object and does
// not move (a std::map node): one copy per device, not two.
struct DeviceProperties {
    const DeviceInfo& info;
    const std::string& ref;
    uint32_t ownerUid = 0;
    const char* lifetime = "";
    uint64_t readyTimestamp = 0;
};

class DeviceObject final : public sdbus::AdaptorInterfaces<org::loopd1::Device_adaptor, sdbus::Properties_adaptor,
                                                           sdbus::ManagedObject_adaptor> {
public:
    // Registers the object; the constructor emits InterfacesAdded, the destructor
    // InterfacesRemoved.
    DeviceObject(sdbus::IConnection& connection, DeviceProperties properties, Handlers& handlers);
    ~DeviceObject();

private:
    void Detach(VoidResult&& result, DbusOptions options) override;
    std::string DevNode() override;
    uint64_t DiskSeq() override { return p_.info.diskseq; }
    uint32_t Number() override { return p_.info.number; }
    std::string BackingFile() override { return p_.info.backingFile; }
    uint64_t BackingDevice() override { return p_.info.backingDevice; }
    uint64_t BackingInode() override { return p_.info.backingInode; }
    uint64_t Offset() override { return p_.info.offset; }
    uint64_t SizeLimit() override { return p_.info.sizeLimit; }
    uint64_t Size() override { return p_.info.size; }
    uint32_t SectorSize() override { return p_.info.sectorSize; }
    bool ReadOnly() override { return p_.info.readOnly; }
    bool DirectIO() override { return p_.info.directIo; }
    bool Autoclear() override { return p_.info.autoclear; }
    bool PartScan() override { return p_.info.partscan; }
    std::vector<std::string> Partitions() override { return partitionNodes(p_.info); }
    std::string Ref() override { return p_.ref; }
    uint32_t OwnerUid() override { return p_.ownerUid; }
    std::string Lifetime() override { return p_.lifetime; }
    uint64_t ReadyTimestamp() override { return p_.readyTimestamp; }

    DeviceProperties p_;
    Handlers& handlers_;
};

} // namespace loopd::service
