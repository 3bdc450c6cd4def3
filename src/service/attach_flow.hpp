#pragma once

#include "bus_objects.hpp"
#include "callers.hpp"
#include "services.hpp"

#include <loopd/attach_options.hpp>
#include <loopd/error.hpp>
#include <loopd/log.hpp>
#include <loopd/uevent.hpp>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <variant>

// Attach and AttachFd from the call to the ready reply (DESIGN.md, "The attach
// sequence"), and WaitReady. Loop thread; the kernel work runs on workers.
namespace loopd::service {

struct Attached;

class AttachFlow {
public:
    using Source = std::variant<std::string, sdbus::UnixFd>; // a path, or the caller's fd

    AttachFlow(Services& services, Callers& callers);

    // Throws Error for a call refused at once (nothing reserved); otherwise the
    // result is answered later, exactly once.
    void start(AttachResult&& result, const CallOrigin& from, std::string what, Source source,
               const core::OptionMap& options);
    void waitReady(AttachResult&& result, const std::string& name, uint64_t timeoutUsec);

    // True when the outcome was one of this flow's requests.
    bool settle(const core::Outcome& outcome);
    // The caller left the bus: a lifetime=client device it is still attaching is
    // detached once ready (through onOrphaned).
    void callerLeft(const std::string& sender);
    // A device left the table: whoever waits for it is told.
    void deviceGone(uint64_t diskseq, const std::string& message);
    // SIGTERM: waiters are failed, configured attaches undone, the rest refused as
    // they come back from their workers.
    void stop();
    // No call in progress (attaches abandoned in a stuck kernel call don't count).
    [[nodiscard]] bool idle() const;
    // The earliest deadline of an attach whose kernel work has not come back.
    [[nodiscard]] std::optional<core::Clock::time_point> nextDeadline() const;
    // Answers those past their deadline with Timeout; their work is undone when
    // (if ever) it comes back.
    void onTime(core::Clock::time_point now);
    [[nodiscard]] bool waiting() const { return !waiters_.empty(); }
    // An event came: for the timeline of the attach it belongs to.
    void sawEvent(const Uevent& event);
    // udevd stayed away: readiness=auto requests count the kernel's events.
    void fallBackToKernel();

    // A lifetime=client device became ready after its caller left.
    std::function<void(uint64_t diskseq)> onOrphaned;

private:
    // When each step of an attach was done (the info line of a ready attach).
    struct Timeline {
        core::Clock::time_point authorized{}, configured{}, partitionsAdded{}, diskEvent{}, lastPartitionEvent{};
        unsigned events = 0; // those that counted: of the attachment, from its source
    };
    struct Pending {
        AttachResult result;
        std::string sender;
        std::string what; // the path, or the fd's path, for messages
        Source source;
        AttachOptions options;
        EventSource events = EventSource::Udev;
        core::Clock::time_point started{};
        uint64_t startedRealtimeUsec = 0;
        core::Clock::time_point deadline{};
        uint32_t ownerUid = 0;
        uint64_t diskseq = 0;    // once configured
        bool vanished = false;   // the caller left the bus meanwhile
        bool abandoning = false; // being undone: at most once
        bool working = false;    // its kernel work is out on a thread
        bool answered = false;   // timed out while working: the caller has its reply
        bool reserved = false;   // its ref is reserved in the table
        bool tagged = false;     // hidden: udev has processed its properties
        core::Record record{};
        log::Context about{}; // the journal's fields of this call's messages
        Timeline times{};
    };
    struct Waiter {
        AttachResult result;
        uint64_t diskseq = 0;
    };

    void authorized(core::RequestId id, const Caller& caller);
    void run(core::RequestId id, const Caller& caller);
    void configured(core::RequestId id, const std::shared_ptr<Attached>& attached);
    void ready(core::RequestId id);
    bool awaitUdevTags(core::RequestId id);
    void failed(core::RequestId id, std::exception_ptr error);
    void dropLate(core::RequestId id, const std::shared_ptr<Attached>& attached);
    [[nodiscard]] std::size_t heldBy(uint32_t uid) const;
    void abandon(core::RequestId id, Errc code, const std::string& why, bool clear);
    void settleWaiter(core::RequestId id, const core::Outcome& outcome);

    Services& s_;
    Callers& callers_;
    std::map<core::RequestId, Pending> attaches_;
    std::map<core::RequestId, Waiter> waiters_;
};

// The reply of Attach and WaitReady for a ready device.
void replyReady(AttachResult& result, const Device& device);

} // namespace loopd::service
