"""A real systemd manager for loopd's unit tests (not a test itself).

UserManager() starts `systemd --user` (as root) that runs the project's own units,
generated from systemd-units/*.in and dbus/org.loopd1.service.in with build-tree
paths, next to a dbus-daemon it starts itself (dbus.socket + dbus.service, a private
system-type bus with the project's policy and --systemd-activation), so that
Type=dbus, BusName= and SystemdService= all work as on a real system. The real
udevd is used (started if none runs), and real loop devices.

How it is kept off the rest of the machine (others run tests at the same time):
- The manager runs in its own mount namespace (unshare). There /run/systemd is a
  private tmpfs holding the /run/systemd/system directory that `systemd --user`
  insists on (sd_booted()) and the inaccessible nodes PID 1 would have made, so
  sd_booted() never becomes true for any other process on the machine, not even
  for a moment. /run is bind-mounted onto itself (on this machine it is no mount
  point, and systemd would put an empty tmpfs over it in every sandboxed unit,
  hiding /run/udev), and the /sys mount is read-only in that namespace only, which
  tells systemd not to track devices (otherwise the flood of other tests' loop
  uevents starves its job queue). /sys/devices/virtual/block stays a writable
  mount of its own, as it is on a real system: loopd.service's ProtectKernelTunables=
  makes it read-only again unless its ReadWritePaths= says otherwise.
- It runs in its own cgroup (loopd-test-PID in the named and unified hierarchies),
  removed afterwards; everything left in it is killed.
- Its runtime directory ($XDG_RUNTIME_DIR, so %t, and loopd's RuntimeDirectory=,
  so the by-ref links) is in the test's temp dir: %t/loopd is what /run/loopd is
  for the system manager.
- There is no journald here: a drop-in for every service (service.d/) appends its
  output to logs/<unit>.log, which stands in for the journal.
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import harness
from harness import run

BUILD = os.environ.get("LOOPD_BUILD") or os.path.dirname(harness.LOOPD)
SRC = harness.LOOPD_SRC
SYSTEMD = "/lib/systemd/systemd"
MANAGER_START_LIMIT = 30.0
CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- Debian's system bus policy; holes only from the project's policy file and
     systemd's (which lets the manager own org.freedesktop.systemd1, to receive
     activation requests: harmless without a manager). Activation files: {services}. -->
<busconfig>
  <type>system</type>
  <listen>{listen}</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{services}</servicedir>
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
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <include>{policy}</include>
  <include>/usr/share/dbus-1/system.d/org.freedesktop.systemd1.conf</include>
</busconfig>
"""

# Run inside the new mount namespace, then exec's the manager (same PID).
NAMESPACE_SETUP = r"""
set -e
for root in {cgroup_roots}; do echo $$ > "$root/{cgroup}/cgroup.procs"; done
mount --bind /run /run
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir /run/systemd/system /run/systemd/inaccessible
cd /run/systemd/inaccessible
mkdir -m 0 dir; install -m 0 /dev/null reg; mkfifo -m 0 fifo
mknod -m 0 chr c 0 0; mknod -m 0 blk b 0 0
/usr/bin/python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("sock")'; chmod 0 sock
cd /
mount --bind /sys/devices/virtual/block /sys/devices/virtual/block
mount -o remount,bind,ro /sys
exec {systemd} --user --unit=loopd-test.target --log-level=info
"""


def _set_subreaper():
    """Orphans (a unit's processes if the manager is killed) come to this process,
    not to a PID 1 that does not reap them here."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def generate(template, out, **values):
    """template.in with @key@ replaced, as meson's configure_file does."""
    with open(template) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    with open(out, "w") as f:
        f.write(text)
    return out


