// The contenders that are not in this process: loopd and udisks2 over D-Bus (one
// connection per client), and the command-line tools scripts use today.
#include "contender.hpp"
#include "verify.hpp"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sdbus-c++/sdbus-c++.h>

#include <cerrno>
#include <chrono>
#include <map>
#include <stdexcept>
#include <system_error>

extern char** environ;

namespace loopd::bench {
namespace {

using namespace std::chrono_literals;
using Options = std::map<std::string, sdbus::Variant>;

// Generous: a reply later than this is a hang, not slowness.
constexpr auto callTimeout = 60s;

[[noreturn]] void fail(const std::string& what)
{
    throw std::system_error(errno, std::generic_category(), what);
}

// ---- loopd -------------------------------------------------------------------

class LoopdClient final : public Client {
public:
    LoopdClient()
        : connection_(sdbus::createSystemBusConnection()),
          manager_(sdbus::createProxy(*connection_, "org.loopd1", "/org/loopd1"))
    {
    }

    Attachment attach(const std::string& image, const AttachOptions& options) override
    {
        Options map;
        if (!options.partscan)
            map.emplace("partscan", sdbus::Variant(false));
        Attachment a;
        sdbus::ObjectPath object;
        manager_->callMethod("Attach")
            .onInterface("org.loopd1.Manager")
            .withTimeout(callTimeout)
            .withArguments(image, map)
            .storeResultsTo(object, a.devnode, a.diskseq, a.partitions);
        a.repliedPartitions = true;
        a.handle = object;
        return a;
    }

    void detach(Attachment& a) override
    {
        manager_->callMethod("Detach")
            .onInterface("org.loopd1.Manager")
            .withTimeout(callTimeout)
            .withArguments(a.diskseq, Options{});
    }

private:
    // The proxy borrows the connection and starts no thread: calls are synchronous
    // on this client's own thread, like a simple client program's.
    std::unique_ptr<sdbus::IConnection> connection_;
    std::unique_ptr<sdbus::IProxy> manager_;
};

class Loopd final : public Contender {
public:
    std::unique_ptr<Client> client() override { return std::make_unique<LoopdClient>(); }
};

// ---- losetup + partx + udevadm settle ------------------------------------------

struct Ran {
    int status = -1;
    std::string out;
    std::string err;
};

// posix_spawnp and collect both outputs. Pipes are O_CLOEXEC so a concurrent
// client's child never inherits them (which would hold our EOF back).
Ran runCommand(const std::vector<std::string>& argv)
{
    int outPipe[2], errPipe[2];
    if (::pipe2(outPipe, O_CLOEXEC) < 0)
        fail("pipe2");
    UniqueFd outRead(outPipe[0]), outWrite(outPipe[1]);
    if (::pipe2(errPipe, O_CLOEXEC) < 0)
        fail("pipe2");
    UniqueFd errRead(errPipe[0]), errWrite(errPipe[1]);

    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, outWrite.get(), 1);
    posix_spawn_file_actions_adddup2(&actions, errWrite.get(), 2);
    std::vector<char*> args;
    for (const auto& a : argv)
        args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    pid_t pid;
    const int r = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (r != 0) {
        errno = r;
        fail("spawn " + argv[0]);
    }
    outWrite.reset();
    errWrite.reset();

