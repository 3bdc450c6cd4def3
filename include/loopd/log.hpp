#pragma once
// The daemon's log: one line per message, written with a single write(2) so lines
// of different threads never interleave.
//
// Under systemd (JOURNAL_STREAM is set) stderr is a stream into the journal, and a
// line that starts with "<N>" gets syslog priority N there (journald's
// SyslogLevelPrefix=, on by default): no journal library needed. Elsewhere a line
// starts with the local time and the level's name.
//
// Not spdlog: its shared library alone kept 0.5 MiB of loopd's RSS resident for a
// dozen formatted lines a second at most (tests/bench/RESULTS.md).
#include <fmt/format.h>

#include <unistd.h>

#include <ctime>
#include <optional>
#include <string>
#include <string_view>

namespace loopd::log {

enum class Level { trace, debug, info, warn, error, critical };

struct Config {
    Level threshold = Level::info;
    bool journal = false;
};

// Set once by main before any thread starts; read-only afterwards.
inline Config config;

inline std::optional<Level> parseLevel(std::string_view name)
{
    static constexpr std::string_view names[] = {"trace", "debug", "info", "warn", "error", "critical"};
    for (int i = 0; i < 6; ++i)
        if (name == names[i])
            return static_cast<Level>(i);
    return std::nullopt;
}

inline bool enabled(Level level) noexcept
{
    return level >= config.threshold;
}

// Control characters as C escapes (\n, \t, \xNN): a caller's path, ref or name
// with a newline never becomes a log line of its own (nor, with "<0>", one of
// journald's emergency lines).
inline std::string escaped(std::string_view text)
{
    std::string out;
    out.reserve(text.size());
    for (const char c : text) {
        const auto byte = static_cast<unsigned char>(c);
        if (byte >= 0x20 && byte != 0x7f && c != '\\')
            out += c;
        else if (c == '\n')
            out += "\\n";
        else if (c == '\t')
            out += "\\t";
        else if (c == '\\')
            out += "\\\\";
        else
            out += fmt::format("\\x{:02x}", byte);
    }
    return out;
}

inline void write(Level level, std::string_view raw) noexcept
{
    static constexpr int priorities[] = {7, 7, 6, 4, 3, 2}; // syslog: debug, info, warning, err, crit
    static constexpr std::string_view names[] = {"trace", "debug", "info", "warning", "error", "critical"};
    const auto index = static_cast<int>(level);
    try {
        const auto message = escaped(raw);
        std::string line;
        if (config.journal) {
            line = fmt::format("<{}>{}\n", priorities[index], message);
        } else {
            timespec now{};
            clock_gettime(CLOCK_REALTIME, &now);
            tm local{};
            localtime_r(&now.tv_sec, &local);
            char stamp[32];
            std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &local);
            line = fmt::format("{}.{:03} {} {}\n", stamp, now.tv_nsec / 1000000, names[index], message);
        }
        // A short write to a full or closed stderr loses a log line, nothing else.
        [[maybe_unused]] auto written = ::write(STDERR_FILENO, line.data(), line.size());
    } catch (...) {
        // Out of memory while logging: the line is lost, the caller goes on.
    }
}

// log::info("...", args), log::warn(...): one callable per level, checked formats.
template <Level level> struct At {
    template <typename... Args> void operator()(fmt::format_string<Args...> format, Args&&... args) const noexcept
    {
        if (!enabled(level))
            return;
        try {
            write(level, fmt::format(format, std::forward<Args>(args)...));
        } catch (...) {
            write(level, "(a log line could not be formatted)");
        }
    }
};

inline constexpr At<Level::trace> trace;
inline constexpr At<Level::debug> debug;
inline constexpr At<Level::info> info;
inline constexpr At<Level::warn> warn;
inline constexpr At<Level::error> error;
inline constexpr At<Level::critical> critical;

} // namespace loopd::log
