#include "partitions.hpp"

#include <loopd/unique_fd.hpp>

#include <blkid/blkid.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/blkpg.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>

namespace loopd::kernel {
namespace {

// How long removePartition waits for a transient opener (udev's probe) to let go.
constexpr std::chrono::seconds busyRetryLimit{5};

using Probe = std::unique_ptr<std::remove_pointer_t<blkid_probe>, decltype(&blkid_free_probe)>;

[[noreturn]] void fail(int err, const std::string& what)
{
    throw std::system_error(err, std::generic_category(), what);
}

int blkpg(int fd, int op, const PartitionSpec& spec)
{
    blkpg_partition part{};
    part.pno = static_cast<int>(spec.number);
    part.start = static_cast<long long>(spec.startBytes);
    part.length = static_cast<long long>(spec.sizeBytes);
    blkpg_ioctl_arg arg{};
    arg.op = op;
    arg.datalen = sizeof(part);
    arg.data = &part;
    int r;
    do
        r = ::ioctl(fd, BLKPG, &arg);
    while (r < 0 && errno == EINTR);
    return r;
}

Probe openProbe(int fd)
{
    Probe probe(blkid_new_probe(), blkid_free_probe);
    if (!probe)
        fail(ENOMEM, "blkid_new_probe");
    if (blkid_probe_set_device(probe.get(), fd, 0, 0) < 0)
        fail(errno ? errno : EIO, "blkid_probe_set_device");
    blkid_probe_enable_superblocks(probe.get(), 0);
    blkid_probe_enable_partitions(probe.get(), 1);
    blkid_probe_set_partitions_flags(probe.get(), BLKID_PARTS_ENTRY_DETAILS);
    return probe;
}

std::vector<PartitionSpec> readTable(blkid_probe probe)
{
    // 1: nothing found; -2: ambiguous (e.g. two tables): attach without partitions,
    // as the kernel would. Only a real I/O error is an error.
    const int r = blkid_do_safeprobe(probe);
    if (r == -1)
        fail(errno ? errno : EIO, "probing the partition table");
    std::vector<PartitionSpec> specs;
    blkid_partlist list = r == 0 ? blkid_probe_get_partitions(probe) : nullptr;
    if (!list)
        return specs;

    // libblkid reports in 512-byte sectors whatever the device's block size.
    const int count = blkid_partlist_numof_partitions(list);
    for (int i = 0; i < count; ++i) {
        blkid_partition part = blkid_partlist_get_partition(list, i);
        if (blkid_partition_is_extended(part))
            continue;
        const auto number = blkid_partition_get_partno(part);
        const auto start = blkid_partition_get_start(part);
        const auto size = blkid_partition_get_size(part);
        if (number <= 0 || start < 0 || size <= 0)
            continue;
        specs.push_back(
            {static_cast<unsigned>(number), static_cast<uint64_t>(start) * 512, static_cast<uint64_t>(size) * 512});
    }
    std::sort(specs.begin(), specs.end(), [](auto& a, auto& b) { return a.number < b.number; });
    return specs;
}

// ---- the probe in a child of its own ------------------------------------------

#if defined(__x86_64__)
constexpr uint32_t auditArch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
constexpr uint32_t auditArch = AUDIT_ARCH_AARCH64;
#elif defined(__i386__)
constexpr uint32_t auditArch = AUDIT_ARCH_I386;
#elif defined(__arm__)
constexpr uint32_t auditArch = AUDIT_ARCH_ARM;
#elif defined(__powerpc64__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
constexpr uint32_t auditArch = AUDIT_ARCH_PPC64LE;
#elif defined(__s390x__)
constexpr uint32_t auditArch = AUDIT_ARCH_S390X;
#elif defined(__riscv) && __riscv_xlen == 64
constexpr uint32_t auditArch = AUDIT_ARCH_RISCV64;
#else
#error "add this architecture's AUDIT_ARCH_* for the probe's seccomp filter"
#endif

// What parsing a partition table needs once the device is open: reading it,
// memory, writing the answer, leaving. Everything else fails with EPERM.
std::vector<sock_filter> probeFilter()
{
    std::vector<long> allowed{__NR_read, __NR_write, __NR_ioctl, __NR_brk, __NR_munmap, __NR_mremap, __NR_madvise,
                              __NR_mprotect, __NR_futex, __NR_close, __NR_exit, __NR_exit_group, __NR_pread64,
                              __NR_rt_sigreturn, __NR_rt_sigprocmask, __NR_rt_sigaction,
                              // What the sanitizers' runtimes call on their own (scripts/test's
                              // ASan+UBSan pass): harmless, they reach nothing outside.
                              __NR_sigaltstack, __NR_getpid, __NR_gettid, __NR_sched_yield};
#ifdef __NR_lseek
    allowed.push_back(__NR_lseek);
#endif
#ifdef __NR__llseek
    allowed.push_back(__NR__llseek);
#endif
#ifdef __NR_mmap
    allowed.push_back(__NR_mmap);
#endif
#ifdef __NR_mmap2
    allowed.push_back(__NR_mmap2);
#endif
#ifdef __NR_fstat
    allowed.push_back(__NR_fstat);
#endif
#ifdef __NR_newfstatat
    allowed.push_back(__NR_newfstatat);
#endif
#ifdef __NR_statx
    allowed.push_back(__NR_statx);
#endif
    std::vector<sock_filter> program{
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, auditArch, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
    };
    for (const auto nr : allowed) {
        program.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, static_cast<uint32_t>(nr), 0, 1));
        program.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    }
    program.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM));
    return program;
}

