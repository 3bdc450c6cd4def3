// libFuzzer target: uevent parsing and the readiness state machine together.
//
// The input is a script of operations on one core::Registry, as the daemon makes
// them: uevents through uevent::makeUevent, as the monitor makes them from what
// libudev gives it (ACTION, sysname, DISKSEQ, SYNTH_UUID; raw bytes, and structured
// events rendered to those properties and parsed back), attach / WaitReady
// (Goal::Ready) and detach (Goal::Released) requests, cancellations, the clock,
// resyncs after lost events, and nudges. After every operation the target checks
// the contract of registry.hpp and API.md "Readiness" and aborts on any breach:
//
// - every request settles at most once, and only while it is pending;
// - Ready only when the ledger shows the disk and every partition of the watch at
//   the watch's diskseq, and never once a higher diskseq was seen (Changed wins);
// - Changed only for Ready goals with a higher diskseq seen; Released only when
//   the partitions are gone or a newer attachment came; TimedOut only at deadline;
// - nothing stays pending that could already settle, nor past its deadline once
//   the clock passed it;
// - pending(), watchedNumbers(), nextDeadline() and the ledger agree with a
//   reference model written from API.md (newest diskseq wins, stale is ignored).
//
// Input format: see make_seeds.py (one opcode byte, then its operands).
#include "core/registry.hpp"
#include "reader.hpp"
#include "uevent/message.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>

using namespace loopd;
using namespace loopd::core;
using namespace std::chrono_literals;
using loopd::fuzz::Reader;
using Kind = Outcome::Kind;

namespace {

constexpr unsigned devices = 4; // loop0..loop3: few, so that requests and events meet
constexpr unsigned maxOps = 512;

enum Op : uint8_t { OpEvent, OpRaw, OpReady, OpReleased, OpCancel, OpTime, OpResync, OpNudges, OpCount };

const char* kindName(Kind kind)
{
    switch (kind) {
    case Kind::Ready:
        return "Ready";
    case Kind::Released:
        return "Released";
    case Kind::Changed:
        return "Changed";
    case Kind::TimedOut:
        return "TimedOut";
    }
    return "?";
}

bool sameWatch(const Watch& a, const Watch& b)
{
    return a.diskseq == b.diskseq && a.number == b.number && a.partitions == b.partitions && a.source == b.source;
}

bool sameEvent(const Uevent& a, const Uevent& b)
{
    return a.source == b.source && a.action == b.action && a.number == b.number && a.partition == b.partition &&
           a.diskseq == b.diskseq && a.synthUuid == b.synthUuid;
}

// What Monitor::receive reads from a udev_device: its action, its sysname and its
// DISKSEQ and SYNTH_UUID properties, each absent (null) or a C string.
struct Properties {
    std::optional<std::string> action, sysname, diskseq, synthUuid;
};

std::optional<Uevent> parse(EventSource source, const Properties& p)
{
    auto str = [](const std::optional<std::string>& s) { return s ? s->c_str() : nullptr; };
    return uevent::makeUevent(source, str(p.action), str(p.sysname), str(p.diskseq), str(p.synthUuid));
}

// The properties libudev has for a loop block uevent ("online" stands for any
// other action).
Properties render(const Uevent& e)
{
    static const char* const actions[] = {"add", "change", "remove", "online"};
    const auto disk = "loop" + std::to_string(e.number);
    Properties p;
    p.action = actions[static_cast<int>(e.action)];
    p.sysname = e.partition ? disk + "p" + std::to_string(e.partition) : disk;
    if (e.diskseq)
        p.diskseq = std::to_string(e.diskseq);
    if (!e.synthUuid.empty())
        p.synthUuid = e.synthUuid;
    return p;
}

struct Pending {
    Goal goal;
    Watch watch;
    Clock::time_point deadline;
    std::optional<Clock::time_point> nudgeAt;
};

// The ledger as API.md describes it: per device and source the newest diskseq seen
// and what was reported with it; lower is stale, higher starts over.
class ReferenceLedger {
public:
    void feed(const Uevent& e)
    {
        if (e.diskseq == 0)
            return;
        auto& v = views_[{e.number, e.source}];
        if (e.diskseq < v.diskseq)
            return;
        if (e.diskseq > v.diskseq)
            v = EventLedger::View{e.diskseq, false, {}};
        const bool present = e.action != UeventAction::Remove;
        if (e.partition == 0)
            v.disk = present;
        else if (present)
            v.partitions.insert(e.partition);
        else
            v.partitions.erase(e.partition);
    }
    void resync(unsigned number, EventSource source, const EventLedger::View& snapshot)
    {
        auto& v = views_[{number, source}];
        if (snapshot.diskseq >= v.diskseq)
            v = snapshot;
    }
    [[nodiscard]] EventLedger::View view(unsigned number, EventSource source) const
    {
        const auto it = views_.find({number, source});
        return it == views_.end() ? EventLedger::View{} : it->second;
    }
    [[nodiscard]] uint64_t newest(unsigned number) const
    {
        return std::max(view(number, EventSource::Kernel).diskseq, view(number, EventSource::Udev).diskseq);
    }
    [[nodiscard]] const auto& all() const { return views_; }

private:
    std::map<std::pair<unsigned, EventSource>, EventLedger::View> views_;
};

bool hasAll(const EventLedger::View& view, const Watch& watch)
{
    return std::all_of(watch.partitions.begin(), watch.partitions.end(),
                       [&](unsigned p) { return view.partitions.count(p) != 0; });
}

bool hasAny(const EventLedger::View& view, const Watch& watch)
{
    return std::any_of(watch.partitions.begin(), watch.partitions.end(),
                       [&](unsigned p) { return view.partitions.count(p) != 0; });
}

class Harness {
public:
    void run(Reader& in)
    {
        for (unsigned ops = 0; !in.empty() && ops < maxOps; ++ops) {
            const auto op = static_cast<Op>(in.byte() % OpCount);
            step(op, in);
            checkState(op == OpTime);
        }
    }

private:
    // What an operation may settle: one request (expect), one device (events and
    // resyncs), or anything past its deadline (time).
    struct Scope {
        std::optional<RequestId> request;
        std::optional<unsigned> number;
        bool time = false;
    };

