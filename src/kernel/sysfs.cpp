#include "sysfs.hpp"

#include <cerrno>
#include <fstream>
#include <system_error>

namespace loopd::kernel {
namespace {

std::optional<std::string> readLine(const std::string& path)
{
    std::ifstream in(path);
    std::string line;
    if (!in || !std::getline(in, line))
        return std::nullopt;
    return line;
}

std::string blockDir(unsigned number)
{
    return "/sys/block/loop" + std::to_string(number);
}

} // namespace

std::optional<uint64_t> sysfsDiskseq(unsigned number)
{
    const auto line = readLine(blockDir(number) + "/diskseq");
    if (!line)
        return std::nullopt;
    return std::stoull(*line);
}

std::optional<std::string> sysfsBackingFile(unsigned number)
{
    return readLine(blockDir(number) + "/loop/backing_file");
}

std::optional<bool> sysfsAutoclear(unsigned number)
{
    const auto line = readLine(blockDir(number) + "/loop/autoclear");
    if (!line)
        return std::nullopt;
    return *line == "1";
}

void triggerChange(unsigned number, unsigned partition, const std::string& uuid)
{
    auto path = blockDir(number);
    if (partition != 0)
        path += "/loop" + std::to_string(number) + "p" + std::to_string(partition);
    path += "/uevent";
    std::ofstream out(path);
    out << "change " << uuid << std::flush;
    if (!out)
        throw std::system_error(errno, std::generic_category(), "write " + path);
}

} // namespace loopd::kernel
