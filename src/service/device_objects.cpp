#include "device_objects.hpp"

#include "bus_write.hpp"
#include "device_properties.hpp"
#include "errors.hpp"
#include "wire.hpp"

#include <loopd/log.hpp>

#include <systemd/sd-bus.h>

#include <charconv>
#include <cstdlib>
#include <cstring>

namespace loopd::service {
namespace {

constexpr const char* deviceInterface = "org.loopd1.Device";
constexpr std::string_view devicePrefix = "/org/loopd1/device";

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
    // vtables and its built-in ObjectManager. It lists each device with
    // org.loopd1.Device and every property: the object InterfacesAdded announced,
    // as GDBus's object managers list theirs (sd-bus's walk also listed Peer,
    // Introspectable and Properties, empty, for every object, and cost 24 ms at
    // 1000 devices in node lookups alone). The manager's own object is not listed
    // (sd-bus lists only what is below the object manager), nor is anything else:
    // nothing else lives below it.
    //
    // loopd writes this reply's bytes itself (sendWritten). Through sd-bus, each
    // of the ~110 items of a device is an append that checks the signature,
    // validates the value and may grow the body: 34-41 ms of loopd's CPU at 4096
    // devices, before dbus-daemon (27-32 ms) could even begin on the 2.6 MB.
    // Written directly it is 8-11 ms, most of it reading 4096 devices' state out
    // of cache (tests/bench/RESULTS.md).
    static int managedObjects(sd_bus_message* call, void* objects, sd_bus_error* error)
    {
        if (!sd_bus_message_is_method_call(call, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"))
            return 0; // everything else as before
        if (!isEmptySignature(call))
            return sd_bus_reply_method_errorf(call, SD_BUS_ERROR_INVALID_ARGS, "Expected no parameters");
        if (sd_bus_message_get_expect_reply(call) == 0)
            return 1; // nobody waits for it
        auto& all = *static_cast<DeviceObjects*>(objects);
        switch (sendWritten(call, all)) {
        case Written::Sent:
            return 1;
        case Written::TooLarge:
            return sd_bus_reply_method_errorf(call, SD_BUS_ERROR_LIMITS_EXCEEDED,
                                              "%zu devices do not fit in one D-Bus message; ask each device "
                                              "object (org.freedesktop.DBus.Properties.GetAll)",
                                              all.objects_.size());
        case Written::NotHere:
            break;
        }
        sd_bus_message* reply = nullptr;
        int r = sd_bus_message_new_method_return(call, &reply);
        if (r >= 0)
            r = appendAll(reply, all, error);
        if (r >= 0)
            r = sd_bus_send(nullptr, reply, nullptr);
        sd_bus_message_unref(reply);
        return r < 0 ? r : 1;
    }

    static constexpr std::string_view managedSignature = "a{oa{sa{sv}}}";

    // The reply's body, a{oa{sa{sv}}}: the same items, in the same order, as
    // appendAll gives sd-bus.
    static void writeAll(wire::Writer& w, const DeviceObjects& objects);

    // The reply written and sent past sd-bus (writeBetweenMessages): NotHere when
    // that could not begin, and sd-bus is to send it.
    enum class Written { Sent, TooLarge, NotHere };
    static Written sendWritten(sd_bus_message* call, DeviceObjects& objects)
    {
        std::string header;
        try {
            wire::Writer w(std::move(objects.reply_));
            writeAll(w, objects);
            objects.reply_ = w.take();
            if (objects.reply_.size() > wire::maxBusMessageBytes - 1024) // the header within it
                return Written::TooLarge;
            uint64_t cookie = 0;
            if (sd_bus_message_get_cookie(call, &cookie) < 0)
                return Written::NotHere;
            header = wire::methodReturnHeader(objects.serial(), static_cast<uint32_t>(cookie),
                                              sd_bus_message_get_sender(call), managedSignature, objects.reply_.size());
        } catch (const std::exception& e) {
            log::warn("GetManagedObjects is sent through sd-bus: {}", e.what());
            return Written::NotHere;
        }
        return writeBetweenMessages(objects.bus_, header, objects.reply_) ? Written::Sent : Written::NotHere;
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

constexpr char detachName[] = "Detach";
constexpr char resizeName[] = "Resize";
constexpr char openName[] = "Open";

// The methods, then every property: built once, kept for sd-bus, which reads the
// table for as long as the vtable slot lives.
const sd_bus_vtable* deviceVtable()
{
    static const auto table = [] {
        std::vector<sd_bus_vtable> v{
            SD_BUS_VTABLE_START(0),
            SD_BUS_METHOD_WITH_ARGS("Detach", SD_BUS_ARGS("a{sv}", options), SD_BUS_NO_RESULT,
                                    (DeviceVtable::method<VoidResult, &Handlers::detach, detachName>),
                                    SD_BUS_VTABLE_UNPRIVILEGED),
            SD_BUS_METHOD_WITH_ARGS("Resize", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("t", size, "as", partitions),
                                    (DeviceVtable::method<ResizeResult, &Handlers::resize, resizeName>),
                                    SD_BUS_VTABLE_UNPRIVILEGED),
            SD_BUS_METHOD_WITH_ARGS("Open", SD_BUS_ARGS("a{sv}", options), SD_BUS_RESULT("h", fd),
                                    (DeviceVtable::method<OpenResult, &Handlers::open, openName>),
                                    SD_BUS_VTABLE_UNPRIVILEGED),
        };
        for (const auto& p : deviceProperties())
            v.push_back(SD_BUS_PROPERTY(p.name, p.signature, p.get, 0, p.flags));
        v.push_back(SD_BUS_VTABLE_END);
        return v;
    }();
    return table.data();
}

} // namespace

void DeviceVtable::writeAll(wire::Writer& w, const DeviceObjects& objects)
{
    const auto devices = w.openArray(8);
    for (const auto& [diskseq, object] : objects.objects_) {
        w.entry();
        w.string(devicePath(diskseq)); // 'o' is laid out as 's'
        const auto interfaces = w.openArray(8);
        w.entry();
        w.string(deviceInterface);
        const auto properties = w.openArray(8);
        for (const auto& property : deviceProperties()) {
            w.entry();
            w.string(property.name);
            w.signature(property.signature);
            property.write(w, object->properties());
        }
        w.close(properties);
        w.close(interfaces);
    }
    w.close(devices);
}

int DeviceVtable::appendDevice(sd_bus_message* reply, const char* path, DeviceObject* object, sd_bus_error* error)
{
    int r = sd_bus_message_open_container(reply, 'e', "sa{sv}");
    if (r >= 0)
        r = sd_bus_message_append_basic(reply, 's', deviceInterface);
    if (r >= 0)
        r = sd_bus_message_open_container(reply, 'a', "{sv}");
    for (const auto& property : deviceProperties()) {
        if (r >= 0)
            r = sd_bus_message_open_container(reply, 'e', "sv");
        if (r >= 0)
            r = sd_bus_message_append_basic(reply, 's', property.name);
        if (r >= 0)
            r = sd_bus_message_open_container(reply, 'v', property.signature);
        if (r >= 0)
            r = property.get(nullptr, path, deviceInterface, property.name, reply, object, error);
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
    int r = sd_bus_add_fallback_vtable(bus_, &vtable_, devicePrefix.data(), deviceInterface, deviceVtable(),
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
