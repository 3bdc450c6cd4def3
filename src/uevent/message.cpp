#include "message.hpp"

#include <cstring>
#include <limits>
#include <map>
#include <string>

namespace loopd::uevent {

std::optional<std::pair<unsigned, unsigned>> parseLoopName(const char* sysname)
{
    if (!sysname || std::strncmp(sysname, "loop", 4) != 0)
        return std::nullopt;
    const char* p = sysname + 4;
    auto digits = [](const char*& q, unsigned& out) {
        if (*q < '0' || *q > '9')
            return false;
        unsigned long v = 0;
        while (*q >= '0' && *q <= '9' && v < 100'000'000)
            v = v * 10 + static_cast<unsigned>(*q++ - '0');
        out = static_cast<unsigned>(v);
        return true;
    };
    unsigned number = 0, partition = 0;
    if (!digits(p, number))
        return std::nullopt;
    if (*p == 'p' && !digits(++p, partition))
        return std::nullopt;
    if (*p != '\0')
        return std::nullopt;
    return std::pair{number, partition};
}

UeventAction parseAction(const char* action)
{
    const std::string_view a = action ? action : "";
    if (a == "add")
        return UeventAction::Add;
    if (a == "change")
        return UeventAction::Change;
    if (a == "remove")
        return UeventAction::Remove;
    return UeventAction::Other;
}

uint64_t parseDiskseq(const char* text)
{
    if (!text || !*text)
        return 0;
    uint64_t value = 0;
    for (const char* p = text; *p; ++p) {
        if (*p < '0' || *p > '9')
            return 0;
        const auto digit = static_cast<uint64_t>(*p - '0');
        if (value > (std::numeric_limits<uint64_t>::max() - digit) / 10)
            return 0;
        value = value * 10 + digit;
    }
    return value;
}

std::optional<Uevent> makeUevent(EventSource source, const char* action, const char* sysname, const char* diskseq,
                                 const char* synthUuid)
{
    const auto name = parseLoopName(sysname);
    if (!name)
        return std::nullopt;
    return Uevent{source, parseAction(action), name->first, name->second, parseDiskseq(diskseq),
                  synthUuid ? synthUuid : ""};
}

std::optional<Uevent> parseKernelUevent(std::string_view message)
{
    // Fields are NUL-terminated; the last one may lack its NUL (a truncated read).
    auto next = [&message]() {
        const auto end = message.find('\0');
        const auto field = message.substr(0, end);
        message.remove_prefix(end == std::string_view::npos ? message.size() : end + 1);
        return field;
    };
    const auto header = next();
    const auto at = header.find('@');
    if (at == 0 || at == std::string_view::npos)
        return std::nullopt; // also rejects udevd's "libudev" messages
    std::map<std::string, std::string, std::less<>> properties;
    while (!message.empty()) {
        const auto field = next();
        const auto equals = field.find('=');
        if (equals == 0 || equals == std::string_view::npos)
            return std::nullopt;
        properties.insert_or_assign(std::string(field.substr(0, equals)), std::string(field.substr(equals + 1)));
    }
    auto get = [&properties](std::string_view key) -> const std::string* {
        const auto it = properties.find(key);
        return it == properties.end() ? nullptr : &it->second;
    };
    const auto* action = get("ACTION");
    const auto* devpath = get("DEVPATH");
    const auto* subsystem = get("SUBSYSTEM");
    if (!action || !devpath || !subsystem || *subsystem != "block" || *action != header.substr(0, at) ||
        *devpath != header.substr(at + 1))
        return std::nullopt;
    const auto slash = devpath->rfind('/');
    const auto sysname = slash == std::string::npos ? *devpath : devpath->substr(slash + 1);
    const auto* diskseq = get("DISKSEQ");
    const auto* uuid = get("SYNTH_UUID");
    return makeUevent(EventSource::Kernel, action->c_str(), sysname.c_str(), diskseq ? diskseq->c_str() : nullptr,
                      uuid ? uuid->c_str() : nullptr);
}

} // namespace loopd::uevent