    Ran ran;
    pollfd fds[2] = {{outRead.get(), POLLIN, 0}, {errRead.get(), POLLIN, 0}};
    std::string* sinks[2] = {&ran.out, &ran.err};
    int open = 2;
    while (open > 0) {
        if (::poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("poll");
        }
        for (int i = 0; i < 2; ++i) {
            if (fds[i].fd < 0 || !fds[i].revents)
                continue;
            char buffer[4096];
            const auto n = ::read(fds[i].fd, buffer, sizeof(buffer));
            if (n > 0)
                sinks[i]->append(buffer, static_cast<std::size_t>(n));
            else if (n == 0 || errno != EINTR) {
                fds[i].fd = -1;
                --open;
            }
        }
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            fail("waitpid");
    ran.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return ran;
}

std::string trimmed(std::string s)
{
    while (!s.empty() && (s.back() == '\n' || s.back() == ' '))
        s.pop_back();
    return s;
}

Ran mustRun(const std::vector<std::string>& argv)
{
    auto ran = runCommand(argv);
    if (ran.status != 0) {
        std::string line;
        for (const auto& a : argv)
            line += (line.empty() ? "" : " ") + a;
        throw std::runtime_error(line + " exited " + std::to_string(ran.status) + ": " + trimmed(ran.err));
    }
    return ran;
}

// What scripts do today: -P asks the kernel to scan (this kernel has no parsers,
// so partx adds them from user space), then settle waits for udev's whole queue.
class LosetupClient final : public Client {
public:
    Attachment attach(const std::string& image, const AttachOptions& options) override
    {
        std::vector<std::string> argv{"losetup", "-f", "--show"};
        if (options.partscan)
            argv.push_back("-P");
        argv.push_back(image);
        Attachment a;
        a.devnode = trimmed(mustRun(argv).out);
        try {
            if (options.partscan)
                mustRun({"partx", "-a", a.devnode});
            mustRun({"udevadm", "settle"});
        } catch (...) {
            runCommand({"partx", "-d", a.devnode});
            runCommand({"losetup", "-d", a.devnode});
            throw;
        }
        a.diskseq = sysfsDiskseq(a.devnode); // losetup names no attachment: read it now
        return a;
    }

    void detach(Attachment& a) override
    {
        // With -P the kernel drops the partitions at LOOP_CLR_FD, BLKPG-added too.
        mustRun({"losetup", "-d", a.devnode});
        mustRun({"udevadm", "settle"});
    }
};

class Losetup final : public Contender {
public:
    std::unique_ptr<Client> client() override { return std::make_unique<LosetupClient>(); }
};

// ---- udisks2 -------------------------------------------------------------------

class Udisks2Client final : public Client {
public:
    Udisks2Client()
        : connection_(sdbus::createSystemBusConnection()),
          manager_(sdbus::createProxy(*connection_, "org.freedesktop.UDisks2", "/org/freedesktop/UDisks2/Manager"))
    {
    }

    Attachment attach(const std::string& image, const AttachOptions& options) override
    {
        UniqueFd file(::open(image.c_str(), O_RDWR | O_CLOEXEC));
        if (!file)
            fail("open " + image);
        Options map;
        if (!options.partscan)
            map.emplace("no-part-scan", sdbus::Variant(true));
        sdbus::ObjectPath object;
        manager_->callMethod("LoopSetup")
            .onInterface("org.freedesktop.UDisks2.Manager")
            .withTimeout(callTimeout)
            .withArguments(sdbus::UnixFd(file.get()), map)
            .storeResultsTo(object);
        Attachment a;
        a.handle = object;
        a.devnode = "/dev/" + object.substr(object.rfind('/') + 1); // .../block_devices/loop3
        a.diskseq = sysfsDiskseq(a.devnode);                        // the reply names no attachment: read it now
        return a;
    }

    void detach(Attachment& a) override
    {
        auto loop = sdbus::createProxy(*connection_, "org.freedesktop.UDisks2", a.handle);
        loop->callMethod("Delete")
            .onInterface("org.freedesktop.UDisks2.Loop")
            .withTimeout(callTimeout)
            .withArguments(Options{});
    }

private:
    std::unique_ptr<sdbus::IConnection> connection_;
    std::unique_ptr<sdbus::IProxy> manager_;
};

class Udisks2 final : public Contender {
public:
    std::unique_ptr<Client> client() override { return std::make_unique<Udisks2Client>(); }
};

} // namespace

std::unique_ptr<Contender> makeLoopd()
{
    return std::make_unique<Loopd>();
}

std::unique_ptr<Contender> makeLosetup()
{
    return std::make_unique<Losetup>();
}

std::unique_ptr<Contender> makeUdisks2()
{
    return std::make_unique<Udisks2>();
}

} // namespace loopd::bench
