// The readiness state machine fed scripted event sequences, as the kernel and udev
// deliver them: in order, out of order, stale, duplicated, double scanned, replaced.
#include "core/registry.hpp"

#include <catch2/catch.hpp>

using namespace loopd;
using namespace loopd::core;
using namespace std::chrono_literals;
using Kind = Outcome::Kind;

namespace {

const auto t0 = Clock::time_point{} + 1000s;
const auto deadline = t0 + 10s;

Uevent ev(UeventAction action, unsigned partition, uint64_t diskseq, unsigned number = 3,
          EventSource source = EventSource::Udev)
{
    return Uevent{source, action, number, partition, diskseq, {}};
}

Watch watch3(uint64_t diskseq = 40)
{
    return Watch{diskseq, 3, {1, 2, 3}, EventSource::Udev};
}

// Feeds events; returns every outcome in order.
std::vector<Outcome> feed(Registry& registry, std::initializer_list<Uevent> events)
{
    std::vector<Outcome> all;
    for (const auto& e : events)
        for (auto& o : registry.onEvent(e))
            all.push_back(o);
    return all;
}

} // namespace

TEST_CASE("ready after the disk and every partition, in order")
{
    Registry registry;
    REQUIRE(registry.expect(1, Goal::Ready, watch3(), deadline).empty());
    REQUIRE(
        feed(registry, {ev(UeventAction::Change, 0, 40), ev(UeventAction::Add, 1, 40), ev(UeventAction::Add, 2, 40)})
            .empty());
    const auto out = feed(registry, {ev(UeventAction::Add, 3, 40)});
    REQUIRE(out.size() == 1);
    CHECK(out[0].request == 1);
    CHECK(out[0].kind == Kind::Ready);
    CHECK(registry.pending() == 0);
}

TEST_CASE("events that came before the diskseq was known count (out of order)")
{
    Registry registry;
    feed(registry, {ev(UeventAction::Add, 2, 40), ev(UeventAction::Add, 3, 40), ev(UeventAction::Add, 1, 40),
                    ev(UeventAction::Change, 0, 40)});
    const auto out = registry.expect(1, Goal::Ready, watch3(), deadline);
    REQUIRE(out.size() == 1);
    CHECK(out[0].kind == Kind::Ready);
}

TEST_CASE("a stale diskseq on the same device is ignored")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline);
    CHECK(feed(registry, {ev(UeventAction::Change, 0, 40)}).empty());
    // Events of the previous attachment of loop3, delivered late.
    CHECK(feed(registry, {ev(UeventAction::Add, 1, 39), ev(UeventAction::Add, 2, 39), ev(UeventAction::Add, 3, 39),
                          ev(UeventAction::Remove, 1, 39)})
              .empty());
    const auto out =
        feed(registry, {ev(UeventAction::Add, 1, 40), ev(UeventAction::Add, 2, 40), ev(UeventAction::Add, 3, 40)});
    REQUIRE(out.size() == 1);
    CHECK(out[0].kind == Kind::Ready);
}

TEST_CASE("duplicated events settle a request exactly once")
{
    Registry registry;
    registry.expect(1, Goal::Ready, Watch{40, 3, {}, EventSource::Udev}, deadline);
    const auto out = feed(registry, {ev(UeventAction::Change, 0, 40), ev(UeventAction::Change, 0, 40)});
    CHECK(out.size() == 1);
}

TEST_CASE("double scan: a partition removed and added again is not a failure")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline);
    CHECK(feed(registry, {ev(UeventAction::Change, 0, 40), ev(UeventAction::Add, 1, 40), ev(UeventAction::Add, 2, 40),
                          ev(UeventAction::Remove, 1, 40), ev(UeventAction::Remove, 2, 40)})
              .empty());
    CHECK(feed(registry, {ev(UeventAction::Add, 3, 40)}).empty()); // 1 and 2 are gone for now
    const auto out = feed(registry, {ev(UeventAction::Add, 1, 40), ev(UeventAction::Add, 2, 40)});
    REQUIRE(out.size() == 1);
    CHECK(out[0].kind == Kind::Ready);
}

