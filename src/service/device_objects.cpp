#include "device_objects.hpp"

#include "errors.hpp"
#include "kernel/loop_device.hpp"

#include <loopd/log.hpp>

#include <systemd/sd-bus.h>

#include <charconv>
#include <cstdlib>
#include <cstring>

namespace loopd::service {
namespace {

constexpr const char* deviceInterface = "org.loopd1.Device";
constexpr std::string_view devicePrefix = "/org/loopd1/device";

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

// A property getter: `value` reads it from the device's properties.
template <auto value>
int property(sd_bus*, const char*, const char*, const char*, sd_bus_message* reply, void* object, sd_bus_error* error)
{
    try {
        return append(reply, value(static_cast<const DeviceObject*>(object)->properties()));
    } catch (const std::exception& e) {
        return sd_bus_error_set(error, SD_BUS_ERROR_FAILED, e.what());
    }
}

std::optional<uint64_t> diskseqOf(std::string_view path)
{
    if (path.substr(0, devicePrefix.size()) != devicePrefix || path.size() < devicePrefix.size() + 2 ||
        path[devicePrefix.size()] != '/')
        return std::nullopt;
    path.remove_prefix(devicePrefix.size() + 1);
    uint64_t diskseq = 0;
    const auto [end, ec] = std::from_chars(path.data(), path.data() + path.size(), diskseq);
    if (ec != std::errc() || end != path.data() + path.size())
        return std::nullopt;
    return diskseq;
}

} // namespace

// sd-bus's callbacks, C functions: nothing may be thrown through them.
struct DeviceVtable {
    static int find(sd_bus*, const char* path, const char*, void* objects, void** found, sd_bus_error*)
    {
        const auto& all = static_cast<DeviceObjects*>(objects)->objects_;
        const auto diskseq = diskseqOf(path);
        const auto it = diskseq ? all.find(*diskseq) : all.end();
        if (it == all.end())
            return 0;
        *found = it->second;
        return 1;
    }

    static int enumerate(sd_bus*, const char*, void* objects, char*** nodes, sd_bus_error*)
    {
        const auto& all = static_cast<DeviceObjects*>(objects)->objects_;
        auto** list = static_cast<char**>(std::calloc(all.size() + 1, sizeof(char*)));
        if (!list)
            return -ENOMEM;
        std::size_t i = 0;
        for (const auto& [diskseq, object] : all)
            if (!(list[i++] = ::strdup(devicePath(diskseq).c_str())))
                return sd_bus_error_set_errno(nullptr, ENOMEM), freeList(list), -ENOMEM;
        *nodes = list;
        return 0;
    }

    static void freeList(char** list)
    {
        for (auto** p = list; *p; ++p)
            std::free(*p);
        std::free(list);
    }

