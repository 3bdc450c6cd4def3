// libFuzzer target: Attach and Detach option parsing (core::parseAttachOptions) on
// a{sv} maps built from the input, against the options table of API.md / README:
//
// - a map is accepted exactly when every key is documented, has its documented
//   type and a value in range; then every field is the given value or its default;
// - anything else is Error(InvalidArgument) whose message names an offending key,
//   and no other exception escapes (the bus layer maps only loopd::Error);
// - Detach takes no options.
//
// Input format: see make_seeds.py.
#include "core/options.hpp"
#include "reader.hpp"

#include <loopd/error.hpp>

#include <array>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

using namespace loopd;
using namespace loopd::core;
using loopd::fuzz::Reader;

namespace {

constexpr std::array<const char*, 12> keys = {"read-only", "offset",       "size-limit", "sector-size",
                                              "direct-io", "partscan",     "autoclear",  "lifetime",
                                              "ref",       "timeout-usec", "readiness",  "hidden"};
constexpr uint64_t maxTimeoutUsec = 86'400'000'000ULL; // a day, as options.cpp has it

// Values at and around every documented boundary; the raw forms find the rest.
constexpr std::array<uint64_t, 12> interesting = {
    0, 1, 511, 512, 513, 1024, 2048, 4096, 8192, 10'000'000, maxTimeoutUsec, maxTimeoutUsec + 1};
const std::array<std::string, 12> words = {"persistent", "client", "auto", "udev",  "kernel", ".",
                                           "..",         "a/b",    "Udev", "demo ", "",       std::string(63, 'r')};

std::string readString(Reader& in)
{
    const auto how = in.byte();
    if (how < 0x80)
        return words[how % words.size()];
    // Raw bytes: controls, UTF-8 or not, long. Not NUL: D-Bus strings cannot hold it.
    const auto raw = in.take(in.byte() % 100);
    return std::string(raw.substr(0, raw.find('\0')));
}

OptionValue readValue(Reader& in)
{
    const auto type = in.byte();
    const auto form = in.byte();
    switch (type % 5) {
    case 0:
        return (form & 1) != 0;
    case 1: // u
        if (form < 0x80)
            return static_cast<uint32_t>(interesting[form % interesting.size()]);
        return static_cast<uint32_t>(in.bytes(4));
    case 2: // t
        if (form < 0x60)
            return interesting[form % interesting.size()];
        if (form < 0xc0)
            return in.bytes(2) * 512;
        if (form == 0xff)
            return std::numeric_limits<uint64_t>::max();
        return in.bytes(8);
    case 3:
        return readString(in);
    default: // a type options never have: i, x, as, h, v...
        return OtherType{std::string(in.take(form % 4 + 1))};
    }
}

std::string readKey(Reader& in)
{
    const auto k = in.byte();
    if (k < 0xe0)
        return keys[k % keys.size()];
    if (k < 0xf0) // near misses of known keys
        return std::string(keys[k % keys.size()]) + (k & 1 ? " " : "_");
    return readString(in);
}

bool validRef(const std::string& s)
{
    // API.md: 1-63 bytes of [A-Za-z0-9._-], not all digits, not "." or "..".
    if (s.empty() || s.size() > 63 || s == "." || s == "..")
        return false;
    bool digitsOnly = true;
    for (const unsigned char c : s) {
        const bool digit = c >= '0' && c <= '9';
        digitsOnly = digitsOnly && digit;
        if (!digit && !(c >= 'a' && c <= 'z') && !(c >= 'A' && c <= 'Z') && c != '.' && c != '_' && c != '-')
            return false;
    }
    return !digitsOnly;
}

// The documented table, independent of options.cpp: whether one entry is valid.
bool validEntry(const std::string& key, const OptionValue& value)
{
    const auto* b = std::get_if<bool>(&value);
    const auto* u = std::get_if<uint32_t>(&value);
    const auto* t = std::get_if<uint64_t>(&value);
    const auto* s = std::get_if<std::string>(&value);
    if (key == "read-only" || key == "direct-io" || key == "partscan" || key == "autoclear" || key == "hidden")
        return b;
    if (key == "offset" || key == "size-limit")
        return t && *t % 512 == 0;
    if (key == "sector-size")
        return u && (*u == 512 || *u == 1024 || *u == 2048 || *u == 4096);
    if (key == "timeout-usec")
        return t && *t >= 1 && *t <= maxTimeoutUsec;
    if (key == "lifetime")
        return s && (*s == "persistent" || *s == "client" || *s == "fd");
    if (key == "readiness")
        return s && (*s == "auto" || *s == "udev" || *s == "kernel");
    if (key == "ref")
        return s && validRef(*s);
    return false;
}

bool validUtf8(std::string_view s)
{
    for (std::size_t i = 0; i < s.size();) {
        const auto c = static_cast<unsigned char>(s[i]);
        const std::size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (n == 0 || i + n > s.size())
            return false;
        for (std::size_t k = 1; k < n; ++k)
            if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80)
                return false;
        i += n;
    }
    return true;
}

// D-Bus hands loopd only valid UTF-8 (sd-bus checks), and an error reply whose
// message is not valid UTF-8 cannot be sent: the caller gets "Failed to create
// method error reply" instead of InvalidArgument.
bool allUtf8(const OptionMap& map)
{
    for (const auto& [key, value] : map) {
        const auto* s = std::get_if<std::string>(&value);
        const auto* other = std::get_if<OtherType>(&value);
        if (!validUtf8(key) || (s && !validUtf8(*s)) || (other && !validUtf8(other->signature)))
            return false;
    }
    return true;
}

