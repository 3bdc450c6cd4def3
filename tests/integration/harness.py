"""Shared fixture for loopd's integration tests.

Each test runs against a fresh world: a private system-bus dbus-daemon whose policy
is Debian's default plus the project's own dbus/org.loopd1.conf, a real
systemd-udevd, and the loopd binary from the build tree. Clients are the project's
loopctl and tools no one here wrote: busctl and python3-dbus.

The product's promise is that a reply means "ready", so nothing here sleeps, settles
or retries before checking a reply. The only polls are for the daemon's own start-up
and for processes to exit.

Run under Debian's /usr/bin/python3 (python3-dbus is installed for it). Needs root;
exits 77 (meson: skipped) otherwise.

Environment: LOOPD (daemon binary), LOOPCTL (CLI binary), LOOPD_SRC (source root).
Without them, paths default to the source tree this file is in and its build/ dir.
For runs by hand: LOOPD_ARGS (extra daemon options), LOOPD_LOG_LEVEL (default
debug), LOOPD_TEST_KEEP=1 (keep the temp dir), LOOPD_TEST_TRACEBACK=1 (tracebacks
for assertion failures too).
Test names given as arguments select a subset.
"""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import dbus  # python3-dbus: an independent client that reports D-Bus error names

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
    with open(path) as f:
        return f.read().strip()


def read_uevent(path):
    """KEY=value lines of a sysfs uevent file as a dict."""
    return dict(line.split("=", 1) for line in read_text(path).splitlines() if "=" in line)


def loop_name(devnode):
    """'/dev/loop3' -> 'loop3'."""
    name = os.path.basename(devnode)
    assert re.fullmatch(r"loop\d+", name), f"{devnode!r} is not a loop device node"
    return name


def partition_numbers_in_sysfs(name):
    """Numbers K of /sys/block/<name>/<name>pK, sorted."""
    pattern = re.compile(re.escape(name) + r"p(\d+)")
    nums = []
    for entry in os.listdir(f"/sys/block/{name}"):
        m = pattern.fullmatch(entry)
        if m:
            nums.append(int(m.group(1)))
    return sorted(nums)


def partition_nodes_in_dev(name):
    return sorted(e for e in os.listdir("/dev") if re.fullmatch(re.escape(name) + r"p\d+", e))


def expected_partitions(devnode, nparts):
    return [f"{devnode}p{k}" for k in range(1, nparts + 1)]


# --------------------------------------------------------------------------- images

class Image:
    """A backing file, and what its partition table should produce."""

    def __init__(self, path, nparts, table_uuid=None):
        self.path = path
        self.nparts = nparts
        self.table_uuid = table_uuid  # as udev spells ID_PART_TABLE_UUID, or None

    def __repr__(self):
        return f"Image({self.path}, {self.nparts} partitions)"


def _sfdisk_image(path, size, script, nparts):
    # A fresh sfdisk run per image gives every image its own random table and
    # partition UUIDs, so a stale udev entry from an earlier image can never pass
    # for this one.
    run("truncate", "-s", size, path)
    run("sfdisk", "-q", path, input=script)
    table = json.loads(run("sfdisk", "--json", path).stdout)["partitiontable"]
    assert len(table["partitions"]) == nparts, f"sfdisk made {table} for {path}"
    table_uuid = table["id"].lower()
    if table["label"] == "dos":
        table_uuid = table_uuid.removeprefix("0x")  # udev: "d56a72a8", sfdisk: "0xd56a72a8"
    return Image(path, nparts, table_uuid)


def make_gpt3(path):
    return _sfdisk_image(path, "64M", "label: gpt\n" + " size=8MiB\n" * 3, 3)


def make_mbr2(path):
    return _sfdisk_image(path, "32M", "label: dos\n" + " size=8MiB\n" * 2, 2)


def make_gpt32(path):
    # GPT has room for 128 entries; 32 x 1 MiB fits a 64 MiB image.
    return _sfdisk_image(path, "64M", "label: gpt\n" + " size=1MiB\n" * 32, 32)