class UserManager:
    """One test's world: temp dir, the project's units under a real systemd manager,
    a private bus run by it, udevd. Fails the test on exit if a loop device backed
    by the temp dir is left (after removing it)."""

    # The bus policy the private bus includes.
    policy_file = harness.POLICY_FILE

    def __init__(self):
        self.tmp = None
        self.proc = None
        self.cgroup = f"loopd-test-{os.getpid()}-{int(time.monotonic() * 1000)}"
        self.udev = None

    # ---- set-up

    def __enter__(self):
        _set_subreaper()
        self.tmp = tempfile.mkdtemp(dir="/var/tmp", prefix="loopd-systemd-")
        self.xdg = self.path("xdg")
        self.units = self.path("units")
        self.logs = self.path("logs")
        self.images = self.path("images")
        self.services = self.path("services")
        for d in (self.xdg, self.units, self.logs, self.images, self.services,
                  os.path.join(self.units, "service.d")):
            os.makedirs(d, mode=0o700 if d == self.xdg else 0o755)
        self.bus_address = f"unix:path={self.xdg}/bus"
        self.env = dict(os.environ, XDG_RUNTIME_DIR=self.xdg,
                        DBUS_SYSTEM_BUS_ADDRESS=self.bus_address,
                        DBUS_SESSION_BUS_ADDRESS=self.bus_address)
        try:
            self._start_udevd()
            self._write_units()
            self._start_manager()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def path(self, *names):
        return os.path.join(self.tmp, *names)

    def _start_udevd(self):
        # harness.Env's udevd handling, without its bus and loopd.
        env = harness.Env()
        env.tmp = self.tmp
        env._start_udevd()
        self.udev = env

    def _write_units(self):
        u = self.units
        with open(os.path.join(u, "loopd-test.target"), "w") as f:
            f.write("[Unit]\nDescription=loopd test\nWants=dbus.service\n")
        with open(os.path.join(u, "service.d", "50-test-log.conf"), "w") as f:
            f.write(f"[Service]\nStandardOutput=append:{self.logs}/%n.log\nStandardError=inherit\n")
        with open(os.path.join(u, "dbus.socket"), "w") as f:
            f.write("[Unit]\nDescription=private system-type bus\n[Socket]\nListenStream=%t/bus\n")
        with open(os.path.join(u, "dbus.service"), "w") as f:
            f.write("[Unit]\nDescription=private system-type bus\nRequires=dbus.socket\n"
                    "[Service]\nType=notify\n"
                    f"ExecStart=/usr/bin/dbus-daemon --config-file={self.path('bus.conf')} "
                    "--nofork --nopidfile --systemd-activation\n")
        with open(self.path("bus.conf"), "w") as f:
            f.write(BUS_CONFIG.format(listen="systemd:", services=self.services,
                                      policy=self.policy_file))
        self._write_project_units()

    def _write_project_units(self):
        """The project's own units and activation file, with build-tree binaries.
        (tests/package/ puts the installed ones here instead.)"""
        u = self.units
        generate(os.path.join(SRC, "systemd-units/loopd.service.in"),
                 os.path.join(u, "loopd.service"), sbindir=BUILD)
        generate(os.path.join(SRC, "systemd-units/loopd-image@.service.in"),
                 os.path.join(u, "loopd-image@.service"), bindir=BUILD, imagesdir=self.images)
        generate(os.path.join(SRC, "dbus/org.loopd1.service.in"),
                 os.path.join(self.services, "org.loopd1.service"), sbindir=BUILD)

    def _start_manager(self):
        for root in CGROUP_ROOTS:
            os.mkdir(os.path.join(root, self.cgroup))
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = self.path("manager-notify")
        notify.bind(notify_path)
        notify.settimeout(MANAGER_START_LIMIT)
        script = NAMESPACE_SETUP.format(cgroup_roots=" ".join(CGROUP_ROOTS), cgroup=self.cgroup,
                                        systemd=SYSTEMD)
        env = dict(self.env, NOTIFY_SOCKET=notify_path,
                   SYSTEMD_UNIT_PATH=f"{self.units}:/usr/lib/systemd/user")
        with open(self.path("manager.log"), "w") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        # The manager's own start-up (not a unit's): it says READY=1 when done.
        try:
            while True:
                msg = notify.recv(4096).decode()
                if "READY=1" in msg.split("\n"):
                    break
        except socket.timeout:
            raise AssertionError(f"systemd --user did not start within {MANAGER_START_LIMIT} s: "
                                 f"{harness.read_text(self.path('manager.log'))}") from None
        finally:
            notify.close()

    # ---- helpers

    def systemctl(self, *args, check=True):
        return run("systemctl", "--user", "--no-pager", *args, env=self.env, check=check)

    def show(self, unit, *props):
        out = self.systemctl("show", unit, *[f"--property={p}" for p in props]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def busctl(self, *args, check=True):
        return run("busctl", "--system", f"--timeout={harness.CALL_TIMEOUT}", *args,
                   env=self.env, check=check)

    def write_unit(self, name, text):
        with open(os.path.join(self.units, name), "w") as f:
            f.write(text)

    def drop_in(self, unit, text):
        d = os.path.join(self.units, unit + ".d")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "50-test.conf"), "w") as f:
            f.write(text)

    def reload(self):
        self.systemctl("daemon-reload")

    def image_config(self, name, text):
        with open(os.path.join(self.images, name + ".conf"), "w") as f:
            f.write(text)

    def log(self, unit):
        try:
            return harness.read_text(os.path.join(self.logs, unit + ".log"))
        except OSError:
            return ""

    def by_ref(self, name=""):
        return os.path.join(self.xdg, "loopd", "by-ref", name)

    # ---- tear-down

    def __exit__(self, exc_type, exc, tb):
        problems = []
        if self.proc is not None:
            if exc_type is not None:
                self._print_logs()
            # SIGTERM: the manager stops every unit (loopd-image@ detaches) and exits.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                problems.append("systemd --user did not exit within 30 s of SIGTERM")
                self.proc.kill()
                self.proc.wait()
        self._remove_cgroup(problems)
        _reap()
        if self.udev is not None and self.udev.udevd_pid is not None:
            self.udev._stop_udevd()
        if self.tmp is not None:
            for devnode, backing in harness.loop_devices_backed_under(self.tmp):
                problems.append(f"leaked loop device {devnode} backed by {backing}")
                harness.force_detach(devnode)
            if os.environ.get("LOOPD_TEST_KEEP"):
                print(f"# kept {self.tmp}")
            else:
                subprocess.run(["rm", "-rf", self.tmp], check=False)
        if problems:
            if exc is not None:
                problems.insert(0, f"{type(exc).__name__}: {exc}")
            raise AssertionError("; ".join(problems))
        return False

    def _remove_cgroup(self, problems):
        named = os.path.join(CGROUP_ROOTS[0], self.cgroup)
        if not os.path.isdir(named):
            return
        for attempt in range(50):
            pids = []
            for dirpath, _, _ in os.walk(named):
                try:
                    pids += harness.read_text(os.path.join(dirpath, "cgroup.procs")).split()
                except OSError:
                    pass
            if not pids:
                break
            if attempt == 0:
                problems.append(f"processes left in the manager's cgroup: {pids}")
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _reap()
            time.sleep(0.1)  # the kernel empties the cgroup after the kill
        for root in CGROUP_ROOTS:
            top = os.path.join(root, self.cgroup)
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass

    def _print_logs(self):
        for name in sorted(os.listdir(self.logs)) + ["manager.log"]:
            path = os.path.join(self.logs, name) if name != "manager.log" else self.path(name)
            try:
                text = harness.read_text(path)
            except OSError:
                continue
            print(f"# ---- {name} ----")
            for line in text.splitlines()[-60:]:
                print("# " + line)


