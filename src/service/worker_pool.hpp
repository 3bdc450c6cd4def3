#pragma once

#include <loopd/unique_fd.hpp>

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace loopd::service {

// A few threads for blocking kernel work. A job runs on a worker and returns a
// continuation; the continuation runs on the loop thread, woken through an eventfd.
// Workers never touch sdbus or the registry: continuations do.
//
// Work that may block for as long as someone else likes (a read of a caller's
// image on a filesystem that never answers) is spawned on a thread of its own
// instead: it stalls nobody but its caller, and is abandoned, never waited for.
class WorkerPool {
public:
    using Continuation = std::function<void()>;
    using Job = std::function<Continuation()>;

    explicit WorkerPool(unsigned threads);
    ~WorkerPool();
    WorkerPool(const WorkerPool&) = delete;
    WorkerPool& operator=(const WorkerPool&) = delete;

    // Loop thread. The job must not throw: it catches and turns errors into its
    // continuation.
    void submit(Job job);
    // Loop thread: runs the job on a detached thread of its own. The job must not
    // use anything that may be gone when it returns late (copy what it needs); its
    // continuation runs only while the pool exists.
    void spawn(Job job);
    // Readable when continuations wait.
    [[nodiscard]] int fd() const { return mailbox_->eventFd.get(); }
    // Loop thread: runs every waiting continuation.
    void runContinuations();

private:
    // Where finished jobs leave their continuations; shared with spawned threads,
    // which may outlive the pool.
    struct Mailbox {
        UniqueFd eventFd;
        std::mutex mutex;
        std::deque<Continuation> done;
        void post(Continuation continuation);
    };

    void work();

    std::shared_ptr<Mailbox> mailbox_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::deque<Job> jobs_;
    bool stopping_ = false;
    std::vector<std::thread> threads_;
};

// Start-up work, before anything is served: fn(i) for every i below count, spread
// over a few threads (the caller's one of them, and fewer when no thread can be
// started); returns once all are done. For work that is mostly waits on the
// kernel and independent from item to item (4096 records and their devices after
// a restart). fn must not throw: it catches, and keeps what it caught for item i.
void spread(std::size_t count, const std::function<void(std::size_t)>& fn);

} // namespace loopd::service
