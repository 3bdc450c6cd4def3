#pragma once

#include "attach_flow.hpp"
#include "autoclear_watch.hpp"
#include "bus_objects.hpp"
#include "callers.hpp"
#include "detach_flow.hpp"
#include "device_table.hpp"
#include "event_loop.hpp"
#include "event_repair.hpp"
#include "find_flow.hpp"
#include "open_flow.hpp"
#include "record_store.hpp"
#include "recovery.hpp"
#include "resize_flow.hpp"
#include "services.hpp"
#include "udev_presence.hpp"
#include "udev_tags.hpp"
#include "watchdog.hpp"
#include "worker_pool.hpp"

#include "core/registry.hpp"
#include "uevent/monitor.hpp"
#include "uevent/udev_watch.hpp"

#include <sdbus-c++/sdbus-c++.h>

#include <memory>
#include <string>

namespace loopd::service {

struct DaemonConfig {
    int receiveBufferBytes = 128 * 1024 * 1024;
    uevent::DropRules drops;       // test-only fault injection: udev's events
    uevent::DropRules kernelDrops; // and the kernel's
    unsigned workers = 4;
    std::string runtimeDir = "/run/loopd";
    std::string udevTagsDir = "/run/loopd/udev"; // where udev/90-loopd.rules looks
    Limits limits;
};

// Wires the flows to the loop: owns the sockets, the bus connection, the table and
// the registry, dispatches events, outcomes and calls. Loop thread.
class Daemon final : public Handlers {
public:
    explicit Daemon(DaemonConfig config);
    ~Daemon() override;
    void run();

    void attachPath(AttachResult&& result, const CallOrigin& from, std::string path, core::OptionMap options) override;
    void attachFd(AttachResult&& result, const CallOrigin& from, sdbus::UnixFd fd, core::OptionMap options) override;
    void detach(VoidResult&& result, const CallOrigin& from, uint64_t diskseq, core::OptionMap options) override;
    void waitReady(AttachResult&& result, std::string device, uint64_t timeoutUsec) override;
    void find(FindResult&& result, const CallOrigin& from, std::string path) override;
    void resize(ResizeResult&& result, const CallOrigin& from, uint64_t diskseq, core::OptionMap options) override;
    void open(OpenResult&& result, const CallOrigin& from, uint64_t diskseq, core::OptionMap options) override;
    std::string readinessSource() const override;
    uint32_t deviceCount() const override;
    std::vector<std::string> kernelQuirks() const override;

private:
    EventLoop::Wait prepare();
    void onUevents(uevent::Monitor& monitor);
    void adopted(uint64_t diskseq);
    void onNameOwnerChanged(const std::string& name, const std::string& newOwner);
    void onSignal();
    void onRemoved(Device& device, RemovalReason reason);
    void settle(const std::vector<core::Outcome>& outcomes);
    void udevChanged(bool running);
    void timers(core::Clock::time_point now);
    [[nodiscard]] std::optional<core::Clock::time_point> nextTimer() const;

    DaemonConfig config_;
    UniqueFd instanceLock_; // <runtime-dir>/lock, LOCK_EX for loopd's life
    uevent::Monitor udevMonitor_;
    uevent::Monitor kernelMonitor_;
    uevent::UdevWatch udevWatch_;
    std::unique_ptr<sdbus::IConnection> connection_;
    std::unique_ptr<sdbus::IProxy> busProxy_;
    WorkerPool workers_;
    EventLoop loop_;
    UniqueFd signalFd_;
    core::Registry registry_;
    Watchdog watchdog_;
    RecordStore records_;
    DeviceTable table_;
    UdevTags udevTags_;
    Services services_;
    Callers callers_;
    AttachFlow attach_;
    DetachFlow detach_;
    EventRepair repair_;
    Recovery recovery_;
    FindFlow find_;
    ResizeFlow resize_;
    OpenFlow open_;
    AutoclearWatch autoclear_;
    UdevPresence udevPresence_;
    std::unique_ptr<ManagerObject> manager_;

    core::RequestId trimmedAt_ = 1; // issued ids at the last malloc_trim
};

} // namespace loopd::service