TEST_CASE("a higher diskseq before readiness means the device changed hands")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline);
    feed(registry, {ev(UeventAction::Change, 0, 40), ev(UeventAction::Add, 1, 40)});
    const auto out = feed(registry, {ev(UeventAction::Change, 0, 41, 3, EventSource::Kernel)});
    REQUIRE(out.size() == 1);
    CHECK(out[0].kind == Kind::Changed);
}

TEST_CASE("events of other devices and of the other source do not count")
{
    Registry registry;
    registry.expect(1, Goal::Ready, Watch{40, 3, {1}, EventSource::Udev}, deadline);
    CHECK(feed(registry, {ev(UeventAction::Change, 0, 40, 4), ev(UeventAction::Add, 1, 40, 4),
                          ev(UeventAction::Change, 0, 40, 3, EventSource::Kernel),
                          ev(UeventAction::Add, 1, 40, 3, EventSource::Kernel)})
              .empty());
    CHECK(feed(registry, {ev(UeventAction::Change, 0, 40), ev(UeventAction::Add, 1, 40)}).size() == 1);
}

TEST_CASE("events without DISKSEQ are ignored")
{
    Registry registry;
    registry.expect(1, Goal::Ready, Watch{40, 3, {}, EventSource::Udev}, deadline);
    CHECK(feed(registry, {ev(UeventAction::Change, 0, 0)}).empty());
}

TEST_CASE("timeout settles at the deadline, not before")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline);
    registry.expect(2, Goal::Ready, watch3(41), deadline + 5s);
    CHECK(registry.nextDeadline() == deadline);
    CHECK(registry.onTime(deadline - 1ms).empty());
    const auto out = registry.onTime(deadline);
    REQUIRE(out.size() == 1);
    CHECK(out[0].request == 1);
    CHECK(out[0].kind == Kind::TimedOut);
    CHECK(registry.nextDeadline() == deadline + 5s);
    // A settled request never settles again.
    CHECK(feed(registry, {ev(UeventAction::Change, 0, 40)}).empty());
}

TEST_CASE("release: settled by the partitions' remove events, which carry the old diskseq")
{
    Registry registry;
    feed(registry, {ev(UeventAction::Change, 0, 40), ev(UeventAction::Add, 1, 40), ev(UeventAction::Add, 2, 40),
                    ev(UeventAction::Add, 3, 40)});
    CHECK(registry.expect(7, Goal::Released, watch3(), deadline).empty());
    CHECK(feed(registry, {ev(UeventAction::Remove, 3, 40), ev(UeventAction::Remove, 2, 40)}).empty());
    const auto out = feed(registry, {ev(UeventAction::Remove, 1, 40)});
    REQUIRE(out.size() == 1);
    CHECK(out[0].kind == Kind::Released);
}

TEST_CASE("cancel forgets a request")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline);
    registry.cancel(1);
    CHECK(registry.pending() == 0);
    CHECK(registry.onTime(deadline + 1s).empty());
}

TEST_CASE("resync after lost events: the snapshot completes what events did not say")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline);
    feed(registry, {ev(UeventAction::Change, 0, 40), ev(UeventAction::Add, 1, 40)});
    // Events of p2 and p3 were dropped; udev's database has them.
    const auto out = registry.resync(3, EventSource::Udev, EventLedger::View{40, true, {1, 2, 3}});
    REQUIRE(out.size() == 1);
    CHECK(out[0].kind == Kind::Ready);
}

TEST_CASE("resync showing a newer diskseq fails a waiting attach with Changed")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline);
    const auto out = registry.resync(3, EventSource::Kernel, EventLedger::View{41, true, {}});
    REQUIRE(out.size() == 1);
    CHECK(out[0].kind == Kind::Changed);
}

