#include "journal.hpp"

#include "format.hpp"

#include <systemd/sd-id128.h>
#include <systemd/sd-journal.h>

#include <memory>
#include <string>
#include <vector>

namespace loopctl {

namespace {

struct CloseJournal {
    void operator()(sd_journal* journal) const { sd_journal_close(journal); }
};
using Journal = std::unique_ptr<sd_journal, CloseJournal>;

// The value of field `name` of the current entry, or "" if it has none.
std::string field(sd_journal* journal, const char* name)
{
    const void* data = nullptr;
    size_t length = 0;
    if (sd_journal_get_data(journal, name, &data, &length) < 0)
        return {};
    const std::string entry(static_cast<const char*>(data), length);
    const auto equals = entry.find('=');
    return equals == std::string::npos ? std::string() : entry.substr(equals + 1);
}

// "Dec 01 17:02:03 host loopd[123]: message"
std::string shortLine(sd_journal* journal)
{
    uint64_t usec = 0;
    if (sd_journal_get_realtime_usec(journal, &usec) < 0)
        return {};
    std::string who = field(journal, "SYSLOG_IDENTIFIER");
    if (who.empty())
        who = field(journal, "_COMM");
    if (const auto pid = field(journal, "_PID"); !pid.empty())
        who += "[" + pid + "]";
    return localTime(usec, "%b %d %H:%M:%S") + " " + field(journal, "_HOSTNAME") + " " + who + ": " +
           escapeControl(field(journal, "MESSAGE"));
}

std::vector<std::string> lastLines(uint64_t diskseq, unsigned count)
{
    sd_journal* opened = nullptr;
    if (sd_journal_open(&opened, SD_JOURNAL_LOCAL_ONLY) < 0)
        return {};
    const Journal journal(opened);
    sd_id128_t boot{};
    char bootId[SD_ID128_STRING_MAX];
    const auto seq = "DISKSEQ=" + std::to_string(diskseq);
    if (sd_id128_get_boot(&boot) < 0 || sd_journal_add_match(opened, seq.c_str(), 0) < 0)
        return {};
    const auto bootMatch = std::string("_BOOT_ID=") + sd_id128_to_string(boot, bootId);
    if (sd_journal_add_match(opened, bootMatch.c_str(), 0) < 0 || sd_journal_seek_tail(opened) < 0)
        return {};
    std::vector<std::string> lines;
    while (lines.size() < count && sd_journal_previous(opened) > 0)
        if (auto line = shortLine(opened); !line.empty())
            lines.push_back(std::move(line));
    return {lines.rbegin(), lines.rend()};
}

} // namespace

void printJournalTail(std::ostream& out, uint64_t diskseq, unsigned lines)
{
    if (lines == 0)
        return;
    try {
        const auto entries = lastLines(diskseq, lines);
        if (entries.empty())
            return;
        out << '\n';
        for (const auto& line : entries)
            out << line << '\n';
    } catch (...) { // bad_alloc at worst: the journal is an extra, never the answer
    }
}

} // namespace loopctl
