#pragma once

#include <cstdint>
#include <ostream>

namespace loopctl {

// Prints the last `lines` journal entries of attachment `diskseq` of this boot
// (fields DISKSEQ=<diskseq> and _BOOT_ID: a diskseq is unique only until reboot),
// oldest first, after a blank line, as `journalctl -o short` would. Prints nothing
// when the journal cannot be opened or read, or has no such entry: status works
// the same on a system without journald. Never throws.
void printJournalTail(std::ostream& out, uint64_t diskseq, unsigned lines);

} // namespace loopctl
