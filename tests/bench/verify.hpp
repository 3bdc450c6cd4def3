#pragma once

#include <cstdint>
#include <string>

// Readiness as API.md defines it, checked at the moment a contender says "done" and
// without waiting: the same checks as verify_ready() in tests/integration/harness.py,
// but reading udev's database files directly (udevadm info would cost milliseconds
// per node and distort the cycle times of every contender alike).
namespace loopd::bench {

struct ImageSpec {
    std::string path; // realpath of the backing file
    unsigned partitions = 0;
    std::string tableUuid; // ID_PART_TABLE_UUID as udev spells it; empty: not checked
};

// "" when devnode with diskseq is ready with all partitions of image; otherwise the
// first thing that is not (for the table: "partitions [] in sysfs, expected 1..3").
// sinceNs (CLOCK_REALTIME): when the attach began; a partition's udev entry written
// before then is a stale one. diskOnly: the disk alone, partitions not looked at.
std::string checkReady(const std::string& devnode, uint64_t diskseq, const ImageSpec& image, int64_t sinceNs,
                       bool diskOnly = false);

// "" when the attachment diskseq on devnode is gone: sysfs is past it, and if the
// device is unbound it has no partitions left.
std::string checkReleased(const std::string& devnode, uint64_t diskseq);

// /sys/block/loopN/diskseq now; 0 when unreadable.
uint64_t sysfsDiskseq(const std::string& devnode);

} // namespace loopd::bench
