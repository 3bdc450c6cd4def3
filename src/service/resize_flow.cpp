#include "resize_flow.hpp"

#include "device_objects.hpp"
#include "errors.hpp"
#include "resize_sequence.hpp"

#include <loopd/error.hpp>
#include <loopd/log.hpp>

namespace loopd::service {
namespace {

// The kernel work and udev's confirmation, together: a resize is a capacity
// change, a probe and a few events (~10 ms here).
constexpr std::chrono::seconds resizeTimeout{10};

} // namespace

ResizeFlow::ResizeFlow(Services& services, Callers& callers) : s_(services), callers_(callers) {}

void ResizeFlow::request(ResizeResult&& result, const CallOrigin& from, uint64_t diskseq,
                         const core::OptionMap& options)
{
    const auto name = "diskseq " + std::to_string(diskseq);
    try {
        core::parseResizeOptions(options);
    } catch (const Error& e) {
        throw Error(e.code(), "cannot resize " + name + ": " + e.what());
    }
    const auto* device = s_.table.find(diskseq);
    if (!device)
        throw Error(Errc::NotFound, "no loopd device with " + name);
    const auto id = s_.nextId();
    pending_.emplace(id, Pending{std::move(result), diskseq, from.sender, {}, {}, false, {}});
    Callers::Details details{{"loopd.device", device->describe()},
                             {"loopd.file", device->info.backingFile},
                             {"loopd.owner-uid", std::to_string(device->ownerUid)}};
    callers_.authorize(
        from, core::Action::Resize, "resizing " + device->describe(), std::move(details),
        [this, id](std::exception_ptr error, Caller) {
            if (error)
                return finish(id, error);
            start(id);
        },
        device->ownerUid);
}

void ResizeFlow::start(core::RequestId id)
{
    auto& pending = pending_.at(id);
    auto* device = s_.table.find(pending.diskseq);
    try {
        if (!device)
            throw Error(Errc::NotFound, "diskseq " + std::to_string(pending.diskseq) + " is no longer attached");
        if (device->state != DeviceState::Ready)
            throw Error(Errc::Busy, device->describe() + (device->state == DeviceState::Resizing
                                                              ? " is being resized already"
                                                              : " is not ready (attaching or being detached)"));
        if (!*device->lockFd) // its release was deferred: loopd holds nothing to resize it through
            throw Error(Errc::Busy, device->describe() + " is released at its last close (deferred detach)");
    } catch (...) {
        return finish(id, std::current_exception());
    }
    device->state = DeviceState::Resizing;
    pending.uuid = makeUuid();
    const auto deadline = core::Clock::now() + resizeTimeout;
    // A thread of its own: the probe reads the caller's image.
    s_.workers.spawn([this, id, fd = device->lockFd, info = device->info, uuid = pending.uuid,
                      max = s_.limits.partitions, deadline]() -> WorkerPool::Continuation {
        try {
            const auto done = resize(fd->get(), info, max, deadline, uuid);
            return [this, id, done] { kernelDone(id, nullptr, Resized{done.size, done.partitions}); };
        } catch (...) {
            return [this, id, error = std::current_exception()] { kernelDone(id, error, {}); };
        }
    });
    // The loop's own timers are not this flow's to change.
    postAfter(s_.workers, resizeTimeout, pending.done, [this, id] { timedOut(id); });
}

void ResizeFlow::onEvent(const Uevent& event)
{
    if (event.synthUuid.empty() || event.action == UeventAction::Remove)
        return;
    for (auto& [id, pending] : pending_) {
        if (pending.uuid != event.synthUuid)
            continue;
        const auto* device = s_.table.find(pending.diskseq);
        if (!device || event.source != device->source || event.diskseq != pending.diskseq)
            return;
        pending.seen.insert(event.partition);
        return checkDone(id);
    }
}

void ResizeFlow::kernelDone(core::RequestId id, std::exception_ptr error, Resized resized)
{
    auto& pending = pending_.at(id);
    auto* device = s_.table.find(pending.diskseq);
    if (error) {
        // Refused before anything changed (Busy), or failed half-way: what the
        // kernel has now is what the device shows.
        if (device) {
            device->state = DeviceState::Ready;
            s_.resync(device->info.number);
        }
        return finish(id, error);
    }
    pending.kernelDone = true;
    pending.resized = std::move(resized);
    checkDone(id);
}

void ResizeFlow::checkDone(core::RequestId id)
{
    auto& pending = pending_.at(id);
    if (!pending.kernelDone || !pending.seen.count(0))
        return;
    for (const auto partition : pending.resized.partitions)
        if (!pending.seen.count(partition))
            return;
    finish(id, nullptr);
}

void ResizeFlow::timedOut(core::RequestId id)
{
    const auto it = pending_.find(id);
    if (it == pending_.end())
        return;
    if (!it->second.kernelDone) // the kernel work is still out: it answers when back
        return;
    finish(id, std::make_exception_ptr(Error(Errc::Timeout, "diskseq " + std::to_string(it->second.diskseq) +
                                                                " was resized, but udev did not confirm the new "
                                                                "sizes in time")));
}

// The device shows what the kernel has now, resized or not; the caller hears.
void ResizeFlow::finish(core::RequestId id, std::exception_ptr error)
{
    auto node = pending_.extract(id);
    auto& pending = node.mapped();
    *pending.done = true;
    auto* device = s_.table.find(pending.diskseq);
    if (device && pending.kernelDone) {
        device->state = DeviceState::Ready;
        const bool sizeChanged = device->info.size != pending.resized.size;
        const bool partitionsChanged = device->info.partitions != pending.resized.partitions;
        device->info.size = pending.resized.size;
        s_.table.setPartitions(pending.diskseq, pending.resized.partitions);
        writeRecord(s_.records, device->record(core::Record::State::Owned));
        std::vector<std::string> changed;
        if (sizeChanged)
            changed.emplace_back("Size");
        if (partitionsChanged)
            changed.emplace_back("Partitions");
        if (device->object && !changed.empty())
            device->object->propertiesChanged(changed);
        log::info("resized dev={} size={} partitions={} sender={}", device->describe(), device->info.size,
                  device->info.partitions.size(), pending.sender);
        if (s_.watchOpens) // partitions added have nodes of their own
            s_.watchOpens(*device);
    }
    if (!error && !device)
        error = std::make_exception_ptr(Error(Errc::DeviceChanged, "diskseq " + std::to_string(pending.diskseq) +
                                                                       " was detached by someone else while resizing"));
    if (error) {
        const auto reply = toDbusError(error, "cannot resize diskseq " + std::to_string(pending.diskseq));
        log::warn("resize of diskseq={} failed sender={}: {}", pending.diskseq, pending.sender, reply.getMessage());
        return pending.result.returnError(reply);
    }
    pending.result.returnResults(device->info.size, partitionNodes(device->info));
}

} // namespace loopd::service
