"""One test's world (Env): a temp dir, a private system bus, polkitd if asked for,
a udevd of its own, and loopd; start, restart and stop of each, and the leak checks
at the end. Part of harness.py (see there)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import dbus

from harness_base import (BUS_NAME, DAEMON_START_LIMIT, LOOPD, MANAGER_IFACE, MANAGER_PATH,
                          POLICY_FILE, POLKIT_ACTIONS_DIR, POLKIT_ACTIONS_FILE,
                          POLKIT_BUS_POLICY, POLKIT_NAME, POLKIT_RULES_DIR, POLKITD, UDEVD,
                          read_text, run)
from harness_checks import (force_detach, loop_devices_backed_under,
                            unbound_loop_devices_with_partitions)
from harness_images import IMAGE_MAKERS
from harness_journal import Journald, journal_stream

__all__ = ["BUS_CONFIG", "udevd_running", "Env", "Skip"]

# --------------------------------------------------------------------------- environment

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- A private system bus with Debian's default policy (/usr/share/dbus-1/system.conf):
     nobody may own names or call methods unless a service's policy file punches a
     hole. The only hole is the project's own policy file, included below. -->
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Peer"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{policy}</include>{extra_includes}
</busconfig>
"""


def _leaked_loop_devices(directory):
    """Loop devices still bound to a file under `directory`. One marked autoclear (a
    foreign `losetup -d` while a udev worker still had it open: the kernel releases
    it at that last close) is given a few seconds to go first."""
    deadline = time.monotonic() + 5.0
    while True:
        found = loop_devices_backed_under(directory)
        pending = [dev for dev, _ in found if _autoclear(dev)]
        if not pending or len(pending) < len(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _autoclear(devnode):
    try:
        return read_text(f"/sys/block/{os.path.basename(devnode)}/loop/autoclear") == "1"
    except OSError:
        return False


def _pid_alive(pid):
    """True for a running process; a zombie (state Z) is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def udevd_running():
    """A live systemd-udevd, zombies of earlier --daemon forks excluded."""
    out = run("pgrep", "-x", "systemd-udevd|udevd", check=False).stdout.split()
    return any(_pid_alive(int(pid)) for pid in out)


class Skip(Exception):
    """Raised by a test that cannot run here (the message says why). main() reports
    it as SKIP, never as PASS, and a file with a skipped test and no failed one
    exits 77, which meson reports as skipped."""


def _stop_child(proc, limit=10.0):
    """SIGTERM, wait, SIGKILL. Returns (exit status, whether it needed SIGKILL)."""
    if proc.poll() is not None:
        return proc.returncode, False
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(limit), False
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(), True


class Env:
    """One test's world: temp dir, private bus, udevd, loopd. Fails the test on exit
    if loopd died or misbehaved on SIGTERM, or if any loop device backed by the temp
    dir is left (after removing it)."""

    def __init__(self, loopd_args=(), polkit=False, polkit_rules=None, journal=False, bus_policies=()):
        """polkit=True also runs Debian's polkitd on the private bus: its bus policy
        is included, dbus/org.loopd1.policy goes to polkit's actions directory and
        `polkit_rules` (JavaScript, if given) to /etc/polkit-1/rules.d for the
        duration, under names of this process's own, and both are removed again at
        exit. The temp dir becomes searchable (0711) so that polkitd, which drops
        to the polkitd user, and test users can reach the bus socket.
        journal=True runs a systemd-journald (Journald) and gives loopd a journal
        stream as stdout and stderr, with JOURNAL_STREAM set, as systemd does.
        bus_policies: more policy files the bus includes (the bench's own server)."""
        self.loopd_args = list(loopd_args)
        self.bus_policies = list(bus_policies)
        self.polkit = polkit
        self.polkit_rules = polkit_rules
        self.journal = Journald() if journal else None
        self._journal_entered = False
        self.polkitd = None
        self.installed = []  # files put outside the temp dir, removed at exit
        self.tmp = None
        self.bus = None
        self.loopd = None
        self.udevd_pid = None
        self.stale_before = set()
        self._images = 0

    # ---- set-up

    def __enter__(self):
        self.tmp = tempfile.mkdtemp(dir="/var/tmp", prefix="loopd-test-")
        # Stale partitions someone else left are theirs; only new ones are ours.
        self.stale_before = unbound_loop_devices_with_partitions()
        try:
            if self.polkit:
                os.chmod(self.tmp, 0o711)
                self._install_polkit_files()
            if self.journal is not None:
                self.journal.__enter__()
                self._journal_entered = True
            self._start_bus()
            if self.polkit:
                self._start_polkitd()
            self._start_udevd()
            self._start_loopd()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _start_bus(self):
        socket = os.path.join(self.tmp, "bus")
        config = os.path.join(self.tmp, "bus.conf")
        with open(config, "w") as f:
            includes = ([POLKIT_BUS_POLICY] if self.polkit else []) + self.bus_policies
            extra = "".join(f"\n  <include>{policy}</include>" for policy in includes)
            f.write(BUS_CONFIG.format(socket=socket, policy=POLICY_FILE, extra_includes=extra))
        with open(os.path.join(self.tmp, "dbus-daemon.log"), "w") as log:
            self.bus = subprocess.Popen(
                ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
                stdout=subprocess.PIPE, stderr=log, text=True)
        # dbus-daemon prints its address once it listens: no polling needed.
        address = self.bus.stdout.readline().strip()
        assert address, f"dbus-daemon did not start: {read_text(log.name)}"
        # loopd and loopctl (sd-bus), busctl and python3-dbus all honour this.
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = f"unix:path={socket}"

    def _install_polkit_files(self):
        # Own names (pid and temp dir): concurrent runs never remove each other's
        # files, and a real installation's org.loopd1.policy is never touched.
        tag = f"loopd-test-{os.getpid()}-{os.path.basename(self.tmp)}"
        files = [(POLKIT_ACTIONS_FILE, os.path.join(POLKIT_ACTIONS_DIR, f"org.loopd1.{tag}.policy"))]
        if self.polkit_rules is not None:
            rules = os.path.join(self.tmp, "test.rules")
            with open(rules, "w") as f:
                f.write(self.polkit_rules)
            files.append((rules, os.path.join(POLKIT_RULES_DIR, f"10-{tag}.rules")))
        for source, target in files:
            self.installed.append(target)  # before the copy: removed even if it fails half-way
            shutil.copyfile(source, target)
            os.chmod(target, 0o644)

    def _start_polkitd(self):
        # polkitd honours DBUS_SYSTEM_BUS_ADDRESS and drops to the polkitd user itself.
        self.polkitd_log = open(os.path.join(self.tmp, "polkitd.log"), "w")
        self.polkitd = subprocess.Popen([POLKITD], stdout=self.polkitd_log,
                                        stderr=subprocess.STDOUT)
        # polkitd's start-up: it loads actions and rules before it asks for its name.
        conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
        try:
            deadline = time.monotonic() + DAEMON_START_LIMIT
            while not conn.name_has_owner(POLKIT_NAME):
                assert self.polkitd.poll() is None, \
                    f"polkitd exited with status {self.polkitd.returncode}: " \
                    f"{read_text(self.polkitd_log.name)}"
                assert time.monotonic() < deadline, \
                    f"polkitd did not own {POLKIT_NAME} within {DAEMON_START_LIMIT} s"
                time.sleep(0.02)
        finally:
            conn.close()

    def _start_udevd(self):
        if udevd_running():
            return  # someone else's udevd: use it, never stop it (require_own_udevd)
        # In the foreground, as our child: its PID is ours to stop, and no zombie of a
        # --daemon fork (nothing reaps orphans here) can be mistaken for a live udevd.
        self.udevd_log = open(os.path.join(self.tmp, "udevd.log"), "a")  # "a": restarts
        self.udevd = subprocess.Popen([UDEVD], stdout=self.udevd_log, stderr=subprocess.STDOUT)
        self.udevd_pid = self.udevd.pid
        # udevd's start-up (not an attach): poll until it answers on its socket.
        deadline = time.monotonic() + 10
        while run("udevadm", "control", "--ping", check=False).returncode != 0:
            assert self.udevd.poll() is None, f"systemd-udevd exited with {self.udevd.returncode}"
            assert time.monotonic() < deadline, "systemd-udevd did not answer within 10 s"
            time.sleep(0.02)

    def _start_loopd(self):
        self.loopd_log = os.path.join(self.tmp, "loopd.log")
        # Records and by-ref links in this test's temp dir: a loopd running for real
        # on this machine, or a previous test, can neither adopt nor be adopted.
        args = ["--runtime-dir", os.path.join(self.tmp, "run"),
                "--log-level", os.environ.get("LOOPD_LOG_LEVEL", "debug")]
        if self.journal is not None:
            stream, identity = journal_stream("loopd")
            with stream:
                self.loopd = subprocess.Popen([LOOPD, *args, *self.loopd_args], stdout=stream.fileno(),
                                              stderr=stream.fileno(),
                                              env={**os.environ, "JOURNAL_STREAM": identity})
        else:
            with open(self.loopd_log, "a") as log:  # "a": restart_loopd() keeps the old log
                self.loopd = subprocess.Popen([LOOPD, *args, *self.loopd_args], stdout=log,
                                              stderr=subprocess.STDOUT)
        # The one readiness poll: the daemon's start-up, not an attach.
        conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
        try:
            deadline = time.monotonic() + DAEMON_START_LIMIT
            while not self._owns_name(conn):
                assert self.loopd.poll() is None, \
                    f"loopd exited with status {self.loopd.returncode} before owning {BUS_NAME}"
                assert time.monotonic() < deadline, \
                    f"loopd did not own {BUS_NAME} within {DAEMON_START_LIMIT} s"
                time.sleep(0.02)
            # The checks here look for udev's work; they only mean something if
            # loopd waits for udev too.
            source = conn.call_blocking(BUS_NAME, MANAGER_PATH, "org.freedesktop.DBus.Properties",
                                        "Get", "ss", [MANAGER_IFACE, "ReadinessSource"])
            assert source == "udev", f"loopd's ReadinessSource is {source!r} with udevd running"
        finally:
            conn.close()

    def _owns_name(self, conn):
        """Whether this loopd owns BUS_NAME. Not just "someone does": right after a
        SIGKILL the bus may not have noticed the killed one's hang-up yet, and
        a call to the name then went to the dead connection (NoReply, CI)."""
        try:
            pid = conn.call_blocking("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                     "GetConnectionUnixProcessID", "s", [BUS_NAME])
        except dbus.DBusException:
            return False  # no owner yet
        return pid == self.loopd.pid

    # ---- per-test helpers

    def image(self, kind):
        """A fresh image of kind gpt3, mbr2, none or gpt32 in the temp dir."""
        self._images += 1
        return IMAGE_MAKERS[kind](os.path.join(self.tmp, f"{kind}-{self._images}.img"))

    def path(self, name):
        return os.path.join(self.tmp, name)

    def attached_here(self):
        return loop_devices_backed_under(self.tmp)

    def assert_loopd_alive(self):
        assert self.loopd.poll() is None, f"loopd died with status {self.loopd.returncode}"

    def restart_loopd(self, kill=True, loopd_args=None, meanwhile=None):
        """Stops loopd (SIGKILL if kill, else SIGTERM, on which it must exit cleanly)
        and starts it again on the same bus with the same runtime dir, so that it
        finds its ownership records. loopd_args, if given, replaces the extra options
        for this and later starts; meanwhile(), if given, runs while loopd is down."""
        self.assert_loopd_alive()
        if kill:
            self.loopd.kill()
            self.loopd.wait()
        else:
            status, killed = _stop_child(self.loopd)
            assert not killed, "loopd did not exit within 10 s of SIGTERM"
            assert status == 0, f"loopd exited with status {status} on SIGTERM"
        if meanwhile is not None:
            meanwhile()
        if loopd_args is not None:
            self.loopd_args = list(loopd_args)
        self._start_loopd()

    @property
    def owns_udevd(self):
        """Whether this Env started udevd (only then may a test stop it)."""
        return self.udevd_pid is not None

    def stop_udevd(self):
        assert self.owns_udevd, "this test did not start udevd: it must not stop it"
        self._stop_udevd()
        self.udevd_pid = None

    def start_udevd(self):
        """Starts udevd again after stop_udevd() (unless someone else's runs now)."""
        self._start_udevd()

    def require_own_udevd(self):
        """For a test that stops or pauses udevd: Skip unless this Env started the
        udevd that runs. One that ran before the test is someone else's (the
        machine's, or a run by hand): not ours to stop, and no second udevd can run
        beside it, so the test cannot run here."""
        if not self.owns_udevd:
            raise Skip("a udevd was running before this test: someone else's, not ours to "
                       "stop; this test needs a machine where none runs")

    # ---- tear-down

    def __exit__(self, exc_type, exc, tb):
        problems = []
        failed = exc_type is not None and not issubclass(exc_type, Skip)
        if self.loopd is not None and not udevd_running():
            # Explains failed udev checks: someone stopped udevd under the test.
            problems.append("no udevd was running at the end of the test")
        if self.loopd is not None:
            if self.loopd.poll() is not None:
                problems.append(f"loopd exited by itself with status {self.loopd.returncode}")
            else:
                status, killed = _stop_child(self.loopd)
                if killed:
                    problems.append("loopd did not exit within 10 s of SIGTERM")
                elif status != 0:
                    problems.append(f"loopd exited with status {status} on SIGTERM")
        if (failed or problems) and self.loopd is not None:
            self._print_log()
        if (failed or problems) and self.polkitd is not None:
            self._print_log(self.polkitd_log.name, "polkitd")
        if self.polkitd is not None:
            _stop_child(self.polkitd)
            self.polkitd_log.close()
        for path in self.installed:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"cannot remove {path}: {e}")
        if self.bus is not None:
            _stop_child(self.bus)
            self.bus.stdout.close()
        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        if self.udevd_pid is not None:
            self._stop_udevd()
        if self._journal_entered:
            self.journal.__exit__(None, None, None)
        if self.tmp is not None:
            for devnode, backing in _leaked_loop_devices(self.tmp):
                problems.append(f"leaked loop device {devnode} backed by {backing}")
                force_detach(devnode)
            for devnode in sorted(unbound_loop_devices_with_partitions() - self.stale_before):
                problems.append(f"leaked partitions of detached {devnode}")
                run("partx", "-d", devnode, check=False)
            if os.environ.get("LOOPD_TEST_KEEP"):
                print(f"# kept {self.tmp}")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        if problems:
            if exc is not None:
                problems.insert(0, f"{type(exc).__name__}: {exc}")
            raise AssertionError("; ".join(problems))
        return False

    def _print_log(self, path=None, name="loopd"):
        try:
            if path is None and self.journal is not None:
                text = run("journalctl", "--no-pager", "-o", "short-precise", f"_PID={self.loopd.pid}",
                           check=False).stdout
            else:
                text = read_text(path or self.loopd_log)
        except OSError:
            return
        print(f"# ---- {name} log ----")
        for line in text.splitlines():
            print("# " + line)
        print(f"# ---- end of {name} log ----")

    def _stop_udevd(self):
        _stop_child(self.udevd)
        self.udevd_log.close()
