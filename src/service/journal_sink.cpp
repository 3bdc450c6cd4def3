#include "journal_sink.hpp"

#include <loopd/log.hpp>

#include <sys/uio.h>
// sd-journal.h's sd_journal_sendv macro would add this file's own CODE_FILE=,
// CODE_LINE= and CODE_FUNC= beside the caller's.
#define SD_JOURNAL_SUPPRESS_LOCATION
#include <systemd/sd-journal.h>
#include <unistd.h>

#include <string>
#include <string_view>
#include <vector>

namespace loopd::service {
namespace {

int syslogPriority(spdlog::level::level_enum level)
{
    switch (level) {
    case spdlog::level::critical:
        return 2;
    case spdlog::level::err:
        return 3;
    case spdlog::level::warn:
        return 4;
    case spdlog::level::info:
        return 6;
    default:
        return 7;
    }
}

std::vector<std::string> fieldsOf(const spdlog::details::log_msg& message)
{
    std::vector<std::string> fields;
    fields.reserve(12);
    fields.push_back("MESSAGE=" + std::string(message.payload.data(), message.payload.size()));
    fields.push_back("PRIORITY=" + std::to_string(syslogPriority(message.level)));
    fields.push_back("SYSLOG_IDENTIFIER=loopd");
    if (message.source.filename) {
        std::string_view file = message.source.filename;
        while (file.substr(0, 3) == "../") // the compiler's path from the build directory
            file.remove_prefix(3);
        fields.push_back("CODE_FILE=" + std::string(file));
        fields.push_back("CODE_LINE=" + std::to_string(message.source.line));
    }
    if (message.source.funcname)
        fields.push_back(std::string("CODE_FUNC=") + message.source.funcname);
    const auto& context = log::current();
    if (context.diskseq != 0)
        fields.push_back("DISKSEQ=" + std::to_string(context.diskseq));
    if (!context.device.empty())
        fields.push_back("LOOPD_DEVICE=" + context.device);
    if (!context.ref.empty())
        fields.push_back("LOOPD_REF=" + log::escaped(context.ref));
    if (context.callerUid)
        fields.push_back("LOOPD_CALLER_UID=" + std::to_string(*context.callerUid));
    if (context.request != 0)
        fields.push_back("LOOPD_REQUEST=" + std::to_string(context.request));
    return fields;
}

} // namespace

void JournalSink::sink_it_(const spdlog::details::log_msg& message)
{
    const auto fields = fieldsOf(message);
    std::vector<iovec> parts;
    parts.reserve(fields.size());
    for (const auto& field : fields)
        parts.push_back({const_cast<char*>(field.data()), field.size()});
    if (sd_journal_sendv(parts.data(), static_cast<int>(parts.size())) >= 0)
        return;
    // No journald to take it (stopped, or not there yet): the line goes to stderr
    // rather than nowhere.
    const auto line = fields.front().substr(8) + "\n";
    [[maybe_unused]] auto written = ::write(STDERR_FILENO, line.data(), line.size());
}

} // namespace loopd::service