def make_none(path):
    run("truncate", "-s", "16M", path)  # all zeroes: no partition table at all
    return Image(path, 0, None)


IMAGE_MAKERS = {"gpt3": make_gpt3, "mbr2": make_mbr2, "none": make_none, "gpt32": make_gpt32}


# --------------------------------------------------------------------------- errors

class CallError(Exception):
    """A D-Bus call answered with an error. name is None when the client (busctl)
    does not show the error name."""

    def __init__(self, name, message, client):
        super().__init__(f"{client}: {name or '<name not shown>'}: {message}")
        self.name = name
        self.message = message
        self.client = client


# --------------------------------------------------------------------------- busctl

def _busctl(*args, json_out=True, check=True):
    cmd = ["busctl", "--system", f"--timeout={CALL_TIMEOUT}"]
    if json_out:
        cmd.append("--json=short")
    p = run(*cmd, *args, check=False)
    if p.returncode != 0 and check:
        # busctl 252 prints only "Call failed: <message>", never the error name.
        msg = p.stderr.strip()
        msg = msg.removeprefix("Call failed: ")
        raise CallError(None, msg, "busctl")
    return p


def _busctl_json(*args):
    return json.loads(_busctl(*args).stdout)


def busctl_options(options):
    """{'offset': ('t', 512), ...} -> busctl's flattened a{sv} arguments."""
    out = [str(len(options or {}))]
    for key, (typ, value) in (options or {}).items():
        if typ == "b":
            value = "true" if value else "false"
        out += [key, typ, str(value)]
    return out


def _attach_reply(data):
    device, devnode, diskseq, partitions = data
    return {"device": device, "devnode": devnode, "diskseq": int(diskseq),
            "partitions": list(partitions)}


def busctl_attach_cmd(path, options=None):
    """The busctl command line for Attach, for callers that run it themselves."""
    return ["busctl", "--system", f"--timeout={CALL_TIMEOUT}", "--json=short", "call",
            BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Attach", "sa{sv}", str(path),
            *busctl_options(options)]


def parse_busctl_attach(stdout):
    reply = json.loads(stdout)
    assert reply["type"] == "ostas", reply
    return _attach_reply(reply["data"])


def busctl_attach(path, options=None):
    """Manager.Attach via busctl. Returns dict device/devnode/diskseq/partitions."""
    p = run(*busctl_attach_cmd(path, options), check=False)
    if p.returncode != 0:
        raise CallError(None, p.stderr.strip().removeprefix("Call failed: "), "busctl")
    return parse_busctl_attach(p.stdout)


def busctl_detach(diskseq, options=None):
    _busctl("call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Detach", "ta{sv}",
            str(diskseq), *busctl_options(options))


def busctl_device_detach(obj, options=None):
    _busctl("call", BUS_NAME, obj, DEVICE_IFACE, "Detach", "a{sv}", *busctl_options(options))


def busctl_wait_ready(device, timeout_usec):
    reply = _busctl_json("call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "WaitReady", "st",
                         str(device), str(timeout_usec))
    return _attach_reply(reply["data"])


def busctl_get_property(obj, iface, prop):
    return _busctl_json("get-property", BUS_NAME, obj, iface, prop)["data"]


def busctl_get_all(obj, iface):
    """Properties.GetAll as {name: plain value}."""
    reply = _busctl_json("call", BUS_NAME, obj, "org.freedesktop.DBus.Properties",
                         "GetAll", "s", iface)
    return {k: v["data"] for k, v in reply["data"][0].items()}


def busctl_managed_objects():
    """ObjectManager.GetManagedObjects as {path: {iface: {prop: value}}}."""
    reply = _busctl_json("call", BUS_NAME, MANAGER_PATH,
                         "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    return {path: {iface: {k: v["data"] for k, v in props.items()}
                   for iface, props in ifaces.items()}
            for path, ifaces in reply["data"][0].items()}


# --------------------------------------------------------------------------- python3-dbus

