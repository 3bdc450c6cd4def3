#pragma once
// The daemon's log, on spdlog (set up by src/service/log.cpp): one plain line per
// message on stderr, or under systemd one journal entry per message with
// structured fields, so that `journalctl -u loopd DISKSEQ=13` tells one
// attachment's story (DESIGN.md, "Logging").
//
//   log::info("attached dev={} diskseq={}", node, diskseq);
//   log::Scope about{{.diskseq = 13, .device = "/dev/loop0"}}; // for what follows
#include <fmt/format.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace loopd::log {

enum class Level { trace, debug, info, warn, error, critical };

std::optional<Level> parseLevel(std::string_view name);
bool enabled(Level level) noexcept;

// What a message is about: the journal's DISKSEQ=, LOOPD_DEVICE=, LOOPD_REF=,
// LOOPD_CALLER_UID= and LOOPD_REQUEST= (one id per D-Bus call). Unset fields
// (0, empty) are left out of the entry.
struct Context {
    uint64_t diskseq = 0;
    std::string device{}; // /dev/loopN
    std::string ref{};
    std::optional<uint32_t> callerUid{};
    uint64_t request = 0;
};

// The context of every message this thread logs while the scope lives. Nested
// scopes add to the outer one; a field the inner one sets wins.
class Scope {
public:
    explicit Scope(const Context& context);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

private:
    Context outer_;
};

// This thread's context (the sinks read it: spdlog's messages carry no fields).
const Context& current() noexcept;

// Control characters as C escapes (\n, \t, \xNN): a caller's path, ref or name
// with a newline never becomes a log line (or journal entry) of its own.
std::string escaped(std::string_view text);

// Where a message was logged (the journal's CODE_FILE=, CODE_LINE=, CODE_FUNC=).
struct Where {
    const char* file;
    int line;
    const char* function;
};

// One message, escaped, with this thread's context. Never throws.
void write(Level level, std::string_view message, const Where& where) noexcept;

// A checked format string and the place of the call. The builtins, not
// std::source_location: clang 14 (the fuzz build) has no std::source_location
// with libstdc++ 12; as default arguments they name the caller's place in both.
template <typename... Args> struct Format {
    template <typename Text>
    consteval Format(const Text& text, const char* file = __builtin_FILE(), int line = __builtin_LINE(),
                     const char* function = __builtin_FUNCTION())
        : text(text), where{file, line, function}
    {
    }
    fmt::format_string<Args...> text;
    Where where;
};

// log::info("...", args), log::warn(...): one callable per level.
template <Level level> struct At {
    template <typename... Args>
    void operator()(Format<std::type_identity_t<Args>...> format, Args&&... args) const noexcept
    {
        if (!enabled(level))
            return;
        try {
            write(level, fmt::format(format.text, std::forward<Args>(args)...), format.where);
        } catch (...) {
            write(level, "(a log line could not be formatted)", format.where);
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
