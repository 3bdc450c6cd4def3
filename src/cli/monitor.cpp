#include "monitor.hpp"

#include "devices.hpp"
#include "format.hpp"

#include <loopd/signals.hpp>
#include <loopd/unique_fd.hpp>

#include <poll.h>
#include <sys/signalfd.h>

#include <cerrno>
#include <cstring>
#include <iostream>
#include <optional>

namespace loopctl {

namespace {

// As the signals carry them (one device at a time: sdbus-c++'s variants will do).
using Variants = std::map<std::string, sdbus::Variant>;
using Interfaces = std::map<std::string, Variants>;

Properties toProperties(const Variants& variants)
{
    Properties props;
    for (const auto& [key, value] : variants)
        props.emplace(key, Value(value));
    return props;
}

// One loopd device as the monitor knows it, to name it when it goes away.
struct Known {
    std::string devnode;
    uint64_t diskseq = 0;
};

// Follows loopd through match rules on the caller's connection, dispatched by
// processPendingRequest() on this thread only: no proxy, hence no thread of
// sdbus-c++'s own. Handlers never throw (sdbus-c++ 1.2 would break the
// connection): a failure is kept and rethrown by run().
class Monitor {
public:
    Monitor(sdbus::IConnection& connection, bool json) : connection_(connection), json_(json) {}

