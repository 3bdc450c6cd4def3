#include "backing_file.hpp"

#include <loopd/error.hpp>

#include <fcntl.h>
#include <linux/capability.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <linux/openat2.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <iterator>
#include <optional>
#include <system_error>

namespace loopd::kernel {
namespace {

// The 32-bit ids' syscalls: on i386 and armhf the plain numbers are the old
// 16-bit calls (ids above 65535 would be cut); elsewhere there is only one kind.
#ifdef SYS_setfsuid32
constexpr long sysSetfsuid = SYS_setfsuid32;
constexpr long sysSetfsgid = SYS_setfsgid32;
constexpr long sysSetgroups = SYS_setgroups32;
#else
constexpr long sysSetfsuid = SYS_setfsuid;
constexpr long sysSetfsgid = SYS_setfsgid;
constexpr long sysSetgroups = SYS_setgroups;
#endif

// The capabilities that let root open any file, taken out of this thread's
// effective set (capset on the calling thread only) and put back after.
class FileCapabilities {
public:
    static FileCapabilities drop()
    {
        FileCapabilities saved;
        if (::syscall(SYS_capget, &saved.header_, saved.data_) < 0)
            throw std::system_error(errno, std::generic_category(), "capget");
        __user_cap_data_struct lowered[2] = {saved.data_[0], saved.data_[1]};
        for (const int cap : {CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER})
            lowered[cap / 32].effective &= ~(1U << (cap % 32));
        if (::syscall(SYS_capset, &saved.header_, lowered) < 0)
            throw std::system_error(errno, std::generic_category(), "capset");
        return saved;
    }
    FileCapabilities(FileCapabilities&& other) noexcept : header_(other.header_), armed_(other.armed_)
    {
        std::copy(std::begin(other.data_), std::end(other.data_), std::begin(data_));
        other.armed_ = false;
    }
    FileCapabilities& operator=(FileCapabilities&&) = delete;
    // Put back when it goes, also when the identity switch after the drop threw.
    ~FileCapabilities() { restore(); }

private:
    FileCapabilities() = default;
    // A worker left without them would fail its next root caller's open; it cannot
    // happen (raising back within the permitted set always works): stop if it does.
    void restore() noexcept
    {
        if (armed_ && ::syscall(SYS_capset, &header_, data_) < 0)
            std::abort();
    }

