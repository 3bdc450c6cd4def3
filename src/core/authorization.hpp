#pragma once

#include <cstdint>
#include <optional>
#include <string>

// Who may do what (API.md, "Security"). Pure: the service room asks the bus who
// the caller is and polkit when told to; the decision itself is made here.
namespace loopd::core {

// Find: anyone (the path is looked up as the caller, so it reveals no more than
// the caller could stat itself, plus which loopd devices it backs). Resize: as
// Detach (owner, root, or polkit's detach-others). Open: the owner or root only.
enum class Action { Attach, Detach, Find, Resize, Open };

struct Caller {
    uint32_t uid = UINT32_MAX; // UINT32_MAX: unknown, a stranger
    // uid 0 *with* CAP_DAC_OVERRIDE and CAP_SYS_ADMIN effective: root. A uid-0
    // process without them is treated like any other user.
    bool privileged = false;
};

struct Verdict {
    bool allowed = false;     // without asking anyone
    std::string polkitAction; // else: allowed only if polkit says yes to this action
    std::string refusal;      // else (no action): refused without asking, because of this
};

// ownerUid: the device's owner, for Detach.
Verdict decide(Action action, const Caller& caller, std::optional<uint32_t> ownerUid = std::nullopt);

} // namespace loopd::core
