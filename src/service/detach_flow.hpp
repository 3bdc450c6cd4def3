#pragma once

#include "attach_sequence.hpp"
#include "bus_objects.hpp"
#include "callers.hpp"
#include "services.hpp"

#include <loopd/log.hpp>

#include <map>
#include <optional>
#include <string>

// Detach, by a caller or by loopd itself (client-vanished), from the claim check
// to the confirmed release. Loop thread; the kernel work runs on workers.
namespace loopd::service {

class DetachFlow {
public:
    DetachFlow(Services& services, Callers& callers);

    // Throws Error for a call refused at once; otherwise answered later, once.
    void request(VoidResult&& result, const CallOrigin& from, uint64_t diskseq, const core::OptionMap& options);
    // loopd's own decision (its client left): no one to answer.
    void own(uint64_t diskseq, RemovalReason reason);
    // The devices tied to this bus connection (lifetime=client or fd) are detached.
    void clientLeft(const std::string& name);
    // Restart: a device adopted for a client detached if that client left meanwhile.
    void unlessOwnerAlive(uint64_t diskseq);

    bool settle(const core::Outcome& outcome);
    [[nodiscard]] bool idle() const { return pending_.empty(); }

private:
    struct Pending {
        std::optional<VoidResult> result; // none when loopd detaches on its own
        uint64_t diskseq = 0;
        RemovalReason reason = RemovalReason::Detached;
        std::string sender;       // for logs; empty for loopd's own
        uint64_t startedUsec = 0; // CLOCK_REALTIME when the kernel work began
        bool takingBack = false;  // open elsewhere: waiting for the device to be ready again
        bool deferred = false;    // option deferred: in use, released at its last close
        log::Context about{};     // the journal's fields of this detach's messages
        core::Clock::time_point started{};
        DetachSteps steps{};
    };

    void start(core::RequestId id);
    void kernelDone(core::RequestId id, std::exception_ptr error, DetachOutcome outcome, DetachSteps steps);
    void takenBack(core::RequestId id);
    void deferredToLastClose(core::RequestId id);
    void readyAgain(core::RequestId id);
    void detachIfOrphaned(const Device& device);
    void confirmed(core::RequestId id, bool timedOut);
    void reply(core::RequestId id, std::exception_ptr error);

    Services& s_;
    Callers& callers_;
    std::map<core::RequestId, Pending> pending_;
};

} // namespace loopd::service
