#include "process.hpp"

#include <loopd/unique_fd.hpp>

#include <fcntl.h>
#include <linux/capability.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

namespace loopd::kernel {
namespace {

// AT_STATX_DONT_SYNC: cached attributes only. A caller's root may lie on a
// filesystem that does not answer (FUSE), and this runs on the loop thread.
bool sameFile(const std::string& a, const std::string& b)
{
    struct statx sa {};
    struct statx sb {};
    constexpr unsigned mask = STATX_INO;
    return ::statx(AT_FDCWD, a.c_str(), AT_STATX_DONT_SYNC, mask, &sa) == 0 &&
           ::statx(AT_FDCWD, b.c_str(), AT_STATX_DONT_SYNC, mask, &sb) == 0 && sa.stx_dev_major == sb.stx_dev_major &&
           sa.stx_dev_minor == sb.stx_dev_minor && sa.stx_ino == sb.stx_ino;
}

// "Uid:" (real, effective, saved, fs) and "CapEff:" of /proc/PID/status.
bool readStatus(const std::string& dir, ProcessFacts& facts)
{
    std::ifstream status(dir + "/status");
    bool uid = false;
    bool caps = false;
    for (std::string line; std::getline(status, line);) {
        std::istringstream fields(line);
        std::string key;
        fields >> key;
        if (key == "Uid:") {
            uint32_t real = 0;
            uid = static_cast<bool>(fields >> real >> facts.effectiveUid);
        } else if (key == "CapEff:") {
            caps = static_cast<bool>(fields >> std::hex >> facts.effectiveCaps);
        }
    }
    return uid && caps;
}

} // namespace

std::optional<ProcessFacts> inspectProcess(pid_t pid)
{
    if (pid <= 0)
        return std::nullopt;
    UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
    if (!pidfd)
        return std::nullopt;
    const auto dir = "/proc/" + std::to_string(pid);
    ProcessFacts facts;
    if (!readStatus(dir, facts))
        return std::nullopt;
    facts.sharesMountsAndRoot =
        sameFile(dir + "/ns/mnt", "/proc/self/ns/mnt") && sameFile(dir + "/root", "/proc/self/root");
    // Still alive, so the number was not reused while we read.
    if (::syscall(SYS_pidfd_send_signal, pidfd.get(), 0, nullptr, 0) < 0)
        return std::nullopt;
    return facts;
}

bool hasRootPowers(const ProcessFacts& facts)
{
    const uint64_t needed = (1ULL << CAP_SYS_ADMIN) | (1ULL << CAP_DAC_OVERRIDE);
    return facts.effectiveUid == 0 && (facts.effectiveCaps & needed) == needed;
}

} // namespace loopd::kernel
