#pragma once

#include <loopd/log.hpp>

namespace loopd::service {

// The journal's priority prefixes when stderr is systemd's journal stream (the
// device and inode in JOURNAL_STREAM are stderr's own, not inherited from a
// parent), a timestamp and level name otherwise.
void setupLogging(log::Level threshold);

} // namespace loopd::service
