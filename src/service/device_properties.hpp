#pragma once

#include "bus_objects.hpp"
#include "wire.hpp"

#include <systemd/sd-bus.h>

#include <cstdint>
#include <span>

// org.loopd1.Device's properties: one table, read by sd-bus's getters (Get,
// GetAll, InterfacesAdded, PropertiesChanged) and by loopd's own writer of the
// GetManagedObjects reply, so that both always send the same values.
namespace loopd::service {

// One property: one reading of it for both ways it is sent.
struct DeviceProperty {
    const char* name;
    const char* signature;
    uint64_t flags;            // SD_BUS_VTABLE_PROPERTY_*
    sd_bus_property_get_t get; // the userdata is the DeviceObject
    void (*write)(wire::Writer&, const DeviceProperties&);
};

// In the order dbus/org.loopd1.xml declares them.
std::span<const DeviceProperty> deviceProperties();

} // namespace loopd::service
