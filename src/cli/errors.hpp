#pragma once

#include <stdexcept>

// How loopctl fails. main() turns each into its exit status: 1 for a Failure (or
// a D-Bus error), 2 for a UsageError; the message goes to stderr.
namespace loopctl {

// A failure with a message for stderr; exit status 1.
struct Failure : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A usage error (bad command line or configuration file); exit status 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

} // namespace loopctl
