#pragma once

#include "core/authorization.hpp"

#include <sdbus-c++/sdbus-c++.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

// Who is calling (the bus daemon's view of a connection) and whether it may
// (core::decide, then polkit when the decision asks for it). Loop thread; every
// question is asynchronous, so the loop never waits for the bus or for polkit.
namespace loopd::service {

// Who sent the call being handled: its unique bus name, and whether its message
// allows interactive authorization (then polkit may have an agent ask someone).
struct CallOrigin {
    std::string sender;
    bool interactive = false;
};

struct Caller {
    uint32_t uid = UINT32_MAX;
    std::vector<uint32_t> groups; // as the bus saw them, the primary gid among them
    uint32_t pid = 0;             // as the bus saw it
    // Looked up afresh for each call (kernel::inspectProcess): a process may drop
    // its powers, or change namespace, after it connected.
    bool privileged = false; // uid 0 with root's capabilities
    bool sameMounts = false; // its paths resolve as loopd's do
};

class Callers {
public:
    using Then = std::function<void(std::exception_ptr, Caller)>;
    // Shown to polkit rules and agents (CheckAuthorization's details).
    using Details = std::map<std::string, std::string>;

    Callers(sdbus::IConnection& connection, sdbus::IProxy& bus);

    // `then` gets nullptr when `sender` may do `action` (to a device owned by
    // ownerUid); else Error(AccessDenied) whose message starts with `what`.
    void authorize(const CallOrigin& from, core::Action action, const std::string& what, Details details, Then then,
                   std::optional<uint32_t> ownerUid = std::nullopt);
    // The connection left the bus: its credentials are forgotten, and polkit's
    // checks for it cancelled (an agent may be asking someone for a password).
    void forget(const std::string& sender);
    // Whether a unique name is still on the bus (a client of an adopted device).
    void checkAlive(const std::string& name, std::function<void(bool)> then);

private:
    void lookup(const std::string& sender, const std::string& what, Then then);
    void askPolkit(const CallOrigin& from, const std::string& action, const Details& details,
                   std::function<void(bool)> then);

    sdbus::IProxy& bus_;
    std::unique_ptr<sdbus::IProxy> polkit_;
    std::map<std::string, Caller> known_;              // by unique bus name, while connected
    std::multimap<std::string, std::string> checking_; // sender -> cancellation ids of its checks
    uint64_t nextCheck_ = 1;
};

} // namespace loopd::service
