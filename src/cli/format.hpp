#pragma once

#include <cstdint>
#include <string>

// Values as admins read them: IEC sizes, local times, user names, and the
// escapes and colours of a terminal. Plain functions of their arguments (and of
// the time zone and user database), shared by status, list and monitor.
namespace loopctl {

// 512 -> "512B", 67108864 -> "64.0M" (powers of 1024, one decimal, as lsblk).
std::string iecSize(uint64_t bytes);
// CLOCK_REALTIME microseconds in local time, strftime `format`, e.g.
// "%a %Y-%m-%d %H:%M:%S %Z"; with `millis`, ".mmm" after the seconds of format.
std::string localTime(uint64_t usec, const char* format, bool millis = false);
// How long before `nowUsec` `thenUsec` was, as systemctl says it: "5s ago",
// "3min 2s ago", "2h 5min ago", "3 days 4h ago".
std::string ago(uint64_t thenUsec, uint64_t nowUsec);
uint64_t realtimeUsec();
// "root" for 0; the decimal uid when the user database has no name for it.
std::string userName(uint32_t uid);
// A dev_t as the kernel and stat(2) give it -> "254:1".
std::string majorMinor(uint64_t dev);
// For --raw output: every byte that would split a field or a line (space,
// control characters, backslash, DEL) as \xHH, as losetup -r and lsblk -r do.
std::string escapeRaw(const std::string& value);
// For text from elsewhere shown on a terminal (journal messages): control
// characters as \xHH, so nothing can move the cursor or forge a line.
std::string escapeControl(const std::string& value);

// ANSI colours, only when `fd` is a terminal that is not "dumb" and NO_COLOR is
// unset or empty (https://no-color.org); otherwise every sequence is "".
struct Colours {
    explicit Colours(int fd);
    const char* green() const { return on ? "\033[0;1;32m" : ""; }
    const char* yellow() const { return on ? "\033[0;1;33m" : ""; }
    const char* red() const { return on ? "\033[0;1;31m" : ""; }
    const char* bold() const { return on ? "\033[1m" : ""; }
    const char* reset() const { return on ? "\033[0m" : ""; }
    bool on;
};

} // namespace loopctl
