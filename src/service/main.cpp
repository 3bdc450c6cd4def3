// loopd: attaches loop devices over D-Bus and replies only when the device and all
// its partitions are ready. See README.md and dbus/org.loopd1.xml.
#include "daemon.hpp"
#include "log.hpp"

#include <CLI/CLI.hpp>
#include <loopd/signals.hpp>
#include <sdbus-c++/Error.h>

#include <malloc.h>
#include <sys/resource.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>

int main(int argc, char** argv)
{
    CLI::App app{"loopd - loop devices attached over D-Bus, ready when the call returns.\n"
                 "Owns org.loopd1 on the system bus (DBUS_SYSTEM_BUS_ADDRESS is honoured)."};
    loopd::service::DaemonConfig config;
    std::string logLevel = "info";
    app.add_option("--log-level", logLevel, "trace, debug, info, warn or error")
        ->capture_default_str()
        ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));
    std::string logTarget = "auto";
    app.add_option("--log-target", logTarget,
                   "journal (native protocol, with DISKSEQ=, LOOPD_DEVICE=, LOOPD_REF=, LOOPD_CALLER_UID= and "
                   "LOOPD_REQUEST= fields), console (plain lines on stderr), or auto: the journal when stderr is "
                   "systemd's journal stream (JOURNAL_STREAM)")
        ->capture_default_str()
        ->check(CLI::IsMember({"auto", "journal", "console"}));
    app.add_option("--receive-buffer", config.receiveBufferBytes,
                   "uevent socket receive buffer in bytes (small values force event loss, for tests)")
        ->capture_default_str()
        ->check(CLI::Range(4096, 1 << 30));
    app.add_option("--workers", config.workers, "threads for blocking kernel work")
        ->capture_default_str()
        ->check(CLI::Range(1, 64));
    app.add_option("--runtime-dir", config.runtimeDir, "ownership records and by-ref links")->capture_default_str();
    app.add_option("--max-devices-per-user", config.limits.devicesPerUser,
                   "loop devices a non-root caller may hold (and be attaching) at once; beyond, LimitExceeded")
        ->capture_default_str()
        ->check(CLI::Range(0U, 1U << 20));
    app.add_option("--max-partitions", config.limits.partitions,
                   "partitions an image may have; an image with more is refused with LimitExceeded")
        ->capture_default_str()
        ->check(CLI::Range(0U, 256U));
    // Every option above may also be set there, as `name = value` lines
    // (`max-devices-per-user = 32`); the command line wins. A missing file is fine.
    app.set_config("--config", LOOPD_CONFIG_FILE, "configuration file")->capture_default_str();
    std::vector<std::string> dropRules;
    app.add_option("--test-drop", dropRules,
                   "TESTS ONLY: drop udev events on purpose: 'disk' or 'partN' (every add/change the kernel sent on "
                   "its own; answers to loopd's synthetic triggers pass), 'random:P' (each with probability P); "
                   "prefixed 'kernel:', the kernel's events instead");
    app.add_option("--test-seed", config.drops.seed, "TESTS ONLY: seed for --test-drop random:P");
    app.set_version_flag("--version", LOOPD_VERSION);
    app.footer("Exit status: 0 after SIGTERM or SIGINT (devices stay attached and are adopted by the next start);\n"
               "1 on a failure to start or to run (the reason on stderr or in the journal); 2 usage error.");
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        // --help and --version exit 0; any bad command line exits 2, as usage
        // errors do everywhere (CLI11's own codes, 105 and up, mean nothing to admins).
        const int code = app.exit(e);
        return code == 0 ? 0 : 2;
    }
    try {
        for (const auto& rule : dropRules) {
            if (rule.rfind("kernel:", 0) == 0)
                config.kernelDrops.add(rule.substr(7));
            else
                config.drops.add(rule);
        }
        config.kernelDrops.seed = config.drops.seed;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "--test-drop: %s\n", e.what());
        return 2;
    }

    loopd::service::setupLogging(*loopd::log::parseLevel(logLevel), *loopd::service::parseLogTarget(logTarget));

    // One fd per held device (its LOCK_SH fd): the soft limit of 1024 would cap
    // loopd near 1000 devices with EMFILE for everyone. The hard limit is the
    // admin's (LimitNOFILE= in loopd.service); nothing here uses select().
    if (rlimit files{}; ::getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
        files.rlim_cur = files.rlim_max;
        if (::setrlimit(RLIMIT_NOFILE, &files) != 0)
            loopd::log::warn("cannot raise the open files limit to {}: {}", files.rlim_max, std::strerror(errno));
    }

    // One malloc arena for all threads: the workers allocate little and briefly,
    // and an arena each would keep its freed memory resident (measured: 0.3 MiB
    // of RSS with 1000 devices, tests/bench/RESULTS.md). Before any thread starts.
    mallopt(M_ARENA_MAX, 1);

    // Before any thread starts, so only the signalfd ever sees these.
    const auto mask = loopd::stopSignals();
    pthread_sigmask(SIG_BLOCK, &mask, nullptr);
    std::signal(SIGPIPE, SIG_IGN);

    try {
        loopd::service::Daemon daemon(config);
        daemon.run();
    } catch (const sdbus::Error& e) {
        loopd::log::critical("D-Bus: {}: {}", e.getName(), e.getMessage());
        return EXIT_FAILURE;
    } catch (const std::exception& e) {
        loopd::log::critical("{}", e.what());
        return EXIT_FAILURE;
    }
    return EXIT_SUCCESS;
}
