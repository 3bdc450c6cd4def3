#include "log.hpp"

#include <sys/stat.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>

namespace loopd::service {
namespace {

bool stderrIsJournal()
{
    const char* stream = std::getenv("JOURNAL_STREAM");
    uintmax_t device = 0;
    uintmax_t inode = 0;
    struct stat st {};
    return stream && std::sscanf(stream, "%" SCNuMAX ":%" SCNuMAX, &device, &inode) == 2 &&
           ::fstat(STDERR_FILENO, &st) == 0 && st.st_dev == device && st.st_ino == inode;
}

} // namespace

void setupLogging(log::Level threshold)
{
    log::config = {threshold, stderrIsJournal()};
}

} // namespace loopd::service
