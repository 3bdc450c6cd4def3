#pragma once

#include <loopd/attach_options.hpp>
#include <loopd/device_info.hpp>

#include <cstdint>
#include <optional>
#include <string>

namespace loopd::core {

// An ownership record in /run/loopd/records: what loopd must know to adopt or
// clean up an attachment after a crash. Written intent-first: before
// LOOP_CONFIGURE, so no crash can leave a device that no record names.
struct Record {
    enum class State {
        Intent,     // about to configure; device unknown: found by backing file + fileName
        Configured, // attached, not yet ready: a restart cleans it up
        Owned,      // ready and replied: a restart adopts it
        Detaching,  // being detached: a restart finishes the detach
    };
    State state = State::Intent;
    std::string token;    // names the intent; unique per attach
    std::string fileName; // lo_file_name given to the kernel (the ref, or "loopd:<token>")
    DeviceInfo info;      // number and diskseq once configured; everything once owned
    std::string ref;
    Lifetime lifetime = Lifetime::Persistent;
    std::string owner; // unique bus name of the caller
    uint32_t ownerUid = 0;
    uint64_t readyTimestamp = 0;
    bool letGo = false;  // loopd holds no fd of it: the kernel releases it at its last close
    bool hidden = false; // attach option hidden: it has a udev properties file
};

// The lo_file_name loopd gives the kernel: "loopd:<token>", a tag no other tool
// sets by accident (the token is a random UUID, kept in the record). A restart
// recognises its own devices by it, never by a ref anyone could also set.
std::string loFileName(const std::string& token);

std::string serialize(const Record& record);
// nullopt for anything that is not a well-formed record (a torn or foreign file).
std::optional<Record> parseRecord(const std::string& text);

} // namespace loopd::core
