#pragma once

#include <loopd/unique_fd.hpp>

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

// Opening and checking backing files. Blocking; runs on workers.
namespace loopd::kernel {

struct Credentials {
    uid_t uid = 0;
    gid_t gid = 0;
    std::vector<gid_t> groups;
    bool privileged = false; // root with root's powers: opens as loopd itself
};

struct BackingFile {
    UniqueFd fd;
    dev_t device = 0;
    ino_t inode = 0;
    uint64_t size = 0;
    bool writable = false;
};

// Opens path with the caller's file-system identity (setfsuid/setfsgid and
// supplementary groups of this thread only), so loopd never opens what the caller
// could not. The fd is what gets attached: no later lookup of the path.
// O_NONBLOCK keeps a fifo from hanging the worker; the type check refuses it after.
UniqueFd openAs(const std::string& path, bool readOnly, const Credentials& caller);

// What names a file: its st_dev and st_ino (what LOOP_GET_STATUS64 reports as
// lo_device and lo_inode).
struct FileId {
    dev_t device = 0;
    ino_t inode = 0;
};

// The file path names now, looked up as openAs does (the caller's identity, no
// magic links) but with O_PATH: no read permission needed, and neither a device
// nor a FUSE file is opened. Symlinks are followed, as an open would.
FileId identifyAs(const std::string& path, const Credentials& caller);

// fstat()s the fd and checks it may back a loop device: a non-empty regular file or
// a block device, larger than offset. Throws loopd::Error(InvalidArgument) naming
// `what` otherwise.
BackingFile inspect(UniqueFd fd, const std::string& what, uint64_t offset);

// The path the kernel has for an open file (procfs), for humans; nullopt if it
// has none (a pipe, a socket, an anonymous inode).
std::optional<std::string> pathOfFd(int fd);

} // namespace loopd::kernel
