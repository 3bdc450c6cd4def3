"""The harness's configuration (paths, bus names, limits) and the two primitives
every other part uses: run() and read_text(). Part of harness.py (see there)."""

import os
import subprocess

__all__ = [
    "LOOPD_SRC", "LOOPD", "LOOPCTL", "POLICY_FILE", "POLKIT_ACTIONS_FILE", "POLKITD",
    "POLKIT_BUS_POLICY", "POLKIT_ACTIONS_DIR", "POLKIT_RULES_DIR", "POLKIT_NAME", "UDEVD",
    "BUS_NAME", "MANAGER_PATH", "MANAGER_IFACE", "DEVICE_IFACE", "ERROR_PREFIX",
    "CALL_TIMEOUT", "DAEMON_START_LIMIT", "run", "read_text",
]

# --------------------------------------------------------------------------- config

LOOPD_SRC = os.environ.get(
    "LOOPD_SRC",
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _built(*candidates):
    """The first candidate under LOOPD_SRC/build that exists (for runs by hand)."""
    paths = [os.path.join(LOOPD_SRC, "build", c) for c in candidates]
    return next((p for p in paths if os.path.exists(p)), paths[0])


LOOPD = os.environ.get("LOOPD") or _built("src/service/loopd", "loopd")
LOOPCTL = os.environ.get("LOOPCTL") or _built("src/cli/loopctl", "loopctl")
POLICY_FILE = os.path.join(LOOPD_SRC, "dbus/org.loopd1.conf")
POLKIT_ACTIONS_FILE = os.path.join(LOOPD_SRC, "dbus/org.loopd1.policy")
# Env(polkit=True): Debian's polkitd, its bus policy, and where it reads actions and rules.
POLKITD = "/usr/lib/polkit-1/polkitd"
POLKIT_BUS_POLICY = "/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf"
POLKIT_ACTIONS_DIR = "/usr/share/polkit-1/actions"
POLKIT_RULES_DIR = "/etc/polkit-1/rules.d"
POLKIT_NAME = "org.freedesktop.PolicyKit1"
UDEVD = "/lib/systemd/systemd-udevd"

BUS_NAME = "org.loopd1"
MANAGER_PATH = "/org/loopd1"
MANAGER_IFACE = "org.loopd1.Manager"
DEVICE_IFACE = "org.loopd1.Device"
ERROR_PREFIX = "org.loopd1.Error."

# Generous: the daemon's own readiness deadline is 10 s; a reply later than this
# is a hang, not slowness.
CALL_TIMEOUT = 60
DAEMON_START_LIMIT = 10.0

# meson runs tests with the caller's PATH; losetup, partx and sfdisk live in sbin.
for _d in ("/usr/sbin", "/sbin"):
    if _d not in os.environ.get("PATH", "").split(":"):
        os.environ["PATH"] = os.environ.get("PATH", "/usr/bin:/bin") + ":" + _d


# --------------------------------------------------------------------------- helpers

def run(*cmd, check=True, timeout=CALL_TIMEOUT + 30, **kw):
    """Runs a command, captures text output; on failure the assert names it all."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check:
        assert p.returncode == 0, (
            f"{' '.join(map(str, cmd))} failed ({p.returncode}): "
            f"{p.stderr.strip() or p.stdout.strip()}")
    return p


def read_text(path):
    # A log may quote a file name, which is any bytes.
    with open(path, errors="backslashreplace") as f:
        return f.read().strip()
