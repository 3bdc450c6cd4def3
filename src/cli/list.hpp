#pragma once

#include "devices.hpp"

#include <ostream>
#include <string>
#include <vector>

namespace loopctl {

// What `loopctl list` prints, losetup-style.
struct ListOptions {
    std::string columns;     // -o: "DEVICE,SIZE" (case-insensitive), "+COL" adds to the defaults
    bool noHeadings = false; // -n
    bool raw = false;        // -r: one space between fields, unsafe bytes as \xHH
    bool bytes = false;      // -b: SIZE in bytes
    bool json = false;       // --json: the raw properties, as before
};

// The column names, in the order --help lists them.
std::vector<std::string> listColumns();
// The columns shown without -o.
inline constexpr const char* defaultListColumns = "DEVICE,DISKSEQ,REF,PARTS,SIZE,RO,BACKING-FILE";

// Throws UsageError naming the first unknown column of `spec` (-o's argument).
void checkColumns(const std::string& spec);
// The properties the table needs (listDevices reads only those), or none for
// --json, which prints them all. Throws UsageError for an unknown column.
std::vector<std::string> listedProperties(const ListOptions& options);
// Prints `devices` (already sorted) as `options` says. Throws UsageError for an
// unknown column, before printing anything.
void printList(std::ostream& out, const std::vector<Device>& devices, const ListOptions& options);

} // namespace loopctl
