#pragma once

#include <sdbus-c++/IConnection.h>

namespace loopctl {

// `loopctl monitor`: prints one line per loopd event as it arrives (ready,
// removed, changed), each with the local time it was received, flushed at once;
// with `json`, one JSON object per line. Returns 0 on SIGINT or SIGTERM, which
// the caller has blocked in every thread; throws Failure when loopd leaves the bus.
int monitor(sdbus::IConnection& connection, bool json);

} // namespace loopctl