    void step(Op op, Reader& in)
    {
        switch (op) {
        case OpEvent:
            return structuredEvent(in);
        case OpRaw:
            return rawEvent(in);
        case OpReady:
        case OpReleased:
            return expect(op == OpReady ? Goal::Ready : Goal::Released, in);
        case OpCancel:
            return cancel(in);
        case OpTime:
            now_ += std::chrono::seconds(in.byte() % 16);
            return check(registry_.onTime(now_), Scope{{}, {}, true});
        case OpResync:
            return resync(in);
        case OpNudges:
            return nudges(in);
        case OpCount:
            break;
        }
    }

    void structuredEvent(Reader& in)
    {
        const auto flags = in.byte();
        Uevent e;
        e.source = flags & 1 ? EventSource::Udev : EventSource::Kernel;
        e.action = static_cast<UeventAction>((flags >> 1) & 3);
        e.number = in.byte() % devices;
        e.partition = in.byte() % 5;
        const auto seq = in.byte();
        e.diskseq = seq == 0xff ? std::numeric_limits<uint64_t>::max() : seq % 8;
        if (flags & 8)
            e.synthUuid = "5c6a4bd8-0f1e-4a3b-9c2d-" + std::to_string(seq);
        // Through libudev's properties and back: the parser must give back what was sent.
        const auto parsed = parse(e.source, render(e));
        FUZZ_CHECK(parsed && sameEvent(*parsed, e), "loop%u p%u diskseq %llu did not survive parsing", e.number,
                   e.partition, static_cast<unsigned long long>(e.diskseq));
        feed(e);
    }

    // Properties as they come: up to four NUL-separated fields (action, sysname,
    // DISKSEQ, SYNTH_UUID), each present only if its bit says so.
    void rawEvent(Reader& in)
    {
        const auto flags = in.byte();
        const auto source = flags & 1 ? EventSource::Udev : EventSource::Kernel;
        auto text = in.take(in.bytes(2) % 2048);
        Properties p;
        std::optional<std::string>* const fields[] = {&p.action, &p.sysname, &p.diskseq, &p.synthUuid};
        for (unsigned i = 0; i < 4; ++i) {
            const auto end = text.find('\0');
            if (flags & (2u << i))
                *fields[i] = std::string(text.substr(0, end));
            text.remove_prefix(end == std::string_view::npos ? text.size() : end + 1);
        }
        const auto parsed = parse(source, p);
        if (!parsed)
            return;
        FUZZ_CHECK(parsed->source == source, "an event parsed with another source");
        // What the parser accepted has one canonical form that parses the same.
        const auto again = parse(source, render(*parsed));
        FUZZ_CHECK(again && sameEvent(*again, *parsed), "loop%u p%u: canonical form parses differently", parsed->number,
                   parsed->partition);
        feed(*parsed);
    }

    void feed(const Uevent& e)
    {
        reference_.feed(e);
        auto out = registry_.onEvent(e);
        if (fuzz::sabotage() == "lost" && !out.empty())
            out.erase(out.begin()); // as if the daemon never heard of one outcome
        check(out, Scope{{}, e.number, false});
    }

