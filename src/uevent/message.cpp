#include "message.hpp"

#include <cstring>
#include <limits>
#include <string_view>

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
    const auto [number, partition] = *name;
    return Uevent{source, parseAction(action), number, partition, parseDiskseq(diskseq), synthUuid ? synthUuid : ""};
}

} // namespace loopd::uevent
