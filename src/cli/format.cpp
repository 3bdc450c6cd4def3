#include "format.hpp"

#include <pwd.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <vector>

namespace loopctl {

std::string iecSize(uint64_t bytes)
{
    static constexpr std::array units{'B', 'K', 'M', 'G', 'T', 'P', 'E'};
    if (bytes < 1024)
        return std::to_string(bytes) + "B";
    double value = static_cast<double>(bytes);
    size_t unit = 0;
    // 1023.96M would print as "1024.0M": the next unit reads better ("1.0G").
    while (unit + 1 < units.size() && std::round(value * 10) / 10 >= 1024) {
        value /= 1024;
        ++unit;
    }
    char text[32];
    std::snprintf(text, sizeof text, "%.1f%c", value, units[unit]);
    return text;
}

std::string localTime(uint64_t usec, const char* format, bool millis)
{
    const time_t seconds = static_cast<time_t>(usec / 1'000'000);
    tm local{};
    if (!localtime_r(&seconds, &local))
        return std::to_string(usec);
    char text[128];
    if (std::strftime(text, sizeof text, format, &local) == 0)
        return std::to_string(usec);
    if (!millis)
        return text;
    char fraction[8];
    std::snprintf(fraction, sizeof fraction, ".%03u", static_cast<unsigned>(usec / 1000 % 1000));
    return text + std::string(fraction);
}

std::string ago(uint64_t thenUsec, uint64_t nowUsec)
{
    if (thenUsec > nowUsec)
        return "in the future";
    const uint64_t s = (nowUsec - thenUsec) / 1'000'000;
    auto n = [](uint64_t value, const char* unit) { return std::to_string(value) + unit; };
    if (s < 60)
        return n(s, "s ago");
    if (s < 3600)
        return n(s / 60, "min ") + n(s % 60, "s ago");
    if (s < 86400)
        return n(s / 3600, "h ") + n(s / 60 % 60, "min ago");
    return n(s / 86400, s / 86400 == 1 ? " day " : " days ") + n(s / 3600 % 24, "h ago");
}

uint64_t realtimeUsec()
{
    timespec now{};
    clock_gettime(CLOCK_REALTIME, &now); // cannot fail for CLOCK_REALTIME
    return static_cast<uint64_t>(now.tv_sec) * 1'000'000 + static_cast<uint64_t>(now.tv_nsec) / 1000;
}

std::string userName(uint32_t uid)
{
    long size = sysconf(_SC_GETPW_R_SIZE_MAX);
    std::vector<char> buffer(size > 0 ? static_cast<size_t>(size) : 16384);
    passwd entry{};
    passwd* found = nullptr;
    if (getpwuid_r(uid, &entry, buffer.data(), buffer.size(), &found) == 0 && found && found->pw_name)
        return found->pw_name;
    return std::to_string(uid);
}

std::string majorMinor(uint64_t dev)
{
    return std::to_string(major(dev)) + ":" + std::to_string(minor(dev));
}

namespace {

std::string escapeIf(const std::string& value, bool (*unsafe)(unsigned char))
{
    std::string out;
    for (const unsigned char c : value) {
        if (!unsafe(c)) {
            out += static_cast<char>(c);
            continue;
        }
        char hex[5];
        std::snprintf(hex, sizeof hex, "\\x%02x", c);
        out += hex;
    }
    return out;
}

} // namespace

std::string escapeRaw(const std::string& value)
{
    return escapeIf(value, [](unsigned char c) { return c <= ' ' || c == '\\' || c == 0x7f; });
}

std::string escapeControl(const std::string& value)
{
    return escapeIf(value, [](unsigned char c) { return (c < ' ' && c != '\t') || c == 0x7f; });
}

Colours::Colours(int fd)
{
    const char* noColor = std::getenv("NO_COLOR");
    const char* term = std::getenv("TERM");
    on = isatty(fd) && !(noColor && *noColor) && !(term && std::strcmp(term, "dumb") == 0);
}

} // namespace loopctl
