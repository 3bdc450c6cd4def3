#pragma once

#include <loopd/unique_fd.hpp>

#include <map>
#include <vector>

namespace loopd::kernel {

// inotify on /dev/loopN of owned devices: every close of the node (IN_CLOSE_WRITE,
// IN_CLOSE_NOWRITE); opens are not watched.
// `losetup -d` opens the node to issue LOOP_CLR_FD, which on a device loopd holds
// open only sets autoclear and sends no uevent; the close that follows is the one
// sign of it that arrives at once. Loop thread: reads never block.
class NodeWatch {
public:
    NodeWatch();
    [[nodiscard]] int fd() const { return fd_.get(); }
    void add(unsigned number);
    void remove(unsigned number);
    // Loop numbers whose node was closed since the last call; also those whose
    // watch the kernel ended (IN_IGNORED: the node went away).
    std::vector<unsigned> closed();

private:
    UniqueFd fd_;
    std::map<int, unsigned> numbers_; // watch descriptor -> loop number
    std::map<unsigned, int> watches_;
};

} // namespace loopd::kernel