def _plain(value):
    """dbus-python values -> plain Python values."""
    if isinstance(value, (dbus.Array, list)):
        return [_plain(v) for v in value]
    if isinstance(value, (dbus.Dictionary, dict)):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, (int, dbus.Byte)):
        return int(value)
    if isinstance(value, str):
        return str(value)
    return value


def pydbus_call(method, signature="", args=(), path=MANAGER_PATH, iface=MANAGER_IFACE,
                timeout=CALL_TIMEOUT):
    """One call on a private connection of its own, like a separate client process.
    Raises CallError with the exact D-Bus error name."""
    conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
    try:
        reply = conn.call_blocking(BUS_NAME, path, iface, method, signature, list(args),
                                   timeout=timeout)
    except dbus.exceptions.DBusException as e:
        raise CallError(e.get_dbus_name(), e.get_dbus_message(), "python3-dbus") from None
    finally:
        conn.close()
    return _plain(reply)


def pydbus_options(**options):
    """Option values must already carry their D-Bus type (dbus.UInt64(512), ...): the
    variant type is part of what is being tested."""
    return dbus.Dictionary({k.replace("_", "-"): v for k, v in options.items()},
                           signature="sv")


def pydbus_attach(path, options=None, timeout=CALL_TIMEOUT):
    reply = pydbus_call("Attach", "sa{sv}", [str(path), options or pydbus_options()],
                        timeout=timeout)
    return _attach_reply(reply)


def expect_error(name, fn, *args, **kw):
    """Calls fn expecting a CallError named `name` (e.g. 'NotFound'); returns it."""
    full = name if name.startswith(ERROR_PREFIX) else ERROR_PREFIX + name
    try:
        result = fn(*args, **kw)
    except CallError as e:
        assert e.name == full, f"expected {full}, got {e}"
        return e
    raise AssertionError(f"expected {full}, but the call succeeded: {result}")


# --------------------------------------------------------------------------- loopctl

class LoopctlError(CallError):
    pass


def _loopctl(*args):
    p = run(LOOPCTL, *args, check=False)
    if p.returncode != 0:
        # Contract: "<org.loopd1.Error.Name>: <message>" on stderr, exit status 1.
        m = None
        for line in p.stderr.strip().splitlines():
            m = re.match(r"(org\.loopd1\.Error\.\w+): (.*)", line) or m
        assert p.returncode == 1, f"loopctl {args} exited {p.returncode}: {p.stderr}"
        assert m, f"loopctl {args}: error not in 'Name: message' form: {p.stderr!r}"
        raise LoopctlError(m.group(1), m.group(2), "loopctl")
    return p.stdout


def loopctl_attach(path, *args):
    """`loopctl attach IMAGE` (human output). The human form carries no diskseq or
    object path, so those are None."""
    lines = _loopctl("attach", *args, path).splitlines()
    assert lines, "loopctl attach printed nothing"
    return {"device": None, "devnode": lines[0], "diskseq": None, "partitions": lines[1:]}


def loopctl_attach_json(path, *args):
    reply = json.loads(_loopctl("attach", "--json", *args, path))
    return {"device": reply["Object"], "devnode": reply["DevNode"],
            "diskseq": int(reply["DiskSeq"]), "partitions": list(reply["Partitions"])}


def loopctl_detach(target):
    _loopctl("detach", str(target))


# --------------------------------------------------------------------------- checks

def _udev_info(devnode):
    """udev's view of a device: (symlinks from the database, properties)."""
    out = run("udevadm", "info", f"--name={devnode}").stdout
    links = [line[3:] for line in out.splitlines() if line.startswith("S: ")]
    props = dict(line[3:].split("=", 1) for line in out.splitlines()
                 if line.startswith("E: ") and "=" in line)
    return links, props


def _check_udev_db(node, majmin, diskseq, what):
    assert os.path.exists(f"/run/udev/data/b{majmin}"), \
        f"{what} {node}: no udev database entry /run/udev/data/b{majmin}"
    links, props = _udev_info(node)
    assert "USEC_INITIALIZED" in props, f"{what} {node}: udev entry not initialized"
    assert "ID_PROCESSING" not in props, f"{what} {node}: udev is still processing it"
    assert props.get("DISKSEQ") == str(diskseq), \
        f"{what} {node}: udev DISKSEQ={props.get('DISKSEQ')}, expected {diskseq}"
    return links, props


