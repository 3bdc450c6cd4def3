// What the monitor makes of the properties libudev gives it for each event (its
// action, sysname, DISKSEQ and SYNTH_UUID): makeUevent, as Monitor::receive calls it.
#include "uevent/message.hpp"

#include <catch2/catch.hpp>

using namespace loopd;
using namespace loopd::uevent;

TEST_CASE("a uevent of a loop disk and of a partition")
{
    // As libudev had them here (6.18): attach of loop3 with two partitions.
    const auto disk = makeUevent(EventSource::Kernel, "change", "loop3", "41", nullptr);
    REQUIRE(disk);
    CHECK(disk->source == EventSource::Kernel);
    CHECK(disk->action == UeventAction::Change);
    CHECK(disk->number == 3);
    CHECK(disk->partition == 0);
    CHECK(disk->diskseq == 41);
    CHECK(disk->synthUuid.empty());

    const auto part = makeUevent(EventSource::Udev, "add", "loop3p2", "41", nullptr);
    REQUIRE(part);
    CHECK(part->source == EventSource::Udev);
    CHECK(part->action == UeventAction::Add);
    CHECK(part->number == 3);
    CHECK(part->partition == 2);
    CHECK(part->diskseq == 41);
}

TEST_CASE("a synthetic uevent carries its SYNTH_UUID; a remove its action")
{
    const auto event = makeUevent(EventSource::Kernel, "change", "loop0", "7", "0a1b2c3d-0000-4000-8000-000000000001");
    REQUIRE(event);
    CHECK(event->synthUuid == "0a1b2c3d-0000-4000-8000-000000000001");

    const auto removed = makeUevent(EventSource::Udev, "remove", "loop0p1", "7", nullptr);
    REQUIRE(removed);
    CHECK(removed->action == UeventAction::Remove);
    CHECK(removed->partition == 1);
}

TEST_CASE("other devices are not loop uevents; missing properties are absent")
{
    CHECK_FALSE(makeUevent(EventSource::Kernel, "add", "sda", "1", nullptr));
    CHECK_FALSE(makeUevent(EventSource::Udev, "change", "loop-control", nullptr, nullptr));
    CHECK_FALSE(makeUevent(EventSource::Udev, "change", nullptr, "1", nullptr));
    // Kernels before 5.15 send no DISKSEQ; a malformed one is as good as none.
    CHECK(makeUevent(EventSource::Kernel, "add", "loop3", nullptr, nullptr)->diskseq == 0);
    CHECK(makeUevent(EventSource::Kernel, "add", "loop3", "-1", nullptr)->diskseq == 0);
    CHECK(makeUevent(EventSource::Kernel, nullptr, "loop3", "5", nullptr)->action == UeventAction::Other);
}

TEST_CASE("DISKSEQ is plain decimal that fits in 64 bits, else absent")
{
    CHECK(parseDiskseq("41") == 41);
    CHECK(parseDiskseq("18446744073709551615") == 18446744073709551615ULL);
    CHECK(parseDiskseq("18446744073709551616") == 0);
    CHECK(parseDiskseq("-1") == 0); // strtoull would say 2^64-1: "a newer attachment"
    CHECK(parseDiskseq(" 41") == 0);
    CHECK(parseDiskseq("41x") == 0);
    CHECK(parseDiskseq("") == 0);
    CHECK(parseDiskseq(nullptr) == 0);
}

TEST_CASE("loop names")
{
    CHECK(parseLoopName("loop0") == std::pair{0u, 0u});
    CHECK(parseLoopName("loop12p3") == std::pair{12u, 3u});
    CHECK_FALSE(parseLoopName("loop"));
    CHECK_FALSE(parseLoopName("loop3p"));
    CHECK_FALSE(parseLoopName("loop3x"));
    CHECK_FALSE(parseLoopName("loop-control"));
    CHECK_FALSE(parseLoopName("loop1234567890")); // more digits than any minor number
    CHECK_FALSE(parseLoopName(nullptr));
    CHECK(makeUevent(EventSource::Udev, "bind", "loop1p1", "9", nullptr)->action == UeventAction::Other);
}
