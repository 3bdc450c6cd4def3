#pragma once

#include <string>

namespace loopd::service {

// One logger: the journal when started by systemd (JOURNAL_STREAM is set), stderr
// otherwise. level: trace, debug, info, warn, error.
void setupLogging(const std::string& level);

} // namespace loopd::service
