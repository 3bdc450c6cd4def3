#include "device_properties.hpp"

#include "device_objects.hpp"
#include "kernel/loop_device.hpp"

#include <exception>
#include <string>
#include <type_traits>
#include <vector>

namespace loopd::service {
namespace {

int append(sd_bus_message* reply, uint64_t value)
{
    return sd_bus_message_append_basic(reply, 't', &value);
}

int append(sd_bus_message* reply, uint32_t value)
{
    return sd_bus_message_append_basic(reply, 'u', &value);
}

int append(sd_bus_message* reply, bool value)
{
    const int boolean = value; // sd-bus's 'b' is an int
    return sd_bus_message_append_basic(reply, 'b', &boolean);
}

int append(sd_bus_message* reply, const std::string& value)
{
    return sd_bus_message_append_basic(reply, 's', value.c_str());
}

int append(sd_bus_message* reply, const std::vector<std::string>& values)
{
    int r = sd_bus_message_open_container(reply, 'a', "s");
    for (const auto& value : values)
        if (r >= 0)
            r = sd_bus_message_append_basic(reply, 's', value.c_str());
    return r < 0 ? r : sd_bus_message_close_container(reply);
}

void put(wire::Writer& w, uint64_t value)
{
    w.u64(value);
}

void put(wire::Writer& w, uint32_t value)
{
    w.u32(value);
}

void put(wire::Writer& w, bool value)
{
    w.boolean(value);
}

void put(wire::Writer& w, const std::string& value)
{
    w.string(value);
}

void put(wire::Writer& w, const std::vector<std::string>& values)
{
    const auto array = w.openArray(4);
    for (const auto& value : values)
        w.string(value);
    w.close(array);
}

template <typename T> constexpr const char* signatureOf = nullptr;
template <> constexpr const char* signatureOf<uint64_t> = "t";
template <> constexpr const char* signatureOf<uint32_t> = "u";
template <> constexpr const char* signatureOf<bool> = "b";
template <> constexpr const char* signatureOf<std::string> = "s";
template <> constexpr const char* signatureOf<std::vector<std::string>> = "as";

using P = const DeviceProperties&;

// A property getter for sd-bus (Get, GetAll, InterfacesAdded, PropertiesChanged):
// `value` reads it from the device's properties.
template <auto value>
int property(sd_bus*, const char*, const char*, const char*, sd_bus_message* reply, void* object, sd_bus_error* error)
{
    try {
        return append(reply, value(static_cast<const DeviceObject*>(object)->properties()));
    } catch (const std::exception& e) {
        return sd_bus_error_set(error, SD_BUS_ERROR_FAILED, e.what());
    }
}

// The same value in loopd's own GetManagedObjects reply.
template <auto value> void write(wire::Writer& w, P p)
{
    put(w, value(p));
}

template <auto value> constexpr DeviceProperty define(const char* name, uint64_t flags)
{
    using T = std::decay_t<decltype(value(std::declval<P>()))>;
    return {name, signatureOf<T>, flags, &property<value>, &write<value>};
}

// org.loopd1.Device's properties as dbus/org.loopd1.xml declares them
// (test_contract.py::test_device_object_matches_the_interface_xml compares).
// Size, Partitions and Autoclear may change (PropertiesChanged); the rest are
// fixed for the attachment's life (API.md), which introspection says as "const".
constexpr uint64_t changes = SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE;
constexpr uint64_t fixed = SD_BUS_VTABLE_PROPERTY_CONST;
constexpr DeviceProperty deviceProperties_[] = {
    define<[](P p) { return kernel::loopDevNode(p.info.number); }>("DevNode", fixed),
    define<[](P p) { return p.info.diskseq; }>("DiskSeq", fixed),
    define<[](P p) { return uint32_t{p.info.number}; }>("Number", fixed),
    // A file name is bytes, a D-Bus string UTF-8: sd-bus refuses a string that is
    // not, and one such name made every GetManagedObjects fail.
    define<[](P p) { return wire::validString(p.info.backingFile); }>("BackingFile", fixed),
    define<[](P p) { return uint64_t{p.info.backingDevice}; }>("BackingDevice", fixed),
    define<[](P p) { return uint64_t{p.info.backingInode}; }>("BackingInode", fixed),
    define<[](P p) { return uint64_t{p.info.offset}; }>("Offset", fixed),
    define<[](P p) { return uint64_t{p.info.sizeLimit}; }>("SizeLimit", fixed),
    define<[](P p) { return uint64_t{p.info.size}; }>("Size", changes),
    define<[](P p) { return uint32_t{p.info.sectorSize}; }>("SectorSize", fixed),
    define<[](P p) { return p.info.readOnly; }>("ReadOnly", fixed),
    define<[](P p) { return p.info.directIo; }>("DirectIO", fixed),
    define<[](P p) { return p.info.autoclear; }>("Autoclear", changes),
    define<[](P p) { return p.info.partscan; }>("PartScan", fixed),
    define<[](P p) { return partitionNodes(p.info); }>("Partitions", changes),
    define<[](P p) { return p.ref; }>("Ref", fixed),
    define<[](P p) { return p.ownerUid; }>("OwnerUid", fixed),
    define<[](P p) { return std::string(p.lifetime); }>("Lifetime", fixed),
    define<[](P p) { return p.readyTimestamp; }>("ReadyTimestamp", fixed),
};

} // namespace

std::span<const DeviceProperty> deviceProperties()
{
    return deviceProperties_;
}

} // namespace loopd::service
