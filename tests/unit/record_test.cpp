#include "core/record.hpp"

#include <catch2/catch.hpp>

using namespace loopd;
using namespace loopd::core;

TEST_CASE("a record survives serialization unchanged")
{
    Record r;
    r.state = Record::State::Owned;
    r.token = "8c0f4d0e-9a8e-4a53-9f51-3c2b9f0c1d2e";
    r.fileName = "loopd:" + r.token;
    r.info.number = 7;
    r.info.diskseq = 1234;
    r.info.backingFile = "/var/lib/images/a b.img";
    r.info.backingDevice = 65024;
    r.info.backingInode = 99;
    r.info.offset = 1048576;
    r.info.sizeLimit = 4096;
    r.info.size = 67108864;
    r.info.sectorSize = 4096;
    r.info.readOnly = true;
    r.info.directIo = true;
    r.info.partscan = true;
    r.info.partitions = {1, 2, 5};
    r.ref = "root";
    r.lifetime = Lifetime::Client;
    r.owner = ":1.42";
    r.ownerUid = 1000;
    r.readyTimestamp = 1795318805973794;

    const auto back = parseRecord(serialize(r));
    REQUIRE(back);
    CHECK(back->state == Record::State::Owned);
    CHECK(back->token == r.token);
    CHECK(back->fileName == r.fileName);
    CHECK(back->info.number == 7);
    CHECK(back->info.diskseq == 1234);
    CHECK(back->info.backingFile == r.info.backingFile);
    CHECK(back->info.partitions == r.info.partitions);
    CHECK(back->info.sectorSize == 4096);
    CHECK(back->info.readOnly);
    CHECK(back->ref == "root");
    CHECK(back->lifetime == Lifetime::Client);
    CHECK(back->owner == ":1.42");
    CHECK(back->ownerUid == 1000);
    CHECK(back->readyTimestamp == r.readyTimestamp);
}

TEST_CASE("torn or foreign record files are refused, not half read")
{
    CHECK_FALSE(parseRecord(""));
    CHECK_FALSE(parseRecord("{\"state\":\"owned\""));
    CHECK_FALSE(parseRecord("{\"state\":\"sleeping\"}"));
    CHECK_FALSE(parseRecord("[1,2,3]"));
    Record r;
    auto text = serialize(r);
    CHECK(parseRecord(text));
    CHECK_FALSE(parseRecord(text.substr(0, text.size() / 2)));
}

TEST_CASE("lifetime fd, a let-go device and hidden survive serialization")
{
    Record r;
    r.state = Record::State::Owned;
    r.lifetime = Lifetime::Fd;
    r.letGo = true;
    r.hidden = true;
    const auto back = parseRecord(serialize(r));
    REQUIRE(back);
    CHECK(back->lifetime == Lifetime::Fd);
    CHECK(back->letGo);
    CHECK(back->hidden);
    CHECK_FALSE(parseRecord(serialize(Record{}))->letGo);
}
