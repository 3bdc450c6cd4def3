#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>

// A caller's process as procfs shows it: what makes root root, and where its paths
// lead. Cheap procfs reads, safe on the loop thread.
namespace loopd::kernel {

struct ProcessFacts {
    uint32_t effectiveUid = UINT32_MAX;
    uint64_t effectiveCaps = 0;
    bool sharesMountsAndRoot = false; // its paths resolve as loopd's do
};

// Read through a pidfd taken first and checked alive after: the facts are of the
// process that had `pid` when the call came, not of one that reused the number
// while they were read. nullopt when it cannot be looked at (gone, or hidden from
// loopd by ProtectProc=invisible).
std::optional<ProcessFacts> inspectProcess(pid_t pid);

// uid 0 with CAP_SYS_ADMIN and CAP_DAC_OVERRIDE in its effective set (API.md).
bool hasRootPowers(const ProcessFacts& facts);

} // namespace loopd::kernel
