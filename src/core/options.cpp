#include "options.hpp"

#include <loopd/error.hpp>

#include <algorithm>
#include <functional>

namespace loopd::core {
namespace {

std::string typeName(const OptionValue& value)
{
    static const char* const names[] = {"b", "u", "t", "s"};
    if (const auto* other = std::get_if<OtherType>(&value))
        return other->signature;
    return names[value.index()];
}

template <typename T> const T& expect(const std::string& key, const OptionValue& value, const char* signature)
{
    if (const auto* v = std::get_if<T>(&value))
        return *v;
    throw Error(Errc::InvalidArgument,
                "option '" + key + "' must have type '" + signature + "', got '" + typeName(value) + "'");
}

[[noreturn]] void badValue(const std::string& key, const std::string& why)
{
    throw Error(Errc::InvalidArgument, "option '" + key + "': " + why);
}

// The refused value as ASCII, to quote in a message: D-Bus strings must be valid
// UTF-8, and a cut (or any) byte sequence from the caller need not be.
std::string printable(const std::string& value)
{
    std::string out;
    for (const unsigned char c : value) {
        if (c >= 0x20 && c < 0x7f && c != '\\') {
            out += static_cast<char>(c);
        } else {
            static const char hex[] = "0123456789abcdef";
            out += {'\\', 'x', hex[c >> 4], hex[c & 15]};
        }
    }
    return out;
}

uint64_t multipleOf512(const std::string& key, uint64_t bytes)
{
    if (bytes % 512 != 0)
        badValue(key, std::to_string(bytes) + " is not a multiple of 512");
    return bytes;
}

using Setter = std::function<void(AttachOptions&, const std::string&, const OptionValue&)>;

const std::map<std::string, Setter, std::less<>>& attachSetters()
{
    static const std::map<std::string, Setter, std::less<>> setters{
        {"read-only", [](auto& o, auto& k, auto& v) { o.readOnly = expect<bool>(k, v, "b"); }},
        {"direct-io", [](auto& o, auto& k, auto& v) { o.directIo = expect<bool>(k, v, "b"); }},
        {"partscan", [](auto& o, auto& k, auto& v) { o.partscan = expect<bool>(k, v, "b"); }},
        {"autoclear", [](auto& o, auto& k, auto& v) { o.autoclear = expect<bool>(k, v, "b"); }},
        {"hidden", [](auto& o, auto& k, auto& v) { o.hidden = expect<bool>(k, v, "b"); }},
        {"offset", [](auto& o, auto& k, auto& v) { o.offset = multipleOf512(k, expect<uint64_t>(k, v, "t")); }},
        {"size-limit", [](auto& o, auto& k, auto& v) { o.sizeLimit = multipleOf512(k, expect<uint64_t>(k, v, "t")); }},
        {"sector-size",
         [](auto& o, auto& k, auto& v) {
             const auto size = expect<uint32_t>(k, v, "u");
             if (size != 512 && size != 1024 && size != 2048 && size != 4096)
                 badValue(k, std::to_string(size) + " is not one of 512, 1024, 2048, 4096");
             o.sectorSize = size;
         }},
        {"lifetime",
         [](auto& o, auto& k, auto& v) {
             const auto& s = expect<std::string>(k, v, "s");
             if (s != "persistent" && s != "client" && s != "fd")
                 badValue(k, "'" + s + "' is not 'persistent', 'client' or 'fd'");
             o.lifetime = s == "client" ? Lifetime::Client : s == "fd" ? Lifetime::Fd : Lifetime::Persistent;
         }},
        {"ref",
         [](auto& o, auto& k, auto& v) {
             const auto& s = expect<std::string>(k, v, "s");
             if (!isValidRef(s))
                 badValue(k, "'" + printable(s.substr(0, 80)) +
                                 "' is not 1 to 63 bytes of [A-Za-z0-9._-], not all digits, not '.' or '..'");
             o.ref = s;
         }},
        {"timeout-usec",
         [](auto& o, auto& k, auto& v) {
             const auto usec = expect<uint64_t>(k, v, "t");
             if (usec == 0 || usec > maxTimeoutUsec)
                 badValue(k, std::to_string(usec) + " is not between 1 and " + std::to_string(maxTimeoutUsec));
             o.timeout = std::chrono::microseconds(usec);
         }},
        {"readiness",
         [](auto& o, auto& k, auto& v) {
             const auto& s = expect<std::string>(k, v, "s");
             if (s == "auto")
                 o.readiness = ReadinessMode::Auto;
             else if (s == "udev")
                 o.readiness = ReadinessMode::Udev;
             else if (s == "kernel")
                 o.readiness = ReadinessMode::Kernel;
             else
                 badValue(k, "'" + s + "' is not 'auto', 'udev' or 'kernel'");
         }},
    };
    return setters;
}

} // namespace

bool isValidRef(const std::string& ref) noexcept
{
    if (ref.empty() || ref.size() > maxRefLength || ref == "." || ref == "..")
        return false;
    auto digit = [](char c) { return c >= '0' && c <= '9'; };
    // All digits would read as a diskseq wherever names resolve (WaitReady, loopctl).
    if (std::all_of(ref.begin(), ref.end(), digit))
        return false;
    return std::all_of(ref.begin(), ref.end(), [&](char c) {
        return digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '.' || c == '_' || c == '-';
    });
}

AttachOptions parseAttachOptions(const OptionMap& options)
{
    AttachOptions parsed;
    for (const auto& [key, value] : options) {
        const auto setter = attachSetters().find(key);
        if (setter == attachSetters().end())
            throw Error(Errc::InvalidArgument, "unknown option '" + key + "'");
        setter->second(parsed, key, value);
    }
    return parsed;
}

DetachOptions parseDetachOptions(const OptionMap& options)
{
    DetachOptions parsed;
    for (const auto& [key, value] : options) {
        if (key != "deferred")
            throw Error(Errc::InvalidArgument, "unknown option '" + key + "'");
        parsed.deferred = expect<bool>(key, value, "b");
    }
    return parsed;
}

OpenOptions parseOpenOptions(const OptionMap& options)
{
    OpenOptions parsed;
    for (const auto& [key, value] : options) {
        if (key == "partition")
            parsed.partition = expect<uint32_t>(key, value, "u");
        else if (key == "read-only")
            parsed.readOnly = expect<bool>(key, value, "b");
        else
            throw Error(Errc::InvalidArgument, "unknown option '" + key + "'");
    }
    return parsed;
}

void parseResizeOptions(const OptionMap& options)
{
    if (!options.empty())
        throw Error(Errc::InvalidArgument, "unknown option '" + options.begin()->first + "'");
}

} // namespace loopd::core
