#include "open_flow.hpp"

#include "device_objects.hpp"
#include "errors.hpp"
#include "kernel/loop_device.hpp"
#include "kernel/partitions.hpp"

#include <loopd/error.hpp>
#include <loopd/log.hpp>

#include <fcntl.h>
#include <sys/file.h>

#include <algorithm>
#include <cerrno>
#include <system_error>

namespace loopd::service {
namespace {

// Worker: the node opened by loopd, checked to be the attachment still (a
// partition's BLKGETDISKSEQ is its disk's).
UniqueFd openNode(const DeviceInfo& info, unsigned partition, bool readOnly)
{
    const auto node = partition ? kernel::partitionDevNode(info.number, partition) : kernel::loopDevNode(info.number);
    UniqueFd fd(::open(node.c_str(), (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOCTTY));
    if (!fd)
        throw std::system_error(errno, std::generic_category(), "open " + node);
    if (kernel::diskseq(fd.get()) != info.diskseq)
        throw Error(Errc::DeviceChanged, node + " is no longer diskseq " + std::to_string(info.diskseq));
    // The disk's fd carries a LOCK_SH (flock belongs to the open file, so it goes
    // with the fd to the caller and lasts while any copy of it is open): udev's
    // BLKRRPART after a close-after-write needs LOCK_EX, and on a kernel without
    // partition parsers it would wipe the BLKPG partitions. That matters once
    // loopd's own LOCK_SH fd is gone (lifetime=fd): seen here, partitions wiped
    // by udev after loopd handed its hold over. A partition's fd needs none: the
    // kernel refuses BLKRRPART while a partition is open.
    if (!partition && !kernel::tryLockFd(fd.get(), LOCK_SH))
        log::debug("{} is locked exclusively by someone; its fd goes without LOCK_SH", node);
    return fd;
}

// Worker, lifetime=fd: autoclear on, loopd's own fd closed; from now on the
// kernel releases the device at the last close of anyone's fd.
void handOverHold(UniqueFd& lockFd)
{
    kernel::setAutoclear(lockFd.get(), true);
    const auto noForks = kernel::holdOffForks(); // no probe child keeps a copy of it open
    lockFd.reset();
}

} // namespace

OpenFlow::OpenFlow(Services& services, Callers& callers) : s_(services), callers_(callers) {}

void OpenFlow::request(OpenResult&& result, const CallOrigin& from, uint64_t diskseq, const core::OptionMap& options)
{
    const auto name = "diskseq " + std::to_string(diskseq);
    core::OpenOptions parsed;
    try {
        parsed = core::parseOpenOptions(options);
    } catch (const Error& e) {
        throw Error(e.code(), "cannot open " + name + ": " + e.what());
    }
    const auto* device = s_.table.find(diskseq);
    if (!device)
        throw Error(Errc::NotFound, "no loopd device with " + name);
    const auto id = s_.nextId();
    pending_.emplace(id, Pending{std::move(result), diskseq, parsed, from.sender});
    callers_.authorize(
        from, core::Action::Open, "opening " + device->describe(), {},
        [this, id](std::exception_ptr error, Caller) {
            if (error)
                return fail(id, error);
            start(id);
        },
        device->ownerUid);
}

void OpenFlow::start(core::RequestId id)
{
    auto& pending = pending_.at(id);
    auto* device = s_.table.find(pending.diskseq);
    const auto partition = pending.options.partition;
    try {
        if (!device || device->state != DeviceState::Ready)
            throw Error(Errc::NotFound, "diskseq " + std::to_string(pending.diskseq) + " is not a ready loopd device");
        const auto& parts = device->info.partitions;
        if (partition && std::find(parts.begin(), parts.end(), partition) == parts.end())
            throw Error(Errc::NotFound, device->describe() + " has no partition " + std::to_string(partition));
        if (!pending.options.readOnly && device->info.readOnly)
            throw Error(Errc::InvalidArgument, device->describe() + " is read-only; it cannot be opened for writing");
    } catch (...) {
        return fail(id, std::current_exception());
    }
    // The first fd of a lifetime=fd or autoclear device takes over loopd's hold
    // (the "someone else" whose last close releases it); meanwhile no detach or
    // resize may use loopd's fd.
    const bool handOver = (device->options.lifetime == Lifetime::Fd || device->options.autoclear) && *device->lockFd;
    if (handOver)
        device->state = DeviceState::Resizing;
    s_.workers.submit([this, id, info = device->info, partition, readOnly = pending.options.readOnly, handOver,
                       lockFd = device->lockFd]() -> WorkerPool::Continuation {
        try {
            auto fd = std::make_shared<UniqueFd>(openNode(info, partition, readOnly));
            if (handOver)
                handOverHold(*lockFd);
            return [this, id, fd, handOver] {
                if (handOver)
                    this->handOver(pending_.at(id).diskseq);
                opened(id, std::move(*fd));
            };
        } catch (...) {
            return [this, id, handOver, error = std::current_exception()] {
                if (auto* device = s_.table.find(pending_.at(id).diskseq); device && handOver)
                    device->state = DeviceState::Ready;
                fail(id, error);
            };
        }
    });
}

// The kernel releases it at the last close of any fd now: reported from its
// uevents as autoclear (EventRepair::checkOwned), as a deferred detach is.
void OpenFlow::handOver(uint64_t diskseq)
{
    auto* device = s_.table.find(diskseq);
    if (!device)
        return;
    device->state = DeviceState::Ready;
    device->options.autoclear = true;
    device->info.autoclear = true;
    writeRecord(s_.records, device->record(core::Record::State::Owned));
    if (device->object)
        device->object->propertiesChanged({"Autoclear"});
    log::info("lifetime=fd: the first fd of dev={} took over loopd's hold", device->describe());
}

void OpenFlow::opened(core::RequestId id, UniqueFd fd)
{
    auto node = pending_.extract(id);
    auto& pending = node.mapped();
    log::info("opened diskseq={} partition={} read-only={} for sender={}", pending.diskseq, pending.options.partition,
              pending.options.readOnly, pending.sender);
    pending.result.returnResults(sdbus::UnixFd(fd.release(), sdbus::adopt_fd));
    // If that fd is closed already (a caller gone), the release came while the
    // device was being handed over: look once.
    if (const auto* device = s_.table.find(pending.diskseq); device && device->options.lifetime == Lifetime::Fd)
        s_.resync(device->info.number);
}

void OpenFlow::fail(core::RequestId id, std::exception_ptr error)
{
    auto node = pending_.extract(id);
    auto& pending = node.mapped();
    const auto reply = toDbusError(error, "cannot open diskseq " + std::to_string(pending.diskseq));
    log::warn("open of diskseq={} refused sender={}: {}", pending.diskseq, pending.sender, reply.getMessage());
    pending.result.returnError(reply);
}

} // namespace loopd::service
