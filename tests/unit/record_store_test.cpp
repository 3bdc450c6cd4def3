#include "service/record_store.hpp"

#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

using namespace loopd;
using namespace loopd::core;

namespace {

struct TempDir {
    std::string path;
    TempDir()
    {
        std::string pattern = (std::filesystem::temp_directory_path() / "loopd-records-XXXXXX").string();
        REQUIRE(::mkdtemp(pattern.data()) != nullptr);
        path = pattern;
    }
    ~TempDir() { std::filesystem::remove_all(path); }
};

Record sample(Record::State state)
{
    Record r;
    r.state = state;
    r.token = "0f6a9e3c-1b2d-4c5e-8f70-9a1b2c3d4e5f";
    r.fileName = loFileName(r.token);
    r.info.number = 3;
    r.info.diskseq = 77;
    r.info.backingFile = "/var/lib/images/a.img";
    r.info.partitions = {1, 2, 3};
    r.owner = ":1.9";
    return r;
}

std::size_t fileCount(const std::string& dir)
{
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(dir))
        ++n;
    return n;
}

} // namespace

TEST_CASE("a record is one file for the attachment's whole life, rewritten in place")
{
    TempDir dir;
    service::RecordStore store(dir.path);
    auto record = sample(Record::State::Intent);
    store.write(record);
    struct stat first {};
    const auto file = dir.path + "/" + record.token + ".json";
    REQUIRE(::stat(file.c_str(), &first) == 0);
    CHECK(first.st_size == 4096);

    for (const auto state : {Record::State::Configured, Record::State::Owned, Record::State::Detaching}) {
        record.state = state;
        store.write(record);
        struct stat now {};
        REQUIRE(::stat(file.c_str(), &now) == 0);
        CHECK(now.st_ino == first.st_ino); // no new inode per update
        const auto all = store.loadAll();
        REQUIRE(all.size() == 1);
        CHECK(all[0].state == state);
        CHECK(all[0].info.partitions == std::vector<unsigned>{1, 2, 3});
    }
    store.remove(record);
    CHECK(fileCount(dir.path) == 0);
}

TEST_CASE("a record longer than a page is replaced whole, and a shorter one after it reads back clean")
{
    TempDir dir;
    service::RecordStore store(dir.path);
    auto record = sample(Record::State::Owned);
    record.info.backingFile = "/" + std::string(5000, 'x');
    store.write(record);
    REQUIRE(store.loadAll().at(0).info.backingFile == record.info.backingFile);

    record.info.backingFile = "/short.img";
    record.state = Record::State::Detaching;
    store.write(record);
    const auto all = store.loadAll();
    REQUIRE(all.size() == 1);
    CHECK(all[0].info.backingFile == "/short.img");
    CHECK(all[0].state == Record::State::Detaching);
    CHECK(fileCount(dir.path) == 1);
}

TEST_CASE("a record longer than a page is written 0600 whatever the umask, never through a symlink")
{
    TempDir dir;
    service::RecordStore store(dir.path);
    auto record = sample(Record::State::Owned);
    record.info.backingFile = "/" + std::string(5000, 'x');
    const auto file = dir.path + "/" + record.token + ".json";

    const auto old = ::umask(0);
    store.write(record);
    ::umask(old);
    struct stat st {};
    REQUIRE(::stat(file.c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == 0600);

    // Someone put a link where the temporary file goes: the write fails, the
    // link's target stays as it was.
    const auto target = dir.path + "/elsewhere";
    {
        std::ofstream(target) << "untouched";
    }
    REQUIRE(::symlink(target.c_str(), (file + ".tmp").c_str()) == 0);
    CHECK_THROWS_AS(store.write(record), std::system_error);
    std::ifstream in(target);
    std::string text;
    std::getline(in, text);
    CHECK(text == "untouched");
}

TEST_CASE("many records are read on several threads, each whole, and an unreadable one is dropped")
{
    TempDir dir;
    service::RecordStore store(dir.path);
    constexpr unsigned count = 1500; // enough for spread() to use its threads
    for (unsigned i = 0; i < count; ++i) {
        auto record = sample(Record::State::Owned);
        record.token = "0f6a9e3c-1b2d-4c5e-8f70-" + std::to_string(100000000000ULL + i);
        record.fileName = loFileName(record.token);
        record.info.number = i;
        record.info.diskseq = 1000 + i;
        record.info.backingFile = "/srv/images/" + std::to_string(i) + ".img";
        store.write(record);
    }
    std::ofstream(dir.path + "/broken.json") << "{\"state\": ";
    const auto all = store.loadAll();
    REQUIRE(all.size() == count);
    std::vector<bool> seen(count, false);
    for (const auto& record : all) {
        REQUIRE(record.info.number < count);
        CHECK(record.info.diskseq == 1000 + record.info.number);
        CHECK(record.info.backingFile == "/srv/images/" + std::to_string(record.info.number) + ".img");
        seen[record.info.number] = true;
    }
    CHECK(std::count(seen.begin(), seen.end(), true) == count);
    CHECK_FALSE(std::filesystem::exists(dir.path + "/broken.json"));
}
