#include "record_store.hpp"

#include "worker_pool.hpp"

#include <loopd/log.hpp>
#include <loopd/unique_fd.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <exception>
#include <filesystem>
#include <optional>
#include <string_view>
#include <system_error>

namespace loopd::service {

namespace fs = std::filesystem;

RecordStore::RecordStore(std::string dir) : dir_(std::move(dir))
{
    fs::create_directories(dir_);
}

namespace {
// The unit the kernel copies a write in; see the class comment.
constexpr std::size_t recordPage = 4096;
} // namespace

std::string RecordStore::pathOf(const core::Record& record) const
{
    return dir_ + "/" + record.token + ".json";
}

void RecordStore::write(const core::Record& record) const
{
    const auto path = pathOf(record);
    auto text = core::serialize(record);
    if (text.size() >= recordPage)
        return replace(path, text);
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!fd)
        throw std::system_error(errno, std::generic_category(), "open " + path);
    struct stat st {};
    if (::fstat(fd.get(), &st) < 0)
        throw std::system_error(errno, std::generic_category(), "stat " + path);
    if (static_cast<std::size_t>(st.st_size) > recordPage) // an earlier long record: its tail would stay
        return replace(path, text);
    // JSON ends at the object; the spaces after it are whitespace to any parser.
    text.resize(recordPage - 1, ' ');
    text.push_back('\n');
    const auto written = ::pwrite(fd.get(), text.data(), text.size(), 0);
    if (written != static_cast<ssize_t>(text.size()))
        throw std::system_error(written < 0 ? errno : EIO, std::generic_category(), "write " + path);
}

namespace {

[[noreturn]] void fail(int err, const std::string& what)
{
    throw std::system_error(err, std::generic_category(), what);
}

// All of text to fd, short writes and EINTR retried.
void writeAll(int fd, std::string_view text, const std::string& path)
{
    while (!text.empty()) {
        const auto written = ::write(fd, text.data(), text.size());
        if (written < 0 && errno == EINTR)
            continue;
        if (written <= 0)
            fail(written < 0 ? errno : EIO, "write " + path);
        text.remove_prefix(static_cast<std::size_t>(written));
    }
}

} // namespace

// No fsync: only loopd's own death matters (see the class comment; the records
// live in /run), and against that rename() is atomic. A flush would only block.
void RecordStore::replace(const std::string& path, const std::string& text) const
{
    const auto temporary = path + ".tmp";
    // As write() opens a record: never through a symlink, never readable by others
    // whatever the umask. O_TRUNC: a temporary left by a replace that failed.
    UniqueFd fd(::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!fd)
        fail(errno, "open " + temporary);
    try {
        writeAll(fd.get(), text, temporary);
        if (::close(fd.release()) < 0)
            fail(errno, "close " + temporary);
        if (::rename(temporary.c_str(), path.c_str()) < 0)
            fail(errno, "rename " + temporary);
    } catch (...) {
        ::unlink(temporary.c_str()); // best effort: loadAll() removes any that remain
        throw;
    }
}

void RecordStore::remove(const core::Record& record) const
{
    std::error_code ec;
    fs::remove(pathOf(record), ec);
}

namespace {

// A record's text without the spaces that pad it to a page: JSON whitespace, but
// nlohmann's lexer takes them one character at a time, most of a restart's CPU
// with 4096 records. An unreadable file reads as empty (parseRecord refuses it).
std::string readRecord(const std::string& path)
{
    std::string text;
    const UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (!fd)
        return text;
    char buffer[recordPage];
    for (;;) {
        const auto got = ::read(fd.get(), buffer, sizeof buffer);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        text.append(buffer, static_cast<std::size_t>(got));
    }
    // Not find_last_not_of(" \t\r\n"), which calls memchr for each of the ~3500
    // padding bytes (13 % of a restart's CPU with 4096 records): eight spaces at a
    // time, then byte by byte.
    const auto isBlank = [](char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; };
    auto end = text.size();
    while (end >= 8 && std::string_view(text).substr(end - 8, 8) == "        ")
        end -= 8;
    while (end > 0 && isBlank(text[end - 1]))
        --end;
    text.resize(end);
    return text;
}

} // namespace

std::vector<core::Record> RecordStore::loadAll() const
{
    std::vector<std::string> paths;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir_, ec)) {
        if (entry.path().extension() == ".json")
            paths.push_back(entry.path().string());
        else
            fs::remove(entry.path(), ec); // a temporary file of a write that a crash cut short
    }
    // Read and parsed on a few threads: an open, a read and a close each, 4096 of
    // them after a restart with as many devices held. A file that does not parse
    // as a record is dropped; anything else that fails (out of memory) keeps every
    // file and fails the start, as a single thread's throw did.
    std::vector<std::optional<core::Record>> parsed(paths.size());
    std::vector<std::exception_ptr> failed(paths.size());
    spread(paths.size(), [&](std::size_t i) {
        try {
            parsed[i] = core::parseRecord(readRecord(paths[i]));
        } catch (...) {
            failed[i] = std::current_exception();
        }
    });
    for (const auto& failure : failed)
        if (failure)
            std::rethrow_exception(failure);
    std::vector<core::Record> records;
    records.reserve(paths.size());
    for (std::size_t i = 0; i < paths.size(); ++i) {
        if (parsed[i]) {
            records.push_back(std::move(*parsed[i]));
        } else {
            log::warn("dropping unreadable ownership record {}", paths[i]);
            fs::remove(paths[i], ec);
        }
    }
    return records;
}

} // namespace loopd::service