def main(module_globals, env_factory=UserManager):
    """Runs the module's test_* functions in definition order, each in a fresh
    env_factory() world. argv may name a subset. Exits 0, 1 or 77 (not root)."""
    if os.geteuid() != 0:
        print("SKIP: loopd's systemd tests need root")
        sys.exit(77)
    tests = [(n, f) for n, f in module_globals.items() if n.startswith("test_") and callable(f)]
    if len(sys.argv) > 1:
        tests = [(n, f) for n, f in tests if n in sys.argv[1:]]
    signal.signal(signal.SIGTERM, harness._on_sigterm)
    failed = 0
    for name, fn in tests:
        started = time.monotonic()
        try:
            with env_factory() as env:
                fn(env)
        except Exception as e:
            failed += 1
            print(f"FAIL {name}: {e}")
            if not isinstance(e, AssertionError) or os.environ.get("LOOPD_TEST_TRACEBACK"):
                import traceback
                traceback.print_exc(file=sys.stdout)
        else:
            print(f"PASS {name} ({time.monotonic() - started:.2f} s)")
        sys.stdout.flush()
    print(f"# {len(tests) - failed}/{len(tests)} passed")
    sys.exit(1 if failed else 0)


def json_dump(path, value):
    with open(path, "w") as f:
        json.dump(value, f)
