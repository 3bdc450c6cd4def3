#pragma once

#include <loopd/unique_fd.hpp>

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace loopd::service {

// A few threads for blocking kernel work. A job runs on a worker and returns a
// continuation; the continuation runs on the loop thread, woken through an eventfd.
// Workers never touch sdbus or the registry: continuations do.
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
    // Readable when continuations wait.
    [[nodiscard]] int fd() const { return eventFd_.get(); }
    // Loop thread: runs every waiting continuation.
    void runContinuations();

private:
    void work();

    UniqueFd eventFd_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::deque<Job> jobs_;
    std::deque<Continuation> done_;
    bool stopping_ = false;
    std::vector<std::thread> threads_;
};

} // namespace loopd::service
