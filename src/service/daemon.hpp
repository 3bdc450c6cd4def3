#pragma once

#include "attach_sequence.hpp"
#include "bus_objects.hpp"
#include "core/registry.hpp"
#include "kernel/node_watch.hpp"
#include "event_loop.hpp"
#include "uevent/monitor.hpp"
#include "watchdog.hpp"
#include "record_store.hpp"
#include "worker_pool.hpp"

#include <loopd/attach_options.hpp>
#include <loopd/error.hpp>

#include <sdbus-c++/sdbus-c++.h>

#include <map>
#include <optional>
#include <memory>
#include <set>
#include <string>
#include <variant>

namespace loopd::service {

struct DaemonConfig {
    int receiveBufferBytes = 128 * 1024 * 1024;
    uevent::DropRules drops;       // test-only fault injection: udev's events
    uevent::DropRules kernelDrops; // and the kernel's
    unsigned workers = 4;
    std::string runtimeDir = "/run/loopd";
};

// Owns all state; everything here runs on the loop thread except the bodies of the
// jobs handed to the worker pool, which touch only what they captured.
class Daemon final : public Handlers {
public:
    explicit Daemon(DaemonConfig config);
    ~Daemon() override;
    void run();

    void attachPath(AttachResult&& result, const std::string& sender, std::string path,
                    core::OptionMap options) override;
    void attachFd(AttachResult&& result, const std::string& sender, sdbus::UnixFd fd,
                  core::OptionMap options) override;
    void detach(VoidResult&& result, const std::string& sender, uint64_t diskseq, core::OptionMap options) override;
    void waitReady(AttachResult&& result, std::string device, uint64_t timeoutUsec) override;
    std::string readinessSource() const override;
    uint32_t deviceCount() const override;

private:
    enum class State { Attaching, Ready, Detaching };
    struct Device {
        DeviceInfo info;
        std::shared_ptr<UniqueFd> lockFd;
        AttachOptions options;
        EventSource source = EventSource::Udev;
        std::string owner;
        uint32_t ownerUid = 0;
        State state = State::Attaching;
        bool listed = false;        // was ready: counts in Devices until removed
        std::string token;          // names its ownership record
        uint64_t readyTimestamp = 0; // CLOCK_REALTIME, µs
        uint64_t startedUsec = 0;   // CLOCK_REALTIME when the attach call came (0: adopted)
        std::unique_ptr<DeviceObject> object;
        [[nodiscard]] core::Watch watch() const;
        // Its ownership record in the given state, made from what the device holds.
        [[nodiscard]] core::Record record(core::Record::State state) const;
    };
    struct PendingAttach {
        AttachResult result;
        std::string sender;
        std::string what; // the path, or "fd N", for messages
        std::variant<std::string, sdbus::UnixFd> source;
        AttachOptions options;
        EventSource events = EventSource::Udev;
        core::Clock::time_point deadline;
        uint32_t ownerUid = 0;
        uint64_t diskseq = 0; // once configured
        core::Clock::time_point started;
        uint64_t startedRealtimeUsec = 0;
        bool vanished = false; // the caller left the bus meanwhile
        core::Record record;
    };
    struct PendingDetach {
        std::optional<VoidResult> result; // none when loopd detaches on its own
        uint64_t diskseq;
        std::string reason;
    };
    struct Caller {
        uint32_t uid = 0;
        std::vector<uint32_t> groups;
    };

    EventLoop::Wait prepare();
    void onUevents(uevent::Monitor& monitor);
    void onNameOwnerChanged(const std::string& name, const std::string& newOwner);
    void onSignal();
    void housekeeping(core::Clock::time_point now);
    void recover();
    void awaitReadded();
    bool adopt(const core::Record& record);
    bool adoptOrRelease(const core::Record& record);
    void checkClientAlive(uint64_t diskseq, const std::string& owner);
    void exportDevice(Device& device);
    void writeRecord(const core::Record& record);
    void resyncAll();
    void resync(unsigned number, bool kernelToo = true);
    void checkOwned(unsigned number);
    void checkReleased(unsigned number);
    void watchNode(const Device& device);
    void foreignDetach(uint64_t diskseq);
    void nudge(const core::Nudge& nudge);
    EventSource eventSourceFor(ReadinessMode mode) const;
    void settle(const std::vector<core::Outcome>& outcomes);

    void startAttach(AttachResult&& result, const std::string& sender, std::string what,
                     std::variant<std::string, sdbus::UnixFd> source, const core::OptionMap& options);
    void lookupCaller(const std::string& sender, std::function<void(std::exception_ptr, Caller)> then);
    void authorize(const std::string& sender, const std::string& action, const std::string& what,
                   std::function<void(std::exception_ptr, Caller)> then);
    void askPolkit(const std::string& sender, const std::string& action, std::function<void(std::exception_ptr)> then);
    void runAttach(core::RequestId id, const Caller& caller);
    void onAttached(core::RequestId id, std::shared_ptr<Attached> attached);
    void attachReady(core::RequestId id);
    void attachFailed(core::RequestId id, std::exception_ptr error);
    void abandonAttach(core::RequestId id, Errc code, const std::string& why, bool clear);

    void detachOwn(uint64_t diskseq, std::string reason);
    void startDetach(core::RequestId id);
    void onDetachDone(core::RequestId id, std::exception_ptr error, bool released);
    void detachConfirmed(core::RequestId id, bool timedOut);
    void replyDetach(core::RequestId id, std::exception_ptr error);
    void removeDevice(uint64_t diskseq, const std::string& reason);
    void forgetNumber(const Device& device);
    void failWaiters(uint64_t diskseq, Errc code, const std::string& message);

    void replyReady(AttachResult& result, const Device& device);
    Device* findDevice(const std::string& name);
    void linkRef(const Device& device);
    void unlinkRef(const Device& device);

    DaemonConfig config_;
    uevent::Monitor udevMonitor_;
    uevent::Monitor kernelMonitor_;
    std::unique_ptr<sdbus::IConnection> connection_;
    std::unique_ptr<sdbus::IProxy> busProxy_;
    std::unique_ptr<sdbus::IProxy> polkitProxy_;
    std::unique_ptr<ManagerObject> manager_;
    WorkerPool workers_;
    EventLoop loop_;
    UniqueFd signalFd_;
    core::Registry registry_;
    Watchdog watchdog_;
    RecordStore records_;
    kernel::NodeWatch nodeWatch_;

    core::RequestId nextId_ = 1;
    core::RequestId trimmedAt_ = 1; // nextId_ at the last malloc_trim
    std::map<uint64_t, Device> devices_; // by diskseq
    std::map<core::RequestId, PendingAttach> attaches_;
    std::map<core::RequestId, PendingDetach> detaches_;
    std::map<core::RequestId, std::pair<AttachResult, uint64_t>> waiters_; // WaitReady, with diskseq
    std::set<std::string> refs_;                                           // in use or reserved
    std::map<unsigned, uint64_t> numbers_;                                 // loop number -> diskseq, owned
    uint32_t listed_ = 0;                                                  // Devices: those with listed set
    bool stopping_ = false;
    bool udevSeen_ = false;
    core::Clock::time_point nextHousekeeping_{};
    core::Clock::time_point nextReleaseScan_{};
    std::map<std::string, Caller> callers_; // credentials by unique bus name, while connected
    std::vector<uint64_t> readded_;          // adopted at start-up with partitions re-added
    std::set<core::RequestId> adopting_;     // their readiness requests
};

} // namespace loopd::service
