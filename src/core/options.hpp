#pragma once

#include <loopd/attach_options.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <variant>

namespace loopd::core {

// A D-Bus variant reduced to the types options may have; anything else keeps only
// its signature so the error can name it.
struct OtherType {
    std::string signature;
};
using OptionValue = std::variant<bool, uint32_t, uint64_t, std::string, OtherType>;
using OptionMap = std::map<std::string, OptionValue>;

// Parses and validates Attach options. Throws Error(InvalidArgument) naming the key
// for an unknown key, a wrong type or an out-of-range value.
AttachOptions parseAttachOptions(const OptionMap& options);

// The Detach options of org.loopd1.Manager and org.loopd1.Device.
struct DetachOptions {
    bool deferred = false; // in use: let the kernel release it at its last close
};

// Parses Detach options; an unknown key or a wrong type is Error(InvalidArgument)
// naming the key, never silently ignored.
DetachOptions parseDetachOptions(const OptionMap& options);

// Device.Open's options: partition u (0, the default: the disk), read-only b
// (default true).
struct OpenOptions {
    unsigned partition = 0;
    bool readOnly = true;
};
OpenOptions parseOpenOptions(const OptionMap& options);

// Resize takes no options yet; any key is refused rather than silently ignored.
void parseResizeOptions(const OptionMap& options);

// A ref is 1..63 bytes of [A-Za-z0-9._-], not all digits (a diskseq), not "." or
// "..": it becomes a file name under by-ref/.
bool isValidRef(const std::string& ref) noexcept;

} // namespace loopd::core
