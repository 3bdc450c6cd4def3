#include "record_store.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <spdlog/spdlog.h>
#include <sstream>
#include <system_error>

namespace loopd::service {

namespace fs = std::filesystem;

RecordStore::RecordStore(std::string dir) : dir_(std::move(dir))
{
    fs::create_directories(dir_);
}

std::string RecordStore::pathOf(const core::Record& record) const
{
    if (record.state == core::Record::State::Intent)
        return dir_ + "/intent-" + record.token + ".json";
    return dir_ + "/" + std::to_string(record.info.diskseq) + ".json";
}

void RecordStore::write(const core::Record& record) const
{
    const auto path = pathOf(record);
    const auto temporary = path + ".tmp";
    {
        std::ofstream out(temporary, std::ios::trunc);
        out << core::serialize(record) << std::flush;
        if (!out)
            throw std::system_error(errno, std::generic_category(), "write " + temporary);
    }
    if (::rename(temporary.c_str(), path.c_str()) < 0)
        throw std::system_error(errno, std::generic_category(), "rename " + temporary);
}

void RecordStore::remove(const core::Record& record) const
{
    std::error_code ec;
    fs::remove(pathOf(record), ec);
}

std::vector<core::Record> RecordStore::loadAll() const
{
    std::vector<core::Record> records;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir_, ec)) {
        if (entry.path().extension() != ".json") {
            fs::remove(entry.path(), ec); // a temporary file of a write that a crash cut short
            continue;
        }
        std::ifstream in(entry.path());
        std::stringstream text;
        text << in.rdbuf();
        if (auto record = core::parseRecord(text.str()))
            records.push_back(std::move(*record));
        else {
            spdlog::warn("dropping unreadable ownership record {}", entry.path().string());
            fs::remove(entry.path(), ec);
        }
    }
    return records;
}

} // namespace loopd::service
