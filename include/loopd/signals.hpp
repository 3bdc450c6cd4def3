#pragma once

#include <signal.h>

namespace loopd {

// SIGTERM and SIGINT: the signals that stop loopd and end `loopctl attach --hold`.
// Both block them before any thread starts and read them from a signalfd, so the
// mask that is blocked and the one that is read must be the same: this one.
inline sigset_t stopSignals() noexcept
{
    sigset_t mask;
    // These fail only for a signal number out of range (EINVAL): not these two.
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    return mask;
}

} // namespace loopd
