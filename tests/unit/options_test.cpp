#include "core/options.hpp"

#include <loopd/error.hpp>

#include <catch2/catch.hpp>

using namespace loopd;
using namespace loopd::core;

namespace {
Errc errorOf(const OptionMap& options)
{
    try {
        parseAttachOptions(options);
    } catch (const Error& e) {
        return e.code();
    }
    return Errc::Failed;
}

std::string messageOf(const OptionMap& options)
{
    try {
        parseAttachOptions(options);
    } catch (const Error& e) {
        return e.what();
    }
    return {};
}
} // namespace

TEST_CASE("defaults are the documented ones")
{
    const auto o = parseAttachOptions({});
    CHECK_FALSE(o.readOnly);
    CHECK(o.offset == 0);
    CHECK(o.sectorSize == 512);
    CHECK(o.partscan);
    CHECK(o.lifetime == Lifetime::Persistent);
    CHECK(o.timeout == std::chrono::seconds(10));
    CHECK(o.readiness == ReadinessMode::Auto);
}

TEST_CASE("every option is parsed")
{
    const auto o = parseAttachOptions({{"read-only", true},
                                       {"offset", uint64_t{1024}},
                                       {"size-limit", uint64_t{4096}},
                                       {"sector-size", uint32_t{4096}},
                                       {"direct-io", true},
                                       {"partscan", false},
                                       {"autoclear", true},
                                       {"hidden", true},
                                       {"lifetime", std::string("client")},
                                       {"ref", std::string("root-image")},
                                       {"timeout-usec", uint64_t{2'000'000}},
                                       {"readiness", std::string("kernel")}});
    CHECK(o.readOnly);
    CHECK(o.offset == 1024);
    CHECK(o.sizeLimit == 4096);
    CHECK(o.sectorSize == 4096);
    CHECK(o.directIo);
    CHECK_FALSE(o.partscan);
    CHECK(o.autoclear);
    CHECK(o.hidden);
    CHECK(o.lifetime == Lifetime::Client);
    CHECK(o.ref == "root-image");
    CHECK(o.timeout == std::chrono::seconds(2));
    CHECK(o.readiness == ReadinessMode::Kernel);
}

TEST_CASE("bad options are InvalidArgument and name the key")
{
    CHECK(errorOf({{"bogus", true}}) == Errc::InvalidArgument);
    CHECK(messageOf({{"bogus", true}}).find("bogus") != std::string::npos);
    CHECK(errorOf({{"offset", std::string("12")}}) == Errc::InvalidArgument);
    CHECK(messageOf({{"offset", std::string("12")}}).find("offset") != std::string::npos);
    CHECK(errorOf({{"offset", uint64_t{100}}}) == Errc::InvalidArgument);
    CHECK(errorOf({{"size-limit", uint64_t{513}}}) == Errc::InvalidArgument);
    CHECK(errorOf({{"sector-size", uint32_t{1000}}}) == Errc::InvalidArgument);
    CHECK(errorOf({{"sector-size", uint64_t{512}}}) == Errc::InvalidArgument); // t, not u
    CHECK(errorOf({{"lifetime", std::string("forever")}}) == Errc::InvalidArgument);
    CHECK(errorOf({{"readiness", std::string("soon")}}) == Errc::InvalidArgument);
    CHECK(errorOf({{"timeout-usec", uint64_t{0}}}) == Errc::InvalidArgument);
    CHECK(errorOf({{"read-only", OtherType{"ai"}}}) == Errc::InvalidArgument);
}

TEST_CASE("refs: 1 to 63 printable bytes, no slash")
{
    CHECK(isValidRef("a"));
    CHECK(isValidRef(std::string(63, 'x')));
    CHECK_FALSE(isValidRef(std::string(64, 'x')));
    CHECK_FALSE(isValidRef(""));
    CHECK_FALSE(isValidRef("a/b"));
    CHECK_FALSE(isValidRef(".."));
    CHECK_FALSE(isValidRef("tab\there"));
    CHECK_FALSE(isValidRef("123")); // would read as a diskseq
    CHECK(isValidRef("disk-2"));
    CHECK(isValidRef("a.b_c-D9"));
    CHECK_FALSE(isValidRef("sp ace"));
    CHECK_FALSE(isValidRef("x\ny"));
    CHECK_FALSE(isValidRef("caf\xc3\xa9"));
    CHECK(errorOf({{"ref", std::string(64, 'x')}}) == Errc::InvalidArgument);
}

TEST_CASE("detach takes no options")
{
    CHECK_NOTHROW(parseDetachOptions({}));
    CHECK_THROWS_AS(parseDetachOptions({{"force", true}}), Error);
    CHECK(parseDetachOptions({{"deferred", true}}).deferred);
    CHECK_FALSE(parseDetachOptions({}).deferred);
    CHECK_THROWS_AS(parseDetachOptions({{"deferred", uint32_t{1}}}), Error);
    CHECK_NOTHROW(parseResizeOptions({}));
    CHECK_THROWS_AS(parseResizeOptions({{"size", uint64_t{1}}}), Error);
}

TEST_CASE("a refused ref is quoted as ASCII, so the error is a valid D-Bus string")
{
    const auto message = messageOf({{"ref", std::string(79, 'r') + "\xc3\xa9"}});
    CHECK(message.find("\\xc3") != std::string::npos);
    for (const unsigned char c : message)
        CHECK(c < 0x80);
}