TEST_CASE("a stale snapshot does not undo what events said")
{
    Registry registry;
    feed(registry, {ev(UeventAction::Change, 0, 40)});
    registry.resync(3, EventSource::Udev, EventLedger::View{39, true, {1, 2, 3}});
    CHECK(registry.ledger().view(3, EventSource::Udev).diskseq == 40);
    CHECK(registry.ledger().view(3, EventSource::Udev).partitions.empty());
}

TEST_CASE("nudges name what is missing, once per device, and come again after the retry")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline, t0 + 1s);
    registry.expect(2, Goal::Ready, watch3(), deadline, t0 + 1s); // a WaitReady on the same device
    feed(registry, {ev(UeventAction::Change, 0, 40), ev(UeventAction::Add, 1, 40), ev(UeventAction::Add, 3, 40)});
    CHECK(registry.nudges(t0 + 500ms, 1s).empty());
    CHECK(registry.nextDeadline() == t0 + 1s);
    const auto due = registry.nudges(t0 + 1s, 1s);
    REQUIRE(due.size() == 1);
    CHECK_FALSE(due[0].disk);
    CHECK(due[0].partitions == std::vector<unsigned>{2});
    CHECK(registry.nudges(t0 + 1500ms, 1s).empty());
    CHECK(registry.nudges(t0 + 2s, 1s).size() == 1);
    // The resent event completes both requests.
    CHECK(feed(registry, {ev(UeventAction::Change, 2, 40)}).size() == 2);
    CHECK(registry.nudges(t0 + 5s, 1s).empty());
}

TEST_CASE("nothing seen yet: the nudge asks for the disk and every partition")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline, t0);
    const auto due = registry.nudges(t0, 1s);
    REQUIRE(due.size() == 1);
    CHECK(due[0].disk);
    CHECK(due[0].partitions == std::vector<unsigned>{1, 2, 3});
}

TEST_CASE("udevd gone: a request retargeted to the kernel's events settles on what the kernel said")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline, t0 + 1s);
    // The kernel announced everything; udev died before processing any of it.
    for (const unsigned p : {0U, 1U, 2U, 3U})
        CHECK(
            registry.onEvent(ev(p ? UeventAction::Add : UeventAction::Change, p, 40, 3, EventSource::Kernel)).empty());
    const auto out = registry.retarget(1, EventSource::Kernel);
    REQUIRE(out.size() == 1);
    CHECK(out[0].kind == Kind::Ready);
    CHECK(out[0].watch.source == EventSource::Kernel);
    CHECK(registry.pending() == 0);
    CHECK(registry.retarget(1, EventSource::Kernel).empty()); // settled once
}

TEST_CASE("retargeted to a source that saw nothing yet, a request keeps waiting")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline);
    CHECK(registry.retarget(1, EventSource::Kernel).empty());
    CHECK(registry.watches(3).at(0).source == EventSource::Kernel);
    CHECK(feed(registry, {ev(UeventAction::Change, 0, 40, 3, EventSource::Kernel),
                          ev(UeventAction::Add, 1, 40, 3, EventSource::Kernel),
                          ev(UeventAction::Add, 2, 40, 3, EventSource::Kernel),
                          ev(UeventAction::Add, 3, 40, 3, EventSource::Kernel)})
              .size() == 1);
}

TEST_CASE("udevd back: lacking names what udev still misses, without touching nudge times")
{
    Registry registry;
    registry.expect(1, Goal::Ready, watch3(), deadline, t0 + 1s);
    registry.expect(2, Goal::Ready, Watch{50, 4, {}, EventSource::Kernel}, deadline, t0 + 1s);
    feed(registry, {ev(UeventAction::Change, 0, 40), ev(UeventAction::Add, 2, 40)});
    const auto due = registry.lacking(EventSource::Udev);
    REQUIRE(due.size() == 1); // the kernel-readiness request is not udev's
    CHECK(due[0].watch.number == 3);
    CHECK_FALSE(due[0].disk);
    CHECK(due[0].partitions == std::vector<unsigned>{1, 3});
    CHECK(registry.nudges(t0 + 500ms, 1s).empty());
    CHECK(registry.nudges(t0 + 1s, 1s).size() == 2);
}
