#pragma once

#include <stdexcept>
#include <string>

namespace loopd {

// The error kinds users see, one per org.loopd1.Error.<Name> (see dbus/org.loopd1.xml).
enum class Errc {
    InvalidArgument,
    NotFound,
    AccessDenied,
    Busy,
    NoFreeDevice,
    DeviceChanged,
    Timeout,
    LimitExceeded,
    Failed,
};

// Thrown inside loopd for failures with a user-facing meaning. The message names
// the object (path, devnode or diskseq) because it goes to the caller verbatim.
class Error : public std::runtime_error {
public:
    Error(Errc code, const std::string& message) : std::runtime_error(message), code_(code) {}
    [[nodiscard]] Errc code() const noexcept { return code_; }

private:
    Errc code_;
};

// "InvalidArgument" etc.: the suffix of the D-Bus error name.
const char* errcName(Errc code) noexcept;

} // namespace loopd
