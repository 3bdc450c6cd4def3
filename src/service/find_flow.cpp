#include "find_flow.hpp"

#include "errors.hpp"
#include "kernel/backing_file.hpp"

#include <loopd/error.hpp>
#include <loopd/log.hpp>

namespace loopd::service {

FindFlow::FindFlow(Services& services, Callers& callers) : s_(services), callers_(callers) {}

void FindFlow::request(FindResult&& result, const CallOrigin& from, std::string path)
{
    if (path.empty() || path.front() != '/')
        throw Error(Errc::InvalidArgument, "cannot find the devices of '" + path + "': not an absolute path");
    const auto id = s_.nextId();
    pending_.emplace(id, Pending{std::move(result), path});
    callers_.authorize(from, core::Action::Find, "finding the devices of " + path, {},
                       [this, id](std::exception_ptr error, Caller caller) {
                           if (error)
                               return reply(id, error);
                           lookUp(id, caller);
                       });
}

void FindFlow::lookUp(core::RequestId id, const Caller& caller)
{
    const auto& path = pending_.at(id).path;
    // As Attach by path: loopd cannot resolve a path in another root or mount
    // namespace, and resolving it in its own would name another file.
    if (!caller.privileged && !caller.sameMounts)
        return reply(id, std::make_exception_ptr(
                             Error(Errc::AccessDenied, "cannot find the devices of " + path +
                                                           ": the path would be resolved in loopd's root and mount "
                                                           "namespace, not the caller's")));
    const kernel::Credentials credentials{caller.uid,
                                          caller.groups.empty() ? 0 : caller.groups.front(),
                                          {caller.groups.begin(), caller.groups.end()},
                                          caller.privileged};
    if (!caller.privileged && caller.groups.empty())
        return reply(id, std::make_exception_ptr(Error(Errc::Failed, "cannot find the devices of " + path +
                                                                         ": the bus did not report the caller's "
                                                                         "groups")));
    // Worker thread: the lookup only, as the caller.
    s_.workers.spawn([this, id, path, credentials]() -> WorkerPool::Continuation {
        try {
            const auto file = kernel::identifyAs(path, credentials);
            return [this, id, file] { found(id, file.device, file.inode); };
        } catch (...) {
            return [this, id, error = std::current_exception()] { reply(id, error); };
        }
    });
}

// Only listed devices: one still attaching or being detached is not (yet, any
// longer) what the file backs as far as callers can tell.
void FindFlow::found(core::RequestId id, dev_t device, ino_t inode)
{
    std::vector<sdbus::ObjectPath> devices;
    for (const auto diskseq : s_.table.diskseqs()) {
        const auto& d = *s_.table.find(diskseq);
        if (d.listed() && d.state != DeviceState::Detaching && d.info.backingDevice == device &&
            d.info.backingInode == inode)
            devices.emplace_back(devicePath(diskseq));
    }
    auto node = pending_.extract(id);
    node.mapped().result.returnResults(devices);
}

void FindFlow::reply(core::RequestId id, std::exception_ptr error)
{
    auto node = pending_.extract(id);
    auto& pending = node.mapped();
    const auto dbusError = toDbusError(error, "cannot find the devices of " + pending.path);
    log::debug("find refused file={}: {}", pending.path, dbusError.getMessage());
    pending.result.returnError(dbusError);
}

} // namespace loopd::service
