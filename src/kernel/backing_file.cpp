#include "backing_file.hpp"

#include <loopd/error.hpp>

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <system_error>

namespace loopd::kernel {
namespace {

// The glibc wrappers of setgroups() apply to every thread of the process; the raw
// syscalls (and setfsuid/setfsgid) change only the calling thread, which is what a
// worker impersonating one caller needs.
class ThreadIdentity {
public:
    explicit ThreadIdentity(const Credentials& caller) : active_(caller.uid != 0)
    {
        if (!active_)
            return;
        if (::syscall(SYS_setgroups, caller.groups.size(), caller.groups.data()) < 0)
            throw std::system_error(errno, std::generic_category(), "setgroups");
        if (!switchTo(SYS_setfsgid, caller.gid)) {
            restore();
            throw std::system_error(EPERM, std::generic_category(), "setfsgid");
        }
        if (!switchTo(SYS_setfsuid, caller.uid)) {
            restore();
            throw std::system_error(EPERM, std::generic_category(), "setfsuid");
        }
    }
    ~ThreadIdentity()
    {
        if (active_)
            restore();
    }
    ThreadIdentity(const ThreadIdentity&) = delete;
    ThreadIdentity& operator=(const ThreadIdentity&) = delete;

private:
    // setfsuid/setfsgid report the previous id, never an error: whether the switch
    // took shows in what a second call with an invalid id (-1, which changes
    // nothing) reports as current.
    static bool switchTo(long call, unsigned id) noexcept
    {
        ::syscall(call, id);
        return ::syscall(call, -1) == static_cast<long>(id);
    }
    // Back to the thread's own file-system ids, and no supplementary groups (loopd
    // needs none). A worker left with a caller's identity would do its next job as
    // that caller, and a destructor cannot throw: stop rather than go on. Cannot
    // happen while loopd keeps the CAP_SETUID and CAP_SETGID it switched with.
    void restore() noexcept
    {
        const bool uid = switchTo(SYS_setfsuid, uid_);
        const bool gid = switchTo(SYS_setfsgid, gid_);
        if (!uid || !gid || ::syscall(SYS_setgroups, 0, nullptr) != 0)
            std::abort();
    }
    bool active_;
    // The thread's own ids, as they were before the switch.
    unsigned uid_ = static_cast<unsigned>(::syscall(SYS_setfsuid, -1));
    unsigned gid_ = static_cast<unsigned>(::syscall(SYS_setfsgid, -1));
};

[[noreturn]] void invalid(const std::string& what, const std::string& why)
{
    throw Error(Errc::InvalidArgument, what + " " + why);
}

} // namespace

UniqueFd openAs(const std::string& path, bool readOnly, const Credentials& caller)
{
    ThreadIdentity identity(caller);
    const int flags = (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
    UniqueFd fd(::open(path.c_str(), flags));
    if (!fd) {
        const int err = errno;
        switch (err) {
        case ENOENT:
        case ENOTDIR:
            throw Error(Errc::NotFound, "no such file: " + path);
        case EACCES:
        case EPERM:
        case EROFS:
            throw Error(Errc::AccessDenied, "cannot open " + path + (readOnly ? "" : " for writing") + ": " +
                                                std::generic_category().message(err));
        case EISDIR:
            invalid(path, "is a directory");
        default:
            throw std::system_error(err, std::generic_category(), "open " + path);
        }
    }
    // Back to blocking I/O: the flag was only there for the open of a fifo.
    const int status = ::fcntl(fd.get(), F_GETFL);
    if (status < 0 || ::fcntl(fd.get(), F_SETFL, status & ~O_NONBLOCK) < 0)
        throw std::system_error(errno, std::generic_category(), "fcntl " + path);
    return fd;
}

BackingFile inspect(UniqueFd fd, const std::string& what, uint64_t offset)
{
    struct stat st {};
    if (::fstat(fd.get(), &st) < 0)
        throw std::system_error(errno, std::generic_category(), "fstat " + what);

    BackingFile file;
    if (S_ISREG(st.st_mode)) {
        file.size = static_cast<uint64_t>(st.st_size);
        if (file.size == 0)
            invalid(what, "is empty");
    } else if (S_ISBLK(st.st_mode)) {
        if (::ioctl(fd.get(), BLKGETSIZE64, &file.size) < 0)
            throw std::system_error(errno, std::generic_category(), "BLKGETSIZE64 " + what);
    } else {
        invalid(what, S_ISDIR(st.st_mode)    ? "is a directory"
                      : S_ISFIFO(st.st_mode) ? "is a fifo, not a regular file or block device"
                                             : "is not a regular file or block device");
    }
    if (offset >= file.size)
        invalid(what,
                "is " + std::to_string(file.size) + " bytes, offset " + std::to_string(offset) + " is past its end");

    const int accmode = ::fcntl(fd.get(), F_GETFL);
    file.writable = accmode >= 0 && (accmode & O_ACCMODE) == O_RDWR;
    file.device = st.st_dev;
    file.inode = st.st_ino;
    file.fd = std::move(fd);
    return file;
}

} // namespace loopd::kernel
