#pragma once

#include <filesystem>
#include <string>
#include <vector>

// /run/loopd/by-ref/<ref> and <ref>-partN: stable names for units and scripts.
// Only DeviceTable calls these, so that a link exists exactly while its device is
// ready and listed. tmpfs operations: cheap enough for the loop thread.
namespace loopd::service {

class RefLinks {
public:
    explicit RefLinks(std::filesystem::path dir);

    // The name of partition N's link.
    static std::string partitionName(const std::string& ref, unsigned partition);

    // Replaces each link atomically (a new symlink renamed over the old name).
    void link(const std::string& ref, unsigned number, const std::vector<unsigned>& partitions) const noexcept;
    void unlink(const std::string& ref, const std::vector<unsigned>& partitions) const noexcept;
    // Start-up: every link left is of an earlier run and may name a loop number that
    // is someone else's attachment by now; adopted devices are linked again.
    void removeAll() const noexcept;

    [[nodiscard]] const std::filesystem::path& dir() const { return dir_; }

private:
    std::filesystem::path dir_;
};

} // namespace loopd::service
