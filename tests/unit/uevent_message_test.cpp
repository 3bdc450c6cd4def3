// Raw kernel uevents (NETLINK_KOBJECT_UEVENT) and libudev properties into Uevent values.
#include "uevent/message.hpp"

#include <catch2/catch.hpp>

#include <string>

using namespace loopd;
using namespace loopd::uevent;
using namespace std::string_literals;

namespace {
// As the kernel sent them here (6.18): attach of loop3 with two partitions.
const auto diskChange = "change@/devices/virtual/block/loop3\0ACTION=change\0DEVPATH=/devices/virtual/block/loop3\0"
                        "SUBSYSTEM=block\0MAJOR=7\0MINOR=3\0DEVNAME=loop3\0DEVTYPE=disk\0DISKSEQ=41\0SEQNUM=5012\0"s;
const auto partAdd = "add@/devices/virtual/block/loop3/loop3p2\0ACTION=add\0DEVPATH=/devices/virtual/block/loop3/"
                     "loop3p2\0SUBSYSTEM=block\0MAJOR=259\0MINOR=1\0DEVNAME=loop3p2\0DEVTYPE=partition\0DISKSEQ=41\0"
                     "PARTN=2\0SEQNUM=5014\0"s;
} // namespace

TEST_CASE("a kernel uevent of a loop disk and of a partition")
{
    const auto disk = parseKernelUevent(diskChange);
    REQUIRE(disk);
    CHECK(disk->source == EventSource::Kernel);
    CHECK(disk->action == UeventAction::Change);
    CHECK(disk->number == 3);
    CHECK(disk->partition == 0);
    CHECK(disk->diskseq == 41);
    CHECK(disk->synthUuid.empty());

    const auto part = parseKernelUevent(partAdd);
    REQUIRE(part);
    CHECK(part->action == UeventAction::Add);
    CHECK(part->number == 3);
    CHECK(part->partition == 2);
    CHECK(part->diskseq == 41);
}

TEST_CASE("a synthetic uevent carries its SYNTH_UUID; a remove its action")
{
    const auto synth = "change@/devices/virtual/block/loop0\0ACTION=change\0DEVPATH=/devices/virtual/block/loop0\0"
                       "SUBSYSTEM=block\0SYNTH_UUID=0a1b2c3d-0000-4000-8000-000000000001\0DISKSEQ=7\0"s;
    const auto event = parseKernelUevent(synth);
    REQUIRE(event);
    CHECK(event->synthUuid == "0a1b2c3d-0000-4000-8000-000000000001");

    const auto remove = "remove@/devices/virtual/block/loop0/loop0p1\0ACTION=remove\0DEVPATH=/devices/virtual/block/"
                        "loop0/loop0p1\0SUBSYSTEM=block\0DISKSEQ=7"s; // last field without its NUL
    const auto removed = parseKernelUevent(remove);
    REQUIRE(removed);
    CHECK(removed->action == UeventAction::Remove);
    CHECK(removed->partition == 1);
}

TEST_CASE("other devices, other subsystems and malformed messages are not loop uevents")
{
    CHECK_FALSE(parseKernelUevent(""));
    CHECK_FALSE(parseKernelUevent("libudev\0\xfe\xed\xca\xfe"s));
    CHECK_FALSE(parseKernelUevent("add@/devices/virtual/block/sda\0ACTION=add\0DEVPATH=/devices/virtual/block/sda\0"
                                  "SUBSYSTEM=block\0DISKSEQ=1\0"s));
    CHECK_FALSE(parseKernelUevent("add@/devices/virtual/bdi/loop3\0ACTION=add\0DEVPATH=/devices/virtual/bdi/loop3\0"
                                  "SUBSYSTEM=bdi\0"s));
    // The header and the properties disagree.
    CHECK_FALSE(parseKernelUevent("add@/devices/virtual/block/loop3\0ACTION=remove\0DEVPATH=/devices/virtual/block/"
                                  "loop3\0SUBSYSTEM=block\0"s));
    CHECK_FALSE(parseKernelUevent("add@/devices/virtual/block/loop3\0ACTION=add\0DEVPATH=/devices/virtual/block/"
                                  "loop4\0SUBSYSTEM=block\0"s));
    // A field without '='; a header without '@'.
    CHECK_FALSE(parseKernelUevent("add@/devices/virtual/block/loop3\0ACTION=add\0DEVPATH=/devices/virtual/block/"
                                  "loop3\0SUBSYSTEM=block\0garbage\0"s));
    CHECK_FALSE(parseKernelUevent("add /devices/virtual/block/loop3\0ACTION=add\0"s));
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
