// The one table from exceptions to org.loopd1.Error.* names.
#include "service/errors.hpp"

#include <loopd/error.hpp>

#include <catch2/catch.hpp>

#include <cerrno>
#include <system_error>

using namespace loopd;
using namespace loopd::service;

namespace {

sdbus::Error mapped(std::exception_ptr error)
{
    return toDbusError(error, "cannot attach /tmp/x.img");
}

} // namespace

TEST_CASE("loopd's own EPERM or EACCES is Failed naming the syscall, never AccessDenied")
{
    for (const int err : {EPERM, EACCES}) {
        const auto e =
            mapped(std::make_exception_ptr(std::system_error(err, std::generic_category(), "ioctl LOOP_CONFIGURE")));
        CHECK(e.getName() == "org.loopd1.Error.Failed");
        CHECK(e.getMessage().find("LOOP_CONFIGURE") != std::string::npos);
        CHECK(e.getMessage().find("/tmp/x.img") != std::string::npos);
    }
}

TEST_CASE("errors decided inside keep their name and message")
{
    const auto e =
        mapped(std::make_exception_ptr(Error(Errc::AccessDenied, "cannot open /tmp/x.img: Permission denied")));
    CHECK(e.getName() == "org.loopd1.Error.AccessDenied");
    CHECK(e.getMessage() == "cannot open /tmp/x.img: Permission denied");
    CHECK(mapped(std::make_exception_ptr(std::system_error(EBUSY, std::generic_category(), "open"))).getName() ==
          "org.loopd1.Error.Busy");
}
