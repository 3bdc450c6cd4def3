#pragma once

#include <loopd/error.hpp>

#include <sdbus-c++/Error.h>

#include <exception>
#include <string>

namespace loopd::service {

// The one table from what went wrong inside to org.loopd1.Error.*: loopd::Error
// keeps its kind, std::system_error maps by errno, anything else is Failed.
// `context` prefixes messages that do not already name their object.
sdbus::Error toDbusError(std::exception_ptr error, const std::string& context);
sdbus::Error makeDbusError(Errc code, const std::string& message);

} // namespace loopd::service