    Watch readWatch(Reader& in)
    {
        const auto b = in.byte();
        Watch watch{0, b % devices, {}, b & 4 ? EventSource::Kernel : EventSource::Udev};
        watch.diskseq = in.byte() % 7 + 1; // BLKGETDISKSEQ never says 0
        const auto mask = in.byte();
        for (unsigned p = 1; p <= 4; ++p)
            if (mask & (1u << (p - 1)))
                watch.partitions.push_back(p);
        return watch;
    }

    void expect(Goal goal, Reader& in)
    {
        const auto watch = readWatch(in);
        const auto deadline = now_ + std::chrono::seconds(in.byte() % 32);
        const auto nudge = in.byte();
        const auto nudgeAt = nudge ? std::optional(now_ + std::chrono::seconds(nudge % 16)) : std::nullopt;
        const auto id = nextId_++; // the daemon never reuses an id
        pending_[id] = Pending{goal, watch, deadline, nudgeAt};
        check(registry_.expect(id, goal, watch, deadline, nudgeAt), Scope{id, {}, false});
    }

    void cancel(Reader& in)
    {
        const RequestId id = in.byte() % (nextId_ + 1); // 0 and nextId_ were never issued
        registry_.cancel(id);
        if (pending_.erase(id))
            settled_.insert(id);
    }

    void resync(Reader& in)
    {
        const auto b = in.byte();
        const auto number = b % devices;
        const auto source = b & 4 ? EventSource::Kernel : EventSource::Udev;
        EventLedger::View snapshot{in.byte() % 8u, false, {}};
        const auto mask = in.byte();
        snapshot.disk = mask & 1;
        for (unsigned p = 1; p <= 4; ++p)
            if (mask & (1u << p))
                snapshot.partitions.insert(p);
        reference_.resync(number, source, snapshot);
        check(registry_.resync(number, source, snapshot), Scope{{}, number, false});
    }

    // A request waiting past its nudge time is reported, one per device: for Ready
    // the disk and partitions whose events are missing, for Released the partitions
    // whose remove events are missing (still present at the watch's diskseq).
    void nudges(Reader& in)
    {
        const auto retry = std::chrono::seconds(in.byte() % 8 + 1);
        std::map<unsigned, std::vector<RequestId>> due;
        for (const auto& [id, p] : pending_)
            if (p.nudgeAt && *p.nudgeAt <= now_)
                due[p.watch.number].push_back(id);
        const auto out = registry_.nudges(now_, retry);
        FUZZ_CHECK(out.size() == due.size(), "%zu nudges for %zu devices with requests due", out.size(), due.size());
        for (const auto& nudge : out) {
            const auto it = due.find(nudge.watch.number);
            FUZZ_CHECK(it != due.end(), "nudge for loop%u, which has no request due", nudge.watch.number);
            FUZZ_CHECK(std::any_of(it->second.begin(), it->second.end(),
                                   [&](RequestId id) {
                                       const auto& p = pending_.at(id);
                                       return p.goal == nudge.goal && sameWatch(p.watch, nudge.watch);
                                   }),
                       "nudge for loop%u names no request due there", nudge.watch.number);
            const auto view = reference_.view(nudge.watch.number, nudge.watch.source);
            const bool current = view.diskseq == nudge.watch.diskseq;
            const bool ready = nudge.goal == Goal::Ready;
            FUZZ_CHECK(nudge.disk == (ready && (!current || !view.disk)), "loop%u: nudge.disk wrong",
                       nudge.watch.number);
            std::vector<unsigned> missing;
            for (const auto p : nudge.watch.partitions) {
                const bool there = current && view.partitions.count(p) != 0;
                if (ready ? !there : there)
                    missing.push_back(p);
            }
            FUZZ_CHECK(nudge.partitions == missing, "loop%u: nudge names the wrong partitions", nudge.watch.number);
            due.erase(it);
        }
        for (auto& [id, p] : pending_)
            if (p.nudgeAt && *p.nudgeAt <= now_)
                p.nudgeAt = now_ + retry;
    }

    // The oracle: what a pending request should settle as, given the ledger now.
    [[nodiscard]] std::optional<Kind> due(const Pending& p) const
    {
        const auto view = reference_.view(p.watch.number, p.watch.source);
        const bool newer = reference_.newest(p.watch.number) > p.watch.diskseq;
        if (p.goal == Goal::Released)
            return newer || !hasAny(view, p.watch) ? std::optional(Kind::Released) : std::nullopt;
        if (newer)
            return Kind::Changed;
        if (view.diskseq == p.watch.diskseq && view.disk && hasAll(view, p.watch))
            return Kind::Ready;
        return std::nullopt;
    }