    // org.freedesktop.DBus.ObjectManager.GetManagedObjects on the manager's path,
    // ahead of sd-bus's own: sd-bus runs a path's message callbacks before its
    // vtables and its built-in ObjectManager. Its generic walk costs, per device,
    // a strdup'ed path from the enumerator, a set insert, node lookups for the
    // path and each of its prefixes, a find() per vtable and one getter call each
    // through a member lookup: 24 ms with 1000 devices, most of loopd's time.
    // This one walks the table once and lists each device with org.loopd1.Device
    // and every property of deviceVtable, read by the same getters: the object
    // that InterfacesAdded announced, as GDBus's object managers list theirs.
    // sd-bus's walk also listed Peer, Introspectable and Properties, empty, for
    // every object: 128 of each device's ~760 bytes (a sixth of the reply) that
    // dbus-daemon validates and every client decodes, and 15 of its ~110 sd-bus
    // appends, for interfaces no InterfacesAdded ever carried. The manager's own object is not listed
    // (sd-bus lists only what is below the object manager), nor is anything
    // else: nothing else lives below it.
    static int managedObjects(sd_bus_message* call, void* objects, sd_bus_error* error)
    {
        if (!sd_bus_message_is_method_call(call, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"))
            return 0; // everything else as before
        if (!isEmptySignature(call))
            return sd_bus_reply_method_errorf(call, SD_BUS_ERROR_INVALID_ARGS, "Expected no parameters");
        sd_bus_message* reply = nullptr;
        int r = sd_bus_message_new_method_return(call, &reply);
        if (r >= 0)
            r = appendAll(reply, *static_cast<DeviceObjects*>(objects), error);
        if (r >= 0)
            r = sd_bus_send(nullptr, reply, nullptr);
        sd_bus_message_unref(reply);
        return r < 0 ? r : 1;
    }

    // A call on a path below /org/loopd1/device that names no device (one detached
    // meanwhile, or never attached): the contract's NotFound, naming the path,
    // rather than sd-bus's UnknownObject, which it no longer sends for these
    // paths (a fallback's callback makes every path below it "found"). sd-bus
    // runs it before the vtables, so a live device's calls are passed on.
    static int gone(sd_bus_message* call, void* objects, sd_bus_error*)
    {
        const std::string_view path = sd_bus_message_get_path(call) ? sd_bus_message_get_path(call) : "";
        uint8_t type = 0;
        if (sd_bus_message_get_type(call, &type) < 0 || type != SD_BUS_MESSAGE_METHOD_CALL || path == devicePrefix)
            return 0;
        if (const auto diskseq = diskseqOf(path);
            diskseq && static_cast<DeviceObjects*>(objects)->objects_.count(*diskseq))
            return 0;
        try {
            const auto error = makeDbusError(Errc::NotFound, "no loopd device at " + std::string(path) +
                                                                 " (detached, or never attached)");
            return sd_bus_reply_method_errorf(call, error.getName().c_str(), "%s", error.getMessage().c_str());
        } catch (...) {
            return -ENOMEM;
        }
    }

    static bool isEmptySignature(sd_bus_message* call)
    {
        const char* signature = sd_bus_message_get_signature(call, 1);
        return !signature || !*signature;
    }

    static int appendAll(sd_bus_message* reply, const DeviceObjects& objects, sd_bus_error* error)
    {
        int r = sd_bus_message_open_container(reply, 'a', "{oa{sa{sv}}}");
        for (const auto& [diskseq, object] : objects.objects_)
            if (r >= 0)
                r = appendObject(reply, devicePath(diskseq), object, error);
        return r < 0 ? r : sd_bus_message_close_container(reply);
    }

    static int appendObject(sd_bus_message* reply, const std::string& path, DeviceObject* object, sd_bus_error* error)
    {
        int r = sd_bus_message_open_container(reply, 'e', "oa{sa{sv}}");
        if (r >= 0)
            r = sd_bus_message_append_basic(reply, 'o', path.c_str());
        if (r >= 0)
            r = sd_bus_message_open_container(reply, 'a', "{sa{sv}}");
        if (r >= 0)
            r = appendDevice(reply, path.c_str(), object, error);
        if (r >= 0)
            r = sd_bus_message_close_container(reply);
        return r < 0 ? r : sd_bus_message_close_container(reply);
    }

    // {s a{sv}} for org.loopd1.Device, each property read by its vtable getter.
    static int appendDevice(sd_bus_message* reply, const char* path, DeviceObject* object, sd_bus_error* error);

    // A Device method: (a{sv} options) in, answered now or later through Result
    // by the daemon's handler, like the Manager's methods.
    template <typename Result, void (Handlers::*handle)(Result&&, const CallOrigin&, uint64_t, core::OptionMap),
              const char* name>
    static int method(sd_bus_message* message, void* found, sd_bus_error* error)
    {
        auto* object = static_cast<DeviceObject*>(found);
        auto& objects = *object->objects_; // found by the table: it is there
        try {
            auto call = adoptCall(message, objects.sdbus_);
            DbusOptions options;
            call >> options;
            const auto origin = originOf(call);
            Result result(std::move(call));
            guarded(result, name, [&] {
                (objects.handlers_.*handle)(std::move(result), origin, object->properties().info.diskseq,
                                            toOptionMap(options));
            });
            return 1; // answered, now or later, through result
        } catch (const sdbus::Error& e) {
            return sd_bus_error_set(error, e.getName().c_str(), e.getMessage().c_str());
        } catch (const std::exception& e) {
            return sd_bus_error_set(error, SD_BUS_ERROR_FAILED, e.what());
        }
    }
};

namespace {

using P = const DeviceProperties&;

constexpr char detachName[] = "Detach";
constexpr char resizeName[] = "Resize";
constexpr char openName[] = "Open";

// org.loopd1.Device as dbus/org.loopd1.xml declares it
// (test_contract.py::test_device_object_matches_the_interface_xml compares).
// Size, Partitions and Autoclear may change (PropertiesChanged); the rest are
// fixed for the attachment's life (API.md), which introspection says as "const".
constexpr uint64_t changes = SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE;
constexpr uint64_t fixed = SD_BUS_VTABLE_PROPERTY_CONST;
const sd_bus_vtable deviceVtable[] = {
    SD_BUS_VTABLE_START(0),
    SD_BUS_METHOD_WITH_ARGS("Detach", SD_BUS_ARGS("a{sv}", options), SD_BUS_NO_RESULT,
                            (DeviceVtable::method<VoidResult, &Handlers::detach, detachName>),
                            SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_ARGS("Resize", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("t", size, "as", partitions),
                            (DeviceVtable::method<ResizeResult, &Handlers::resize, resizeName>),
                            SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD_WITH_ARGS("Open", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("h", fd),
                            (DeviceVtable::method<OpenResult, &Handlers::open, openName>), SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_PROPERTY("DevNode", "s", property<[](P p) { return kernel::loopDevNode(p.info.number); }>, 0, fixed),
    SD_BUS_PROPERTY("DiskSeq", "t", property<[](P p) { return p.info.diskseq; }>, 0, fixed),
    SD_BUS_PROPERTY("Number", "u", property<[](P p) { return uint32_t{p.info.number}; }>, 0, fixed),
    SD_BUS_PROPERTY("BackingFile", "s", property<[](P p) { return p.info.backingFile; }>, 0, fixed),
    SD_BUS_PROPERTY("BackingDevice", "t", property<[](P p) { return uint64_t{p.info.backingDevice}; }>, 0, fixed),
    SD_BUS_PROPERTY("BackingInode", "t", property<[](P p) { return uint64_t{p.info.backingInode}; }>, 0, fixed),
    SD_BUS_PROPERTY("Offset", "t", property<[](P p) { return uint64_t{p.info.offset}; }>, 0, fixed),
    SD_BUS_PROPERTY("SizeLimit", "t", property<[](P p) { return uint64_t{p.info.sizeLimit}; }>, 0, fixed),
    SD_BUS_PROPERTY("Size", "t", property<[](P p) { return uint64_t{p.info.size}; }>, 0, changes),
    SD_BUS_PROPERTY("SectorSize", "u", property<[](P p) { return uint32_t{p.info.sectorSize}; }>, 0, fixed),
    SD_BUS_PROPERTY("ReadOnly", "b", property<[](P p) { return p.info.readOnly; }>, 0, fixed),
    SD_BUS_PROPERTY("DirectIO", "b", property<[](P p) { return p.info.directIo; }>, 0, fixed),
    SD_BUS_PROPERTY("Autoclear", "b", property<[](P p) { return p.info.autoclear; }>, 0, changes),
    SD_BUS_PROPERTY("PartScan", "b", property<[](P p) { return p.info.partscan; }>, 0, fixed),
    SD_BUS_PROPERTY("Partitions", "as", property<[](P p) { return partitionNodes(p.info); }>, 0, changes),
    SD_BUS_PROPERTY("Ref", "s", property<[](P p) { return p.ref; }>, 0, fixed),
    SD_BUS_PROPERTY("OwnerUid", "u", property<[](P p) { return p.ownerUid; }>, 0, fixed),
    SD_BUS_PROPERTY("Lifetime", "s", property<[](P p) { return std::string(p.lifetime); }>, 0, fixed),
    SD_BUS_PROPERTY("ReadyTimestamp", "t", property<[](P p) { return p.readyTimestamp; }>, 0, fixed),
    SD_BUS_VTABLE_END,
};

} // namespace

int DeviceVtable::appendDevice(sd_bus_message* reply, const char* path, DeviceObject* object, sd_bus_error* error)
{
    int r = sd_bus_message_open_container(reply, 'e', "sa{sv}");
    if (r >= 0)
        r = sd_bus_message_append_basic(reply, 's', deviceInterface);
    if (r >= 0)
        r = sd_bus_message_open_container(reply, 'a', "{sv}");
    for (const auto* entry = deviceVtable; r >= 0 && entry->type != _SD_BUS_VTABLE_END; ++entry) {
        if (entry->type != _SD_BUS_VTABLE_PROPERTY)
            continue;
        const auto& property = entry->x.property;
        r = sd_bus_message_open_container(reply, 'e', "sv");
        if (r >= 0)
            r = sd_bus_message_append_basic(reply, 's', property.member);
        if (r >= 0)
            r = sd_bus_message_open_container(reply, 'v', property.signature);
        if (r >= 0)
            r = property.get(nullptr, path, deviceInterface, property.member, reply, object, error);
        if (r >= 0)
            r = sd_bus_message_close_container(reply);
        if (r >= 0)
            r = sd_bus_message_close_container(reply);
    }
    if (r >= 0)
        r = sd_bus_message_close_container(reply);
    return r < 0 ? r : sd_bus_message_close_container(reply);
}

DeviceObjects::DeviceObjects(sdbus::IObject& manager, Handlers& handlers) : handlers_(handlers)
{
    // Any message made on the connection knows its bus.
    const auto probe = manager.createSignal("org.loopd1.Manager", "DeviceRemoved");
    sdbus_ = sdbusOf(probe);
    bus_ = sd_bus_ref(sd_bus_message_get_bus(rawMessage(probe)));
    int r = sd_bus_add_fallback_vtable(bus_, &vtable_, devicePrefix.data(), deviceInterface, deviceVtable,
                                       DeviceVtable::find, this);
    if (r >= 0)
        r = sd_bus_add_node_enumerator(bus_, &enumerator_, devicePrefix.data(), DeviceVtable::enumerate, this);
    if (r >= 0)
        r = sd_bus_add_object(bus_, &managedObjects_, managerPath, DeviceVtable::managedObjects, this);
    if (r >= 0)
        r = sd_bus_add_fallback(bus_, &gone_, devicePrefix.data(), DeviceVtable::gone, this);
    if (r < 0) {
        sd_bus_slot_unref(managedObjects_);
        sd_bus_slot_unref(enumerator_);
        sd_bus_slot_unref(vtable_);
        sd_bus_unref(bus_);
        throw sdbus::Error(SD_BUS_ERROR_FAILED,
                           std::string("cannot serve ") + devicePrefix.data() + ": " + std::strerror(-r));
    }
}

DeviceObjects::~DeviceObjects()
{
    // Devices outliving the table (the daemon's members unwinding after a failed
    // start) must not reach back into it.
    for (auto& [diskseq, object] : objects_)
        object->objects_ = nullptr;
    sd_bus_slot_unref(gone_);
    sd_bus_slot_unref(managedObjects_);
    sd_bus_slot_unref(enumerator_);
    sd_bus_slot_unref(vtable_);
    sd_bus_unref(bus_);
}

DeviceObject::DeviceObject(DeviceObjects& objects, DeviceProperties properties)
    : objects_(&objects), p_(std::move(properties))
{
    objects_->objects_[p_.info.diskseq] = this;
    if (!objects_->announcing_)
        return;
    const auto path = devicePath(p_.info.diskseq);
    if (const int r = sd_bus_emit_interfaces_added(objects_->bus_, path.c_str(), deviceInterface, nullptr); r < 0)
        log::warn("InterfacesAdded not sent diskseq={}: {}", p_.info.diskseq, std::strerror(-r));
}

DeviceObject::~DeviceObject()
{
    if (!objects_)
        return;
    objects_->objects_.erase(p_.info.diskseq);
    if (!objects_->announcing_)
        return;
    const auto path = devicePath(p_.info.diskseq);
    if (const int r = sd_bus_emit_interfaces_removed(objects_->bus_, path.c_str(), deviceInterface, nullptr); r < 0)
        log::warn("InterfacesRemoved not sent diskseq={}: {}", p_.info.diskseq, std::strerror(-r));
}

void DeviceObject::propertiesChanged(const std::vector<std::string>& names)
{
    if (!objects_)
        return;
    std::vector<char*> list;
    for (const auto& name : names)
        list.push_back(const_cast<char*>(name.c_str()));
    list.push_back(nullptr);
    const auto path = devicePath(p_.info.diskseq);
    if (const int r = sd_bus_emit_properties_changed_strv(objects_->bus_, path.c_str(), deviceInterface, list.data());
        r < 0)
        log::warn("PropertiesChanged not sent diskseq={}: {}", p_.info.diskseq, std::strerror(-r));
}

} // namespace loopd::service