def _check_block_node(node, sys_dir, what):
    st = os.stat(node)  # raises (and so fails) if missing
    assert stat.S_ISBLK(st.st_mode), f"{what} {node} is not a block device"
    majmin = read_text(f"{sys_dir}/dev")
    assert f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == majmin, \
        f"{what} {node} is {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, sysfs says {majmin}"
    return majmin


def verify_ready(devnode, diskseq, nparts, table_uuid=None):
    """Checks, at reply time and without any waiting, that the attachment `diskseq`
    on `devnode` is ready as API.md defines it: kernel devices for the disk and each
    of its `nparts` partitions carrying DISKSEQ=diskseq, and udev done with all of
    them. `table_uuid` (from the image) additionally proves udev's entries describe
    this image's table, not a previous attachment's."""
    name = loop_name(devnode)
    sys_dir = f"/sys/block/{name}"
    disk_majmin = _check_block_node(devnode, sys_dir, "disk")
    assert read_text(f"{sys_dir}/diskseq") == str(diskseq), \
        f"{devnode}: sysfs diskseq {read_text(f'{sys_dir}/diskseq')}, reply said {diskseq}"
    assert os.path.exists(f"{sys_dir}/loop/backing_file"), f"{devnode} is not bound"

    found = partition_numbers_in_sysfs(name)
    assert found == list(range(1, nparts + 1)), \
        f"{devnode}: kernel has partitions {found}, expected 1..{nparts}"

    links, props = _check_udev_db(devnode, disk_majmin, diskseq, "disk")
    # udev makes this link only while processing an event with DISKSEQ=diskseq.
    assert f"disk/by-diskseq/{diskseq}" in links, \
        f"{devnode}: udev has not processed an event with DISKSEQ={diskseq} (links {links})"
    if table_uuid:
        assert props.get("ID_PART_TABLE_UUID") == table_uuid, \
            f"{devnode}: udev saw table {props.get('ID_PART_TABLE_UUID')}, image has {table_uuid}"
    link = f"/dev/disk/by-diskseq/{diskseq}"
    assert os.path.realpath(link) == devnode, \
        f"{link} -> {os.path.realpath(link) if os.path.lexists(link) else 'missing'}, expected {devnode}"

    for k in range(1, nparts + 1):
        pnode, psys = f"{devnode}p{k}", f"{sys_dir}/{name}p{k}"
        majmin = _check_block_node(pnode, psys, "partition")
        ue = read_uevent(f"{psys}/uevent")
        assert ue.get("DISKSEQ") == str(diskseq), \
            f"{pnode}: kernel DISKSEQ={ue.get('DISKSEQ')}, expected {diskseq}"
        _, pprops = _check_udev_db(pnode, majmin, diskseq, "partition")
        assert pprops.get("ID_PART_ENTRY_NUMBER") == str(k) and \
            pprops.get("ID_PART_ENTRY_DISK") == disk_majmin, \
            f"{pnode}: udev has not probed it as partition {k} of {disk_majmin}: {pprops}"
        if table_uuid:
            assert pprops.get("ID_PART_TABLE_UUID") == table_uuid, \
                f"{pnode}: udev saw table {pprops.get('ID_PART_TABLE_UUID')}, image has {table_uuid}"


def verify_reply(reply, image):
    """The reply's shape, then readiness of what it names."""
    devnode = reply["devnode"]
    name = loop_name(devnode)
    assert reply["partitions"] == expected_partitions(devnode, image.nparts), \
        f"partitions {reply['partitions']}, expected {expected_partitions(devnode, image.nparts)}"
    if reply["diskseq"] is not None:
        assert reply["device"] == f"/org/loopd1/device/{reply['diskseq']}", \
            f"object {reply['device']} for diskseq {reply['diskseq']}"
        diskseq = reply["diskseq"]
    else:
        diskseq = int(read_text(f"/sys/block/{name}/diskseq"))  # human output has none
    verify_ready(devnode, diskseq, image.nparts, image.table_uuid)
    assert os.path.realpath(read_text(f"/sys/block/{name}/loop/backing_file")) == \
        os.path.realpath(image.path), f"{devnode} is not backed by {image.path}"
    return diskseq


