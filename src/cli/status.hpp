#pragma once

#include "devices.hpp"

#include <ostream>

namespace loopctl {

// `loopctl status` for people, laid out like `systemctl status`: a header line,
// labelled properties, the partitions with their sizes and udev state (read from
// sysfs and udev's database now), then the attachment's last `journalLines`
// journal entries, if there are any.
void printStatus(std::ostream& out, const Device& device, unsigned journalLines);

} // namespace loopctl
