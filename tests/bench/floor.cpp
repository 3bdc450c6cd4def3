#include "floor.hpp"

#include "kernel/loop_device.hpp"
#include "kernel/partitions.hpp"
#include "kernel/sysfs.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/file.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <system_error>
#include <thread>

namespace loopd::bench {
namespace {

using namespace std::chrono_literals;

// A reply later than this is a hang, not slowness (loopd's own default is 10 s).
constexpr auto readinessLimit = 30s;
constexpr int allocationAttempts = 64;

class FloorClient final : public Client {
public:
    explicit FloorClient(Floor& floor) : floor_(floor) {}
    Attachment attach(const std::string& image, const AttachOptions& options) override
    {
        return floor_.attach(image, options);
    }
    void detach(Attachment& attachment) override { floor_.detach(attachment); }

private:
    Floor& floor_;
};

struct Configured {
    unsigned number = 0;
    uint64_t diskseq = 0;
    UniqueFd holdFd;
};

// Under the loop-control lock (the one systemd and loopd take), so concurrent floor
// callers never race for a number; losetup does not take it, hence the retry.
std::optional<Configured> tryConfigure(const kernel::LoopConfig& config)
{
    unsigned number = 0;
    UniqueFd writable;
    uint64_t diskseq = 0;
    {
        kernel::LoopControl control;
        number = control.getFree();
        writable = kernel::openLoop(number, false);
        if (!kernel::configure(writable.get(), config))
            return std::nullopt;
        // The same fd as LOOP_CONFIGURE: no window for a detach and re-attach.
        diskseq = kernel::diskseq(writable.get());
    }
    // A read-only fd with LOCK_SH is what stays: udev, watching the node, answers
    // the close of the writable fd with BLKRRPART unless it can take LOCK_EX, and on
    // this parser-less kernel BLKRRPART wipes the BLKPG partitions. (Same reasoning
    // as loopd's keepReadOnly; a floor that lost its partitions would be no floor.)
    auto hold = kernel::openLoop(number, true);
    kernel::lockFd(hold.get(), LOCK_SH);
    writable.reset();
    return Configured{number, diskseq, std::move(hold)};
}

Configured allocate(const kernel::LoopConfig& config)
{
    for (int attempt = 0; attempt < allocationAttempts; ++attempt)
        if (auto configured = tryConfigure(config))
            return std::move(*configured);
    throw std::runtime_error("floor: no loop device stayed free long enough to configure it");
}

const char* kindName(core::Outcome::Kind kind)
{
    switch (kind) {
    case core::Outcome::Kind::Ready:
        return "ready";
    case core::Outcome::Kind::Released:
        return "released";
    case core::Outcome::Kind::Changed:
        return "changed by someone else";
    case core::Outcome::Kind::TimedOut:
        return "timed out";
    }
    return "?";
}

} // namespace

Floor::Floor()
    // Subscribed before any attach: no event of ours can pass unseen.
    : monitor_(EventSource::Udev, 128 * 1024 * 1024), stopFd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK))
{
    if (!stopFd_)
        throw std::system_error(errno, std::generic_category(), "eventfd");
    thread_ = std::thread([this] { monitorLoop(); });
}

Floor::~Floor()
{
    const uint64_t one = 1;
    (void)!::write(stopFd_.get(), &one, sizeof(one)); // cannot fail: the counter is 0 or 1
    thread_.join();
}

std::unique_ptr<Client> Floor::client()
{
    return std::make_unique<FloorClient>(*this);
}

Attachment Floor::attach(const std::string& image, const AttachOptions& options)
{
    UniqueFd backing(::open(image.c_str(), O_RDWR | O_CLOEXEC));
    if (!backing)
        throw std::system_error(errno, std::generic_category(), "open " + image);
    kernel::LoopConfig config;
    config.backingFd = backing.get();
    config.partscan = options.partscan;
    config.fileName = "loopd-bench:floor";
    auto configured = allocate(config);
    backing.reset(); // the loop device holds its own reference to the file

    Attachment a;
    a.devnode = kernel::loopDevNode(configured.number);
    a.diskseq = configured.diskseq;
    a.holdFd = std::move(configured.holdFd);
    try {
        if (options.partscan)
            for (const auto& spec : kernel::probePartitions(a.holdFd.get())) {
                kernel::addPartition(a.holdFd.get(), spec); // false (EBUSY): the kernel made it, fine
                a.partitionNumbers.push_back(spec.number);
                a.partitions.push_back(kernel::partitionDevNode(configured.number, spec.number));
            }
        a.repliedPartitions = true;
        const auto kind =
            await(core::Goal::Ready, core::Watch{a.diskseq, configured.number, a.partitionNumbers, EventSource::Udev});
        if (kind != core::Outcome::Kind::Ready)
            throw std::runtime_error("floor: " + a.devnode + " " + kindName(kind));
    } catch (...) {
        try {
            detach(a);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "floor: undo of %s failed: %s\n", a.devnode.c_str(), e.what());
        }
        throw;
    }
    return a;
}

