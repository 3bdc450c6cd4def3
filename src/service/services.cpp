#include "services.hpp"

#include "bus_objects.hpp"
#include "device_objects.hpp"

#include <loopd/log.hpp>

#include <cstdio>
#include <random>
#include <thread>

namespace loopd::service {

uint64_t realtimeUsec()
{
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch())
            .count());
}

void postAfter(WorkerPool& workers, std::chrono::milliseconds timeout, std::shared_ptr<std::atomic<bool>> done,
               WorkerPool::Continuation then)
{
    workers.spawn([timeout, done = std::move(done), then = std::move(then)]() -> WorkerPool::Continuation {
        constexpr std::chrono::milliseconds step{50};
        const auto until = std::chrono::steady_clock::now() + timeout;
        while (!*done && std::chrono::steady_clock::now() < until)
            std::this_thread::sleep_for(
                std::min<std::chrono::steady_clock::duration>(step, until - std::chrono::steady_clock::now()));
        if (*done)
            return [] {};
        return then;
    });
}

std::string makeUuid()
{
    static std::mt19937_64 random(std::random_device{}());
    const uint64_t hi = (random() & ~0xf000ULL) | 0x4000ULL;
    const uint64_t lo = (random() & ~(3ULL << 62)) | (2ULL << 62);
    char text[37];
    std::snprintf(text, sizeof(text), "%08llx-%04llx-%04llx-%04llx-%012llx", static_cast<unsigned long long>(hi >> 32),
                  static_cast<unsigned long long>((hi >> 16) & 0xffff), static_cast<unsigned long long>(hi & 0xffff),
                  static_cast<unsigned long long>(lo >> 48), static_cast<unsigned long long>(lo & 0xffffffffffffULL));
    return text;
}

// Loop thread: one page rewritten in place in the page cache (see RecordStore).
void writeRecord(const RecordStore& records, const core::Record& record) noexcept
{
    try {
        records.write(record);
    } catch (const std::exception& e) {
        log::error("cannot write the ownership record diskseq={}: {}", record.info.diskseq, e.what());
    }
}

void exportDevice(Services& services, Device& device)
{
    try {
        device.object = std::make_unique<DeviceObject>(
            *services.manager->devices, DeviceProperties{device.info, device.options.ref, device.ownerUid,
                                                         lifetimeName(device.options.lifetime), device.readyTimestamp});
    } catch (const sdbus::Error& e) {
        log::error("cannot export device object diskseq={}: {}", device.info.diskseq, e.getMessage());
    }
}

} // namespace loopd::service
