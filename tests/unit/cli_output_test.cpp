// What loopctl prints for people and scripts: sizes, times, escapes, list tables.
#include "cli/format.hpp"
#include "cli/list.hpp"

#include <catch2/catch.hpp>

#include <cstdlib>
#include <ctime>
#include <optional>
#include <sstream>

using namespace loopctl;

namespace {

Device device(uint32_t number, uint64_t diskseq, const std::string& ref, const std::string& file)
{
    Properties props{
        {"DevNode", Value(std::string("/dev/loop") + std::to_string(number))},
        {"DiskSeq", Value(diskseq)},
        {"Number", Value(number)},
        {"Ref", Value(ref)},
        {"Partitions", Value(std::vector<std::string>{"/dev/loopXp1"})},
        {"Size", Value(uint64_t{67108864})},
        {"ReadOnly", Value(true)},
        {"BackingFile", Value(file)},
    };
    return {sdbus::ObjectPath("/org/loopd1/device/" + std::to_string(diskseq)), props};
}

std::string list(const std::vector<Device>& devices, ListOptions options)
{
    std::ostringstream out;
    printList(out, devices, options);
    return out.str();
}

} // namespace

TEST_CASE("sizes in IEC units, as lsblk prints them")
{
    CHECK(iecSize(0) == "0B");
    CHECK(iecSize(512) == "512B");
    CHECK(iecSize(1024) == "1.0K");
    CHECK(iecSize(67108864) == "64.0M");
    CHECK(iecSize(15 * 1048576) == "15.0M");
    CHECK(iecSize(1536ULL << 20) == "1.5G");
    // 1023.96M would round to "1024.0M": the next unit instead.
    CHECK(iecSize((1ULL << 30) - 40000) == "1.0G");
    CHECK(iecSize(UINT64_MAX) == "16.0E");
}

TEST_CASE("how long ago, as systemctl says it")
{
    const uint64_t s = 1'000'000;
    CHECK(ago(100 * s, 100 * s) == "0s ago");
    CHECK(ago(100 * s, 159 * s) == "59s ago");
    CHECK(ago(0, 182 * s) == "3min 2s ago");
    CHECK(ago(0, 7500 * s) == "2h 5min ago");
    CHECK(ago(0, 86400 * s + 3600 * s) == "1 day 1h ago");
    CHECK(ago(0, 3 * 86400 * s) == "3 days 0h ago");
    CHECK(ago(10 * s, 5 * s) == "in the future");
}

TEST_CASE("local time in the format asked for")
{
    const char* before = std::getenv("TZ");
    const std::optional<std::string> saved = before ? std::optional<std::string>(before) : std::nullopt;
    ::setenv("TZ", "UTC", 1);
    ::tzset();
    const auto day = localTime(1796132479088578, "%a %Y-%m-%d %H:%M:%S %Z");
    const auto time = localTime(1796132479088578, "%H:%M:%S", true);
    saved ? ::setenv("TZ", saved->c_str(), 1) : ::unsetenv("TZ"); // other tests keep the zone they had
    ::tzset();
    CHECK(day == "Tue 2026-12-01 13:41:19 UTC");
    CHECK(time == "13:41:19.088");
}

TEST_CASE("escapes: raw fields never split, terminal text never moves the cursor")
{
    CHECK(escapeRaw("/tmp/my disk.img") == "/tmp/my\\x20disk.img");
    CHECK(escapeRaw("a\\b\nc\x7f") == "a\\x5cb\\x0ac\\x7f");
    CHECK(escapeRaw("plain-ref_1.x") == "plain-ref_1.x");
    CHECK(escapeControl("a b\tc\n\x1b[2J") == "a b\tc\\x0a\\x1b[2J");
    CHECK(majorMinor(65024) == "254:0");
}

TEST_CASE("list: columns fitted to their content, SIZE right-aligned, no trailing blanks")
{
    const std::vector<Device> devices{device(0, 7, "web", "/srv/a.img"), device(12, 1234, "", "/b.img")};
    CHECK(list(devices, {"DEVICE,DISKSEQ,REF,SIZE,RO,BACKING-FILE", false, false, false, false}) ==
          "DEVICE      DISKSEQ REF  SIZE RO BACKING-FILE\n"
          "/dev/loop0  7       web 64.0M 1  /srv/a.img\n"
          "/dev/loop12 1234        64.0M 1  /b.img\n");
    CHECK(list(devices, {"ref,parts", true, false, false, false}) == "web 1\n    1\n");
    CHECK(list(devices, {"+PARTS", true, true, true, false}) == "/dev/loop0 7 web 1 67108864 1 /srv/a.img 1\n"
                                                                "/dev/loop12 1234  1 67108864 1 /b.img 1\n");
}

TEST_CASE("list: raw output escapes what would split a field")
{
    const std::vector<Device> devices{device(3, 9, "", "/tmp/my disk\n.img")};
    CHECK(list(devices, {"DEVICE,BACKING-FILE", false, true, false, false}) ==
          "DEVICE BACKING-FILE\n/dev/loop3 /tmp/my\\x20disk\\x0a.img\n");
    CHECK(list(devices, {"DEVICE,BACKING-FILE", true, false, false, false}) == "/dev/loop3 /tmp/my disk\\x0a.img\n");
}

TEST_CASE("list: an unknown column is a usage error naming it")
{
    CHECK_NOTHROW(checkColumns("device,Size,BACKING-INODE"));
    CHECK_THROWS_AS(checkColumns("DEVICE,NOPE"), UsageError);
    CHECK_THROWS_WITH(checkColumns("DEVICE,NOPE"), Catch::Contains("'NOPE'"));
    // A device lacking a property (a loopd of another version) fails naming both.
    const std::vector<Device> devices{device(1, 2, "", "/x")};
    CHECK_THROWS_WITH(list(devices, {"OWNER", false, false, false, false}),
                      Catch::Contains("/org/loopd1/device/2") && Catch::Contains("OwnerUid"));
}