def verify_detached(devnode, diskseq):
    """Checks, right after a Detach reply, that the attachment `diskseq` is gone: no
    backing file, no partitions in sysfs or /dev, and sysfs past `diskseq`."""
    name = loop_name(devnode)
    sys_dir = f"/sys/block/{name}"
    if not os.path.isdir(sys_dir):
        return  # the loop device itself was removed: nothing can be left
    now = int(read_text(f"{sys_dir}/diskseq"))
    assert now != diskseq, f"{devnode} still has diskseq {diskseq}"
    assert now > diskseq, f"{devnode} diskseq went back from {diskseq} to {now}"
    if os.path.exists(f"{sys_dir}/loop/backing_file"):
        # Someone else (not a test here) attached it since; it is no longer ours.
        return
    assert partition_numbers_in_sysfs(name) == [], \
        f"{devnode}: partitions {partition_numbers_in_sysfs(name)} left in sysfs"
    assert partition_nodes_in_dev(name) == [], \
        f"{devnode}: partition nodes {partition_nodes_in_dev(name)} left in /dev"


def loop_devices_backed_under(directory):
    """[(devnode, backing file)] for every bound loop device whose file lies under
    `directory`."""
    prefix = os.path.realpath(directory) + "/"
    found = []
    for name in sorted(os.listdir("/sys/block")):
        try:
            backing = read_text(f"/sys/block/{name}/loop/backing_file")
        except OSError:
            continue
        if backing.startswith(prefix):
            found.append((f"/dev/{name}", backing))
    return found


def detach_quietly(diskseq):
    """Best-effort clean-up through loopd for a test that failed half-way; the leak
    check in Env catches whatever this cannot remove."""
    if diskseq is None:
        return
    try:
        busctl_detach(diskseq)
    except Exception as e:  # the test has already failed; say why clean-up did too
        print(f"# clean-up: Detach {diskseq} failed: {e}")


def unbound_loop_devices_with_partitions():
    """Loop devices with no backing file that still have partitions: on this kernel
    (no partition parsers) BLKPG partitions can outlive the attachment."""
    found = set()
    for name in os.listdir("/sys/block"):
        if name.startswith("loop") and not os.path.exists(f"/sys/block/{name}/loop") \
                and partition_numbers_in_sysfs(name):
            found.add(f"/dev/{name}")
    return found


def force_detach(devnode):
    """Removes a loop device the way an admin would: partitions first (this kernel
    does not drop BLKPG partitions for us), then the binding."""
    run("partx", "-d", devnode, check=False)
    run("losetup", "-d", devnode, check=False)


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

    def __init__(self, loopd_args=(), polkit=False, polkit_rules=None):
        """polkit=True also runs Debian's polkitd on the private bus: its bus policy
        is included, dbus/org.loopd1.policy goes to polkit's actions directory and
        `polkit_rules` (JavaScript, if given) to /etc/polkit-1/rules.d for the
        duration, under names of this process's own, and both are removed again at
        exit. The temp dir becomes searchable (0711) so that polkitd, which drops
        to the polkitd user, and test users can reach the bus socket."""
        self.loopd_args = list(loopd_args)
        self.polkit = polkit
        self.polkit_rules = polkit_rules
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
            extra = f"\n  <include>{POLKIT_BUS_POLICY}</include>" if self.polkit else ""
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
            return  # someone else's udevd: use it, never stop it
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
        with open(self.loopd_log, "a") as log:  # "a": restart_loopd() keeps the old log
            self.loopd = subprocess.Popen([LOOPD, *args, *self.loopd_args], stdout=log,
                                          stderr=subprocess.STDOUT)
        # The one readiness poll: the daemon's start-up, not an attach.
        conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
        try:
            deadline = time.monotonic() + DAEMON_START_LIMIT
            while not conn.name_has_owner(BUS_NAME):
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

    def restart_loopd(self, kill=True, loopd_args=None):
        """Stops loopd (SIGKILL if kill, else SIGTERM, on which it must exit cleanly)
        and starts it again on the same bus with the same runtime dir, so that it
        finds its ownership records. loopd_args, if given, replaces the extra options
        for this and later starts."""
        self.assert_loopd_alive()
        if kill:
            self.loopd.kill()
            self.loopd.wait()
        else:
            status, killed = _stop_child(self.loopd)
            assert not killed, "loopd did not exit within 10 s of SIGTERM"
            assert status == 0, f"loopd exited with status {status} on SIGTERM"
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

    # ---- tear-down

    def __exit__(self, exc_type, exc, tb):
        problems = []
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
        if (exc_type is not None or problems) and self.loopd is not None:
            self._print_log()
        if (exc_type is not None or problems) and self.polkitd is not None:
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
        if self.tmp is not None:
            for devnode, backing in loop_devices_backed_under(self.tmp):
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


