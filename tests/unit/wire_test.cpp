// The bytes loopd writes itself (service/wire) against libdbus, the parser
// dbus-daemon runs on every message: a reply it would refuse would cut loopd
// off the bus.
#include "service/wire.hpp"

#include <catch2/catch.hpp>
#include <dbus/dbus.h>

#include <map>
#include <string>
#include <variant>
#include <vector>

using namespace loopd::service;

namespace {

using Value = std::variant<uint64_t, uint32_t, bool, std::string, std::vector<std::string>>;
using Objects = std::map<std::string, std::map<std::string, std::map<std::string, Value>>>;

void put(wire::Writer& w, const Value& value)
{
    if (const auto* t = std::get_if<uint64_t>(&value))
        w.signature("t"), w.u64(*t);
    else if (const auto* u = std::get_if<uint32_t>(&value))
        w.signature("u"), w.u32(*u);
    else if (const auto* b = std::get_if<bool>(&value))
        w.signature("b"), w.boolean(*b);
    else if (const auto* s = std::get_if<std::string>(&value))
        w.signature("s"), w.string(*s);
    else {
        w.signature("as");
        const auto array = w.openArray(4);
        for (const auto& item : std::get<std::vector<std::string>>(value))
            w.string(item);
        w.close(array);
    }
}

std::string body(const Objects& objects)
{
    wire::Writer w;
    const auto all = w.openArray(8);
    for (const auto& [path, interfaces] : objects) {
        w.entry();
        w.string(path);
        const auto ifaces = w.openArray(8);
        for (const auto& [name, properties] : interfaces) {
            w.entry();
            w.string(name);
            const auto props = w.openArray(8);
            for (const auto& [key, value] : properties) {
                w.entry();
                w.string(key);
                put(w, value);
            }
            w.close(props);
        }
        w.close(ifaces);
    }
    w.close(all);
    return w.take();
}

Value read(DBusMessageIter* variant)
{
    DBusMessageIter inner;
    dbus_message_iter_recurse(variant, &inner);
    switch (dbus_message_iter_get_arg_type(&inner)) {
    case DBUS_TYPE_UINT64: {
        dbus_uint64_t t = 0;
        dbus_message_iter_get_basic(&inner, &t);
        return uint64_t{t};
    }
    case DBUS_TYPE_UINT32: {
        dbus_uint32_t u = 0;
        dbus_message_iter_get_basic(&inner, &u);
        return uint32_t{u};
    }
    case DBUS_TYPE_BOOLEAN: {
        dbus_bool_t b = 0;
        dbus_message_iter_get_basic(&inner, &b);
        return b != 0;
    }
    case DBUS_TYPE_STRING: {
        const char* s = nullptr;
        dbus_message_iter_get_basic(&inner, &s);
        return std::string(s);
    }
    default: {
        std::vector<std::string> items;
        DBusMessageIter item;
        dbus_message_iter_recurse(&inner, &item);
        for (; dbus_message_iter_get_arg_type(&item) == DBUS_TYPE_STRING; dbus_message_iter_next(&item)) {
            const char* s = nullptr;
            dbus_message_iter_get_basic(&item, &s);
            items.emplace_back(s);
        }
        return items;
    }
    }
}

// Walks a{oa{sa{sv}}} as libdbus reads it.
Objects read(DBusMessage* message)
{
    Objects out;
    DBusMessageIter top, object;
    dbus_message_iter_init(message, &top);
    for (dbus_message_iter_recurse(&top, &object); dbus_message_iter_get_arg_type(&object) == DBUS_TYPE_DICT_ENTRY;
         dbus_message_iter_next(&object)) {
        DBusMessageIter entry, interface;
        dbus_message_iter_recurse(&object, &entry);
        const char* path = nullptr;
        dbus_message_iter_get_basic(&entry, &path);
        auto& interfaces = out[path];
        dbus_message_iter_next(&entry);
        for (dbus_message_iter_recurse(&entry, &interface);
             dbus_message_iter_get_arg_type(&interface) == DBUS_TYPE_DICT_ENTRY; dbus_message_iter_next(&interface)) {
            DBusMessageIter ientry, property;
            dbus_message_iter_recurse(&interface, &ientry);
            const char* name = nullptr;
            dbus_message_iter_get_basic(&ientry, &name);
            auto& properties = interfaces[name];
            dbus_message_iter_next(&ientry);
            for (dbus_message_iter_recurse(&ientry, &property);
                 dbus_message_iter_get_arg_type(&property) == DBUS_TYPE_DICT_ENTRY; dbus_message_iter_next(&property)) {
                DBusMessageIter pentry;
                dbus_message_iter_recurse(&property, &pentry);
                const char* key = nullptr;
                dbus_message_iter_get_basic(&pentry, &key);
                dbus_message_iter_next(&pentry);
                properties[key] = read(&pentry);
            }
        }
    }
    return out;
}

struct Parsed {
    DBusMessage* message = nullptr;
    std::string error;
    ~Parsed()
    {
        if (message)
            dbus_message_unref(message);
    }
};

void demarshal(Parsed& parsed, const std::string& bytes)
{
    DBusError error;
    dbus_error_init(&error);
    parsed.message = dbus_message_demarshal(bytes.data(), static_cast<int>(bytes.size()), &error);
    if (dbus_error_is_set(&error))
        parsed.error = error.message;
    dbus_error_free(&error);
}

const Objects twoDevices{
    {"/org/loopd1/device/7",
     {{"org.loopd1.Device",
       {{"DevNode", std::string("/dev/loop0")},
        {"DiskSeq", uint64_t{7}},
        {"Number", uint32_t{0}},
        {"ReadOnly", true},
        {"Partitions", std::vector<std::string>{"/dev/loop0p1", "/dev/loop0p2"}},
        {"BackingFile", std::string("/srv/images/\xc3\xa9t\xc3\xa9.img")},
        {"Ref", std::string()}}}}},
    {"/org/loopd1/device/12",
     {{"org.loopd1.Device",
       {{"Partitions", std::vector<std::string>{}},
        {"Size", uint64_t{1} << 40},
        {"Autoclear", false},
        {"BackingFile", std::string(wire::validString("/tmp/bad-\xff\xfe.img"))}}}}},
};

} // namespace

