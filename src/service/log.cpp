// loopd's log (include/loopd/log.hpp) on spdlog: one synchronous logger, so that a
// sink runs on the logging thread and sees its log::current() context.
#include "log.hpp"

#include "journal_sink.hpp"

#include <loopd/utf8.hpp>

#include <spdlog/logger.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <sys/stat.h>

#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <memory>

namespace loopd::log {
namespace {

thread_local Context context;
std::atomic<Level> threshold{Level::info};

// Before setupLogging (and in tests): plain lines on stderr.
std::shared_ptr<spdlog::logger>& logger()
{
    static auto instance = [] {
        auto console = std::make_shared<spdlog::logger>("loopd", std::make_shared<spdlog::sinks::stderr_sink_mt>());
        console->set_pattern("%Y-%m-%d %H:%M:%S.%e %l %v");
        console->set_level(spdlog::level::trace); // log::enabled() filters first
        return console;
    }();
    return instance;
}

spdlog::level::level_enum spdlogLevel(Level level)
{
    static constexpr spdlog::level::level_enum levels[] = {spdlog::level::trace, spdlog::level::debug,
                                                           spdlog::level::info,  spdlog::level::warn,
                                                           spdlog::level::err,   spdlog::level::critical};
    return levels[static_cast<int>(level)];
}

} // namespace

std::optional<Level> parseLevel(std::string_view name)
{
    static constexpr std::string_view names[] = {"trace", "debug", "info", "warn", "error", "critical"};
    for (int i = 0; i < 6; ++i)
        if (name == names[i])
            return static_cast<Level>(i);
    return std::nullopt;
}

bool enabled(Level level) noexcept
{
    return level >= threshold.load(std::memory_order_relaxed);
}

Scope::Scope(const Context& inner) : outer_(context)
{
    if (inner.diskseq != 0)
        context.diskseq = inner.diskseq;
    if (!inner.device.empty())
        context.device = inner.device;
    if (!inner.ref.empty())
        context.ref = inner.ref;
    if (inner.callerUid)
        context.callerUid = inner.callerUid;
    if (inner.request != 0)
        context.request = inner.request;
}

Scope::~Scope()
{
    context = std::move(outer_);
}

const Context& current() noexcept
{
    return context;
}

std::string escaped(std::string_view text)
{
    std::string out;
    out.reserve(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) {
        const char c = text[i];
        const auto byte = static_cast<unsigned char>(c);
        // journalctl shows a message that is not UTF-8 as "[N blob data]", and a
        // file name in it need not be: what is not is written as \xNN, and so are
        // the C1 controls (U+0080..U+009F, \xc2\x80..\xc2\x9f), which it takes as
        // unprintable too.
        const bool c1 = byte == 0xc2 && i + 1 < text.size() && static_cast<unsigned char>(text[i + 1]) < 0xa0;
        if (const auto n = byte >= 0x80 && !c1 ? validUtf8Character(text.substr(i)) : 0; n > 0) {
            out.append(text.substr(i, n));
            i += n - 1;
        } else if (byte >= 0x20 && byte != 0x7f && c != '\\' && byte < 0x80)
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

void write(Level level, std::string_view message, const Where& where) noexcept
{
    try {
        logger()->log(spdlog::source_loc{where.file, where.line, where.function}, spdlogLevel(level), escaped(message));
    } catch (...) {
        // Out of memory while logging: the line is lost, the caller goes on.
    }
}

} // namespace loopd::log

namespace loopd::service {
namespace {

bool stderrIsJournal()
{
    const char* stream = std::getenv("JOURNAL_STREAM");
    uintmax_t device = 0;
    uintmax_t inode = 0;
    struct stat st {};
    return stream && std::sscanf(stream, "%" SCNuMAX ":%" SCNuMAX, &device, &inode) == 2 &&
           ::fstat(STDERR_FILENO, &st) == 0 && st.st_dev == device && st.st_ino == inode;
}

} // namespace

std::optional<LogTarget> parseLogTarget(std::string_view name)
{
    if (name == "auto")
        return LogTarget::Automatic;
    if (name == "journal")
        return LogTarget::Journal;
    if (name == "console")
        return LogTarget::Console;
    return std::nullopt;
}

void setupLogging(log::Level threshold, LogTarget target)
{
    const bool journal = target == LogTarget::Journal || (target == LogTarget::Automatic && stderrIsJournal());
    auto& logger = log::logger();
    if (journal) {
        logger = std::make_shared<spdlog::logger>("loopd", std::make_shared<JournalSink>());
        logger->set_pattern("%v"); // the journal has the time and the level
        logger->set_level(spdlog::level::trace);
    }
    log::threshold = threshold;
}

} // namespace loopd::service
