#include "authorization.hpp"

namespace loopd::core {

Verdict decide(Action action, const Caller& caller, std::optional<uint32_t> ownerUid)
{
    constexpr uint32_t unknown = UINT32_MAX;
    if (caller.uid == 0 && caller.privileged)
        return {true, {}, {}};
    if (action == Action::Find)
        return {true, {}, {}};
    // polkitd grants every uid-0 subject everything without reading its rules:
    // for uid 0 without root's powers its yes would mean nothing. Such a process
    // owns nothing either (root's devices are not its own).
    if (caller.uid == 0)
        return {false,
                {},
                "needs root's powers: uid 0 without CAP_DAC_OVERRIDE and CAP_SYS_ADMIN is not root, and "
                "polkit, which lets any uid-0 process through, cannot decide for it"};
    const bool owner = ownerUid && *ownerUid == caller.uid && caller.uid != unknown;
    switch (action) {
    case Action::Find:
        return {true, {}, {}};
    case Action::Open:
        return {owner, {}, owner ? "" : "is for the device's owner or root only"};
    case Action::Attach:
        return {false, "org.loopd1.attach", {}};
    case Action::Detach:
    case Action::Resize:
        // A caller may always detach what it attached.
        if (owner)
            return {true, {}, {}};
        return {false, "org.loopd1.detach-others", {}};
    }
    return {false, "org.loopd1.attach", {}};
}

} // namespace loopd::core
