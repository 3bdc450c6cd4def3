#include "verify.hpp"

#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <vector>

namespace loopd::bench {
namespace {

namespace fs = std::filesystem;

std::optional<std::string> readFile(const std::string& path)
{
    std::ifstream in(path);
    if (!in)
        return std::nullopt;
    std::stringstream text;
    text << in.rdbuf();
    auto s = text.str();
    while (!s.empty() && (s.back() == '\n' || s.back() == ' '))
        s.pop_back();
    return s;
}

std::string nameOf(const std::string& devnode)
{
    return fs::path(devnode).filename().string();
}

// The node exists, is a block device, and has the numbers sysfs gives the device:
// a stale node of an earlier device with another devt does not pass.
std::string checkNode(const std::string& node, const std::string& sysDir, std::string& majmin)
{
    struct stat st {};
    if (::stat(node.c_str(), &st) != 0)
        return node + " does not exist";
    if (!S_ISBLK(st.st_mode))
        return node + " is not a block device";
    const auto dev = readFile(sysDir + "/dev");
    if (!dev)
        return sysDir + " does not exist";
    majmin = std::to_string(major(st.st_rdev)) + ":" + std::to_string(minor(st.st_rdev));
    if (majmin != *dev)
        return node + " is " + majmin + ", sysfs says " + *dev;
    return "";
}

struct UdevEntry {
    bool initialized = false;
    int64_t writtenNs = 0; // the file's mtime, CLOCK_REALTIME
    bool processing = false;
    std::vector<std::string> links;
    std::vector<std::string> properties; // KEY=value
    [[nodiscard]] bool has(const std::string& keyValue) const
    {
        for (const auto& p : properties)
            if (p == keyValue)
                return true;
        return false;
    }
    [[nodiscard]] bool hasLink(const std::string& link) const
    {
        for (const auto& l : links)
            if (l == link)
                return true;
        return false;
    }
};

// udev's database entry, as `udevadm info` would show it: "I:" is USEC_INITIALIZED,
// "S:" a symlink, "E:" a property.
std::optional<UdevEntry> readUdevEntry(const std::string& majmin)
{
    const auto path = "/run/udev/data/b" + majmin;
    std::ifstream in(path);
    struct stat st {};
    if (!in || ::stat(path.c_str(), &st) != 0)
        return std::nullopt;
    UdevEntry entry;
    entry.writtenNs = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
    std::string line;
    while (std::getline(in, line)) {
        if (line.size() < 2 || line[1] != ':')
            continue;
        const auto value = line.substr(2);
        if (line[0] == 'I')
            entry.initialized = true;
        else if (line[0] == 'S')
            entry.links.push_back(value);
        else if (line[0] == 'E') {
            entry.processing = entry.processing || value.rfind("ID_PROCESSING=", 0) == 0;
            entry.properties.push_back(value);
        }
    }
    return entry;
}

// udev's database keeps what its rules added, not the kernel's DISKSEQ; what ties
// an entry to this attachment is the by-diskseq link (disk), or for a partition
// (created anew by each attach) that udev wrote the entry after the attach began.
// Not USEC_INITIALIZED: udev carries it over from a stale entry of the same devt
// (left when udevd missed a remove while it was down), seen here often.
std::string checkUdev(const std::string& node, const std::string& majmin, UdevEntry& entry)
{
    auto read = readUdevEntry(majmin);
    if (!read)
        return node + ": no udev database entry";
    entry = std::move(*read);
    if (!entry.initialized)
        return node + ": udev entry not initialized";
    if (entry.processing)
        return node + ": udev is still processing it";
    return "";
}

std::vector<unsigned> sysfsPartitions(const std::string& name)
{
    std::vector<unsigned> found;
    std::error_code ec;
    const auto prefix = name + "p";
    for (const auto& e : fs::directory_iterator("/sys/block/" + name, ec)) {
        const auto entry = e.path().filename().string();
        if (entry.rfind(prefix, 0) == 0 && entry.size() > prefix.size() &&
            entry.find_first_not_of("0123456789", prefix.size()) == std::string::npos)
            found.push_back(static_cast<unsigned>(std::stoul(entry.substr(prefix.size()))));
    }
    std::sort(found.begin(), found.end());
    return found;
}

bool hasDiskseq(const std::string& ueventFile, uint64_t diskseq)
{
    std::istringstream text(readFile(ueventFile).value_or(""));
    std::string line;
    while (std::getline(text, line))
        if (line == "DISKSEQ=" + std::to_string(diskseq))
            return true;
    return false;
}

std::string listed(const std::vector<unsigned>& numbers)
{
    std::string s = "[";
    for (const auto n : numbers)
        s += (s.size() > 1 ? "," : "") + std::to_string(n);
    return s + "]";
}

std::string checkPartition(const std::string& devnode, const std::string& sysDir, unsigned k, uint64_t diskseq,
                           const std::string& diskMajmin, const ImageSpec& image, int64_t sinceNs)
{
    const auto name = nameOf(devnode);
    const auto node = devnode + "p" + std::to_string(k);
    const auto psys = sysDir + "/" + name + "p" + std::to_string(k);
    std::string majmin;
    if (auto problem = checkNode(node, psys, majmin); !problem.empty())
        return problem;
    if (!hasDiskseq(psys + "/uevent", diskseq))
        return node + ": kernel uevent lacks DISKSEQ=" + std::to_string(diskseq);
    UdevEntry entry;
    if (auto problem = checkUdev(node, majmin, entry); !problem.empty())
        return problem;
    // tmpfs stamps files with the coarse clock (a jiffy behind at most).
    if (entry.writtenNs < sinceNs - 20'000'000)
        return node + ": udev's entry was written before this attachment";
    if (!entry.has("ID_PART_ENTRY_NUMBER=" + std::to_string(k)) || !entry.has("ID_PART_ENTRY_DISK=" + diskMajmin))
        return node + ": udev has not probed it as partition " + std::to_string(k);
    if (!image.tableUuid.empty() && !entry.has("ID_PART_TABLE_UUID=" + image.tableUuid))
        return node + ": udev saw another partition table";
    return "";
}

} // namespace

uint64_t sysfsDiskseq(const std::string& devnode)
{
    const auto text = readFile("/sys/block/" + nameOf(devnode) + "/diskseq");
    return text ? std::stoull(*text) : 0;
}

std::string checkReady(const std::string& devnode, uint64_t diskseq, const ImageSpec& image, int64_t sinceNs,
                       bool diskOnly)
{
    const auto name = nameOf(devnode);
    const auto sysDir = "/sys/block/" + name;
    std::string diskMajmin;
    if (auto problem = checkNode(devnode, sysDir, diskMajmin); !problem.empty())
        return problem;
    if (sysfsDiskseq(devnode) != diskseq)
        return devnode + ": sysfs diskseq is not " + std::to_string(diskseq);
    const auto backing = readFile(sysDir + "/loop/backing_file");
    if (!backing)
        return devnode + " is not bound";
    std::error_code ec;
    if (fs::weakly_canonical(*backing, ec) != fs::path(image.path))
        return devnode + " is backed by " + *backing;

    const auto partitions = sysfsPartitions(name);
    std::vector<unsigned> expected;
    for (unsigned k = 1; k <= image.partitions; ++k)
        expected.push_back(k);
    if (!diskOnly && partitions != expected)
        return devnode + ": partitions " + listed(partitions) + " in sysfs, expected " + listed(expected);

    if (!hasDiskseq(sysDir + "/uevent", diskseq))
        return devnode + ": kernel uevent lacks DISKSEQ=" + std::to_string(diskseq);
    UdevEntry entry;
    if (auto problem = checkUdev(devnode, diskMajmin, entry); !problem.empty())
        return problem;
    // udev makes this link only while processing an event with this DISKSEQ.
    const auto link = "disk/by-diskseq/" + std::to_string(diskseq);
    if (!entry.hasLink(link))
        return devnode + ": udev has no " + link + " link for it";
    if (!image.tableUuid.empty() && !entry.has("ID_PART_TABLE_UUID=" + image.tableUuid))
        return devnode + ": udev has not seen this image's partition table";
    if (fs::canonical("/dev/" + link, ec) != fs::path(devnode))
        return "/dev/" + link + " does not point to " + devnode;

    for (unsigned k = 1; !diskOnly && k <= image.partitions; ++k)
        if (auto problem = checkPartition(devnode, sysDir, k, diskseq, diskMajmin, image, sinceNs); !problem.empty())
            return problem;
    return "";
}

std::string checkReleased(const std::string& devnode, uint64_t diskseq)
{
    const auto name = nameOf(devnode);
    const auto sysDir = "/sys/block/" + name;
    std::error_code ec;
    if (!fs::exists(sysDir, ec))
        return ""; // the device itself is gone
    const auto now = sysfsDiskseq(devnode);
    if (now == diskseq)
        return devnode + " still has diskseq " + std::to_string(diskseq);
    if (fs::exists(sysDir + "/loop/backing_file", ec))
        return ""; // someone (another client of the batch) attached it since
    // The reads above and this one are not one snapshot: another client of the
    // batch may attach the freed device and add its partitions in between (seen:
    // its partition 1 counted as ours). Its LOOP_CONFIGURE moves the diskseq on.
    if (const auto left = sysfsPartitions(name); !left.empty() && sysfsDiskseq(devnode) == now)
        return devnode + ": partitions " + listed(left) + " left after detach";
    return "";
}

} // namespace loopd::bench
