#include "ref_links.hpp"

#include "kernel/loop_device.hpp"

#include <loopd/log.hpp>

namespace loopd::service {

namespace fs = std::filesystem;

RefLinks::RefLinks(fs::path dir) : dir_(std::move(dir)) {}

std::string RefLinks::partitionName(const std::string& ref, unsigned partition)
{
    return ref + "-part" + std::to_string(partition);
}

void RefLinks::link(const std::string& ref, unsigned number, const std::vector<unsigned>& partitions) const noexcept
{
    if (ref.empty())
        return;
    std::error_code ec;
    fs::create_directories(dir_, ec);
    auto one = [&](const std::string& name, const std::string& target) {
        const auto temporary = dir_ / ("." + name + ".new");
        fs::remove(temporary, ec);
        fs::create_symlink(target, temporary, ec);
        if (!ec)
            fs::rename(temporary, dir_ / name, ec);
        if (ec)
            log::warn("cannot link {}: {}", (dir_ / name).string(), ec.message());
    };
    one(ref, kernel::loopDevNode(number));
    for (const auto partition : partitions)
        one(partitionName(ref, partition), kernel::partitionDevNode(number, partition));
}

void RefLinks::unlink(const std::string& ref, const std::vector<unsigned>& partitions) const noexcept
{
    if (ref.empty())
        return;
    std::error_code ec;
    fs::remove(dir_ / ref, ec);
    for (const auto partition : partitions)
        fs::remove(dir_ / partitionName(ref, partition), ec);
}

void RefLinks::removeAll() const noexcept
{
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir_, ec)) {
        std::error_code removeError;
        fs::remove(entry.path(), removeError);
        if (removeError)
            log::warn("cannot remove stale link {}: {}", entry.path().string(), removeError.message());
    }
}

} // namespace loopd::service
