#pragma once

#include "kernel/backing_file.hpp"
#include "kernel/partitions.hpp"
#include "record_store.hpp"

#include "core/registry.hpp"

#include <loopd/attach_options.hpp>
#include <loopd/device_info.hpp>
#include <loopd/unique_fd.hpp>

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

// The blocking kernel sequences of attach and detach (DESIGN.md, "The attach
// sequence"). Everything here runs on worker threads.
namespace loopd::service {

struct Attached {
    UniqueFd lockFd; // the configuring fd, holding LOCK_SH while loopd owns the device
    DeviceInfo info;
    core::Clock::time_point configured{};      // LOOP_CONFIGURE done
    core::Clock::time_point partitionsAdded{}; // the table probed, BLKPG done
};

// Opens the backing file (as the caller, for a path) and checks it.
kernel::BackingFile openBacking(const std::string& path, const AttachOptions& options,
                                const kernel::Credentials& caller);
kernel::BackingFile checkBacking(UniqueFd fd, const std::string& what, const AttachOptions& options);

// Allocates a loop device and configures it with the backing file, reads back its
// diskseq and what the kernel applied, and adds the partitions of its table.
// Keeps `record` in the store as it goes (intent before LOOP_CONFIGURE, configured
// once the diskseq is known). On failure nothing stays attached and no record.
// An image with more than maxPartitions partitions is refused (LimitExceeded).
// The table is probed by the deadline (Timeout past it).
Attached attach(const kernel::BackingFile& backing, const AttachOptions& options, core::Record& record,
                const RecordStore& records, unsigned maxPartitions, core::Clock::time_point deadline);

enum class DetachOutcome {
    Released,  // the kernel released the attachment
    TakenBack, // still open elsewhere after the clear: taken back as it was
    Deferred,  // still open elsewhere, and could not be taken back: the kernel
               // releases it at that opener's last close (autoclear)
};

// Removes partitions, clears the device and closes lockFd; Released once the
// kernel released it. Throws Error(Busy) when the disk or a partition is claimed
// (mounted: nothing touched). TakenBack when the disk is still open elsewhere
// after the clear: autoclear taken off again, partitions re-added, lockFd a new
// LOCK_SH fd; the caller waits for udev to see the partitions again.
// When each step was done, for the detach's timeline in the log.
struct DetachSteps {
    core::Clock::time_point claimsChecked{};
    core::Clock::time_point cleared{};  // partitions removed, LOOP_CLR_FD
    core::Clock::time_point released{}; // the kernel let go of it (or not)
};
DetachOutcome detach(UniqueFd& lockFd, const DeviceInfo& info, DetachSteps& steps);

// Detach with the release deferred (option `deferred`): as detach, but a device
// in use is not Busy. Claimed (mounted): nothing is removed, autoclear is set and
// loopd's fd closed, so the kernel releases the device at the holder's last close.
// Open elsewhere after the clear: not taken back, left to that release. Deferred
// then, else Released. lockFd is closed either way.
DetachOutcome detachDeferred(UniqueFd& lockFd, const DeviceInfo& info, DetachSteps& steps);

// A release loopd did not make (autoclear at a last close, `losetup -d`) is seen
// at its first uevent, the disk's "change"; the kernel drops the partitions
// after sending it (6.18: seen here 1 in 4 times, partitions still in sysfs when
// DeviceRemoved went out). Waits up to 2 s for sysfs to show none, so that a
// DeviceRemoved means the partitions are gone too.
void awaitPartitionsDropped(unsigned number) noexcept;

// How far undoing an attach got.
enum class Undone {
    Detached,    // released, partitions and all
    AtLastClose, // held open elsewhere (a partition past BLKPG's retries, a mount):
                 // LOOP_CLR_FD only set autoclear; the holder's last close releases it
    NotOurs,     // detached and re-attached by someone else meanwhile: left alone
    Failed,      // logged; left attached
};

// Undoes a failed attach: the same as detach, but best effort.
Undone undo(UniqueFd lockFd, const DeviceInfo& info) noexcept;

// What happened to the device, for the failed call's message: "it was detached again".
std::string describe(Undone undone, const DeviceInfo& info);

// Closes loopd's fd of a device someone else detached (`losetup -d` only marked it
// for release at its last close) and waits briefly for the release.
void letGo(UniqueFd lockFd, const DeviceInfo& info) noexcept;

// ---- after a restart (see Daemon::recover) ----

// Reopens an owned device of a record if it is still that attachment (same
// diskseq, same backing file) and locks it if no one holds LOCK_EX (`locked`);
// re-adds partitions that someone's close-after-write wiped while no loopd held
// the lock. nullopt if it is gone.
std::optional<UniqueFd> reopenOwned(const core::Record& record, bool& readded, bool& locked);

// Clears the device of a record that never became ready (or was being detached)
// if it is still that attachment.
void releaseRecorded(const core::Record& record);

// Finds and clears a device a crash left between LOOP_CONFIGURE and its record:
// bound to the intent's backing file with the intent's lo_file_name. Devices in
// `skip` (named by other records) are not looked at.
void releaseIntent(const core::Record& intent, const std::set<unsigned>& skip);

} // namespace loopd::service
