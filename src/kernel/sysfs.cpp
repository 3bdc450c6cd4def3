#include "sysfs.hpp"

#include <fstream>

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

} // namespace loopd::kernel
