#include "open_watch.hpp"

#include <fcntl.h>
#include <sys/fanotify.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <system_error>

namespace loopd::kernel {
namespace {

constexpr std::size_t maxHandleBytes = 128; // MAX_HANDLE_SZ

std::string handleKey(int type, const unsigned char* bytes, std::size_t size)
{
    std::string key(reinterpret_cast<const char*>(&type), sizeof(type));
    key.append(reinterpret_cast<const char*>(bytes), size);
    return key;
}

// The handle fanotify reports for a node's inode: the same bytes that
// name_to_handle_at gives (both encode through the filesystem's export ops).
std::string handleOf(const std::string& node)
{
    alignas(file_handle) std::array<unsigned char, sizeof(file_handle) + maxHandleBytes> buffer{};
    auto* handle = reinterpret_cast<file_handle*>(buffer.data());
    handle->handle_bytes = maxHandleBytes;
    int mountId = 0;
    if (::name_to_handle_at(AT_FDCWD, node.c_str(), handle, &mountId, 0) != 0)
        throw std::system_error(errno, std::generic_category(), "name_to_handle_at " + node);
    return handleKey(handle->handle_type, handle->f_handle, handle->handle_bytes);
}

} // namespace

OpenWatch::OpenWatch()
    : fd_(::fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_FID | FAN_CLOEXEC | FAN_NONBLOCK, O_RDONLY | O_CLOEXEC))
{
    if (!fd_)
        throw std::system_error(errno, std::generic_category(), "fanotify_init");
}

void OpenWatch::add(unsigned number, const std::vector<std::string>& nodes)
{
    for (const auto& node : nodes) {
        if (::fanotify_mark(fd_.get(), FAN_MARK_ADD, FAN_OPEN, AT_FDCWD, node.c_str()) != 0)
            throw std::system_error(errno, std::generic_category(), "fanotify_mark " + node);
        handles_[handleOf(node)] = Marked{number, node};
    }
}

void OpenWatch::remove(unsigned number)
{
    for (auto it = handles_.begin(); it != handles_.end();) {
        if (it->second.number != number) {
            ++it;
            continue;
        }
        // ENOENT: the node went away, and its mark with its inode.
        ::fanotify_mark(fd_.get(), FAN_MARK_REMOVE, FAN_OPEN, AT_FDCWD, it->second.node.c_str());
        it = handles_.erase(it);
    }
}

std::vector<OpenWatch::Open> OpenWatch::read(bool& overflow)
{
    std::vector<Open> opens;
    alignas(fanotify_event_metadata) std::array<char, 8192> buffer{};
    for (;;) {
        auto n = ::read(fd_.get(), buffer.data(), buffer.size());
        if (n <= 0)
            break; // EAGAIN: drained
        const auto* event = reinterpret_cast<const fanotify_event_metadata*>(buffer.data());
        for (; FAN_EVENT_OK(event, n); event = FAN_EVENT_NEXT(event, n)) {
            if (event->mask & FAN_Q_OVERFLOW) {
                overflow = true;
                continue;
            }
            if (event->event_len < sizeof(*event) + sizeof(fanotify_event_info_fid))
                continue;
            const auto* info = reinterpret_cast<const fanotify_event_info_fid*>(event + 1);
            if (info->hdr.info_type != FAN_EVENT_INFO_TYPE_FID)
                continue;
            const auto* handle = reinterpret_cast<const file_handle*>(info->handle);
            const auto it = handles_.find(handleKey(handle->handle_type, handle->f_handle, handle->handle_bytes));
            if (it != handles_.end())
                opens.push_back({it->second.number, event->pid});
        }
    }
    return opens;
}

MountTable::MountTable() : fd_(::open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC))
{
    if (!fd_)
        throw std::system_error(errno, std::generic_category(), "open /proc/self/mountinfo");
}

std::set<dev_t> MountTable::devices()
{
    std::string text;
    std::array<char, 16384> buffer{};
    if (::lseek(fd_.get(), 0, SEEK_SET) < 0)
        throw std::system_error(errno, std::generic_category(), "lseek /proc/self/mountinfo");
    for (;;) {
        const auto n = ::read(fd_.get(), buffer.data(), buffer.size());
        if (n < 0)
            throw std::system_error(errno, std::generic_category(), "read /proc/self/mountinfo");
        if (n == 0)
            break;
        text.append(buffer.data(), static_cast<std::size_t>(n));
    }
    // "36 35 98:0 /mnt1 /mnt2 rw ...": the third field is the device.
    std::set<dev_t> found;
    std::istringstream lines(text);
    for (std::string line; std::getline(lines, line);) {
        unsigned id = 0, parent = 0, major = 0, minor = 0;
        if (std::sscanf(line.c_str(), "%u %u %u:%u", &id, &parent, &major, &minor) == 4)
            found.insert(makedev(major, minor));
    }
    return found;
}

pid_t parentPid(pid_t pid)
{
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so the
    // fields are counted from the last ')'.
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    if (!std::getline(stat, line))
        return 0;
    const auto close = line.rfind(')');
    if (close == std::string::npos)
        return 0;
    char state = 0;
    int ppid = 0;
    if (std::sscanf(line.c_str() + close + 1, " %c %d", &state, &ppid) != 2)
        return 0;
    return ppid;
}

} // namespace loopd::kernel
