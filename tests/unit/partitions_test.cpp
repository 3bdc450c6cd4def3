// The partition probe in its confined child answers as the in-process one does,
// and a deadline that has passed ends it. On a regular file: no root needed.
#include "kernel/partitions.hpp"

#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <system_error>

using namespace loopd::kernel;

namespace {

// A 16 MiB file with an MBR: partition 1 at sector 2048 (8 MiB), partition 2 after it.
int mbrImage()
{
    char name[] = "/tmp/loopd-probe-XXXXXX";
    const int fd = ::mkstemp(name);
    REQUIRE(fd >= 0);
    ::unlink(name);
    REQUIRE(::ftruncate(fd, 16 << 20) == 0);
    std::array<unsigned char, 512> mbr{};
    auto entry = [&](int index, uint32_t start, uint32_t sectors) {
        unsigned char* e = mbr.data() + 0x1be + 16 * index;
        e[4] = 0x83; // Linux
        std::memcpy(e + 8, &start, 4);
        std::memcpy(e + 12, &sectors, 4);
    };
    entry(0, 2048, 16384);
    entry(1, 18432, 8192);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    REQUIRE(::pwrite(fd, mbr.data(), mbr.size(), 0) == 512);
    return fd;
}

} // namespace

TEST_CASE("the confined probe finds what the in-process probe finds")
{
    const int fd = mbrImage();
    const auto confined = probePartitionsConfined(fd, std::chrono::steady_clock::now() + std::chrono::seconds(10));
    const auto direct = probePartitions(fd);
    REQUIRE(confined.size() == 2);
    REQUIRE(direct.size() == 2);
    for (std::size_t i = 0; i < 2; ++i) {
        CHECK(confined[i].number == direct[i].number);
        CHECK(confined[i].startBytes == direct[i].startBytes);
        CHECK(confined[i].sizeBytes == direct[i].sizeBytes);
    }
    CHECK(confined[0].startBytes == 2048ULL * 512);
    CHECK(confined[1].sizeBytes == 8192ULL * 512);
    ::close(fd);
}

TEST_CASE("a file without a table has no partitions, also when confined")
{
    char name[] = "/tmp/loopd-probe-XXXXXX";
    const int fd = ::mkstemp(name);
    ::unlink(name);
    REQUIRE(::ftruncate(fd, 1 << 20) == 0);
    CHECK(probePartitionsConfined(fd, std::chrono::steady_clock::now() + std::chrono::seconds(10)).empty());
    ::close(fd);
}

TEST_CASE("a deadline that has passed ends the probe with ETIMEDOUT")
{
    const int fd = mbrImage();
    try {
        probePartitionsConfined(fd, std::chrono::steady_clock::now() - std::chrono::seconds(1));
        FAIL("no timeout");
    } catch (const std::system_error& e) {
        CHECK(e.code().value() == ETIMEDOUT);
    }
    ::close(fd);
}
