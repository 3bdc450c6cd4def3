#pragma once

#include "bus_objects.hpp"

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

struct sd_bus;
struct sd_bus_slot;

// The Device objects (/org/loopd1/device/<diskseq>), all served by one sd-bus
// fallback vtable on the connection sdbus-c++ opened, found by their diskseq.
//
// Not one sdbus-c++ object per device: sdbus-c++ 1.2 builds a vtable, a map of
// 19 property records with two std::functions each and sd-bus's member tables for
// every object, about 7 KiB per device of loopd's 9 (massif, tests/bench/RESULTS.md).
// The interface is the same for all devices, so one static table serves them, and
// a device costs what loopd itself keeps of it. Loop thread only, as sdbus-c++.
namespace loopd::service {

class DeviceObjects;

// One device on the bus: InterfacesAdded when made, InterfacesRemoved when gone.
class DeviceObject {
public:
    DeviceObject(DeviceObjects& objects, DeviceProperties properties);
    ~DeviceObject();
    DeviceObject(const DeviceObject&) = delete;
    DeviceObject& operator=(const DeviceObject&) = delete;

    [[nodiscard]] const DeviceProperties& properties() const { return p_; }
    // PropertiesChanged for these properties of org.loopd1.Device.
    void propertiesChanged(const std::vector<std::string>& names);

private:
    friend struct DeviceVtable;
    friend class DeviceObjects;

    DeviceObjects* objects_; // null once the objects' table is gone (a failed start-up unwinding)
    DeviceProperties p_;
};

class DeviceObjects {
public:
    // Takes the connection's sd-bus from a message of the manager's object.
    DeviceObjects(sdbus::IObject& manager, Handlers& handlers);
    ~DeviceObjects();
    DeviceObjects(const DeviceObjects&) = delete;
    DeviceObjects& operator=(const DeviceObjects&) = delete;

    // From now on objects are announced (InterfacesAdded, InterfacesRemoved).
    // Before loopd owns its name no client can tell its signals from anyone's,
    // and a restart adopting thousands of devices would send one each for
    // nothing: clients read the objects with GetManagedObjects once the name is
    // there.
    void announce() { announcing_ = true; }

private:
    friend class DeviceObject;
    friend struct DeviceVtable;

    sd_bus* bus_ = nullptr;
    sdbus::internal::ISdBus* sdbus_ = nullptr; // to answer calls through sdbus::Result
    sd_bus_slot* vtable_ = nullptr;
    sd_bus_slot* enumerator_ = nullptr;
    sd_bus_slot* managedObjects_ = nullptr; // GetManagedObjects on the manager's path
    sd_bus_slot* gone_ = nullptr;           // Device calls on paths of no device: NotFound
    std::map<uint64_t, DeviceObject*> objects_;
    Handlers& handlers_;
    bool announcing_ = false;
    // The last GetManagedObjects body, kept for the next one: its pages are
    // mapped already, where a fresh 2.6 MB (4096 devices) faulted in each time.
    std::string reply_;

    // Serials of the replies loopd writes itself: from 2^31 up, while sd-bus
    // counts its own from 1. Nobody answers a reply, so no one matches them, but
    // they stay apart as D-Bus asks of a connection's serials.
    uint32_t serial()
    {
        serial_ = serial_ == UINT32_MAX ? 1U << 31 : serial_ + 1;
        return serial_;
    }
    uint32_t serial_ = 1U << 31;
};

} // namespace loopd::service