// In the child: no capabilities, no new privileges, only probeFilter()'s calls.
bool confine()
{
    __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct none[2]{};
    if (::syscall(SYS_capset, &header, none) != 0 || ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return false;
    auto program = probeFilter();
    sock_fprog filter{static_cast<unsigned short>(program.size()), program.data()};
    return ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &filter) == 0;
}

// The child's answer on the pipe: a status word, then number/start/size triples.
constexpr uint64_t answerOk = 0;
constexpr std::size_t maxAnswered = 4096;

[[noreturn]] void probeChild(int deviceFd, int answerFd)
{
    // Only a read-only fd of the device and the pipe stay open, and /dev/null as
    // 0-2: a child that misparses its way into running code finds none of loopd's
    // sockets, no journal stream or tty, and cannot write to or reconfigure the
    // device (loopd's own fd is writable).
    // First of all, before anything that may wait: loopd's other fds go, so that
    // a child that lingers never keeps loopd's bus connection (or anything else)
    // open after loopd is gone.
    const int device = ::fcntl(deviceFd, F_DUPFD, 100);
    const int answer = ::fcntl(answerFd, F_DUPFD, 100);
    if (device < 0 || answer < 0 || ::dup2(device, 3) != 3 || ::dup2(answer, 4) != 4 ||
        ::syscall(SYS_close_range, 5U, ~0U, 0U) != 0)
        ::_exit(2);
    const int readOnly = ::open("/proc/self/fd/3", O_RDONLY | O_CLOEXEC);
    const int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (readOnly < 0 || null < 0 || ::dup2(readOnly, 3) != 3 || ::dup2(null, 0) != 0 || ::dup2(null, 1) != 1 ||
        ::dup2(null, 2) != 2 || ::close(readOnly) != 0 || ::close(null) != 0)
        ::_exit(2);
    std::vector<uint64_t> words{answerOk};
    try {
        auto probe = openProbe(3); // reads sysfs: before the filter
        if (!confine())
            ::_exit(3);
        const auto table = readTable(probe.get());
        if (table.size() > maxAnswered) // more than the parent reads: an answer of its own
            throw std::system_error(E2BIG, std::generic_category(), "too many partitions");
        for (const auto& spec : table)
            words.insert(words.end(), {spec.number, spec.startBytes, spec.sizeBytes});
    } catch (const std::system_error& e) {
        words = {static_cast<uint64_t>(e.code().value())};
    } catch (...) {
        words = {static_cast<uint64_t>(EIO)};
    }
    const auto* data = reinterpret_cast<const char*>(words.data());
    std::size_t left = words.size() * sizeof(uint64_t);
    while (left > 0) {
        const auto n = ::write(4, data, left);
        if (n <= 0)
            ::_exit(4);
        data += n;
        left -= static_cast<std::size_t>(n);
    }
    ::_exit(0);
}