    void check(std::vector<Outcome> out, const Scope& scope)
    {
        if (fuzz::sabotage() == "twice" && !out.empty())
            out.push_back(out.front()); // as if a request settled twice
        for (const auto& o : out) {
            const auto it = pending_.find(o.request);
            FUZZ_CHECK(it != pending_.end(), "request %llu settled (%s) but was %s",
                       static_cast<unsigned long long>(o.request), kindName(o.kind),
                       settled_.count(o.request) ? "settled or cancelled before" : "never made");
            const auto& p = it->second;
            FUZZ_CHECK(sameWatch(o.watch, p.watch), "request %llu settled with another watch",
                       static_cast<unsigned long long>(o.request));
            FUZZ_CHECK(!scope.request || *scope.request == o.request, "expect() settled another request");
            FUZZ_CHECK(!scope.number || *scope.number == o.watch.number,
                       "an event on loop%u settled a request on loop%u", *scope.number, o.watch.number);
            checkKind(o, p, scope);
            pending_.erase(it);
            settled_.insert(o.request);
        }
    }

    void checkKind(const Outcome& o, const Pending& p, const Scope& scope) const
    {
        const auto& w = p.watch;
        // The registry's own ledger, as the brief of this check says: Ready only when it
        // shows the disk and all partitions at the watch's diskseq.
        const auto& view = registry_.ledger().view(w.number, w.source);
        const auto newest = registry_.ledger().newestDiskseq(w.number);
        switch (o.kind) {
        case Kind::Ready:
            FUZZ_CHECK(p.goal == Goal::Ready, "a detach request settled Ready");
            FUZZ_CHECK(view.diskseq == w.diskseq && view.disk && hasAll(view, w),
                       "Ready on loop%u diskseq %llu but the ledger has diskseq %llu disk %d, %zu partitions", w.number,
                       static_cast<unsigned long long>(w.diskseq), static_cast<unsigned long long>(view.diskseq),
                       view.disk, view.partitions.size());
            FUZZ_CHECK(newest <= w.diskseq, "Ready on loop%u after diskseq %llu replaced %llu", w.number,
                       static_cast<unsigned long long>(newest), static_cast<unsigned long long>(w.diskseq));
            break;
        case Kind::Changed:
            FUZZ_CHECK(p.goal == Goal::Ready, "a detach request settled Changed");
            FUZZ_CHECK(newest > w.diskseq, "Changed on loop%u without a newer diskseq", w.number);
            break;
        case Kind::Released:
            FUZZ_CHECK(p.goal == Goal::Released, "an attach request settled Released");
            FUZZ_CHECK(newest > w.diskseq || !hasAny(view, w), "Released on loop%u with partitions still there",
                       w.number);
            break;
        case Kind::TimedOut:
            FUZZ_CHECK(scope.time && p.deadline <= now_, "TimedOut before the deadline");
            break;
        }
    }

    void checkState(bool afterTime)
    {
        FUZZ_CHECK(registry_.pending() == pending_.size(), "pending() is %zu, %zu requests are waiting",
                   registry_.pending(), pending_.size());
        for (const auto& [key, view] : reference_.all()) {
            const auto& actual = registry_.ledger().view(key.first, key.second);
            FUZZ_CHECK(actual.diskseq == view.diskseq && actual.disk == view.disk &&
                           actual.partitions == view.partitions,
                       "ledger of loop%u differs from the reference", key.first);
            const auto newest = registry_.ledger().newestDiskseq(key.first);
            FUZZ_CHECK(newest >= highWater_[key.first], "loop%u's newest diskseq went back", key.first);
            highWater_[key.first] = newest;
        }
        std::set<unsigned> numbers;
        std::optional<Clock::time_point> next;
        auto consider = [&next](Clock::time_point t) { next = next ? std::min(*next, t) : t; };
        for (const auto& [id, p] : pending_) {
            const auto kind = due(p);
            FUZZ_CHECK(!kind, "request %llu on loop%u is still pending though it is %s",
                       static_cast<unsigned long long>(id), p.watch.number, kindName(kind.value_or(Kind::Ready)));
            FUZZ_CHECK(!afterTime || p.deadline > now_, "request %llu is pending past its deadline",
                       static_cast<unsigned long long>(id));
            numbers.insert(p.watch.number);
            consider(p.deadline);
            if (p.nudgeAt)
                consider(*p.nudgeAt);
        }
        const auto watched = registry_.watchedNumbers();
        FUZZ_CHECK(std::vector<unsigned>(numbers.begin(), numbers.end()) == watched, "watchedNumbers() is wrong");
        FUZZ_CHECK(registry_.nextDeadline() == next, "nextDeadline() is wrong");
    }

    Registry registry_;
    ReferenceLedger reference_;
    std::map<RequestId, Pending> pending_;
    std::set<RequestId> settled_;
    std::map<unsigned, uint64_t> highWater_;
    RequestId nextId_ = 1;
    Clock::time_point now_ = Clock::time_point{} + 1000s;
};

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size)
{
    Reader in(data, size);
    Harness().run(in);
    return 0;
}
