#include "status.hpp"

#include "format.hpp"
#include "journal.hpp"

#include <libudev.h>
#include <unistd.h>

#include <algorithm>
#include <iomanip>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace loopctl {

namespace {

struct UnrefUdev {
    void operator()(udev* handle) const { udev_unref(handle); }
    void operator()(udev_device* handle) const { udev_device_unref(handle); }
};
using Udev = std::unique_ptr<udev, UnrefUdev>;
using UdevDevice = std::unique_ptr<udev_device, UnrefUdev>;

// A block device (disk or partition) of the attachment as the system sees it now.
struct Node {
    std::string name;  // loop0p1
    std::string state; // "ready", or what is missing
    bool ready = false;
    std::optional<uint64_t> size; // bytes, from sysfs
};

// What udev's database says of /dev/<name> for attachment `diskseq`: ready means
// the node exists, carries the diskseq and udev has finished with it (API.md).
Node inspect(udev* context, const std::string& name, uint64_t diskseq)
{
    Node node{name, "missing", false, std::nullopt};
    const UdevDevice dev(udev_device_new_from_subsystem_sysname(context, "block", name.c_str()));
    if (!dev)
        return node;
    if (const char* sectors = udev_device_get_sysattr_value(dev.get(), "size"))
        node.size = std::stoull(sectors) * 512; // sysfs counts 512-byte sectors always
    const char* seq = udev_device_get_property_value(dev.get(), "DISKSEQ");
    if (!seq || seq != std::to_string(diskseq))
        node.state =
            std::string("diskseq ") + (seq ? seq : "unknown") + " in the kernel, not " + std::to_string(diskseq);
    else if (!udev_device_get_is_initialized(dev.get()))
        node.state = "not processed by udev yet";
    else if (udev_device_get_property_value(dev.get(), "ID_PROCESSING"))
        node.state = "being processed by udev";
    else {
        node.state = "ready";
        node.ready = true;
    }
    return node;
}

std::string flags(const Device& device)
{
    std::string words = device.flag("ReadOnly") ? "read-only" : "read-write";
    words += device.flag("PartScan") ? ", partscan" : ", no-partscan";
    if (device.flag("DirectIO"))
        words += ", direct-io";
    if (device.flag("Autoclear"))
        words += ", autoclear";
    return words;
}

std::string bytes(uint64_t value)
{
    return iecSize(value) + " (" + std::to_string(value) + " bytes)";
}

std::string basename(const std::string& devnode)
{
    return devnode.substr(devnode.rfind('/') + 1);
}

// The partitions, one a line under the first: node, size, udev state.
void printPartitions(std::ostream& out, const std::vector<Node>& parts, const Colours& colours)
{
    size_t nameWidth = 0, sizeWidth = 0;
    for (const auto& part : parts) {
        nameWidth = std::max(nameWidth, part.name.size() + 5);
        sizeWidth = std::max(sizeWidth, part.size ? iecSize(*part.size).size() : 1);
    }
    const char* label = " Partitions: ";
    for (const auto& part : parts) {
        out << label << std::left << std::setw(static_cast<int>(nameWidth)) << "/dev/" + part.name << ' ' << std::right
            << std::setw(static_cast<int>(sizeWidth)) << (part.size ? iecSize(*part.size) : "-") << ' '
            << (part.ready ? colours.green() : colours.red()) << part.state << colours.reset() << '\n';
        label = "             ";
    }
    if (parts.empty())
        out << label << "none\n";
}

} // namespace

void printStatus(std::ostream& out, const Device& device, unsigned journalLines)
{
    const Colours colours(STDOUT_FILENO);
    const Udev context(udev_new());
    if (!context)
        throw Failure("udev_new failed");
    const auto diskseq = device.u64("DiskSeq");
    const auto devnode = device.text("DevNode");
    const Node disk = inspect(context.get(), basename(devnode), diskseq);
    std::vector<Node> parts;
    for (const auto& part : device.strings("Partitions"))
        parts.push_back(inspect(context.get(), basename(part), diskseq));
    bool allReady = disk.ready;
    for (const auto& part : parts)
        allReady = allReady && part.ready;

    const auto ref = device.text("Ref");
    const auto readyUsec = device.u64("ReadyTimestamp");
    out << (allReady ? colours.green() : colours.red()) << "●" << colours.reset() << ' ' << devnode
        << (ref.empty() ? "" : " (" + ref + ")") << " — ready";
    if (readyUsec)
        out << " since " << localTime(readyUsec, "%a %Y-%m-%d %H:%M:%S %Z") << "; " << ago(readyUsec, realtimeUsec());
    out << '\n';
    auto line = [&out](const char* label, const std::string& value) {
        out << std::right << std::setw(11) << label << ": " << value << '\n';
    };
    line("Object", device.object);
    line("DiskSeq", std::to_string(diskseq));
    line("Backing", device.text("BackingFile") + " (" + majorMinor(device.u64("BackingDevice")) + ", inode " +
                        std::to_string(device.u64("BackingInode")) + ")");
    line("Size", iecSize(device.u64("Size")));
    if (const auto offset = device.u64("Offset"))
        line("Offset", bytes(offset));
    if (const auto limit = device.u64("SizeLimit"))
        line("Size limit", bytes(limit));
    if (const auto sector = device.u32("SectorSize"); sector != 512)
        line("Sector size", std::to_string(sector));
    line("Flags", flags(device));
    line("Lifetime", device.text("Lifetime"));
    const auto uid = device.u32("OwnerUid");
    line("Owner", userName(uid) + " (" + std::to_string(uid) + ")");
    line("Udev", std::string(disk.ready ? colours.green() : colours.red()) + disk.state + colours.reset());
    printPartitions(out, parts, colours);
    printJournalTail(out, diskseq, journalLines);
}

} // namespace loopctl
