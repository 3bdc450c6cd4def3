#pragma once

#include <cstdint>
#include <string>

namespace loopd {

// Where an event came from: the kernel's own uevent, or udev's broadcast after it
// processed the event (rules run, database written, symlinks made).
enum class EventSource { Kernel, Udev };

enum class UeventAction { Add, Change, Remove, Other };

// One block uevent of a loop device or one of its partitions, reduced to what the
// readiness logic needs.
struct Uevent {
    EventSource source = EventSource::Kernel;
    UeventAction action = UeventAction::Other;
    unsigned number = 0;          // N of loopN
    unsigned partition = 0;       // K of loopNpK; 0 for the whole disk
    uint64_t diskseq = 0;         // DISKSEQ=; 0 when absent (kernels before 5.15)
    std::string synthUuid;        // SYNTH_UUID= of an event loopd triggered itself
    bool loopdProperties = false; // udev's event has LOOPD_OWNER_UID= (imported by 90-loopd.rules)
};

} // namespace loopd
