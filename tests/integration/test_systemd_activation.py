"""D-Bus activation without systemd: with loopd not running, a busctl call starts
it through an activation file and is answered.

A private system-type dbus-daemon whose config has the project's policy and a
<servicedir> with an activation file generated from dbus/org.loopd1.service.in,
Exec= pointing at the build-tree loopd (plus a --runtime-dir in the temp dir).
Without --systemd-activation dbus-daemon runs Exec= itself; SystemdService= is
exercised in test_systemd.py, under a real manager.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import harness
from harness import run
from test_systemd_manager import BUS_CONFIG, generate, main, _reap, _set_subreaper


class ActivationEnv:
    def __init__(self):
        self.tmp = None
        self.bus = None
        self.udev = None

    def __enter__(self):
        _set_subreaper()  # loopd is dbus-daemon's child; if that goes first, ours
        self.tmp = tempfile.mkdtemp(dir="/var/tmp", prefix="loopd-activation-")
        try:
            self.udev = harness.Env()
            self.udev.tmp = self.tmp
            self.udev._start_udevd()
            self._start_bus()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def path(self, name):
        return os.path.join(self.tmp, name)

    def _start_bus(self):
        services = self.path("services")
        os.mkdir(services)
        activation = generate(os.path.join(harness.LOOPD_SRC, "dbus/org.loopd1.service.in"),
                              os.path.join(services, "org.loopd1.service"),
                              sbindir=os.path.dirname(harness.LOOPD))
        with open(activation) as f:
            text = f.read()
        # The build-tree binary (harness.LOOPD), with its records and links here.
        exec_line = next(line for line in text.splitlines() if line.startswith("Exec="))
        assert exec_line == f"Exec={os.path.dirname(harness.LOOPD)}/loopd", exec_line
        with open(activation, "w") as f:
            f.write(text.replace(exec_line, f"Exec={harness.LOOPD} --runtime-dir {self.path('run')} "
                                            "--log-level debug"))
        socket = self.path("bus")
        config = BUS_CONFIG.format(listen=f"unix:path={socket}", services=services,
                                   policy=harness.POLICY_FILE)
        with open(self.path("bus.conf"), "w") as f:
            f.write(config)
        # The activated loopd inherits dbus-daemon's environment: this is its bus.
        self.address = f"unix:path={socket}"
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address)
        with open(self.path("dbus-daemon.log"), "w") as log:
            self.bus = subprocess.Popen(
                ["dbus-daemon", f"--config-file={self.path('bus.conf')}", "--nofork", "--print-address"],
                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        assert self.bus.stdout.readline().strip(), "dbus-daemon did not start"
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.address

    def bus_call(self, member, signature="", *args):
        out = run("busctl", "--system", "--json=short", "call", "org.freedesktop.DBus",
                  "/org/freedesktop/DBus", "org.freedesktop.DBus", member, signature, *args).stdout
        return json.loads(out)["data"][0]

    def __exit__(self, exc_type, exc, tb):
        problems = []
        if self.bus is not None:
            try:
                if self.bus_call("NameHasOwner", "s", "org.loopd1"):
                    pid = self.bus_call("GetConnectionUnixProcessID", "s", "org.loopd1")
                    os.kill(pid, signal.SIGTERM)
                    deadline = time.monotonic() + 10
                    while harness._pid_alive(pid):
                        if time.monotonic() > deadline:
                            problems.append("activated loopd did not exit within 10 s of SIGTERM")
                            os.kill(pid, signal.SIGKILL)
                            break
                        time.sleep(0.02)  # a process exiting, not a readiness wait
            except Exception as e:
                problems.append(f"stopping the activated loopd: {e}")
            if exc_type is not None:
                for name in ("dbus-daemon.log",):
                    print(f"# ---- {name} ----\n# " + harness.read_text(self.path(name)).replace("\n", "\n# "))
            harness._stop_child(self.bus)
            self.bus.stdout.close()
        _reap()
        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        if self.udev is not None and self.udev.udevd_pid is not None:
            self.udev._stop_udevd()
        if self.tmp is not None:
            for devnode, backing in harness.loop_devices_backed_under(self.tmp):
                problems.append(f"leaked loop device {devnode} backed by {backing}")
                harness.force_detach(devnode)
            subprocess.run(["rm", "-rf", self.tmp], check=False)
        if problems:
            if exc is not None:
                problems.insert(0, f"{type(exc).__name__}: {exc}")
            raise AssertionError("; ".join(problems))
        return False


def test_busctl_call_activates_loopd(env):
    assert not env.bus_call("NameHasOwner", "s", "org.loopd1"), "org.loopd1 owned before any call"
    image = harness.make_gpt3(env.path("a.img"))

    reply = harness.busctl_attach(image.path, {"ref": ("s", "act")})
    diskseq = harness.verify_reply(reply, image)

    pid = env.bus_call("GetConnectionUnixProcessID", "s", "org.loopd1")
    assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(harness.LOOPD), \
        f"org.loopd1 is owned by {os.path.realpath(f'/proc/{pid}/exe')}, not the activated loopd"
    assert os.readlink(env.path("run/by-ref/act")) == reply["devnode"]
    harness.busctl_detach(diskseq)
    harness.verify_detached(reply["devnode"], diskseq)


if __name__ == "__main__":
    main(globals(), env_factory=ActivationEnv)
