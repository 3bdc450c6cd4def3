// loopd-managed-floor: the floor under GetManagedObjects. It fetches loopd's reply
// once and answers every GetManagedObjects with a copy of it (libdbus's
// dbus_message_copy: the bytes copied, nothing marshalled again), so it spends
// next to nothing per call. What a client then waits for is dbus-daemon reading,
// validating and routing the message and its own library reading it: the part of
// loopd's figure that no server can remove. Not a test: many_devices.py calls it
// and its own client side by side with loopd.
//
//   loopd-managed-floor serve
//       owns org.loopd1.bench.Floor on $DBUS_SYSTEM_BUS_ADDRESS (the bench's bus
//       lets it, tests/bench/floor-bus-policy.conf), prints "ready" once it
//       does, and serves until its stdin closes.
//   loopd-managed-floor call NAME ROUNDS
//       calls NAME's GetManagedObjects ROUNDS times through sd-bus, reading
//       nothing of the reply (sd-bus checks a message's header when it arrives
//       and its body only as it is read; libdbus validates all of it first), and
//       prints the fastest round trip in ms: the figure without the client.
#include <dbus/dbus.h>
#include <poll.h>
#include <systemd/sd-bus.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

constexpr const char* floorName = "org.loopd1.bench.Floor";
constexpr const char* managerInterface = "org.freedesktop.DBus.ObjectManager";

DBusMessage* fetchTemplate(DBusConnection* bus, DBusError* error)
{
    DBusMessage* call =
        dbus_message_new_method_call("org.loopd1", "/org/loopd1", managerInterface, "GetManagedObjects");
    DBusMessage* reply = dbus_connection_send_with_reply_and_block(bus, call, 120'000, error);
    dbus_message_unref(call);
    return reply;
}

DBusHandlerResult answer(DBusConnection* bus, DBusMessage* call, void* data)
{
    if (!dbus_message_is_method_call(call, managerInterface, "GetManagedObjects"))
        return DBUS_HANDLER_RESULT_NOT_YET_HANDLED;
    // A copy has no serial and is not locked: it gets this call's destination
    // and reply serial. The sender it names (loopd) is replaced by dbus-daemon,
    // as in every message it routes.
    DBusMessage* reply = dbus_message_copy(static_cast<DBusMessage*>(data));
    if (!reply || !dbus_message_set_destination(reply, dbus_message_get_sender(call)) ||
        !dbus_message_set_reply_serial(reply, dbus_message_get_serial(call)) ||
        !dbus_connection_send(bus, reply, nullptr))
        std::fprintf(stderr, "loopd-managed-floor: out of memory\n");
    if (reply)
        dbus_message_unref(reply);
    return DBUS_HANDLER_RESULT_HANDLED;
}

bool stdinClosed()
{
    pollfd in{STDIN_FILENO, POLLIN, 0};
    return poll(&in, 1, 0) > 0;
}

int call(const char* name, int rounds)
{
    sd_bus* bus = nullptr;
    int r = sd_bus_open_system(&bus);
    double best = 1e9;
    for (int i = 0; r >= 0 && i < rounds; ++i) {
        sd_bus_message* reply = nullptr;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        const auto started = std::chrono::steady_clock::now();
        r = sd_bus_call_method(bus, name, "/org/loopd1", managerInterface, "GetManagedObjects", &error, &reply, "");
        const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - started;
        best = std::min(best, took.count());
        if (r < 0)
            std::fprintf(stderr, "loopd-managed-floor: %s: %s\n", name, error.message ? error.message : strerror(-r));
        sd_bus_error_free(&error);
        sd_bus_message_unref(reply);
    }
    sd_bus_unref(bus);
    if (r < 0)
        return 1;
    std::printf("%.2f\n", best);
    return 0;
}

int serve()
{
    DBusError error;
    dbus_error_init(&error);
    DBusConnection* bus = dbus_bus_get_private(DBUS_BUS_SYSTEM, &error);
    DBusMessage* reply = bus ? fetchTemplate(bus, &error) : nullptr;
    if (reply &&
        dbus_bus_request_name(bus, floorName, DBUS_NAME_FLAG_DO_NOT_QUEUE, &error) !=
            DBUS_REQUEST_NAME_REPLY_PRIMARY_OWNER &&
        !dbus_error_is_set(&error))
        dbus_set_error(&error, DBUS_ERROR_FAILED, "%s is owned by someone else", floorName);
    if (dbus_error_is_set(&error)) {
        std::fprintf(stderr, "loopd-managed-floor: %s\n", error.message);
        return 1;
    }
    dbus_connection_add_filter(bus, answer, reply, nullptr);
    std::printf("ready\n");
    std::fflush(stdout);
    // 100 ms blocks: the copy of a call's reply is sent at once; stdin is only
    // looked at in between.
    while (!stdinClosed() && dbus_connection_read_write_dispatch(bus, 100))
        ;
    dbus_message_unref(reply);
    dbus_connection_close(bus);
    dbus_connection_unref(bus);
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc == 2 && std::strcmp(argv[1], "serve") == 0)
        return serve();
    if (argc == 4 && std::strcmp(argv[1], "call") == 0)
        return call(argv[2], std::atoi(argv[3]));
    std::fprintf(stderr, "usage: loopd-managed-floor serve | call NAME ROUNDS\n");
    return 2;
}
