#include "monitor.hpp"

#include <loopd/log.hpp>
#include <loopd/unique_fd.hpp>

#include <libudev.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <string_view>
#include <system_error>

namespace loopd::uevent {
namespace {

[[noreturn]] void fail(int err, const char* what)
{
    throw std::system_error(err, std::generic_category(), what);
}

std::optional<Uevent> toUevent(udev_device* device, EventSource source)
{
    auto event = makeUevent(source, udev_device_get_action(device), udev_device_get_sysname(device),
                            udev_device_get_property_value(device, "DISKSEQ"),
                            udev_device_get_property_value(device, "SYNTH_UUID"));
    if (event)
        event->loopdProperties = udev_device_get_property_value(device, "LOOPD_OWNER_UID") != nullptr;
    return event;
}

} // namespace

void UdevUnref::operator()(udev* handle) const noexcept
{
    udev_unref(handle);
}

void UdevUnref::operator()(udev_device* handle) const noexcept
{
    udev_device_unref(handle);
}

void UdevUnref::operator()(udev_enumerate* handle) const noexcept
{
    udev_enumerate_unref(handle);
}

void UdevUnref::operator()(udev_monitor* handle) const noexcept
{
    udev_monitor_unref(handle);
}

bool udevRunning()
{
    // The socket file outlives a udevd that was killed; only a listener accepts.
    // A non-blocking connect answers at once either way.
    const UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd)
        return false;
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, "/run/udev/control", sizeof(address.sun_path) - 1);
    return ::connect(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 || errno == EAGAIN ||
           errno == EINPROGRESS;
}

void DropRules::add(const std::string& rule)
{
    if (rule == "disk")
        disk = true;
    else if (rule.rfind("part", 0) == 0 && rule.size() > 4)
        partitions.insert(static_cast<unsigned>(std::stoul(rule.substr(4))));
    else if (rule.rfind("random:", 0) == 0)
        probability = std::stod(rule.substr(7));
    else
        throw std::invalid_argument("unknown drop rule '" + rule + "' (disk, partN or random:P)");
}

bool Monitor::dropped(const Uevent& event)
{
    if (!drops_.any())
        return false;
    if (drops_.probability > 0 && std::uniform_real_distribution<double>(0, 1)(random_) < drops_.probability)
        return true;
    const bool ruled = event.partition == 0 ? drops_.disk : drops_.partitions.count(event.partition) != 0;
    return ruled && event.action != UeventAction::Remove && event.synthUuid.empty();
}

namespace {

UdevEntry readEntry(udev_device* device)
{
    UdevEntry entry;
    const auto devnum = udev_device_get_devnum(device);
    entry.devnum = std::to_string(major(devnum)) + ":" + std::to_string(minor(devnum));
    entry.initialized =
        udev_device_get_is_initialized(device) > 0 && !udev_device_get_property_value(device, "ID_PROCESSING");
    if (!entry.initialized)
        return entry;
    if (const char* disk = udev_device_get_property_value(device, "ID_PART_ENTRY_DISK"))
        entry.partEntryDisk = disk;
    if (const char* number = udev_device_get_property_value(device, "ID_PART_ENTRY_NUMBER"))
        entry.partEntryNumber = static_cast<unsigned>(std::strtoul(number, nullptr, 10));
    // The database file is rewritten each time udev processes the device; its
    // USEC_INITIALIZED is not (udev carries it over from an earlier device with the
    // same number). The file's change time says when udev last finished with it.
    const auto path = "/run/udev/data/b" + std::to_string(major(devnum)) + ":" + std::to_string(minor(devnum));
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0)
        entry.processedRealtimeUsec =
            static_cast<uint64_t>(st.st_ctim.tv_sec) * 1'000'000 + static_cast<uint64_t>(st.st_ctim.tv_nsec) / 1000;
    constexpr std::string_view prefix = "/dev/disk/by-diskseq/";
    udev_list_entry* link;
    udev_list_entry_foreach(link, udev_device_get_devlinks_list_entry(device))
    {
        const std::string_view name = udev_list_entry_get_name(link);
        if (name.substr(0, prefix.size()) == prefix)
            entry.linkedDiskseq = std::strtoull(std::string(name.substr(prefix.size())).c_str(), nullptr, 10);
    }
    return entry;
}

} // namespace

std::map<unsigned, UdevEntry> readUdevDatabase(unsigned number)
{
    // The disk's sysfs dir lists its partitions: a directory of a few entries,
    // where an enumeration of the block subsystem would scan every block device
    // (2000 here) on the loop thread.
    std::map<unsigned, UdevEntry> entries;
    const UdevPtr<udev> context(udev_new());
    if (!context)
        return entries;
    const auto disk = "loop" + std::to_string(number);
    const auto diskPath = "/sys/class/block/" + disk;
    std::vector<std::string> names{disk};
    std::error_code ec;
    for (const auto& child : std::filesystem::directory_iterator(diskPath, ec))
        if (const auto name = child.path().filename().string(); name.rfind(disk + "p", 0) == 0)
            names.push_back(name);
    for (const auto& name : names) {
        const UdevPtr<udev_device> device(udev_device_new_from_subsystem_sysname(context.get(), "block", name.c_str()));
        if (!device)
            continue;
        const auto parsed = parseLoopName(udev_device_get_sysname(device.get()));
        if (parsed && parsed->first == number)
            entries[parsed->second] = readEntry(device.get());
    }
    return entries;
}

Monitor::Monitor(EventSource source, int receiveBufferBytes, DropRules drops)
    : source_(source), udev_(udev_new()), drops_(std::move(drops)), random_(drops_.seed)
{
    if (!udev_)
        fail(errno ? errno : ENOMEM, "udev_new");
    monitor_.reset(udev_monitor_new_from_netlink(udev_.get(), source == EventSource::Udev ? "udev" : "kernel"));
    if (!monitor_)
        fail(errno ? errno : ENOMEM, "udev_monitor_new_from_netlink");
    int r = udev_monitor_filter_add_match_subsystem_devtype(monitor_.get(), "block", nullptr);
    // Growing the buffer past net.core.rmem_max needs CAP_NET_ADMIN, which the
    // hardened unit does not grant: keep what the kernel allows. Lost events cost a
    // re-enumeration, never a wrong answer.
    if (r >= 0 && udev_monitor_set_receive_buffer_size(monitor_.get(), receiveBufferBytes) < 0)
        log::warn("uevent receive buffer of {} bytes refused; keeping the kernel's limit", receiveBufferBytes);
    if (r >= 0)
        r = udev_monitor_enable_receiving(monitor_.get());
    if (r < 0)
        fail(-r, "enabling the uevent monitor");
}

int Monitor::fd() const
{
    return udev_monitor_get_fd(monitor_.get());
}

Monitor::Batch Monitor::receive()
{
    Batch batch;
    for (;;) {
        errno = 0;
        const UdevPtr<udev_device> device(udev_monitor_receive_device(monitor_.get()));
        if (!device) {
            if (errno == ENOBUFS) {
                batch.overflow = true;
                continue; // the socket is readable again after reporting the drop
            }
            // EAGAIN: drained. Anything else (a malformed or foreign message) was
            // consumed and dropped by libudev; the level-triggered poll brings us
            // back if more is readable.
            break;
        }
        if (auto event = toUevent(device.get(), source_); event && !dropped(*event))
            batch.events.push_back(std::move(*event));
    }
    return batch;
}

} // namespace loopd::uevent
