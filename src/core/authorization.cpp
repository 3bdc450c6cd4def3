#include "authorization.hpp"

namespace loopd::core {

Verdict decide(Action action, const Caller& caller, std::optional<uint32_t> ownerUid)
{
    constexpr uint32_t unknown = UINT32_MAX;
    if (caller.uid == 0 && caller.privileged)
        return {true, {}};
    const bool owner = ownerUid && *ownerUid == caller.uid && caller.uid != unknown && caller.uid != 0;
    switch (action) {
    case Action::Find:
        return {true, {}};
    case Action::Open:
        return {owner, {}};
    case Action::Attach:
        return {false, "org.loopd1.attach"};
    case Action::Detach:
    case Action::Resize:
        // A caller may always detach what it attached.
        // uid 0 without root's powers is not root's: its devices need detach-others.
        if (ownerUid && *ownerUid == caller.uid && caller.uid != unknown && caller.uid != 0)
            return {true, {}};
        return {false, "org.loopd1.detach-others"};
    }
    return {false, "org.loopd1.attach"};
}

} // namespace loopd::core