TEST_CASE("a file name that is not UTF-8 becomes a D-Bus string, valid UTF-8 stays as it is")
{
    CHECK(wire::validString("/srv/a b.img") == "/srv/a b.img");
    CHECK(wire::validString("/srv/\xc3\xa9t\xc3\xa9") == "/srv/\xc3\xa9t\xc3\xa9"); // é, two bytes
    CHECK(wire::validString("/srv/\xf0\x9f\x92\xbe") == "/srv/\xf0\x9f\x92\xbe");   // U+1F4BE, four
    CHECK(wire::validString("/srv/bad-\xff.img") == "/srv/bad-\\xff.img");          // never a UTF-8 byte
    CHECK(wire::validString("a\xc0\xaf") == "a\\xc0\\xaf");                         // '/' too long
    CHECK(wire::validString("a\xed\xa0\x80") == "a\\xed\\xa0\\x80");                // a UTF-16 surrogate
    CHECK(wire::validString("a\xef\xbf\xbe") == "a\\xef\\xbf\\xbe");                // U+FFFE: sd-bus refuses it
    CHECK(wire::validString("a\xef\xb7\x90") == "a\\xef\\xb7\\x90");                // U+FDD0, the same
    CHECK(wire::validString("a\xe2\x82") == "a\\xe2\\x82");                         // cut short
    CHECK(wire::validString("a\xe2\x82\xac\x80") == "a\xe2\x82\xac\\x80");          // €, then a stray byte
    CHECK(wire::validString(std::string("a\0b", 3)) == "a\\x00b");                  // NUL ends a C string
    CHECK(wire::validString("\xf4\x90\x80\x80") == "\\xf4\\x90\\x80\\x80");         // past U+10FFFF
    CHECK(wire::isValidString(wire::validString("\xff\xc3(\xe2\x28\xa1 \xf0\x28\x8c\x28")));
}

TEST_CASE("long strings are checked eight bytes at a time, and every byte still counts")
{
    CHECK(wire::isValidString("/var/tmp/loopd-test-abcdefgh/none-4095.img"));
    CHECK(wire::isValidString("/var/tmp/\xc3\xa9t\xc3\xa9/abcdefghijklmnop"));
    for (std::size_t at = 0; at < 24; ++at) {
        std::string bad(24, 'a');
        bad[at] = '\xff';
        CHECK_FALSE(wire::isValidString(bad));
        bad[at] = '\0';
        CHECK_FALSE(wire::isValidString(bad));
    }
}

TEST_CASE("the writer refuses a string that would get loopd cut off the bus")
{
    wire::Writer w;
    CHECK_THROWS_AS(w.string("bad-\xff"), std::invalid_argument);
    CHECK_THROWS_AS(w.string(std::string("a\0b", 3)), std::invalid_argument);
    CHECK_NOTHROW(w.string("/dev/loop0"));
}

TEST_CASE("a written GetManagedObjects reply is one libdbus reads as sent")
{
    for (const auto& objects : {Objects{}, twoDevices}) {
        const auto payload = body(objects);
        const auto header = wire::methodReturnHeader(0x80000001, 42, ":1.17", "a{oa{sa{sv}}}", payload.size());
        CHECK(header.size() % 8 == 0);
        Parsed parsed;
        demarshal(parsed, header + payload);
        INFO(parsed.error);
        REQUIRE(parsed.message);
        CHECK(dbus_message_get_type(parsed.message) == DBUS_MESSAGE_TYPE_METHOD_RETURN);
        CHECK(dbus_message_get_serial(parsed.message) == 0x80000001);
        CHECK(dbus_message_get_reply_serial(parsed.message) == 42);
        CHECK(std::string(dbus_message_get_destination(parsed.message)) == ":1.17");
        CHECK(std::string(dbus_message_get_signature(parsed.message)) == "a{oa{sa{sv}}}");
        CHECK(dbus_message_get_no_reply(parsed.message));
        CHECK(read(parsed.message) == objects);
    }
}

TEST_CASE("a reply on a peer-to-peer connection names no destination")
{
    const auto payload = body(twoDevices);
    Parsed parsed;
    demarshal(parsed, wire::methodReturnHeader(5, 9, nullptr, "a{oa{sa{sv}}}", payload.size()) + payload);
    INFO(parsed.error);
    REQUIRE(parsed.message);
    CHECK(dbus_message_get_destination(parsed.message) == nullptr);
    CHECK(read(parsed.message) == twoDevices);
}

TEST_CASE("libdbus refuses a reply whose length is off by one: the check can fail")
{
    auto payload = body(twoDevices);
    const auto header = wire::methodReturnHeader(5, 9, ":1.1", "a{oa{sa{sv}}}", payload.size());
    payload[0] = static_cast<char>(payload[0] + 1); // the outer array's length
    Parsed parsed;
    demarshal(parsed, header + payload);
    CHECK_FALSE(parsed.message);
}
