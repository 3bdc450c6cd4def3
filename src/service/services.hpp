#pragma once

#include "device_table.hpp"
#include "record_store.hpp"
#include "worker_pool.hpp"

#include "core/registry.hpp"

#include <sdbus-c++/IConnection.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <vector>

// What every flow of the service room shares, handed to each by reference. The
// flows (attach, detach, recovery, event repair) use these and the kernel room;
// they never call each other. daemon.cpp owns all of it and wires the flows.
namespace loopd::service {

class ManagerObject;
class Handlers;
class UdevTags;

// Detach confirmation: the remove events follow LOOP_CLR_FD within milliseconds.
inline constexpr std::chrono::seconds releaseTimeout{10};
// How long a request waits for its events before asking again (kernels 5.19-6.14
// drop some loop uevents; sockets drop them under load). Readiness takes ~10 ms
// here, so a second means something was lost.
inline constexpr std::chrono::seconds nudgeAfter{1};

// What one caller may take (API.md, "Security"; settings of loopd.conf).
struct Limits {
    unsigned devicesPerUser = 16; // non-root callers: devices held or being attached
    unsigned partitions = 128;    // partitions of one image, for every caller
};

struct Services {
    Services(sdbus::IConnection& connection, DeviceTable& table, core::Registry& registry, WorkerPool& workers,
             const RecordStore& records, Handlers& handlers)
        : connection(connection), table(table), registry(registry), workers(workers), records(records),
          handlers(handlers)
    {
    }

    sdbus::IConnection& connection;
    DeviceTable& table;
    core::Registry& registry;
    WorkerPool& workers;
    const RecordStore& records;
    Handlers& handlers; // what Device objects forward their calls to
    ManagerObject* manager = nullptr;
    UdevTags* udevTags = nullptr; // udev properties of hidden devices
    // Dispatches registry outcomes to the flow whose request each is.
    std::function<void(const std::vector<core::Outcome>&)> settle;
    // Reads what sysfs and udev's database say of a loop number now (EventRepair).
    std::function<void(unsigned number)> resync;
    // Reads every uevent the sockets hold now.
    std::function<void()> drainEvents;
    // An attach's kernel work is done and its request registered (EventRepair).
    std::function<void(const core::Watch&)> afterConfigure;
    // A device is ready (again) as the flows see it: AutoclearWatch watches who
    // opens an autoclear device loopd still holds.
    std::function<void(const Device&)> watchOpens;
    bool udevRunning = false; // a udevd listens (UdevWatch): readiness=auto means udev
    bool stopping = false;
    Limits limits;

    core::RequestId nextId() { return nextId_++; }
    [[nodiscard]] core::RequestId issued() const { return nextId_; }

private:
    core::RequestId nextId_ = 1;
};

uint64_t realtimeUsec();
// A random RFC 4122 version 4 UUID (record tokens, SYNTH_UUID).
std::string makeUuid();
// Loop thread: writes a record, logging (not throwing) a failure.
void writeRecord(const RecordStore& records, const core::Record& record) noexcept;
// A deadline for flows that do not own the loop's timers (resize, udev tags): a
// thread of its own sleeps until `timeout` and then posts `then`, or ends early,
// posting nothing, once `*done` is set (looked at every 50 ms): no thread outlives
// its wait by long.
void postAfter(WorkerPool& workers, std::chrono::milliseconds timeout, std::shared_ptr<std::atomic<bool>> done,
               WorkerPool::Continuation then);

// Loop thread: registers a ready device's object (InterfacesAdded).
void exportDevice(Services& services, Device& device);

} // namespace loopd::service
