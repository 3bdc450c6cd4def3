#include "callers.hpp"

#include "kernel/process.hpp"

#include <loopd/error.hpp>
#include <loopd/log.hpp>

namespace loopd::service {

Callers::Callers(sdbus::IConnection& connection, sdbus::IProxy& bus)
    : bus_(bus),
      polkit_(sdbus::createProxy(connection, "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority"))
{
}

void Callers::authorize(const CallOrigin& from, core::Action action, const std::string& what, Details details,
                        Then then, std::optional<uint32_t> ownerUid)
{
    lookup(from.sender, what,
           [this, from, action, what, details, then, ownerUid](std::exception_ptr error, Caller caller) {
               if (error)
                   return then(error, std::move(caller));
               if (const auto facts = kernel::inspectProcess(static_cast<pid_t>(caller.pid))) {
                   caller.privileged = caller.uid == 0 && kernel::hasRootPowers(*facts);
                   caller.sameMounts = facts->sharesMountsAndRoot;
               }
               const auto verdict = core::decide(action, core::Caller{caller.uid, caller.privileged}, ownerUid);
               if (verdict.allowed)
                   return then(nullptr, std::move(caller));
               if (verdict.polkitAction.empty()) {
                   const auto why = what + " " + verdict.refusal + " (uid " + std::to_string(caller.uid) + ")";
                   return then(std::make_exception_ptr(Error(Errc::AccessDenied, why)), caller);
               }
               askPolkit(from, verdict.polkitAction, details, [then, caller, what, verdict](bool allowed) {
                   if (allowed)
                       return then(nullptr, caller);
                   then(std::make_exception_ptr(Error(Errc::AccessDenied, what + " was not authorized (polkit action " +
                                                                              verdict.polkitAction + ", uid " +
                                                                              std::to_string(caller.uid) + ")")),
                        caller);
               });
           });
}

void Callers::lookup(const std::string& sender, const std::string& what, Then then)
{
    // A connection's credentials are fixed when it connects and its unique name is
    // never reused: ask the bus once per connection.
    if (const auto known = known_.find(sender); known != known_.end())
        return then(nullptr, known->second);
    auto failed = [what, sender](const std::string& why) {
        return std::make_exception_ptr(
            Error(Errc::Failed, what + ": the bus did not say who " + sender + " is: " + why));
    };
    try {
        bus_.callMethodAsync("GetConnectionCredentials")
            .onInterface("org.freedesktop.DBus")
            .withArguments(sender)
            .uponReplyInvoke([this, sender, then, failed](const sdbus::Error* error,
                                                          std::map<std::string, sdbus::Variant> credentials) {
                if (error)
                    return then(failed(error->getName() + ": " + error->getMessage()), {});
                Caller caller;
                if (credentials.count("UnixUserID"))
                    caller.uid = credentials.at("UnixUserID").get<uint32_t>();
                if (credentials.count("ProcessID"))
                    caller.pid = credentials.at("ProcessID").get<uint32_t>();
                if (credentials.count("UnixGroupIDs"))
                    caller.groups = credentials.at("UnixGroupIDs").get<std::vector<uint32_t>>();
                known_[sender] = caller;
                then(nullptr, std::move(caller));
            });
    } catch (const std::exception& e) {
        then(failed(e.what()), {});
    }
}

// polkit's CheckAuthorization for the calling connection (subject
// "system-bus-name": polkit resolves the name itself, so no PID is trusted), with
// user interaction allowed so an agent may ask for a password. The answer may take
// as long as the user does.
namespace {

// D-Bus strings must be valid UTF-8, and a file name is any bytes: the prompt gets
// printable ASCII, the rest as '?'.
Callers::Details printable(const Callers::Details& details)
{
    auto out = details;
    for (auto& [key, value] : out)
        for (auto& c : value)
            if (c < ' ' || c > '~')
                c = '?';
    return out;
}

} // namespace

void Callers::askPolkit(const CallOrigin& from, const std::string& action, const Details& details,
                        std::function<void(bool)> then)
{
    using Subject = sdbus::Struct<std::string, std::map<std::string, sdbus::Variant>>;
    using Answer = sdbus::Struct<bool, bool, std::map<std::string, std::string>>;
    const auto& sender = from.sender;
    // Only when the caller's message allows it (busctl --allow-interactive-authorization,
    // G_DBUS_CALL_FLAGS_ALLOW_INTERACTIVE_AUTHORIZATION); else polkit answers at once.
    const uint32_t allowUserInteraction = from.interactive ? 1 : 0;
    const auto cancellation = "loopd-" + std::to_string(nextCheck_++);
    checking_.emplace(sender, cancellation);
    try {
        polkit_->callMethodAsync("CheckAuthorization")
            .onInterface("org.freedesktop.PolicyKit1.Authority")
            .withTimeout(std::chrono::minutes(5))
            .withArguments(Subject{"system-bus-name", {{"name", sdbus::Variant(sender)}}}, action, printable(details),
                           allowUserInteraction, cancellation)
            .uponReplyInvoke([this, then, action, sender, cancellation](const sdbus::Error* error, Answer answer) {
                const auto [first, last] = checking_.equal_range(sender);
                for (auto it = first; it != last; ++it)
                    if (it->second == cancellation) {
                        checking_.erase(it);
                        break;
                    }
                if (error)
                    log::warn("polkit could not be asked action={} sender={}: {}", action, sender, error->getMessage());
                then(!error && std::get<0>(answer));
            });
    } catch (const std::exception& e) {
        log::warn("polkit could not be asked action={} sender={}: {}", action, sender, e.what());
        then(false);
    }
}

void Callers::forget(const std::string& sender)
{
    known_.erase(sender);
    const auto [first, last] = checking_.equal_range(sender);
    for (auto it = first; it != last; ++it) {
        try {
            polkit_->callMethodAsync("CancelCheckAuthorization")
                .onInterface("org.freedesktop.PolicyKit1.Authority")
                .withArguments(it->second)
                .uponReplyInvoke([](const sdbus::Error*) {});
        } catch (const std::exception& e) {
            log::warn("cannot cancel polkit's check for {}: {}", sender, e.what());
        }
    }
    // Their answers (cancelled: not authorized) still arrive and fail the calls.
}

// Asked after subscribing to NameOwnerChanged (the daemon does that first): a
// client that leaves in between is seen either way.
void Callers::checkAlive(const std::string& name, std::function<void(bool)> then)
{
    try {
        bus_.callMethodAsync("NameHasOwner")
            .onInterface("org.freedesktop.DBus")
            .withArguments(name)
            .uponReplyInvoke([then](const sdbus::Error* error, bool alive) { then(error != nullptr || alive); });
    } catch (const std::exception& e) {
        log::warn("cannot ask whether {} is still on the bus: {}", name, e.what());
    }
}

} // namespace loopd::service
