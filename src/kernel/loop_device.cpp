#include "loop_device.hpp"

#include <fcntl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <sys/file.h>
#include <sys/ioctl.h>

#include <cerrno>
#include <cstring>
#include <system_error>

namespace loopd::kernel {
namespace {

#ifndef BLKGETDISKSEQ
#define BLKGETDISKSEQ _IOR(0x12, 128, __u64) // Linux 5.15
#endif

[[noreturn]] void fail(const std::string& what)
{
    throw std::system_error(errno, std::generic_category(), what);
}

int ioctlRetry(int fd, unsigned long request, auto arg)
{
    int r;
    do
        r = ::ioctl(fd, request, arg);
    while (r < 0 && errno == EINTR);
    return r;
}

uint32_t flagsOf(const LoopConfig& config)
{
    uint32_t flags = 0;
    if (config.readOnly)
        flags |= LO_FLAGS_READ_ONLY;
    if (config.directIo)
        flags |= LO_FLAGS_DIRECT_IO;
    if (config.partscan)
        flags |= LO_FLAGS_PARTSCAN;
    if (config.autoclear)
        flags |= LO_FLAGS_AUTOCLEAR;
    return flags;
}

loop_info64 infoOf(const LoopConfig& config)
{
    loop_info64 info{};
    info.lo_offset = config.offset;
    info.lo_sizelimit = config.sizeLimit;
    info.lo_flags = flagsOf(config);
    std::strncpy(reinterpret_cast<char*>(info.lo_file_name), config.fileName.c_str(), LO_NAME_SIZE - 1);
    return info;
}

// Kernels before 5.8 have no LOOP_CONFIGURE: bind first, then set the status. A
// window exists between the two in which the device is bound with defaults; the
// caller holds LOCK_EX on the device so udev does not probe it meanwhile.
bool configureLegacy(int loopFd, const LoopConfig& config)
{
    if (ioctlRetry(loopFd, LOOP_SET_FD, config.backingFd) < 0) {
        if (errno == EBUSY)
            return false;
        fail("LOOP_SET_FD");
    }
    auto info = infoOf(config);
    // LOOP_SET_STATUS64 ignores the read-only flag; LOOP_SET_FD took it from the fd's mode.
    if (ioctlRetry(loopFd, LOOP_SET_STATUS64, &info) < 0 ||
        (config.sectorSize != 512 && ioctlRetry(loopFd, LOOP_SET_BLOCK_SIZE, config.sectorSize) < 0)) {
        const int saved = errno;
        ioctlRetry(loopFd, LOOP_CLR_FD, 0);
        errno = saved;
        fail("LOOP_SET_STATUS64");
    }
    return true;
}

} // namespace

std::string loopDevNode(unsigned number)
{
    return "/dev/loop" + std::to_string(number);
}

std::string partitionDevNode(unsigned number, unsigned partition)
{
    return loopDevNode(number) + "p" + std::to_string(partition);
}

LoopControl::LoopControl() : fd_(::open("/dev/loop-control", O_RDWR | O_CLOEXEC))
{
    if (!fd_)
        fail("open /dev/loop-control");
    lockFd(fd_.get(), LOCK_EX);
}

unsigned LoopControl::getFree()
{
    const int number = ioctlRetry(fd_.get(), LOOP_CTL_GET_FREE, 0);
    if (number < 0)
        fail("LOOP_CTL_GET_FREE");
    return static_cast<unsigned>(number);
}

void LoopControl::add(unsigned number)
{
    if (ioctlRetry(fd_.get(), LOOP_CTL_ADD, number) < 0 && errno != EEXIST)
        fail("LOOP_CTL_ADD " + std::to_string(number));
}

UniqueFd openLoop(unsigned number, bool readOnly)
{
    auto fd = tryOpenLoop(number, readOnly);
    if (!fd) {
        errno = ENXIO;
        fail("open " + loopDevNode(number));
    }
    return std::move(*fd);
}

std::optional<UniqueFd> tryOpenLoop(unsigned number, bool readOnly)
{
    const auto node = loopDevNode(number);
    UniqueFd fd(::open(node.c_str(), (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOCTTY));
    if (!fd && errno == ENXIO)
        return std::nullopt;
    if (!fd)
        fail("open " + node);
    return fd;
}

bool tryLockFd(int fd, int op)
{
    int r;
    do
        r = ::flock(fd, op | LOCK_NB);
    while (r < 0 && errno == EINTR);
    if (r < 0 && errno == EWOULDBLOCK)
        return false;
    if (r < 0)
        fail("flock");
    return true;
}

void lockFd(int fd, int op)
{
    int r;
    do
        r = ::flock(fd, op);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        fail("flock");
}

std::optional<LoopStatus> getStatus(int loopFd)
{
    loop_info64 info{};
    if (ioctlRetry(loopFd, LOOP_GET_STATUS64, &info) < 0) {
        if (errno == ENXIO)
            return std::nullopt;
        fail("LOOP_GET_STATUS64");
    }
    return LoopStatus{
        .backingDevice = static_cast<dev_t>(info.lo_device),
        .backingInode = static_cast<ino_t>(info.lo_inode),
        .offset = info.lo_offset,
        .sizeLimit = info.lo_sizelimit,
        .readOnly = (info.lo_flags & LO_FLAGS_READ_ONLY) != 0,
        .directIo = (info.lo_flags & LO_FLAGS_DIRECT_IO) != 0,
        .partscan = (info.lo_flags & LO_FLAGS_PARTSCAN) != 0,
        .autoclear = (info.lo_flags & LO_FLAGS_AUTOCLEAR) != 0,
        .fileName = std::string(reinterpret_cast<const char*>(info.lo_file_name),
                                strnlen(reinterpret_cast<const char*>(info.lo_file_name), LO_NAME_SIZE)),
    };
}

bool configure(int loopFd, const LoopConfig& config)
{
    loop_config lc{};
    lc.fd = static_cast<__u32>(config.backingFd);
    lc.block_size = config.sectorSize;
    lc.info = infoOf(config);
    if (ioctlRetry(loopFd, LOOP_CONFIGURE, &lc) == 0)
        return true;
    switch (errno) {
    case EBUSY:
        return false;
    case EINVAL:
        // Newer kernels refuse direct I/O the backing file cannot do instead of
        // silently using buffered I/O: do what older ones did; the caller reads back
        // what was applied.
        if (config.directIo) {
            auto buffered = config;
            buffered.directIo = false;
            return configure(loopFd, buffered);
        }
        // Before 5.8 the loop driver answered unknown ioctls with EINVAL.
        return configureLegacy(loopFd, config);
    case ENOTTY: // before 5.8, through the block layer
        return configureLegacy(loopFd, config);
    default:
        fail("LOOP_CONFIGURE");
    }
}

uint64_t diskseq(int loopFd)
{
    __u64 seq = 0;
    if (ioctlRetry(loopFd, BLKGETDISKSEQ, &seq) < 0)
        fail("BLKGETDISKSEQ (needs Linux 5.15)");
    return seq;
}

uint64_t sizeBytes(int loopFd)
{
    uint64_t bytes = 0;
    if (ioctlRetry(loopFd, BLKGETSIZE64, &bytes) < 0)
        fail("BLKGETSIZE64");
    return bytes;
}

uint32_t logicalBlockSize(int loopFd)
{
    int size = 0;
    if (ioctlRetry(loopFd, BLKSSZGET, &size) < 0)
        fail("BLKSSZGET");
    return static_cast<uint32_t>(size);
}

void clear(int loopFd)
{
    if (ioctlRetry(loopFd, LOOP_CLR_FD, 0) < 0)
        fail("LOOP_CLR_FD");
}

void flushBuffers(int loopFd)
{
    if (ioctlRetry(loopFd, BLKFLSBUF, 0) < 0)
        fail("BLKFLSBUF");
}

void setCapacity(int loopFd)
{
    if (ioctlRetry(loopFd, LOOP_SET_CAPACITY, 0) < 0)
        fail("LOOP_SET_CAPACITY");
}

} // namespace loopd::kernel

namespace loopd::kernel {

namespace {

void setFlag(int loopFd, uint32_t flag, bool on)
{
    loop_info64 info{};
    if (ioctlRetry(loopFd, LOOP_GET_STATUS64, &info) < 0)
        fail("LOOP_GET_STATUS64");
    info.lo_flags = on ? (info.lo_flags | flag) : (info.lo_flags & ~flag);
    if (ioctlRetry(loopFd, LOOP_SET_STATUS64, &info) < 0)
        fail("LOOP_SET_STATUS64");
}

} // namespace

void setAutoclear(int loopFd, bool on)
{
    setFlag(loopFd, LO_FLAGS_AUTOCLEAR, on);
}

} // namespace loopd::kernel
