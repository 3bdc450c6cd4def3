#include "sysfs.hpp"

#include <fcntl.h>
#include <sys/stat.h>

#include <cerrno>
#include <filesystem>
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

std::optional<unsigned> loopNumberOf(int fd)
{
    // AT_STATX_DONT_SYNC: cached attributes only, so that a file on a filesystem
    // that does not answer (FUSE) cannot make the loop thread wait here.
    struct statx st {};
    if (::statx(fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_TYPE, &st) != 0 || !S_ISBLK(st.stx_mode))
        return std::nullopt;
    return loopNumberOfDevt(st.stx_rdev_major, st.stx_rdev_minor);
}

std::optional<unsigned> loopNumberOfDevt(unsigned major, unsigned minor)
{
    std::error_code ec;
    const auto target =
        std::filesystem::read_symlink("/sys/dev/block/" + std::to_string(major) + ":" + std::to_string(minor), ec);
    if (ec)
        return std::nullopt;
    // .../block/loop3 for a disk, .../block/loop3/loop3p1 for a partition.
    for (auto part = target; !part.empty() && part != part.parent_path(); part = part.parent_path()) {
        const auto name = part.filename().string();
        if (name.rfind("loop", 0) != 0 || name.size() == 4 || name.size() > 13)
            continue;
        const auto digits = name.substr(4);
        if (digits.find_first_not_of("0123456789") == std::string::npos)
            return static_cast<unsigned>(std::stoul(digits));
    }
    return std::nullopt;
}

} // namespace loopd::kernel
