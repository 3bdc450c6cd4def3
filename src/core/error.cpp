#include <loopd/error.hpp>

namespace loopd {

const char* errcName(Errc code) noexcept
{
    switch (code) {
    case Errc::InvalidArgument:
        return "InvalidArgument";
    case Errc::NotFound:
        return "NotFound";
    case Errc::AccessDenied:
        return "AccessDenied";
    case Errc::Busy:
        return "Busy";
    case Errc::NoFreeDevice:
        return "NoFreeDevice";
    case Errc::DeviceChanged:
        return "DeviceChanged";
    case Errc::Timeout:
        return "Timeout";
    case Errc::LimitExceeded:
        return "LimitExceeded";
    case Errc::Failed:
        break;
    }
    return "Failed";
}

} // namespace loopd