// Messages go out as D-Bus strings, so they must be valid UTF-8 whatever the caller
// sent (options.cpp once cut a quoted ref inside a UTF-8 sequence; reproducer:
// tests/fuzz/known-bugs/options-ref-utf8-cut).
bool checkUtf8()
{
    return true;
}

template <typename T> T given(const OptionMap& map, const char* key, T fallback)
{
    const auto it = map.find(key);
    return it == map.end() ? fallback : std::get<T>(it->second);
}

void checkAccepted(const OptionMap& map, AttachOptions o)
{
    if (fuzz::sabotage() == "widen" && o.offset > 0)
        o.offset += 1; // as if an offset off the 512-byte grid got through
    FUZZ_CHECK(o.offset % 512 == 0, "offset %llu", static_cast<unsigned long long>(o.offset));
    FUZZ_CHECK(o.sizeLimit % 512 == 0, "size-limit %llu", static_cast<unsigned long long>(o.sizeLimit));
    FUZZ_CHECK(o.sectorSize == 512 || o.sectorSize == 1024 || o.sectorSize == 2048 || o.sectorSize == 4096,
               "sector-size %u", o.sectorSize);
    FUZZ_CHECK(o.timeout.count() >= 1 && static_cast<uint64_t>(o.timeout.count()) <= maxTimeoutUsec,
               "timeout-usec %lld", static_cast<long long>(o.timeout.count()));
    FUZZ_CHECK(o.ref.empty() || validRef(o.ref), "ref of %zu bytes", o.ref.size());
    FUZZ_CHECK(o.ref.size() <= maxRefLength, "ref longer than lo_file_name");
    FUZZ_CHECK(o.lifetime == Lifetime::Persistent || o.lifetime == Lifetime::Client || o.lifetime == Lifetime::Fd,
               "lifetime");
    FUZZ_CHECK(o.readiness == ReadinessMode::Auto || o.readiness == ReadinessMode::Udev ||
                   o.readiness == ReadinessMode::Kernel,
               "readiness");
    // What was asked is what is applied; what was not asked is the documented default.
    FUZZ_CHECK(o.readOnly == given(map, "read-only", false), "read-only");
    FUZZ_CHECK(o.directIo == given(map, "direct-io", false), "direct-io");
    FUZZ_CHECK(o.partscan == given(map, "partscan", true), "partscan");
    FUZZ_CHECK(o.autoclear == given(map, "autoclear", false), "autoclear");
    FUZZ_CHECK(o.hidden == given(map, "hidden", false), "hidden");
    FUZZ_CHECK(o.offset == given<uint64_t>(map, "offset", 0), "offset not as given");
    FUZZ_CHECK(o.sizeLimit == given<uint64_t>(map, "size-limit", 0), "size-limit not as given");
    FUZZ_CHECK(o.sectorSize == given<uint32_t>(map, "sector-size", 512), "sector-size not as given");
    FUZZ_CHECK(static_cast<uint64_t>(o.timeout.count()) == given<uint64_t>(map, "timeout-usec", 10'000'000),
               "timeout-usec not as given");
    FUZZ_CHECK(o.ref == given<std::string>(map, "ref", ""), "ref not as given");
    const auto lifetime = given<std::string>(map, "lifetime", "persistent");
    FUZZ_CHECK((o.lifetime == Lifetime::Client) == (lifetime == "client"), "lifetime not as given");
    FUZZ_CHECK((o.lifetime == Lifetime::Fd) == (lifetime == "fd"), "lifetime fd not as given");
    const auto readiness = given<std::string>(map, "readiness", "auto");
    FUZZ_CHECK(o.readiness == (readiness == "udev"     ? ReadinessMode::Udev
                               : readiness == "kernel" ? ReadinessMode::Kernel
                                                       : ReadinessMode::Auto),
               "readiness not as given");
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size)
{
    Reader in(data, size);
    OptionMap map;
    for (unsigned n = in.byte() % 12; n > 0 && !in.empty(); --n) {
        auto key = readKey(in);
        map.insert_or_assign(std::move(key), readValue(in));
    }
    std::optional<std::string> offending; // the documented verdict, before asking the parser
    for (const auto& [key, value] : map)
        if (!validEntry(key, value))
            offending = offending.value_or(key);

    try {
        const auto parsed = parseAttachOptions(map);
        FUZZ_CHECK(!offending, "option '%s' was accepted", offending->c_str());
        checkAccepted(map, parsed);
    } catch (const Error& e) {
        FUZZ_CHECK(offending, "a valid map was refused: %s", e.what());
        FUZZ_CHECK(e.code() == Errc::InvalidArgument, "refused with %s", errcName(e.code()));
        const std::string message = e.what();
        bool named = false;
        for (const auto& [key, value] : map)
            named = named || (!validEntry(key, value) && message.find("'" + key + "'") != std::string::npos);
        FUZZ_CHECK(named, "the error names no offending key: %s", message.c_str());
        FUZZ_CHECK(!checkUtf8() || !allUtf8(map) || validUtf8(message), "error message not UTF-8: %s", message.c_str());
    } // anything else escapes and libFuzzer reports it as a crash

    try {
        // Detach knows one option, deferred (b).
        const bool onlyDeferred =
            map.size() == 1 && map.count("deferred") && std::holds_alternative<bool>(map.begin()->second);
        parseDetachOptions(map);
        FUZZ_CHECK(map.empty() || onlyDeferred, "Detach accepted %zu options", map.size());
    } catch (const Error& e) {
        FUZZ_CHECK(!map.empty() && e.code() == Errc::InvalidArgument, "Detach refused nothing: %s", e.what());
        const bool onlyDeferred =
            map.size() == 1 && map.count("deferred") && std::holds_alternative<bool>(map.begin()->second);
        FUZZ_CHECK(!onlyDeferred, "Detach refused deferred: %s", e.what());
    }
    return 0;
}
