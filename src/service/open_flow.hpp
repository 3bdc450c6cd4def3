#pragma once

#include "bus_objects.hpp"
#include "callers.hpp"
#include "services.hpp"

#include "core/options.hpp"

#include <map>
#include <string>

// Device.Open (API.md): an fd of the device or of one partition for its owner or
// root, so an unprivileged owner needs no permission on the device node. With
// lifetime=fd the first fd handed out takes over loopd's own hold. Loop thread;
// the open runs on a worker.
namespace loopd::service {

class OpenFlow {
public:
    OpenFlow(Services& services, Callers& callers);

    // Throws Error for a call refused at once; otherwise answered later, once.
    void request(OpenResult&& result, const CallOrigin& from, uint64_t diskseq, const core::OptionMap& options);

private:
    struct Pending {
        OpenResult result;
        uint64_t diskseq = 0;
        core::OpenOptions options;
        std::string sender;
    };

    void start(core::RequestId id);
    void opened(core::RequestId id, UniqueFd fd);
    void handOver(uint64_t diskseq);
    void fail(core::RequestId id, std::exception_ptr error);

    Services& s_;
    Callers& callers_;
    std::map<core::RequestId, Pending> pending_;
};

} // namespace loopd::service
