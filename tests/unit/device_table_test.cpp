// The device table's invariants: one device per diskseq, the newest attachment
// owns its loop number, refs and their links unique, listed (and linked) exactly
// from ready to removal. verify() re-checks all of them after every step.
#include "service/device_table.hpp"

#include <loopd/error.hpp>

#include <catch2/catch.hpp>

#include <unistd.h>

#include <filesystem>

using namespace loopd;
using namespace loopd::service;
namespace fs = std::filesystem;

namespace {

struct TempDir {
    fs::path path;
    TempDir()
    {
        char pattern[] = "/tmp/loopd-table-XXXXXX";
        path = ::mkdtemp(pattern);
    }
    ~TempDir() { fs::remove_all(path); }
};

Device device(uint64_t diskseq, unsigned number, std::string ref = {}, std::vector<unsigned> partitions = {})
{
    Device d;
    d.info.diskseq = diskseq;
    d.info.number = number;
    d.info.partitions = std::move(partitions);
    d.options.ref = std::move(ref);
    return d;
}

std::string target(const fs::path& link)
{
    return fs::read_symlink(link).string();
}

} // namespace

TEST_CASE("one device per diskseq")
{
    TempDir dir;
    DeviceTable table{RefLinks(dir.path)};
    table.add(device(10, 3));
    CHECK_THROWS_AS(table.add(device(10, 4)), std::logic_error);
    table.verify();
    CHECK(table.size() == 1);
}

TEST_CASE("the newest attachment owns its loop number, also after the old one goes")
{
    TempDir dir;
    DeviceTable table{RefLinks(dir.path)};
    table.add(device(10, 3));
    table.setState(10, DeviceState::Detaching);
    table.add(device(12, 3)); // the kernel gave loop3 out again before the release was confirmed
    table.verify();
    REQUIRE(table.owner(3) != nullptr);
    CHECK(table.owner(3)->info.diskseq == 12);
    table.remove(10, RemovalReason::Detached);
    table.verify();
    REQUIRE(table.owner(3) != nullptr);
    CHECK(table.owner(3)->info.diskseq == 12);
    table.remove(12, RemovalReason::Detached);
    CHECK(table.owner(3) == nullptr);
    table.verify();
}

TEST_CASE("refs are unique, reserved or in use, and free again once removed")
{
    TempDir dir;
    DeviceTable table{RefLinks(dir.path)};
    table.reserveRef("web");
    CHECK_THROWS_AS(table.reserveRef("web"), Error);
    table.add(device(10, 3, "web"));
    CHECK_THROWS_AS(table.reserveRef("web"), Error);
    table.verify();
    table.remove(10, RemovalReason::Detached);
    table.reserveRef("web");
    table.releaseRef("web");
    table.verify();
}

TEST_CASE("a ref never takes another device's partition link, nor the other way round")
{
    TempDir dir;
    DeviceTable table{RefLinks(dir.path)};
    table.reserveRef("web");
    table.add(device(10, 3, "web", {1, 2, 3}));
    table.markReady(10, 1);
    CHECK_THROWS_AS(table.reserveRef("web-part1"), Error);
    CHECK(target(dir.path / "web-part1") == "/dev/loop3p1");
    table.reserveRef("web-part4"); // web has no partition 4
    table.releaseRef("web-part4");

    table.reserveRef("db-part2");
    table.add(device(20, 5, "db-part2"));
    table.reserveRef("db");
    CHECK_THROWS_AS(table.add(device(21, 6, "db", {1, 2})), Error);
    CHECK(table.find(21) == nullptr);
    CHECK(table.owner(6) == nullptr);
    table.add(device(22, 7, "db", {1})); // db-part1 collides with nothing
    table.verify();
}

TEST_CASE("listed and linked exactly from ready until removed")
{
    TempDir dir;
    DeviceTable table{RefLinks(dir.path)};
    std::vector<std::pair<uint64_t, RemovalReason>> removed;
    table.onRemoved = [&](Device& d, RemovalReason reason) { removed.emplace_back(d.info.diskseq, reason); };
    table.reserveRef("demo");
    table.add(device(10, 3, "demo", {1, 2}));
    CHECK(table.listedCount() == 0);
    CHECK_FALSE(fs::exists(fs::symlink_status(dir.path / "demo")));
    table.markReady(10, 1234);
    CHECK(table.listedCount() == 1);
    CHECK(target(dir.path / "demo") == "/dev/loop3");
    CHECK(target(dir.path / "demo-part2") == "/dev/loop3p2");
    table.verify();
    table.remove(10, RemovalReason::Timeout);
    CHECK(table.listedCount() == 0);
    CHECK(fs::is_empty(dir.path));
    REQUIRE(removed.size() == 1);
    CHECK(removed[0].second == RemovalReason::Timeout);
    CHECK(std::string(reasonName(RemovalReason::Timeout)) == "timeout");
    CHECK(reasonName(RemovalReason::Abandoned) == nullptr);
    table.verify();
}

TEST_CASE("names resolve as devnode, then diskseq, then ref; never ambiguously")
{
    TempDir dir;
    DeviceTable table{RefLinks(dir.path)};
    table.add(device(10, 3));
    table.setState(10, DeviceState::Detaching);
    table.add(device(12, 3));
    table.reserveRef("web");
    table.add(device(14, 4, "web"));
    table.reserveRef("pending");
    CHECK(table.resolve("/dev/loop3")->info.diskseq == 12); // the old one being detached hides nothing
    CHECK(table.resolve("10")->info.diskseq == 10);
    CHECK(table.resolve("web")->info.diskseq == 14);
    CHECK(table.resolve("") == nullptr);
    CHECK(table.resolve("pending") == nullptr); // reserved, not yet a device
    CHECK(table.resolve("/dev/loop") == nullptr);
    CHECK(table.resolve("/dev/loop3x") == nullptr);
    CHECK(table.resolve("99999999999999999999999") == nullptr);
}

TEST_CASE("restart: every stale link goes, adopted devices are linked again")
{
    TempDir dir;
    fs::create_symlink("/dev/loop9", dir.path / "old");
    DeviceTable table{RefLinks(dir.path)};
    table.links().removeAll();
    auto adopted = device(30, 2, "kept", {1});
    adopted.state = DeviceState::Ready;
    adopted.readyTimestamp = 5;
    table.add(std::move(adopted));
    CHECK_FALSE(fs::exists(fs::symlink_status(dir.path / "old")));
    CHECK(target(dir.path / "kept-part1") == "/dev/loop2p1");
    CHECK(table.listedCount() == 1);
    table.verify();
}

TEST_CASE("a resize's partitions are linked, removed ones unlinked, never over another device's ref")
{
    TempDir dir;
    DeviceTable table{RefLinks(dir.path)};
    table.reserveRef("web");
    table.add(device(10, 3, "web", {1, 2}));
    table.markReady(10, 1);
    table.reserveRef("web-part3");
    table.add(device(20, 5, "web-part3"));
    table.markReady(20, 1);

    table.setPartitions(10, {1, 3, 4});
    CHECK(table.find(10)->info.partitions == std::vector<unsigned>{1, 3, 4});
    CHECK(target(dir.path / "web-part1") == "/dev/loop3p1");
    CHECK(target(dir.path / "web-part4") == "/dev/loop3p4");
    CHECK_FALSE(fs::exists(fs::symlink_status(dir.path / "web-part2")));
    CHECK(target(dir.path / "web-part3") == "/dev/loop5"); // the other device's, untouched
}