namespace {

// BLKPG_DEL_PARTITION fails with EBUSY while anyone has the partition open, and
// udev's workers open each partition to probe it, for a (synthesized) change event
// too. Such an opener leaves within milliseconds; anything longer is a real holder.
void removePartitionPatiently(int fd, unsigned partition)
{
    const auto deadline = std::chrono::steady_clock::now() + 2s;
    for (;;) {
        try {
            return kernel::removePartition(fd, partition);
        } catch (const std::system_error& e) {
            if (e.code() != std::errc::device_or_resource_busy || std::chrono::steady_clock::now() > deadline)
                throw;
        }
        std::this_thread::sleep_for(1ms);
    }
}

} // namespace

void Floor::detach(Attachment& a)
{
    const auto number = static_cast<unsigned>(std::stoul(a.devnode.substr(9))); // "/dev/loop"
    for (auto it = a.partitionNumbers.rbegin(); it != a.partitionNumbers.rend(); ++it)
        removePartitionPatiently(a.holdFd.get(), *it);
    kernel::clear(a.holdFd.get());
    a.holdFd.reset(); // the last opener: the kernel (6.11+) releases the device now
    const auto kind =
        await(core::Goal::Released, core::Watch{a.diskseq, number, a.partitionNumbers, EventSource::Udev});
    if (kind != core::Outcome::Kind::Released)
        throw std::runtime_error("floor: release of " + a.devnode + " " + kindName(kind));
}

core::Outcome::Kind Floor::await(core::Goal goal, const core::Watch& watch)
{
    const auto id = nextId_++;
    const auto deadline = core::Clock::now() + readinessLimit;
    std::unique_lock lock(mutex_);
    record(registry_.expect(id, goal, watch, deadline));
    if (!settled_.wait_until(lock, deadline, [&] { return done_.count(id) != 0; })) {
        registry_.cancel(id);
        return core::Outcome::Kind::TimedOut;
    }
    return done_.extract(id).mapped();
}

// Under mutex_.
void Floor::record(const std::vector<core::Outcome>& outcomes)
{
    for (const auto& outcome : outcomes)
        done_[outcome.request] = outcome.kind;
    if (!outcomes.empty())
        settled_.notify_all();
}

// Monitor thread: drains the socket as soon as it is readable, like loopd's loop.
void Floor::monitorLoop()
{
    for (;;) {
        pollfd fds[2] = {{monitor_.fd(), POLLIN, 0}, {stopFd_.get(), POLLIN, 0}};
        if (::poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            std::perror("floor: poll");
            return;
        }
        if (fds[1].revents)
            return;
        auto batch = monitor_.receive();
        std::lock_guard lock(mutex_);
        for (const auto& event : batch.events)
            record(registry_.onEvent(event));
        if (batch.overflow) {
            ++overflows_;
            for (const auto number : registry_.watchedNumbers())
                resync(number);
        }
    }
}

// Under mutex_: events were lost; sysfs and udev's database say what they would have.
void Floor::resync(unsigned number)
{
    const auto diskseq = kernel::sysfsDiskseq(number);
    if (!diskseq)
        return;
    core::EventLedger::View view{*diskseq, false, {}};
    const auto present = kernel::existingPartitions(number);
    for (const auto& [partition, entry] : uevent::readUdevDatabase(number)) {
        if (!entry.initialized)
            continue;
        if (partition == 0)
            view.disk = entry.linkedDiskseq == *diskseq; // its by-diskseq link
        else if (std::find(present.begin(), present.end(), partition) != present.end())
            view.partitions.insert(partition);
    }
    record(registry_.resync(number, EventSource::Udev, view));
}

} // namespace loopd::bench
