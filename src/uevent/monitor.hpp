#pragma once

#include "message.hpp" // parseLoopName

#include <loopd/uevent.hpp>

#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

struct udev;
struct udev_device;
struct udev_enumerate;
struct udev_monitor;

// The netlink monitors for block uevents of loop devices (libudev). Runs on the
// loop thread: receive() never blocks.
namespace loopd::uevent {

// Drops one reference of a libudev handle (udev_*_unref): UdevPtr owns one.
struct UdevUnref {
    void operator()(udev* handle) const noexcept;
    void operator()(udev_device* handle) const noexcept;
    void operator()(udev_enumerate* handle) const noexcept;
    void operator()(udev_monitor* handle) const noexcept;
};
template <typename T> using UdevPtr = std::unique_ptr<T, UdevUnref>;

// Test-only fault injection: events the monitor drops as if the socket had lost
// them, so tests reach the recovery paths on purpose. Each monitor has its own.
struct DropRules {
    // Every add/change event of the disk, or of partition N, that the kernel sent
    // on its own: the answers to loopd's synthetic triggers (SYNTH_UUID) pass, so
    // recovery stays possible. All of them, not just the first: Linux 6.1 sends two
    // disk "change" events per LOOP_CONFIGURE (6.18: one), and dropping one of two
    // would drop nothing that matters.
    bool disk = false;
    std::set<unsigned> partitions;
    double probability = 0; // any event, at random
    unsigned seed = 0;

    // "disk", "partN" or "random:P"; throws std::invalid_argument otherwise.
    void add(const std::string& rule);
    [[nodiscard]] bool any() const { return disk || !partitions.empty() || probability > 0; }
};

class Monitor {
public:
    // source Udev: events udevd broadcasts after processing; Kernel: the kernel's
    // own. receiveBufferBytes sizes the socket buffer (udevd itself uses 128 MiB).
    Monitor(EventSource source, int receiveBufferBytes, DropRules drops = {});
    Monitor(const Monitor&) = delete;
    Monitor& operator=(const Monitor&) = delete;

    [[nodiscard]] int fd() const;

    struct Batch {
        std::vector<Uevent> events;
        bool overflow = false; // ENOBUFS: the kernel dropped events for us
    };
    // Everything readable now, loop devices only.
    Batch receive();

private:
    [[nodiscard]] bool dropped(const Uevent& event);

    EventSource source_;
    UdevPtr<udev> udev_;
    UdevPtr<udev_monitor> monitor_; // declared after udev_: released before it
    DropRules drops_;
    std::minstd_rand random_;
};

// What udev's database says of one device: the DISKSEQ it processed last, and
// whether processing finished (the entry is initialized).
struct UdevEntry {
    bool initialized = false;
    // The diskseq udev last processed the whole disk with, from its
    // disk/by-diskseq/N link (the database keeps no DISKSEQ; libudev's property
    // comes from sysfs, i.e. is always the current one). 0 for partitions.
    uint64_t linkedDiskseq = 0;
    // When udev last finished processing the device (CLOCK_REALTIME, µs, from its
    // database file): a partition entry older than the attachment belongs to an
    // earlier one on that number.
    uint64_t processedRealtimeUsec = 0;
    // "major:minor" of the device itself, and for a partition what blkid found in
    // the table udev probed (ID_PART_ENTRY_DISK, ID_PART_ENTRY_NUMBER): a
    // partition's device number is reused by other disks' partitions, so an entry
    // left by another disk's partition that had it before can only be told apart
    // by what it describes.
    std::string devnum;
    std::string partEntryDisk;
    unsigned partEntryNumber = 0;
};
// loopN (partition 0) and its partitions that have a udev database entry, read
// from /run/udev/data: for re-enumeration after lost events.
std::map<unsigned, UdevEntry> readUdevDatabase(unsigned number);

// Whether a udevd is running and processing events (its control socket exists).
bool udevRunning();

} // namespace loopd::uevent
