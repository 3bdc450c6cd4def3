#include "worker_pool.hpp"

#include <algorithm>
#include <atomic>
#include <system_error>

#include <loopd/log.hpp>

#include <sys/eventfd.h>

#include <cerrno>
#include <cstdint>
#include <system_error>

namespace loopd::service {

WorkerPool::WorkerPool(unsigned threads) : mailbox_(std::make_shared<Mailbox>())
{
    mailbox_->eventFd = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!mailbox_->eventFd)
        throw std::system_error(errno, std::generic_category(), "eventfd");
    for (unsigned i = 0; i < threads; ++i)
        threads_.emplace_back([this] { work(); });
}

WorkerPool::~WorkerPool()
{
    {
        std::lock_guard lock(mutex_);
        stopping_ = true;
    }
    wake_.notify_all();
    for (auto& thread : threads_)
        thread.join();
}

void WorkerPool::Mailbox::post(Continuation continuation)
{
    {
        std::lock_guard lock(mutex);
        done.push_back(std::move(continuation));
    }
    const uint64_t one = 1;
    // Cannot fail short of a counter overflow, which 2^64 completions would need.
    (void)!::write(eventFd.get(), &one, sizeof(one));
}

void WorkerPool::submit(Job job)
{
    {
        std::lock_guard lock(mutex_);
        jobs_.push_back(std::move(job));
    }
    wake_.notify_one();
}

void WorkerPool::spawn(Job job)
{
    auto shared = std::make_shared<Job>(std::move(job));
    try {
        std::thread([mailbox = mailbox_, shared] { mailbox->post((*shared)()); }).detach();
    } catch (const std::system_error& e) {
        // No thread to be had (TasksMax): the pool's workers take it, late rather than never.
        log::warn("cannot start a thread ({}); the job waits for a worker", e.what());
        submit([shared] { return (*shared)(); });
    }
}

void WorkerPool::runContinuations()
{
    uint64_t count = 0;
    // EAGAIN only means another wake-up already drained the counter.
    (void)!::read(mailbox_->eventFd.get(), &count, sizeof(count));
    std::deque<Continuation> ready;
    {
        std::lock_guard lock(mailbox_->mutex);
        ready.swap(mailbox_->done);
    }
    for (auto& continuation : ready) {
        // One failed continuation (a reply the bus refused) must not stop the rest
        // or the daemon.
        try {
            continuation();
        } catch (const std::exception& e) {
            log::error("completion failed: {}", e.what());
        }
    }
}

// Worker thread.
void WorkerPool::work()
{
    for (;;) {
        Job job;
        {
            std::unique_lock lock(mutex_);
            wake_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
            if (stopping_ && jobs_.empty())
                return;
            job = std::move(jobs_.front());
            jobs_.pop_front();
        }
        mailbox_->post(job());
    }
}

void spread(std::size_t count, const std::function<void(std::size_t)>& fn)
{
    // Fewer items than this are not worth a thread's start.
    constexpr std::size_t perThread = 256;
    const std::size_t threads = std::clamp<std::size_t>(std::min(std::thread::hardware_concurrency(), 4U), 1,
                                                        std::max<std::size_t>(count / perThread, 1));
    // Items handed out one at a time: whatever threads there are take them all.
    std::atomic<std::size_t> next{0};
    const auto take = [&] {
        for (std::size_t i = next++; i < count; i = next++)
            fn(i);
    };
    std::vector<std::thread> helpers;
    helpers.reserve(threads - 1);
    for (std::size_t t = 1; t < threads; ++t) {
        try {
            helpers.emplace_back(take);
        } catch (const std::system_error&) {
            break; // no more threads to be had (TasksMax): the ones there are do it all
        }
    }
    take();
    for (auto& helper : helpers)
        helper.join();
}

} // namespace loopd::service