// Untrusted: what a child that parsed attacker-controlled bytes says.
std::vector<PartitionSpec> checkedAnswer(const std::vector<uint64_t>& words)
{
    if (words.empty())
        throw std::runtime_error("the partition probe gave no answer");
    // The child's errno is its word only: reported, never mapped to an error kind.
    if (words[0] != answerOk)
        throw std::runtime_error("probing the partition table failed: " +
                                 std::generic_category().message(static_cast<int>(std::min<uint64_t>(words[0], 4095))));
    if ((words.size() - 1) % 3 != 0 || (words.size() - 1) / 3 > maxAnswered)
        throw std::runtime_error("the partition probe gave a malformed answer");
    std::vector<PartitionSpec> specs;
    for (std::size_t i = 1; i < words.size(); i += 3) {
        const PartitionSpec spec{static_cast<unsigned>(words[i]), words[i + 1], words[i + 2]};
        const bool sane = words[i] > 0 && words[i] <= 65535 && spec.sizeBytes > 0 &&
                          spec.startBytes <= UINT64_MAX - spec.sizeBytes &&
                          (specs.empty() || specs.back().number < spec.number);
        if (!sane)
            throw std::runtime_error("the partition probe reported an impossible partition");
        specs.push_back(spec);
    }
    return specs;
}

} // namespace

#if defined(__SANITIZE_ADDRESS__)
// ASan's runtime is not fork-safe in a process with many threads: scripts/test's
// sanitizer pass saw one child in ~1000 hang on a lock another thread held at the
// fork. Sanitizer builds of the daemon therefore parse in-process; a
// single-threaded process (the unit tests) still forks.
bool singleThreaded()
{
    std::error_code ec;
    const auto tasks = std::distance(std::filesystem::directory_iterator("/proc/self/task", ec),
                                     std::filesystem::directory_iterator());
    return !ec && tasks == 1;
}
#endif

namespace {
std::shared_mutex forkGate;
}

std::shared_lock<std::shared_mutex> holdOffForks()
{
    return std::shared_lock(forkGate);
}

namespace {

// fork() with no other sequence's fds in flight; returns once the child has
// closed its copies of loopd's fds (its end of `closed` is among them: EOF).
pid_t forkGated(int deviceFd, int answerFd)
{
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC) != 0)
        fail(errno, "pipe2");
    UniqueFd closedReader(ends[0]);
    UniqueFd closedWriter(ends[1]);
    std::unique_lock gate(forkGate);
    const pid_t child = ::fork();
    if (child < 0)
        fail(errno, "fork");
    if (child == 0)
        probeChild(deviceFd, answerFd);
    closedWriter.reset();
    char byte;
    while (::read(closedReader.get(), &byte, 1) < 0 && errno == EINTR) {
    }
    return child;
}

} // namespace

std::vector<PartitionSpec> probePartitionsConfined(int fd, std::chrono::steady_clock::time_point deadline)
{
#if defined(__SANITIZE_ADDRESS__)
    if (!singleThreaded())
        return probePartitions(fd);
#endif
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC) != 0)
        fail(errno, "pipe2");
    UniqueFd reader(ends[0]);
    UniqueFd writer(ends[1]);
    const pid_t child = forkGated(fd, writer.get());
    writer.reset();
    std::vector<uint64_t> words;
    std::string buffer;
    bool timedOut = false;
    bool clean = false;
    for (;;) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        pollfd ready{reader.get(), POLLIN, 0};
        const int r = left.count() <= 0 ? 0 : ::poll(&ready, 1, static_cast<int>(left.count()));
        if (r == 0) {
            timedOut = true;
            break;
        }
        if (r < 0 && errno == EINTR)
            continue;
        char chunk[4096];
        const auto n = r < 0 ? -1 : ::read(reader.get(), chunk, sizeof(chunk));
        if (n == 0) { // EOF: the child said all it had to say
            clean = true;
            break;
        }
        if (n < 0 || buffer.size() > (maxAnswered * 3 + 1) * sizeof(uint64_t))
            break;
        buffer.append(chunk, static_cast<std::size_t>(n));
    }
    // Anything but a clean end: the child is not waited for on its own terms (one
    // that writes on and on would block on the full pipe forever).
    if (!clean)
        ::kill(child, SIGKILL);
    // A child stuck in a read of the device cannot die before the read returns:
    // this waits with it. It runs on the attach's own thread, which its caller
    // (answered Timeout meanwhile) no longer waits for.
    int status = 0;
    while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
    }
    if (timedOut)
        throw std::system_error(ETIMEDOUT, std::generic_category(), "probing the partition table");
    if (!clean || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        throw std::runtime_error("the partition probe died (" +
                                 (WIFSIGNALED(status) ? "signal " + std::to_string(WTERMSIG(status))
                                                      : "status " + std::to_string(WEXITSTATUS(status))) +
                                 ")");
    words.resize(buffer.size() / sizeof(uint64_t));
    std::memcpy(words.data(), buffer.data(), words.size() * sizeof(uint64_t));
    return checkedAnswer(words);
}

