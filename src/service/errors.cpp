#include "errors.hpp"

#include <cerrno>
#include <system_error>

namespace loopd::service {
namespace {

// A caller's own lack of permission is decided (and named AccessDenied) where it
// is checked: polkit, or opening the file as the caller. An EPERM or EACCES that
// reaches here is loopd's own (its sandbox, a seccomp filter): Failed, naming the
// syscall or path, never blamed on the caller.
Errc fromErrno(int err)
{
    switch (err) {
    case ENOENT:
    case ENXIO:
        return Errc::NotFound;
    case EBUSY:
        return Errc::Busy;
    case EINVAL:
        return Errc::InvalidArgument;
    case ETIMEDOUT: // a step with the attach's deadline (the partition probe)
        return Errc::Timeout;
    default:
        return Errc::Failed;
    }
}

} // namespace

sdbus::Error makeDbusError(Errc code, const std::string& message)
{
    return sdbus::Error(std::string("org.loopd1.Error.") + errcName(code), message);
}

sdbus::Error toDbusError(std::exception_ptr error, const std::string& context)
{
    try {
        std::rethrow_exception(error);
    } catch (const Error& e) {
        return makeDbusError(e.code(), e.what());
    } catch (const std::system_error& e) {
        return makeDbusError(fromErrno(e.code().value()), context + ": " + e.what());
    } catch (const sdbus::Error& e) {
        return e;
    } catch (const std::exception& e) {
        return makeDbusError(Errc::Failed, context + ": " + e.what());
    } catch (...) {
        return makeDbusError(Errc::Failed, context + ": unknown error");
    }
}

} // namespace loopd::service
