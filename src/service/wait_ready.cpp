// WaitReady, and what AttachFlow tells those waiting (AttachFlow's part that
// waits for devices others attached, and what every wait counts once udevd is
// gone; the attach itself is attach_flow.cpp).
#include "attach_flow.hpp"

#include "errors.hpp"
#include "kernel/loop_device.hpp"

namespace loopd::service {

// The reply of Attach, AttachFd and WaitReady: the device is ready.
void replyReady(AttachResult& result, const Device& device)
{
    result.returnResults(sdbus::ObjectPath(devicePath(device.info.diskseq)), kernel::loopDevNode(device.info.number),
                         device.info.diskseq, partitionNodes(device.info));
}

void AttachFlow::waitReady(AttachResult&& result, const std::string& name, uint64_t timeoutUsec)
{
    if (timeoutUsec > maxTimeoutUsec)
        throw Error(Errc::InvalidArgument, "cannot wait for '" + name + "': timeout_usec " +
                                               std::to_string(timeoutUsec) + " is beyond " +
                                               std::to_string(maxTimeoutUsec));
    auto* device = s_.table.resolve(name);
    if (!device || device->state == DeviceState::Detaching)
        throw Error(Errc::NotFound, "no loopd device '" + name + "'");
    if (device->state == DeviceState::Ready)
        return replyReady(result, *device);
    const auto timeout = timeoutUsec ? std::chrono::microseconds(timeoutUsec) : std::chrono::microseconds(10'000'000);
    const auto id = s_.nextId();
    waiters_.emplace(id, Waiter{std::move(result), device->info.diskseq});
    s_.settle(s_.registry.expect(id, core::Goal::Ready, device->watch(), core::Clock::now() + timeout));
}

void AttachFlow::settleWaiter(core::RequestId id, const core::Outcome& outcome)
{
    auto node = waiters_.extract(id);
    auto& [result, diskseq] = node.mapped();
    const auto* device = s_.table.find(diskseq);
    const auto name = "diskseq " + std::to_string(diskseq);
    if (outcome.kind == core::Outcome::Kind::Ready && device)
        return replyReady(result, *device);
    if (outcome.kind == core::Outcome::Kind::Changed)
        return result.returnError(makeDbusError(Errc::DeviceChanged, name + " was replaced by someone else"));
    result.returnError(makeDbusError(Errc::Timeout, name + " was not ready within the timeout"));
}

void AttachFlow::deviceGone(uint64_t diskseq, const std::string& message)
{
    for (auto it = waiters_.begin(); it != waiters_.end();) {
        if (it->second.diskseq != diskseq) {
            ++it;
            continue;
        }
        s_.registry.cancel(it->first);
        it->second.result.returnError(makeDbusError(Errc::DeviceChanged, message));
        it = waiters_.erase(it);
    }
}

// udevd went away and did not come back within the grace: a readiness=auto
// request counts the kernel's events from now on (ReadinessSource says kernel).
void AttachFlow::fallBackToKernel()
{
    std::vector<core::RequestId> ids;
    for (auto& [id, job] : attaches_) {
        if (job.options.readiness != ReadinessMode::Auto || job.events != EventSource::Udev)
            continue;
        job.events = EventSource::Kernel; // one not yet configured counts the kernel's too
        if (job.diskseq != 0 && !job.abandoning)
            ids.push_back(id);
    }
    for (const auto& [id, waiter] : waiters_)
        if (const auto* device = s_.table.find(waiter.diskseq);
            device && device->options.readiness == ReadinessMode::Auto)
            ids.push_back(id);
    for (const auto id : ids) {
        if (const auto it = attaches_.find(id); it != attaches_.end())
            if (auto* device = s_.table.find(it->second.diskseq))
                device->source = EventSource::Kernel;
        log::info("udevd is gone: request {} now counts the kernel's events", id);
        s_.settle(s_.registry.retarget(id, EventSource::Kernel));
    }
}

} // namespace loopd::service
