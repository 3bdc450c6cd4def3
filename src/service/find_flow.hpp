#pragma once

#include "bus_objects.hpp"
#include "callers.hpp"
#include "services.hpp"

#include <map>
#include <string>
#include <vector>

// Manager.Find: the loopd devices backed by the file a path names now (API.md).
// Loop thread; the lookup of the caller's path runs on a thread of its own (a
// path on a filesystem that does not answer stalls only this call).
namespace loopd::service {

class FindFlow {
public:
    FindFlow(Services& services, Callers& callers);

    void request(FindResult&& result, const CallOrigin& from, std::string path);

private:
    void lookUp(core::RequestId id, const Caller& caller);
    void found(core::RequestId id, dev_t device, ino_t inode);
    void reply(core::RequestId id, std::exception_ptr error);

    struct Pending {
        FindResult result;
        std::string path;
    };

    Services& s_;
    Callers& callers_;
    std::map<core::RequestId, Pending> pending_;
};

} // namespace loopd::service