    int run()
    {
        subscribe();
        // Subscribed first, then asked: a device that becomes ready in between is
        // reported by its signal, and none is missed. The first call starts loopd
        // if the bus can activate it.
        for (const auto& device : listDevices(connection_))
            known_[device.object] = {device.text("DevNode"), device.u64("DiskSeq")};
        owner_ = nameOwner();
        std::cerr << "Monitoring loopd (" << busName << ", " << owner_ << "); Ctrl-C to stop." << std::endl;
        return loop();
    }

private:
    void subscribe()
    {
        const std::string fromLoopd = std::string("type='signal',sender='") + busName + "',";
        add(fromLoopd + "path='/org/loopd1',interface='org.freedesktop.DBus.ObjectManager',member='InterfacesAdded'",
            &Monitor::onAdded);
        add(fromLoopd + "path='/org/loopd1',interface='org.loopd1.Manager',member='DeviceRemoved'",
            &Monitor::onRemoved);
        add(fromLoopd + "path_namespace='/org/loopd1',interface='org.freedesktop.DBus.Properties',"
                        "member='PropertiesChanged'",
            &Monitor::onChanged);
        add(std::string("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                        "member='NameOwnerChanged',arg0='") +
                busName + "'",
            &Monitor::onOwnerChanged);
    }

    void add(const std::string& match, void (Monitor::*handler)(sdbus::Message&))
    {
        slots_.push_back(connection_.addMatch(match, [this, handler](sdbus::Message& message) {
            try {
                (this->*handler)(message);
            } catch (const sdbus::Error& e) {
                failure_ = e.getName() + ": " + e.getMessage();
            } catch (const std::exception& e) {
                failure_ = e.what();
            } catch (...) {
                failure_ = "unknown error in a signal handler";
            }
        }));
    }

    std::string nameOwner()
    {
        auto bus = sdbus::createProxy(connection_, "org.freedesktop.DBus", "/org/freedesktop/DBus");
        std::string owner;
        bus->callMethod("GetNameOwner")
            .onInterface("org.freedesktop.DBus")
            .withArguments(busName)
            .storeResultsTo(owner);
        return owner;
    }

    int loop()
    {
        const sigset_t mask = loopd::stopSignals();
        const loopd::UniqueFd signals(::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
        if (!signals)
            throw Failure(std::string("signalfd: ") + std::strerror(errno));
        for (;;) {
            while (connection_.processPendingRequest() && !failure_) {
            }
            if (failure_)
                throw Failure(*failure_);
            const auto poll = connection_.getEventLoopPollData();
            pollfd fds[] = {{poll.fd, static_cast<short>(poll.events), 0}, {signals.get(), POLLIN, 0}};
            if (::poll(fds, 2, poll.getPollTimeout()) < 0 && errno != EINTR)
                throw Failure(std::string("poll: ") + std::strerror(errno));
            if (fds[1].revents & POLLIN) {
                // What loopd sent before the signal still gets its line.
                while (connection_.processPendingRequest() && !failure_) {
                }
                return 0;
            }
        }
    }

    void onAdded(sdbus::Message& message)
    {
        sdbus::ObjectPath object;
        Interfaces interfaces;
        message >> object >> interfaces;
        const auto it = interfaces.find(deviceInterface);
        if (it == interfaces.end())
            return;
        const Device device{object, toProperties(it->second)};
        const Known known{device.text("DevNode"), device.u64("DiskSeq")};
        known_[object] = known;
        const auto ref = device.text("Ref");
        const auto parts = device.strings("Partitions");
        print(Json{{"event", "ready"},
                   {"object", std::string(object)},
                   {"devnode", known.devnode},
                   {"diskseq", known.diskseq},
                   {"ref", ref},
                   {"partitions", parts},
                   {"ready_usec", device.u64("ReadyTimestamp")}},
              "ready " + known.devnode + " diskseq=" + std::to_string(known.diskseq) +
                  (ref.empty() ? "" : " ref=" + ref) + " parts=" + std::to_string(parts.size()));
    }

    void onRemoved(sdbus::Message& message)
    {
        sdbus::ObjectPath object;
        uint64_t diskseq = 0;
        std::string reason;
        message >> object >> diskseq >> reason;
        const auto it = known_.find(object);
        // Gone before this learnt its node (between subscribing and listing).
        const std::string devnode = it != known_.end() ? it->second.devnode : std::string(object);
        if (it != known_.end())
            known_.erase(it);
        print(Json{{"event", "removed"},
                   {"object", std::string(object)},
                   {"devnode", devnode},
                   {"diskseq", diskseq},
                   {"reason", reason}},
              "removed " + devnode + " diskseq=" + std::to_string(diskseq) + " reason=" + reason);
    }

    void onChanged(sdbus::Message& message)
    {
        std::string interface;
        Variants changed;
        message >> interface >> changed;
        if (interface == managerInterface)
            changed.erase("Devices"); // every attach and detach: said by ready and removed
        if (changed.empty())
            return;
        Json properties = Json::object();
        std::string words;
        for (const auto& [key, value] : changed) {
            properties[key] = toJson(value);
            words += " " + describe(key, value);
        }
        if (interface == managerInterface) {
            print(Json{{"event", "changed"}, {"object", managerPath}, {"properties", properties}},
                  "changed loopd" + words);
            return;
        }
        const auto it = known_.find(sdbus::ObjectPath(message.getPath()));
        if (interface != deviceInterface || it == known_.end())
            return;
        print(Json{{"event", "changed"},
                   {"object", message.getPath()},
                   {"devnode", it->second.devnode},
                   {"diskseq", it->second.diskseq},
                   {"properties", properties}},
              "changed " + it->second.devnode + " diskseq=" + std::to_string(it->second.diskseq) + words);
    }

    static std::string describe(const std::string& key, const sdbus::Variant& value)
    {
        if (key == "Size")
            return "size=" + iecSize(value.get<uint64_t>());
        if (key == "Partitions")
            return "parts=" + std::to_string(value.get<std::vector<std::string>>().size());
        if (value.peekValueType() == "b")
            return key + "=" + (value.get<bool>() ? "yes" : "no");
        return key + "=" + toText(value);
    }

    void onOwnerChanged(sdbus::Message& message)
    {
        std::string name, oldOwner, newOwner;
        message >> name >> oldOwner >> newOwner;
        if (name == busName && oldOwner == owner_)
            failure_ = "loopd (" + owner_ + ") left the bus";
    }

    // One event: a line of text or a JSON object, written out at once.
    void print(Json event, const std::string& text)
    {
        const auto now = realtimeUsec();
        if (json_) {
            Json line{{"time_usec", now}};
            line.update(event);
            std::cout << line.dump(-1, ' ', false, Json::error_handler_t::replace) << std::endl;
            return;
        }
        std::cout << localTime(now, "%Y-%m-%d %H:%M:%S", true) << ' ' << escapeControl(text) << std::endl;
    }

    sdbus::IConnection& connection_;
    const bool json_;
    std::string owner_;
    std::map<sdbus::ObjectPath, Known> known_;
    std::vector<sdbus::Slot> slots_;
    std::optional<std::string> failure_;
};

} // namespace

int monitor(sdbus::IConnection& connection, bool json)
{
    return Monitor(connection, json).run();
}

} // namespace loopctl
