#include "node_watch.hpp"

#include "loop_device.hpp"

#include <sys/inotify.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <set>
#include <system_error>

namespace loopd::kernel {

NodeWatch::NodeWatch() : fd_(::inotify_init1(IN_CLOEXEC | IN_NONBLOCK))
{
    if (!fd_)
        throw std::system_error(errno, std::generic_category(), "inotify_init1");
}

void NodeWatch::add(unsigned number)
{
    const int wd = ::inotify_add_watch(fd_.get(), loopDevNode(number).c_str(), IN_CLOSE_WRITE | IN_CLOSE_NOWRITE);
    if (wd < 0)
        throw std::system_error(errno, std::generic_category(), "inotify_add_watch " + loopDevNode(number));
    numbers_[wd] = number;
    watches_[number] = wd;
}

void NodeWatch::remove(unsigned number)
{
    const auto it = watches_.find(number);
    if (it == watches_.end())
        return;
    // EINVAL: the node went away and the kernel dropped the watch already.
    ::inotify_rm_watch(fd_.get(), it->second);
    numbers_.erase(it->second);
    watches_.erase(it);
}

std::vector<unsigned> NodeWatch::closed()
{
    std::set<unsigned> touched;
    alignas(inotify_event) std::array<char, 4096> buffer{};
    for (;;) {
        const auto n = ::read(fd_.get(), buffer.data(), buffer.size());
        if (n <= 0)
            break; // EAGAIN: drained
        for (ssize_t offset = 0; offset < n;) {
            const auto* event = reinterpret_cast<const inotify_event*>(buffer.data() + offset);
            if (const auto it = numbers_.find(event->wd); it != numbers_.end())
                touched.insert(it->second);
            offset += static_cast<ssize_t>(sizeof(inotify_event) + event->len);
        }
    }
    return {touched.begin(), touched.end()};
}

} // namespace loopd::kernel