# --------------------------------------------------------------------------- runner

class Parallel:
    """Runs fn(i) for i in range(n) on n threads; re-raises the first failure after
    all are done. Used to check each concurrent reply the moment it arrives."""

    def __init__(self, n, fn):
        self.results = [None] * n
        self.errors = [None] * n
        # Daemon threads: a SIGTERM (meson's timeout) must not wait for them.
        threads = [threading.Thread(target=self._one, args=(fn, i), daemon=True)
                   for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _one(self, fn, i):
        try:
            self.results[i] = fn(i)
        except BaseException as e:  # reported by raise_first()
            self.errors[i] = e

    def raise_first(self):
        failures = [(i, e) for i, e in enumerate(self.errors) if e is not None]
        if failures:
            i, e = failures[0]
            others = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise AssertionError(f"client {i}: {e}{others}") from e


_terminated = False


def _on_sigterm(signum, frame):
    """meson kills a test that runs too long with SIGTERM: unwind through Env's
    __exit__ so loopd, dbus-daemon and udevd stop and leaked devices are removed."""
    global _terminated
    _terminated = True
    raise SystemExit(128 + signum)


def main(module_globals, **env_options):
    """Runs the module's test_* functions in definition order, each in a fresh Env
    (made with env_options, e.g. polkit=True). argv may name a subset. Exits 0, 1 (a
    failure) or 77 (skipped: not root)."""
    if os.geteuid() != 0:
        print("SKIP: loopd integration tests need root")
        sys.exit(77)
    for binary in (LOOPD, LOOPCTL):
        if not os.access(binary, os.X_OK):
            print(f"FAIL: {binary} is not an executable (set LOOPD / LOOPCTL)")
            sys.exit(1)
    tests = [(n, f) for n, f in module_globals.items() if n.startswith("test_") and callable(f)]
    if len(sys.argv) > 1:
        tests = [(n, f) for n, f in tests if n in sys.argv[1:]]
    signal.signal(signal.SIGTERM, _on_sigterm)
    failed = 0
    for name, fn in tests:
        started = time.monotonic()
        try:
            # LOOPD_ARGS: extra daemon options for a run by hand, e.g. a tiny
            # --receive-buffer to make the kernel drop uevents.
            with Env(os.environ.get("LOOPD_ARGS", "").split(), **env_options) as env:
                fn(env)
        except Exception as e:
            failed += 1
            print(f"FAIL {name}: {e}")
            if not isinstance(e, AssertionError) or os.environ.get("LOOPD_TEST_TRACEBACK"):
                traceback.print_exc(file=sys.stdout)
        else:
            print(f"PASS {name} ({time.monotonic() - started:.2f} s)")
        sys.stdout.flush()
        if _terminated:
            print("# terminated by SIGTERM")
            sys.exit(1)
    print(f"# {len(tests) - failed}/{len(tests)} passed")
    sys.exit(1 if failed else 0)