    __user_cap_header_struct header_{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data_[2]{};
    bool armed_ = true;
};

// The glibc wrappers of setgroups() apply to every thread of the process; the raw
// syscalls (and setfsuid/setfsgid) change only the calling thread, which is what a
// worker impersonating one caller needs.
class ThreadIdentity {
public:
    explicit ThreadIdentity(const Credentials& caller) : active_(!caller.privileged)
    {
        if (!active_)
            return;
        // A switch to a non-zero fsuid drops the file capabilities from this
        // thread's effective set by itself; for uid 0 without root's powers they
        // are dropped here, so the open is checked as that process's would be.
        if (caller.uid == 0)
            dropped_.emplace(FileCapabilities::drop());
        if (::syscall(sysSetgroups, caller.groups.size(), caller.groups.data()) < 0)
            throw std::system_error(errno, std::generic_category(), "setgroups");
        if (!switchTo(sysSetfsgid, caller.gid)) {
            restore();
            throw std::system_error(EPERM, std::generic_category(), "setfsgid");
        }
        if (!switchTo(sysSetfsuid, caller.uid)) {
            restore();
            throw std::system_error(EPERM, std::generic_category(), "setfsuid");
        }
    }
    ~ThreadIdentity()
    {
        if (active_)
            restore();
        // dropped_ puts the capabilities back as it goes, after the ids.
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
        const bool uid = switchTo(sysSetfsuid, uid_);
        const bool gid = switchTo(sysSetfsgid, gid_);
        if (!uid || !gid || ::syscall(sysSetgroups, 0, nullptr) != 0)
            std::abort();
    }
    bool active_;
    std::optional<FileCapabilities> dropped_;
    // The thread's own ids, as they were before the switch.
    unsigned uid_ = static_cast<unsigned>(::syscall(sysSetfsuid, -1));
    unsigned gid_ = static_cast<unsigned>(::syscall(sysSetfsgid, -1));
};

[[noreturn]] void invalid(const std::string& what, const std::string& why)
{
    throw Error(Errc::InvalidArgument, what + " " + why);
}

} // namespace

namespace {

// openat2 (5.6+): no magic links on the way, so /proc/self/fd/N (loopd's own fds)
// or /proc/PID/root never lead anywhere the caller could not go itself.
UniqueFd openNoMagic(const std::string& path, uint64_t flags)
{
    open_how how{};
    how.flags = flags;
    how.resolve = RESOLVE_NO_MAGICLINKS;
    UniqueFd fd(static_cast<int>(::syscall(SYS_openat2, AT_FDCWD, path.c_str(), &how, sizeof(how))));
    if (!fd && errno == ENOSYS) // before 5.6: only the flags
        fd = UniqueFd(::open(path.c_str(), static_cast<int>(how.flags)));
    return fd;
}

[[noreturn]] void openFailed(int err, const std::string& path, bool readOnly, const Credentials& caller)
{
    switch (err) {
    case ENOENT:
    case ENOTDIR:
        throw Error(Errc::NotFound, "no such file: " + path);
    case EACCES:
    case EPERM:
    case EROFS:
        // Opened as loopd itself (privileged caller): its own sandbox refused,
        // not the caller's rights: Failed, naming the path (errors table).
        if (caller.privileged)
            throw std::system_error(err, std::generic_category(), "open " + path);
        throw Error(Errc::AccessDenied, "cannot open " + path + (readOnly ? "" : " for writing") + ": " +
                                            std::generic_category().message(err));
    case EISDIR:
        invalid(path, "is a directory");
    case ELOOP:
        invalid(path, "leads through a magic link (/proc/.../fd, /proc/.../root) or too many symlinks");
    default:
        throw std::system_error(err, std::generic_category(), "open " + path);
    }
}

} // namespace

UniqueFd openAs(const std::string& path, bool readOnly, const Credentials& caller)
{
    ThreadIdentity identity(caller);
    UniqueFd fd =
        openNoMagic(path, static_cast<uint64_t>((readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
    if (!fd)
        openFailed(errno, path, readOnly, caller);
    // Back to blocking I/O: the flag was only there for the open of a fifo.
    const int status = ::fcntl(fd.get(), F_GETFL);
    if (status < 0 || ::fcntl(fd.get(), F_SETFL, status & ~O_NONBLOCK) < 0)
        throw std::system_error(errno, std::generic_category(), "fcntl " + path);
    return fd;
}

FileId identifyAs(const std::string& path, const Credentials& caller)
{
    UniqueFd fd;
    {
        ThreadIdentity identity(caller);
        fd = openNoMagic(path, static_cast<uint64_t>(O_PATH | O_CLOEXEC));
        if (!fd)
            openFailed(errno, path, true, caller);
    }
    struct stat st {};
    if (::fstat(fd.get(), &st) < 0)
        throw std::system_error(errno, std::generic_category(), "fstat " + path);
    return FileId{st.st_dev, st.st_ino};
}

BackingFile inspect(UniqueFd fd, const std::string& what, uint64_t offset)
{
    // What the fd may do: an O_PATH fd cannot be read (LOOP_CONFIGURE would fail
    // late), a write-only one cannot back a device that is read.
    const int mode = ::fcntl(fd.get(), F_GETFL);
    if (mode < 0)
        throw std::system_error(errno, std::generic_category(), "fcntl " + what);
    if (mode & O_PATH)
        invalid(what, "is an O_PATH file descriptor; open it for reading");
    if ((mode & O_ACCMODE) == O_WRONLY)
        invalid(what, "is open for writing only; open it for reading");
    // procfs and sysfs files are the kernel's views (of memory, of devices), never
    // images, whatever their size says.
    struct statfs fs {};
    if (::fstatfs(fd.get(), &fs) < 0)
        throw std::system_error(errno, std::generic_category(), "fstatfs " + what);
    if (fs.f_type == PROC_SUPER_MAGIC || fs.f_type == SYSFS_MAGIC)
        invalid(what, "is a procfs or sysfs file, not an image");

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

    file.writable = (mode & O_ACCMODE) == O_RDWR;
    file.device = st.st_dev;
    file.inode = st.st_ino;
    file.fd = std::move(fd);
    return file;
}

std::optional<std::string> pathOfFd(int fd)
{
    std::error_code ec;
    auto path = std::filesystem::read_symlink("/proc/self/fd/" + std::to_string(fd), ec);
    if (ec || path.empty() || path.native().front() != '/')
        return std::nullopt;
    return path.string();
}

} // namespace loopd::kernel