std::vector<PartitionSpec> probePartitions(int fd)
{
    auto probe = openProbe(fd);
    return readTable(probe.get());
}

bool addPartition(int fd, const PartitionSpec& spec)
{
    if (blkpg(fd, BLKPG_ADD_PARTITION, spec) == 0)
        return true;
    if (errno == EBUSY)
        return false;
    fail(errno, "BLKPG_ADD_PARTITION " + std::to_string(spec.number));
}

void removePartition(int fd, unsigned number)
{
    // BLKPG_DEL_PARTITION fails with EBUSY while anyone has the partition open, and
    // udev's workers open every new partition to probe it. Seen on Debian 12's 6.1
    // (kernel matrix, qemu): a 32-partition attach that timed out while udev was
    // still probing could not be undone ("BLKPG_DEL_PARTITION 31: EBUSY") and the
    // device leaked. A probe lets go within milliseconds (seconds under emulation),
    // so retry for a while; a partition that stays open (mounted) still fails.
    using namespace std::chrono_literals;
    const auto deadline = std::chrono::steady_clock::now() + busyRetryLimit;
    auto pause = 5ms;
    while (blkpg(fd, BLKPG_DEL_PARTITION, PartitionSpec{number, 0, 0}) != 0) {
        if (errno == ENXIO)
            return;
        if (errno != EBUSY || std::chrono::steady_clock::now() + pause > deadline)
            fail(errno, "BLKPG_DEL_PARTITION " + std::to_string(number));
        std::this_thread::sleep_for(pause);
        pause = std::min<std::chrono::milliseconds>(pause * 2, 200ms);
    }
}

void resizePartition(int fd, const PartitionSpec& spec)
{
    if (blkpg(fd, BLKPG_RESIZE_PARTITION, spec) != 0)
        fail(errno, "BLKPG_RESIZE_PARTITION " + std::to_string(spec.number));
}

std::optional<PartitionSpec> existingPartition(unsigned loopNumber, unsigned partition)
{
    const auto dir = "/sys/block/loop" + std::to_string(loopNumber) + "/loop" + std::to_string(loopNumber) + "p" +
                     std::to_string(partition);
    auto sectors = [&dir](const char* name) -> std::optional<uint64_t> {
        UniqueFd fd(::open((dir + "/" + name).c_str(), O_RDONLY | O_CLOEXEC));
        char text[32] = {};
        if (!fd || ::read(fd.get(), text, sizeof(text) - 1) <= 0)
            return std::nullopt;
        return std::strtoull(text, nullptr, 10);
    };
    const auto start = sectors("start");
    const auto size = sectors("size");
    if (!start || !size)
        return std::nullopt;
    // sysfs counts 512-byte sectors whatever the logical block size.
    return PartitionSpec{partition, *start * 512, *size * 512};
}

std::vector<unsigned> existingPartitions(unsigned loopNumber)
{
    namespace fs = std::filesystem;
    const std::string disk = "loop" + std::to_string(loopNumber);
    const std::string prefix = disk + "p";
    std::vector<unsigned> numbers;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator("/sys/block/" + disk, ec)) {
        const auto name = entry.path().filename().string();
        if (name.rfind(prefix, 0) == 0 && name.size() > prefix.size())
            numbers.push_back(static_cast<unsigned>(std::stoul(name.substr(prefix.size()))));
    }
    std::sort(numbers.begin(), numbers.end());
    return numbers;
}

} // namespace loopd::kernel
