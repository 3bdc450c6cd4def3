#pragma once

#include "event_ledger.hpp"

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <vector>

namespace loopd::core {

using Clock = std::chrono::steady_clock;
using RequestId = uint64_t;

// One attachment as the readiness logic sees it: which loop device, which diskseq,
// which partitions its table has, and which event source counts.
struct Watch {
    uint64_t diskseq = 0;
    unsigned number = 0;
    std::vector<unsigned> partitions;
    EventSource source = EventSource::Udev;
};

enum class Goal { Ready, Released };

// A request for readiness that waited a grace period without completing: the
// events it misses (disk and/or partitions) may have been dropped by the kernel,
// so the caller asks the kernel to send them again.
struct Nudge {
    Goal goal = Goal::Ready; // Released: the remove events are missing; re-read instead
    Watch watch;
    unsigned attempt = 1;             // 1 for a request's first nudge, 2 for the next...
    bool disk = false;                // the disk's event is missing
    std::vector<unsigned> partitions; // these partitions' events are missing
};

struct Outcome {
    enum class Kind { Ready, Released, Changed, TimedOut };
    RequestId request;
    Kind kind;
    Watch watch;
};

// The readiness state machine. Requests wait for an attachment to become ready
// (attach, WaitReady) or to be released (detach); events and the clock settle them.
// Every request settles exactly once: with its goal, with Changed (a higher diskseq
// took the device), or with TimedOut at its deadline. Pure logic: the caller feeds
// events and time and acts on the outcomes.
class Registry {
public:
    // Starts waiting; the outcome may be immediate when the events already came.
    // A Ready request still waiting at nudgeAt is reported by nudges().
    std::vector<Outcome> expect(RequestId request, Goal goal, Watch watch, Clock::time_point deadline,
                                std::optional<Clock::time_point> nudgeAt = std::nullopt);
    std::vector<Outcome> onEvent(const Uevent& event);
    // A snapshot of the present state replaced what events said (see EventLedger).
    std::vector<Outcome> resync(unsigned number, EventSource source, EventLedger::View snapshot);
    // Requests whose nudge time passed, one per device; each is due again after retry.
    std::vector<Nudge> nudges(Clock::time_point now, Clock::duration retry);
    // Every Ready request of the given source, as a nudge naming what it still
    // lacks; nudge times and attempts are left as they are (udevd came back).
    [[nodiscard]] std::vector<Nudge> lacking(EventSource source) const;
    // Loop numbers with requests waiting on them.
    [[nodiscard]] std::vector<unsigned> watchedNumbers() const;
    // What the requests waiting on loopN watch.
    [[nodiscard]] std::vector<Watch> watches(unsigned number) const;
    // A request counts another source's events from now on (udevd went away and a
    // readiness=auto request falls back to the kernel's); may settle it at once.
    std::vector<Outcome> retarget(RequestId request, EventSource source);
    std::vector<Outcome> onTime(Clock::time_point now);
    // Forgets a request without an outcome (its caller is handled elsewhere).
    void cancel(RequestId request);

    [[nodiscard]] std::optional<Clock::time_point> nextDeadline() const;
    [[nodiscard]] std::size_t pending() const { return requests_.size(); }
    [[nodiscard]] const EventLedger& ledger() const { return ledger_; }

private:
    struct Request {
        Goal goal;
        Watch watch;
        Clock::time_point deadline;
        std::optional<Clock::time_point> nudgeAt;
        unsigned nudges = 0;
    };
    std::vector<Outcome> reevaluate(unsigned number);

    [[nodiscard]] std::optional<Outcome::Kind> evaluate(const Request& request) const;
    [[nodiscard]] Nudge missing(const Request& request, unsigned attempt) const;
    void settle(RequestId id, Outcome::Kind kind, std::vector<Outcome>& out);

    EventLedger ledger_;
    std::map<RequestId, Request> requests_;
    std::multimap<unsigned, RequestId> byNumber_; // so an event looks only at its own device
};

} // namespace loopd::core
