// loopctl: the command-line client of loopd (org.loopd1 on the system bus).
#include "attach_args.hpp"
#include "devices.hpp"
#include "find_resize.hpp"
#include "list.hpp"
#include "monitor.hpp"
#include "org.loopd1-proxy.h"
#include "status.hpp"

#include <loopd/signals.hpp>
#include <loopd/unique_fd.hpp>

#include <CLI/CLI.hpp>
#include <sdbus-c++/sdbus-c++.h>
#include <systemd/sd-daemon.h>

#include <fcntl.h>
#include <poll.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <optional>

namespace {

using loopctl::AttachArgs;
using loopctl::busName;
using loopctl::deviceInterface;
using loopctl::Failure;
using loopctl::Json;
using loopctl::managerPath;
using loopctl::UsageError;

using Options = std::map<std::string, sdbus::Variant>;
using AttachReply = std::tuple<sdbus::ObjectPath, std::string, uint64_t, std::vector<std::string>>;

class Manager final : public sdbus::ProxyInterfaces<org::loopd1::Manager_proxy> {
public:
    explicit Manager(sdbus::IConnection& connection) : ProxyInterfaces(connection, busName, managerPath) {}
    ~Manager() { unregisterProxy(); }

    // Reports the removal of attachment `diskseq` (DeviceRemoved) from then on.
    void watch(uint64_t diskseq)
    {
        watched_ = diskseq;
        registerProxy();
    }
    // The reason loopd gave when the watched device went away, once it has.
    const std::optional<std::string>& removed() const { return removed_; }

private:
    void onDeviceRemoved(const sdbus::ObjectPath&, const uint64_t& diskseq, const std::string& reason) override
    {
        if (watched_ && diskseq == *watched_)
            removed_ = reason;
    }
    std::optional<uint64_t> watched_;
    std::optional<std::string> removed_;
};

void printReady(const AttachReply& reply, bool json)
{
    const auto& [object, devnode, diskseq, partitions] = reply;
    if (json) {
        std::cout << Json{{"Object", std::string(object)},
                          {"DevNode", devnode},
                          {"DiskSeq", diskseq},
                          {"Partitions", partitions}}
                         .dump()
                  << std::endl;
        return;
    }
    std::cout << devnode << '\n';
    for (const auto& partition : partitions)
        std::cout << partition << '\n';
    std::cout.flush();
}

Options attachOptions(const AttachArgs& args, bool readOnly)
{
    Options options;
    if (readOnly)
        options["read-only"] = true;
    if (args.directIo)
        options["direct-io"] = true;
    if (args.noPartscan)
        options["partscan"] = false;
    if (args.autoclear)
        options["autoclear"] = true;
    if (args.hold)
        options["lifetime"] = std::string("client");
    if (args.offset)
        options["offset"] = *args.offset;
    if (args.sizeLimit)
        options["size-limit"] = *args.sizeLimit;
    if (args.sectorSize)
        options["sector-size"] = *args.sectorSize;
    if (args.ref)
        options["ref"] = *args.ref;
    if (args.timeout)
        options["timeout-usec"] = static_cast<uint64_t>(*args.timeout * 1e6);
    return options;
}

// Opened here, with the user's own permissions, and passed as an fd (AttachFd):
// loopd then needs no access to the file (its unit mounts the system read-only).
// Without write permission the image is attached read-only, as losetup does.
// Returns {fd, read-only}, or nullopt if it cannot be opened: then loopd, which
// opens a path as its caller, is asked instead, and its error is the answer.
std::optional<std::pair<loopd::UniqueFd, bool>> openImage(const AttachArgs& args)
{
    if (!args.readOnly) {
        loopd::UniqueFd fd(::open(args.image.c_str(), O_RDWR | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
        if (fd)
            return std::pair{std::move(fd), false};
        if (errno != EACCES && errno != EROFS && errno != EPERM)
            return std::nullopt;
        std::cerr << args.image << ": not writable, attaching read-only\n";
    }
    loopd::UniqueFd fd(::open(args.image.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
    if (!fd)
        return std::nullopt;
    return std::pair{std::move(fd), true};
}

// Holds the device until SIGTERM or SIGINT: loopd detaches it when this
// connection leaves the bus (lifetime=client), and this detaches it first,
// politely. If the device goes away meanwhile (someone detached it, loopd lost
// it), this fails at once, so the unit holding it fails too.
void hold(sdbus::IConnection& connection, Manager& manager, uint64_t diskseq)
{
    const sigset_t mask = loopd::stopSignals();
    const loopd::UniqueFd signals(::signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK));
    if (!signals)
        throw Failure(std::string("signalfd: ") + std::strerror(errno));
    for (;;) {
        while (connection.processPendingRequest()) {
        }
        if (manager.removed())
            throw Failure("org.loopd1.Error.DeviceChanged: diskseq " + std::to_string(diskseq) + " was removed (" +
                          *manager.removed() + ") while held");
        const auto poll = connection.getEventLoopPollData();
        pollfd fds[] = {{poll.fd, static_cast<short>(poll.events), 0}, {signals.get(), POLLIN, 0}};
        if (::poll(fds, 2, poll.getPollTimeout()) < 0 && errno != EINTR)
            throw Failure(std::string("poll: ") + std::strerror(errno));
        if (fds[1].revents & POLLIN)
            break;
    }
    manager.Detach(diskseq, {});
}

int attach(sdbus::IConnection& connection, const AttachArgs& args)
{
    Manager manager(connection);
    AttachReply reply;
    if (auto opened = openImage(args)) {
        const sdbus::UnixFd unixFd(opened->first.release(), sdbus::adopt_fd);
        reply = manager.AttachFd(unixFd, attachOptions(args, opened->second || args.readOnly));
    } else {
        // loopd opens the path as this caller: it grants nothing more, and names
        // what is wrong (NotFound, AccessDenied, ...) in its own error.
        reply = manager.Attach(std::filesystem::absolute(args.image).string(), attachOptions(args, args.readOnly));
    }
    if (args.hold) {
        // Before READY=1: a removal after this is seen, and one before it shows as
        // the object being gone now.
        manager.watch(std::get<2>(reply));
        sdbus::createProxy(connection, busName, std::get<0>(reply))
            ->getProperty("DiskSeq")
            .onInterface(deviceInterface);
    }
    printReady(reply, args.json);
    if (args.hold) {
        sd_notifyf(0, "READY=1\nSTATUS=Holding %s (diskseq %llu)", std::get<1>(reply).c_str(),
                   static_cast<unsigned long long>(std::get<2>(reply)));
        hold(connection, manager, std::get<2>(reply));
    }
    return 0;
}

int detach(sdbus::IConnection& connection, const std::string& name, bool deferred)
{
    Options options;
    if (deferred)
        options.emplace("deferred", sdbus::Variant(true));
    Manager(connection).Detach(loopctl::findDevice(connection, name).u64("DiskSeq"), options);
    return 0;
}

int wait(sdbus::IConnection& connection, const std::string& name, double timeout)
{
    printReady(Manager(connection).WaitReady(name, static_cast<uint64_t>(timeout * 1e6)), false);
    return 0;
}

int status(sdbus::IConnection& connection, const std::string& name, bool json, unsigned lines)
{
    const auto device = loopctl::findDevice(connection, name);
    if (json)
        std::cout << loopctl::deviceJson(device).dump(2, ' ', false, Json::error_handler_t::replace) << '\n';
    else
        loopctl::printStatus(std::cout, device, lines);
    return 0;
}

// Under systemd (attach --hold in a Type=notify unit) the error becomes the unit's
// status text, and the barrier makes sure the manager has read it before this
// process exits (and the unit fails).
void reportToSystemd(bool hold, const std::string& error)
{
    if (!hold || !std::getenv("NOTIFY_SOCKET"))
        return;
    sd_notifyf(0, "STATUS=%s", error.c_str());
    sd_notify_barrier(0, 5'000'000);
}

constexpr const char* exitStatusHelp =
    "Exit status: 0 success; 1 failure (the D-Bus error name and message, e.g.\n"
    "org.loopd1.Error.NotFound: ..., on stderr, after everything printed before it);\n"
    "2 usage error (a bad command line or --config file).";

// Everything printed so far goes out before an error message: with both streams
// on one pipe or file, lines then appear in the order they happened.
void printError(const std::string& message)
{
    std::cout.flush();
    std::fflush(stdout);
    std::cerr << message << std::endl;
}

} // namespace

int main(int argc, char** argv)
{
    CLI::App app{"loopctl - attach and detach loop devices through loopd.\n"
                 "Replies mean ready: the device and all its partitions exist and udev has processed them."};
    app.require_subcommand(1);
    app.footer(exitStatusHelp);
    AttachArgs attachArgs;
    std::string name;
    double timeout = 10;
    bool json = false;
    unsigned lines = 10;
    loopctl::ListOptions listOptions;

    // CLI11 reads "-512" into an unsigned option as 2^64 - 512: a usage error instead.
    const CLI::Validator notNegative(
        [](const std::string& value) { return value.rfind('-', 0) == 0 ? "must not be negative" : std::string(); }, "",
        "not negative");
    auto* attachCmd = app.add_subcommand("attach", "attach IMAGE; print the device node, then its partitions");
    attachCmd->add_option("IMAGE", attachArgs.image, "image file or block device (or image = in --config)");
    attachCmd->add_option("--config", attachArgs.config,
                          "read the image and options from FILE (key = value lines, e.g. /etc/loopd/images/NAME.conf)");
    attachCmd->add_flag("--read-only", attachArgs.readOnly, "attach read-only");
    attachCmd->add_option("--offset", attachArgs.offset, "start of the data in the file, bytes (multiple of 512)")
        ->check(notNegative);
    attachCmd->add_option("--size-limit", attachArgs.sizeLimit, "size of the device, bytes (multiple of 512)")
        ->check(notNegative);
    attachCmd->add_option("--sector-size", attachArgs.sectorSize, "logical block size: 512, 1024, 2048 or 4096")
        ->check(notNegative);
    attachCmd->add_flag("--direct-io", attachArgs.directIo, "use direct I/O on the backing file");
    attachCmd->add_flag("--no-partscan", attachArgs.noPartscan, "do not create partition devices");
    attachCmd->add_flag("--autoclear", attachArgs.autoclear, "let the kernel detach at last close");
    attachCmd->add_option("--ref", attachArgs.ref, "a name for the device, linked as /run/loopd/by-ref/NAME");
    attachCmd->add_option("--timeout", attachArgs.timeout, "seconds to wait for readiness (default 10)")
        ->check(CLI::Range(0.000001, 86400.0));
    attachCmd->add_flag("--hold", attachArgs.hold,
                        "stay running, tell systemd READY=1, detach on SIGTERM/SIGINT or when this exits");
    attachCmd->add_flag("--json", attachArgs.json, "print a JSON object");

    auto* detachCmd = app.add_subcommand("detach", "detach a loopd device; returns once it is released");
    detachCmd->add_option("DEVICE", name, "device node, ref or diskseq")->required();
    bool deferred = false;
    detachCmd->add_flag("--deferred", deferred,
                        "if the device is in use, let the kernel release it at its last close instead of failing");

    std::string columnsHelp = "columns to show, comma-separated (default " + std::string(loopctl::defaultListColumns) +
                              "; +COL adds to those):";
    for (const auto& column : loopctl::listColumns())
        columnsHelp += " " + column;
    auto* listCmd = app.add_subcommand("list", "list loopd devices, by loop number");
    listCmd->add_option("-o,--output", listOptions.columns, columnsHelp);
    listCmd->add_flag("-n,--noheadings", listOptions.noHeadings, "print no header line");
    listCmd->add_flag("-r,--raw", listOptions.raw, "one space between fields, spaces and control bytes as \\xHH");
    listCmd->add_flag("-b,--bytes", listOptions.bytes, "SIZE in bytes");
    listCmd->add_flag("--json", listOptions.json, "print a JSON array of the devices' properties");

    auto* waitCmd = app.add_subcommand("wait", "wait until a loopd device is ready");
    waitCmd->add_option("DEVICE", name, "device node, ref or diskseq")->required();
    waitCmd->add_option("--timeout", timeout, "seconds (0: 10)")
        ->capture_default_str()
        ->check(CLI::Range(0.0, 86400.0));

    auto* statusCmd = app.add_subcommand("status", "show a loopd device, its partitions and its latest log lines");
    statusCmd->add_option("DEVICE", name, "device node, ref or diskseq")->required();
    statusCmd->add_option("-n,--lines", lines, "journal lines to show (0: none)")->capture_default_str();
    statusCmd->add_flag("--json", json, "print the properties as a JSON object");

    auto* monitorCmd = app.add_subcommand(
        "monitor", "print loopd's events as they happen (ready, removed, changed) until Ctrl-C or loopd stops");
    monitorCmd->add_flag("--json", json, "one JSON object per line");
    loopctl::FindResizeArgs findResize;
    loopctl::addFindResize(app, findResize);

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        const int code = app.exit(e);
        return code == 0 ? 0 : 2;
    }

    try {
        if (attachArgs.config)
            readConfig(attachArgs);
        else if (*attachCmd && attachArgs.image.empty())
            throw UsageError("attach: IMAGE or --config is required");
        if (*listCmd && !listOptions.json) // an unknown column is a usage error, before any call
            loopctl::checkColumns(listOptions.columns);
    } catch (const UsageError& e) {
        printError(e.what());
        reportToSystemd(attachArgs.hold, e.what());
        return 2;
    }

    try {
        if (attachArgs.hold || *monitorCmd) { // before any thread exists, so only their signalfd gets them
            const sigset_t mask = loopd::stopSignals();
            if (const int err = pthread_sigmask(SIG_BLOCK, &mask, nullptr); err != 0)
                throw Failure(std::string("pthread_sigmask: ") + std::strerror(err));
        }
        auto connection = sdbus::createSystemBusConnection();
        // The daemon's own deadline decides; the bus call only must not give up first.
        const double callSeconds = std::max(timeout, attachArgs.timeout.value_or(10)) + 30;
        connection->setMethodCallTimeout(std::chrono::microseconds(static_cast<uint64_t>(callSeconds * 1e6)));
        if (*attachCmd)
            return attach(*connection, attachArgs);
        if (*detachCmd)
            return detach(*connection, name, deferred);
        if (const auto code = loopctl::runFindResize(*connection, findResize))
            return *code;
        if (*listCmd) {
            loopctl::printList(std::cout, loopctl::listDevices(*connection, loopctl::listedProperties(listOptions)),
                               listOptions);
            return 0;
        }
        if (*waitCmd)
            return wait(*connection, name, timeout);
        if (*monitorCmd)
            return loopctl::monitor(*connection, json);
        return status(*connection, name, json, lines);
    } catch (const sdbus::Error& e) {
        printError(e.getName() + ": " + e.getMessage());
        reportToSystemd(attachArgs.hold, e.getName() + ": " + e.getMessage());
    } catch (const std::exception& e) {
        printError(e.what());
        reportToSystemd(attachArgs.hold, e.what());
    }
    return 1;
}
