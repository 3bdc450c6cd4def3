#!/usr/bin/python3
"""What API.md promises where the daemon once broke it: a refused Detach changes
nothing, refs and their by-ref links never collide, restart recovery unlinks
what it forgets, names resolve never ambiguously, readiness=udev without udevd
fails at once, loopd's usage errors exit 2, errors name their object, a
Detach sends exactly one DeviceRemoved (reason `timeout` when its release is not
confirmed in time), restart recovery leaves foreign devices alone, a timed-out
attach is abandoned once even across SIGTERM, and a devnode names the newest
attachment on its number.

Each test says in its docstring whether the daemon before the fix failed it.
"""

import errno
import fcntl
import json
import os
import signal
import struct
import subprocess
import threading
import time

import xml.etree.ElementTree as ET

import dbus

from harness import (CALL_TIMEOUT, ERROR_PREFIX, DEVICE_IFACE, LOOPCTL, LOOPD, LOOPD_SRC, MANAGER_IFACE, MANAGER_PATH,
                     CallError, SignalWatcher, busctl_attach_cmd, busctl_detach, busctl_get_property,
                     busctl_managed_objects, detach_quietly, expect_error, force_detach,
                     loop_name, main, pydbus_attach, pydbus_call, pydbus_options, read_text,
                     run, verify_detached, verify_reply)

SIGNAL_DEADLINE = 1.0  # as test_reliability.py: a signal later than this is lost


# --------------------------------------------------------------------------- helpers

def attach(path, **options):
    return pydbus_attach(path, pydbus_options(**options))


def attach_refused(error, path, **options):
    """Attach must fail with org.loopd1.Error.<error>. Should it succeed, the device
    is detached again before the test fails, so the failure leaks nothing."""
    try:
        reply = attach(path, **options)
    except CallError as e:
        assert e.name == ERROR_PREFIX + error, f"Attach {path} {options}: expected {error}, got {e}"
        return e
    detach_quietly(reply["diskseq"])
    raise AssertionError(f"Attach {path} {options} succeeded ({reply['devnode']}), "
                         f"expected {ERROR_PREFIX}{error}")


def detach_call(diskseq):
    return pydbus_call("Detach", "ta{sv}", [dbus.UInt64(diskseq), pydbus_options()])


def listed_objects():
    return {path for path, ifaces in busctl_managed_objects().items() if DEVICE_IFACE in ifaces}


def devices_count():
    return busctl_get_property(MANAGER_PATH, MANAGER_IFACE, "Devices")


def by_ref(env, name):
    """The harness runs loopd with --runtime-dir <tmp>/run: links are there."""
    return env.path(os.path.join("run", "by-ref", name))


def link_target(path):
    return os.readlink(path) if os.path.lexists(path) else None


def highest_diskseq():
    return max(int(read_text(f"/sys/block/{n}/diskseq")) for n in os.listdir("/sys/block")
               if os.path.exists(f"/sys/block/{n}/diskseq"))


class Background:
    """fn(*args, **kw) on a thread of its own, like a client waiting for its reply
    while the test acts: .result, or .error with what it raised, once .done is set."""

    def __init__(self, fn, *args, **kw):
        self.result = self.error = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(fn, args, kw), daemon=True).start()

    def _run(self, fn, args, kw):
        try:
            self.result = fn(*args, **kw)
        except BaseException as e:  # noqa: B902 - handed to the test
            self.error = e
        finally:
            self.done.set()

    def wait(self, limit, what):
        assert self.done.wait(limit), f"{what}: no reply within {limit} s"
        return self


def poll(what, check, limit=10.0):
    """Waits for something the test itself set off in the kernel (a release, a
    configure), never for a readiness loopd replies for; fails naming `what`."""
    deadline = time.monotonic() + limit
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {limit} s"
        time.sleep(0.001)


def sysfs(name, attribute):
    """/sys/block/<name>/<attribute>, or None when the device or attribute is gone."""
    try:
        return read_text(f"/sys/block/{name}/{attribute}")
    except OSError:
        return None


# linux/loop.h, for what no tool does: another tool's attachment with a chosen
# lo_file_name, a loop device removed.
LOOP_GET_STATUS64, LOOP_CONFIGURE = 0x4C05, 0x4C0A
LOOP_CTL_ADD, LOOP_CTL_REMOVE, LOOP_CTL_GET_FREE = 0x4C80, 0x4C81, 0x4C82
LOOP_INFO64 = "=5Q4I64s64s32s2Q"  # struct loop_info64: 232 bytes
LO_FILE_NAME = 9                   # its field lo_file_name


def foreign_attach(path, file_name):
    """Attaches `path` on a free loop device as another tool would (LOOP_CONFIGURE
    on /dev/loop-control's free number, loopd not involved), with lo_file_name
    `file_name`. Returns the devnode."""
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    backing = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(50):
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            loop = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
            try:
                info = struct.pack(LOOP_INFO64, 0, 0, 0, 0, 0, 0, 0, 0, 0, file_name.encode(), b"", b"", 0, 0)
                fcntl.ioctl(loop, LOOP_CONFIGURE, struct.pack("=II", backing, 0) + info + bytes(64))
                return f"/dev/loop{number}"
            except OSError as e:
                if e.errno != errno.EBUSY:  # taken meanwhile: the next free one
                    raise
            finally:
                os.close(loop)
        raise AssertionError(f"no loop device stayed free to attach {path}")
    finally:
        os.close(backing)
        os.close(control)


def lo_file_name(devnode):
    fd = os.open(devnode, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = struct.unpack(LOOP_INFO64, fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(struct.calcsize(LOOP_INFO64))))
    finally:
        os.close(fd)
    return info[LO_FILE_NAME].rstrip(b"\0").decode()


def loop_control(request, number):
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        return fcntl.ioctl(control, request, number)
    finally:
        os.close(control)


def records(env):
    """loopd's ownership records (the harness's runtime dir), as {file: state}."""
    folder = env.path(os.path.join("run", "records"))
    found = {}
    for name in (os.listdir(folder) if os.path.isdir(folder) else []):
        try:
            with open(os.path.join(folder, name)) as f:
                found[name] = json.load(f).get("state")
        except (OSError, ValueError):
            continue  # being replaced at this moment
    return found


# --------------------------------------------------------------------------- 0. the interface

def interface_members(root, name):
    """Methods (with in/out signatures) and properties (with types) of an
    interface in introspection XML."""
    iface = next(i for i in root.iter("interface") if i.get("name") == name)
    methods = {m.get("name"): tuple("".join(a.get("type") for a in m.iter("arg") if a.get("direction", "in") == d)
                                    for d in ("in", "out"))
               for m in iface.iter("method")}
    # EmitsChangedSignal: "true" unless annotated (D-Bus specification).
    props = {p.get("name"): (p.get("type"), p.get("access"),
                             next((a.get("value") for a in p.iter("annotation")
                                   if a.get("name") == "org.freedesktop.DBus.Property.EmitsChangedSignal"), "true"))
             for p in iface.iter("property")}
    signals = {g.get("name"): "".join(a.get("type") for a in g.iter("arg")) for g in iface.iter("signal")}
    return methods, props, signals


def test_calls_on_a_detached_device_are_not_found(env):
    """A client that kept a device's object path after the device went (or made
    one up) gets the contract's NotFound naming that path, for the device's
    methods and its properties alike, not sd-bus's UnknownObject (an outside
    review saw that on 5b0445e). The folder itself still introspects."""
    reply = attach(env.image("none").path)
    busctl_detach(reply["diskseq"])
    for path in (reply["device"], "/org/loopd1/device/x"):
        for call in (lambda: pydbus_call("Detach", "a{sv}", [dbus.Dictionary({}, signature="sv")], path=path,
                                         iface=DEVICE_IFACE),
                     lambda: pydbus_call("Get", "ss", [DEVICE_IFACE, "DevNode"], path=path,
                                         iface="org.freedesktop.DBus.Properties")):
            err = expect_error("NotFound", call)
            assert path in err.message, err.message
    xml = pydbus_call("Introspect", path="/org/loopd1/device", iface="org.freedesktop.DBus.Introspectable")
    assert "<node" in xml, xml


def test_device_object_matches_the_interface_xml(env):
    """A device object, as the bus introspects it, has exactly the methods,
    signatures and properties (with whether they change: only Size, Partitions
    and Autoclear do) dbus/org.loopd1.xml declares for org.loopd1.Device
    (loopd serves device objects from a table of its own, not from code
    generated from the XML)."""
    reply = attach(env.image("gpt3").path)
    try:
        xml = run("busctl", "--system", "introspect", "--xml-interface", "org.loopd1", reply["device"]).stdout
        served = interface_members(ET.fromstring(xml), DEVICE_IFACE)
        declared = interface_members(ET.parse(os.path.join(LOOPD_SRC, "dbus", "org.loopd1.xml")).getroot(),
                                     DEVICE_IFACE)
        assert served == declared, f"{reply['device']} serves {served}, the XML declares {declared}"
    finally:
        detach_quietly(reply["diskseq"])


def typed(value):
    """A dbus-python value with its D-Bus type, for comparisons that tell
    UInt32 from UInt64 and Boolean from integers."""
    if isinstance(value, dbus.Array):
        return (value.signature, [typed(v) for v in value])
    return (type(value).__name__, value.variant_level, value)


def busctl_json(*args):
    return json.loads(run("busctl", "--system", "--json=short", "call", "org.loopd1", *args).stdout)["data"]


def test_managed_objects_match_each_object(env):
    """GetManagedObjects (loopd answers it with a handler of its own, not sd-bus's
    walk) lists exactly the attached devices, each with org.loopd1.Device (the
    interface API.md names and InterfacesAdded announces; the standard ones sd-bus
    adds to every object carry no properties and are not listed) and what
    Properties.GetAll returns for it, value and type, read through dbus-python and
    through busctl --json."""
    replies = [attach(env.image("gpt3").path, ref=dbus.String("managed-a")), attach(env.image("none").path),
               attach(env.image("mbr2").path, read_only=dbus.Boolean(True))]
    try:
        paths = {r["device"] for r in replies}
        bus = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
        try:
            manager = bus.get_object("org.loopd1", MANAGER_PATH, introspect=False)
            listed = manager.GetManagedObjects(dbus_interface="org.freedesktop.DBus.ObjectManager")
            assert set(listed) == paths, f"GetManagedObjects lists {sorted(listed)}, attached {sorted(paths)}"
            for path in paths:
                obj = bus.get_object("org.loopd1", path, introspect=False)
                xml = obj.Introspect(dbus_interface="org.freedesktop.DBus.Introspectable")
                interfaces = {i.get("name") for i in ET.fromstring(xml).findall("interface")}
                assert set(listed[path]) == {DEVICE_IFACE} and DEVICE_IFACE in interfaces, \
                    f"{path}: GetManagedObjects lists {sorted(listed[path])}, introspection {sorted(interfaces)}"
                for interface, props in listed[path].items():
                    every = obj.GetAll(interface, dbus_interface="org.freedesktop.DBus.Properties")
                    assert {k: typed(v) for k, v in props.items()} == {k: typed(v) for k, v in every.items()}, \
                        f"{path} {interface}: GetManagedObjects {dict(props)}, GetAll {dict(every)}"
                assert len(listed[path][DEVICE_IFACE]) == 19, f"{path}: {sorted(listed[path][DEVICE_IFACE])}"
        finally:
            bus.close()
        objects = busctl_json(MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")[0]
        assert set(objects) == paths, f"busctl: GetManagedObjects lists {sorted(objects)}"
        for path in paths:
            for interface, props in objects[path].items():
                every = busctl_json(path, "org.freedesktop.DBus.Properties", "GetAll", "s", interface)[0]
                assert props == every, f"busctl {path} {interface}: GetManagedObjects {props}, GetAll {every}"
        by_path = {r["device"]: r for r in replies}
        for path, reply in by_path.items():
            device = objects[path][DEVICE_IFACE]
            assert device["DiskSeq"] == {"type": "t", "data": reply["diskseq"]}, f"{path}: {device['DiskSeq']}"
            assert device["DevNode"] == {"type": "s", "data": reply["devnode"]}, f"{path}: {device['DevNode']}"
        assert objects[replies[0]["device"]][DEVICE_IFACE]["Ref"]["data"] == "managed-a"
        assert objects[replies[2]["device"]][DEVICE_IFACE]["ReadOnly"]["data"] is True
    finally:
        for reply in replies:
            detach_quietly(reply["diskseq"])


# --------------------------------------------------------------------------- 1. Busy changes nothing

def busy_changes_nothing(env, image, reply, node_to_mount):
    """With `node_to_mount` mounted, Detach is Busy and the device stays attached,
    listed, ready and without autoclear; after umount a second Detach works."""
    diskseq, name = reply["diskseq"], loop_name(reply["devnode"])
    mnt = env.path("mnt")
    os.makedirs(mnt, exist_ok=True)
    run("mount", node_to_mount, mnt)
    mounted, detached = True, False
    try:
        count = devices_count()
        e = expect_error("Busy", detach_call, diskseq)
        problems = []
        if reply["device"] not in listed_objects():
            problems.append(f"{reply['device']} is no longer in GetManagedObjects")
        if devices_count() != count:
            problems.append(f"Devices is {devices_count()}, was {count}")
        autoclear = read_text(f"/sys/block/{name}/loop/autoclear")
        if autoclear != "0":
            problems.append(f"/sys/block/{name}/loop/autoclear is {autoclear}: set behind the caller's back")
        if reply["devnode"] not in e.message and str(diskseq) not in e.message:
            problems.append(f"Busy message {e.message!r} names neither {reply['devnode']} nor {diskseq}")
        assert not problems, f"after Busy for {node_to_mount} mounted: " + "; ".join(problems)
        verify_reply(reply, image)  # still ready, partitions and all

        run("umount", mnt)
        mounted = False
        busctl_detach(diskseq)
        detached = True
        verify_detached(reply["devnode"], diskseq)
    finally:
        if mounted:
            run("umount", mnt, check=False)
        if not detached:
            detach_quietly(diskseq)


def test_busy_whole_disk_mounted_changes_nothing(env):
    """Hole 1. Failed before: the device was dropped from the list (reason
    autoclear) with autoclear set, and the second Detach was NotFound."""
    image = env.image("none")
    run("mkfs.ext4", "-q", "-F", image.path)  # a filesystem, no partition table
    reply = attach(image.path)
    try:
        verify_reply(reply, image)
    except BaseException:
        detach_quietly(reply["diskseq"])
        raise
    busy_changes_nothing(env, image, reply, reply["devnode"])


def test_busy_partition_mounted_changes_nothing(env):
    """Hole 1, a mounted partition of a GPT image. Passed before (a claimed
    partition was checked before anything was touched); kept as the contract."""
    image = env.image("gpt3")
    reply = attach(image.path)
    try:
        verify_reply(reply, image)
        run("mkfs.ext4", "-q", "-F", reply["partitions"][0])
    except BaseException:
        detach_quietly(reply["diskseq"])
        raise
    busy_changes_nothing(env, image, reply, reply["partitions"][0])


def test_busy_open_elsewhere_changes_nothing(env):
    """Hole 1, the disk held open (not claimed) by another process: LOOP_CLR_FD
    only sets autoclear then. Failed before: Busy, with autoclear left set and the
    device dropped from the list. Now loopd takes the device back as it was, and
    the Busy reply means it is ready again, every partition included."""
    image = env.image("gpt3")
    reply = attach(image.path)
    diskseq, name = reply["diskseq"], loop_name(reply["devnode"])
    detached = False
    try:
        verify_reply(reply, image)
        holder = open(reply["devnode"], "rb")
        try:
            count = devices_count()
            expect_error("Busy", detach_call, diskseq)
            # Checked at reply time, as a caller that got Busy would.
            verify_reply(reply, image)
            assert reply["device"] in listed_objects(), f"{reply['device']} is no longer listed"
            assert devices_count() == count, f"Devices is {devices_count()}, was {count}"
            autoclear = read_text(f"/sys/block/{name}/loop/autoclear")
            assert autoclear == "0", f"/sys/block/{name}/loop/autoclear is {autoclear} after Busy"
        finally:
            holder.close()
        busctl_detach(diskseq)
        detached = True
        verify_detached(reply["devnode"], diskseq)
    finally:
        if not detached:
            detach_quietly(diskseq)


def test_caller_strings_never_make_log_lines(env):
    """A name with a newline and a journal priority prefix is escaped in loopd's log
    (issue 14, item 3; API.md, Security). Failed before: "<0>FORGED" became a line
    of its own, which journald would have logged at emergency priority."""
    forged = "x\n<0>FORGED"
    expect_error("NotFound", pydbus_call, "WaitReady", "st", [forged, dbus.UInt64(0)])
    expect_error("NotFound", pydbus_attach, "/no/such\n<0>FORGED.img", pydbus_options())
    # The log is written with one write(2) per line before the reply is sent.
    with open(env.loopd_log) as f:
        lines = f.read().splitlines()
    raw = [line for line in lines if line.startswith("<0>FORGED") or line.startswith("FORGED")]
    assert not raw, f"a caller's string became a log line of its own: {raw}"
    assert any("x\\n<0>FORGED" in line for line in lines), "the refusal was not logged, escaped"


# --------------------------------------------------------------------------- 2. refs and their links

def test_ref_cannot_take_a_partition_link(env):
    """Hole 2: `web-part1` while `web` has partition 1. Failed before: the attach
    succeeded and took over the link by-ref/web-part1."""
    web_image, other = env.image("gpt3"), env.image("none")
    web = attach(web_image.path, ref=dbus.String("web"))
    try:
        verify_reply(web, web_image)
        expected = {"web": web["devnode"], **{f"web-part{k}": p for k, p in
                                              enumerate(web["partitions"], 1)}}
        for link, target in expected.items():
            assert link_target(by_ref(env, link)) == target, \
                f"by-ref/{link} -> {link_target(by_ref(env, link))}, expected {target}"
        attach_refused("InvalidArgument", other.path, ref=dbus.String("web-part1"))
        assert link_target(by_ref(env, "web-part1")) == web["partitions"][0], \
            f"by-ref/web-part1 -> {link_target(by_ref(env, 'web-part1'))} after the refused " \
            f"attach, expected {web['partitions'][0]}"
        assert devices_count() == 1, f"Devices is {devices_count()}, expected 1"
        assert [d for d, _ in env.attached_here()] == [web["devnode"]], \
            f"attached after the refusal: {env.attached_here()}"
    finally:
        detach_quietly(web["diskseq"])


def test_ref_whose_partition_link_is_taken(env):
    """Hole 2, the other order: `db` of a GPT image while a device has ref
    `db-part2`. Failed before: the attach succeeded."""
    first_image, gpt = env.image("none"), env.image("gpt3")
    first = attach(first_image.path, ref=dbus.String("db-part2"))
    try:
        verify_reply(first, first_image)
        attach_refused("InvalidArgument", gpt.path, ref=dbus.String("db"))
        assert link_target(by_ref(env, "db-part2")) == first["devnode"], \
            f"by-ref/db-part2 -> {link_target(by_ref(env, 'db-part2'))}, expected {first['devnode']}"
        assert not os.path.lexists(by_ref(env, "db")), "by-ref/db exists after the refused attach"
        assert devices_count() == 1, f"Devices is {devices_count()}, expected 1"
        assert [d for d, _ in env.attached_here()] == [first["devnode"]], \
            f"attached after the refusal: {env.attached_here()}"
    finally:
        detach_quietly(first["diskseq"])


def test_ref_all_digits_or_dots_refused(env):
    """Hole 2: a ref that is all digits would read as a diskseq; `.`/`..` are not
    names. `.` and `..` passed before; `123` failed (it was accepted)."""
    image = env.image("none")
    for ref in (".", "..", "123"):
        attach_refused("InvalidArgument", image.path, ref=dbus.String(ref))
    assert env.attached_here() == [], f"attached after refusals: {env.attached_here()}"


# --------------------------------------------------------------------------- 3. restart recovery

def test_restart_unlinks_ref_of_device_released_meanwhile(env):
    """Hole 3: loopd SIGKILLed, its device released by `losetup -d` while loopd is
    down; the restarted loopd forgets it and its link. Failed before: by-ref/stale
    was left pointing at the released device."""
    image = env.image("none")
    reply = attach(image.path, ref=dbus.String("stale"))
    name, released = loop_name(reply["devnode"]), False
    try:
        verify_reply(reply, image)
        assert link_target(by_ref(env, "stale")) == reply["devnode"]
        env.loopd.kill()
        env.loopd.wait()
        force_detach(reply["devnode"])
        released = True
        # losetup -d only marks a device a udev worker still has open; the kernel
        # releases it at that close. Restarting before would rightly adopt it.
        deadline = time.monotonic() + 10
        while read_text(f"/sys/block/{name}/diskseq") == str(reply["diskseq"]):
            assert time.monotonic() < deadline, f"{reply['devnode']} not released by losetup -d"
            time.sleep(0.02)
        # Env.restart_loopd() stops and starts in one go; the release must fall
        # between the two, so this starts the daemon the same way Env does.
        env._start_loopd()
        problems = []
        if os.path.lexists(by_ref(env, "stale")):
            problems.append(f"by-ref/stale -> {link_target(by_ref(env, 'stale'))} survived the restart")
        if reply["device"] in listed_objects():
            problems.append(f"{reply['device']} is still listed")
        if devices_count() != 0:
            problems.append(f"Devices is {devices_count()}, expected 0")
        assert not problems, "after restart: " + "; ".join(problems)
        expect_error("NotFound", pydbus_call, "WaitReady", "st", ["stale", dbus.UInt64(1_000_000)])
    finally:
        if env.loopd.poll() is not None:
            env._start_loopd()  # the test failed while loopd was down
        if not released:
            detach_quietly(reply["diskseq"])


def test_restart_leaves_foreign_devices_alone(env):
    """Hole 3, "restart recovery can touch a foreign device" (API.md: "another
    tool's devices are never detached or modified").
    While loopd is down, another tool attaches loopd's images with lo_file_name
    set to what adbd7c0 wrote there, the ref: one in place of an owned device
    released meanwhile, one where an attach was cut off after its intent record.
    The restarted loopd must leave both alone and drop its two records.
    Failed before: recovery of the intent record matched a device by backing
    file and lo_file_name (the ref, which anyone can set) and detached the
    foreign one. (The owned record's case passed before: its diskseq decides.)"""
    owned_image, cut_image = env.image("none"), env.image("none")
    reply = attach(owned_image.path, ref=dbus.String("web"))
    name, released = loop_name(reply["devnode"]), False
    control, cut, foreign = None, None, []
    try:
        verify_reply(reply, owned_image)
        # An attach cut off after its intent record: loopd takes the loop-control
        # lock (as losetup does) after writing it, and this test holds that lock.
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(control, fcntl.LOCK_EX)
        cut = subprocess.Popen(busctl_attach_cmd(cut_image.path, {"ref": ("s", "db")}),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        poll("the intent record of the attach of " + cut_image.path,
             lambda: "intent" in records(env).values())
        env.loopd.kill()
        env.loopd.wait()
        cut.wait(CALL_TIMEOUT)
        force_detach(reply["devnode"])
        released = True
        poll(f"{reply['devnode']} released by losetup -d",
             lambda: sysfs(name, "diskseq") != str(reply["diskseq"]))
        # Another tool's attachments of the same images, named as adbd7c0 named its own.
        foreign.append(foreign_attach(owned_image.path, "web"))
        foreign.append(foreign_attach(cut_image.path, "db"))
        before = {dev: (sysfs(loop_name(dev), "diskseq"), sysfs(loop_name(dev), "loop/backing_file"),
                        lo_file_name(dev)) for dev in foreign}
        os.close(control)  # the lock goes with it
        control = None
        env._start_loopd()  # as in test_restart_unlinks_...: Env.restart_loopd would start at once

        problems = []
        for dev, was in before.items():
            now = (sysfs(loop_name(dev), "diskseq"), sysfs(loop_name(dev), "loop/backing_file"),
                   lo_file_name(dev) if os.path.exists(f"/sys/block/{loop_name(dev)}/loop") else None)
            if now != was:
                problems.append(f"foreign {dev} (diskseq, backing file, lo_file_name) was {was}, is {now}")
        listed = {props["DevNode"] for path, ifaces in busctl_managed_objects().items()
                  for iface, props in ifaces.items() if iface == DEVICE_IFACE}
        problems += [f"foreign {dev} is listed" for dev in foreign if dev in listed]
        if devices_count() != 0:
            problems.append(f"Devices is {devices_count()}, expected 0")
        problems += [f"by-ref/{ref} -> {link_target(by_ref(env, ref))}" for ref in ("web", "db")
                     if os.path.lexists(by_ref(env, ref))]
        if records(env):
            problems.append(f"records kept: {records(env)}")
        assert not problems, "after the restart: " + "; ".join(problems)
        for target in ("web", "db", *foreign):
            expect_error("NotFound", pydbus_call, "WaitReady", "st", [target, dbus.UInt64(1_000_000)])
    finally:
        if control is not None:
            os.close(control)
        if cut is not None and cut.poll() is None:
            cut.wait(CALL_TIMEOUT)  # loopd went on with it: the leak check reports the device
        if env.loopd.poll() is not None:
            env._start_loopd()  # the test failed while loopd was down
        for dev in foreign:
            force_detach(dev)
        if not released:
            detach_quietly(reply["diskseq"])


# --------------------------------------------------------------------------- 4. name resolution

def test_empty_name_resolves_to_nothing(env):
    """Hole 4. WaitReady("") passed before (NotFound); `loopctl detach ""` failed
    before: it matched the device whose Ref is empty and detached it (exit 0)."""
    image = env.image("none")
    reply = attach(image.path)  # no ref: its Ref property is ""
    detached = False
    try:
        verify_reply(reply, image)
        try:
            got = pydbus_call("WaitReady", "st", ["", dbus.UInt64(1_000_000)])
        except CallError as e:
            assert e.name in (ERROR_PREFIX + "NotFound", ERROR_PREFIX + "InvalidArgument"), \
                f"WaitReady(''): {e}"
        else:
            raise AssertionError(f"WaitReady('') resolved to a device: {got}")

        p = run(LOOPCTL, "detach", "", check=False)
        still = reply["device"] in listed_objects() and os.path.exists(
            f"/sys/block/{loop_name(reply['devnode'])}/loop/backing_file")
        detached = not still
        assert p.returncode in (1, 2) and still, \
            f"loopctl detach '' exited {p.returncode} ({p.stderr.strip()!r}); " \
            f"{reply['devnode']} (Ref '') is {'still' if still else 'no longer'} attached"
        assert p.stderr.strip(), "loopctl detach '' failed without a message"
        verify_reply(reply, image)
    finally:
        if not detached:
            detach_quietly(reply["diskseq"])


def test_wait_ready_devnode_names_the_newest_attachment(env):
    """Hole 4: A on loopN is being detached, its release done in the kernel but
    not yet confirmed (udevd paused, the kernel's events withheld by --test-drop),
    while B is attached on the same loopN: WaitReady(loopN) names B. Failed
    before: it took the lowest diskseq matching the devnode, A, and answered
    NotFound because A was being detached."""
    env.require_own_udevd()
    env.restart_loopd(kill=False, loopd_args=["--test-drop", "kernel:random:1"])
    old_image, new_image = env.image("gpt3"), env.image("none")
    a = attach(old_image.path)
    name, paused, a_detach, b_attach, b_detached = loop_name(a["devnode"]), False, None, None, False
    try:
        verify_reply(a, old_image)
        # Paused, udevd neither confirms A's release nor locks loopN to probe it
        # (an attach passes a locked number over). Its workers are not paused:
        # one still busy with A's events (loopd's synthetic triggers) would write
        # the database during the detach, and loopd would look at sysfs early.
        run("udevadm", "settle", "--timeout=10")
        os.kill(env.udevd_pid, signal.SIGSTOP)
        paused = True
        a_detach = Background(detach_call, a["diskseq"])
        poll(f"{a['devnode']} released", lambda: sysfs(name, "diskseq") != str(a["diskseq"]))
        b_attach = Background(attach, new_image.path, readiness=dbus.String("kernel"))
        backing = poll(f"{new_image.path} attached", lambda: [dev for dev, f in env.attached_here()
                                                            if f == os.path.realpath(new_image.path)])
        assert backing == [a["devnode"]], \
            f"B went to {backing}, not to A's {a['devnode']}: the case cannot be set up here"
        b_diskseq = int(sysfs(name, "diskseq"))
        # B is in loopd's table once its diskseq resolves (a 1 µs wait: Timeout, not NotFound).
        deadline = time.monotonic() + 10
        while True:
            try:
                pydbus_call("WaitReady", "st", [str(b_diskseq), dbus.UInt64(1)])
                break  # ready already
            except CallError as e:
                if e.name == ERROR_PREFIX + "Timeout":
                    break
                assert e.name == ERROR_PREFIX + "NotFound", f"WaitReady({b_diskseq}): {e}"
            assert time.monotonic() < deadline, f"diskseq {b_diskseq} not known to loopd within 10 s"
            time.sleep(0.005)
        assert not a_detach.done.is_set(), \
            f"A's Detach was answered ({a_detach.error or 'ok'}) before B was known: nothing to tell apart"
        try:
            got = pydbus_call("WaitReady", "st", [a["devnode"], dbus.UInt64(10_000_000)])
        except CallError as e:
            raise AssertionError(f"WaitReady({a['devnode']}) with A (diskseq {a['diskseq']}) being detached "
                                 f"and B (diskseq {b_diskseq}) attached on it: {e}") from None
        assert got[2] == b_diskseq, \
            f"WaitReady({a['devnode']}) answered diskseq {got[2]}; A was {a['diskseq']}, B is {b_diskseq}"
        b = b_attach.wait(CALL_TIMEOUT, "B's Attach").result
        assert b is not None, f"B's Attach: {b_attach.error}"
        assert a_detach.wait(CALL_TIMEOUT, "A's Detach").error is None, f"A's Detach: {a_detach.error}"
        os.kill(env.udevd_pid, signal.SIGCONT)
        paused = False
        busctl_detach(b["diskseq"])
        b_detached = True
        verify_detached(b["devnode"], b["diskseq"])
    finally:
        if paused:
            os.kill(env.udevd_pid, signal.SIGCONT)
        if a_detach is None or (a_detach.done.wait(CALL_TIMEOUT) and a_detach.error):
            detach_quietly(a["diskseq"])
        if b_attach is not None and b_attach.done.wait(CALL_TIMEOUT) and b_attach.result and not b_detached:
            detach_quietly(b_attach.result["diskseq"])


# --------------------------------------------------------------------------- 5. readiness=udev, no udevd

def test_readiness_udev_without_udevd_is_failed(env):
    """Hole 5: an explicit readiness=udev with no udevd running cannot be met, so
    it fails at once with Failed naming the image, not Timeout after the deadline.
    Failed before: Timeout."""
    assert env.owns_udevd, ("udevd was running before this test, so it cannot stop it: run "
                            "the suite on a machine where the harness starts its own udevd")
    image = env.image("gpt3")
    env.stop_udevd()
    try:
        # loopd notices udevd's exit itself; give it the 2 s test_reliability allows.
        deadline = time.monotonic() + 2.0
        while busctl_get_property(MANAGER_PATH, MANAGER_IFACE, "ReadinessSource") != "kernel":
            assert time.monotonic() < deadline, "ReadinessSource is not 'kernel' 2 s after udevd stopped"
            time.sleep(0.02)
        # A short deadline: a daemon that waits for udev anyway fails quickly.
        e = attach_refused("Failed", image.path, readiness=dbus.String("udev"),
                           timeout_usec=dbus.UInt64(2_000_000))
        assert image.path in e.message, f"Failed message {e.message!r} does not name {image.path}"
        assert env.attached_here() == [], f"left attached: {env.attached_here()}"
        assert devices_count() == 0, f"Devices is {devices_count()}, expected 0"
    finally:
        env.start_udevd()


# --------------------------------------------------------------------------- 6. loopd's command line

def run_loopd(env, *args):
    # A bus nobody listens on and a runtime dir of its own: should a bad option be
    # accepted, this daemon fails at once instead of taking org.loopd1 from the
    # test's loopd or touching its records.
    environ = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS="unix:path=" + env.path("no-bus"))
    return subprocess.run([LOOPD, "--runtime-dir", env.path("run-cli"), *args],
                          capture_output=True, text=True, timeout=30, env=environ)


def test_loopd_usage_errors_exit_2(env):
    """Hole 6. --help passed before; every usage error failed before (CLI11's own
    exit statuses, e.g. 105 for a failed check, 109 for an unknown option)."""
    p = run_loopd(env, "--help")
    assert p.returncode == 0 and "--workers" in p.stdout, \
        f"loopd --help exited {p.returncode}: {p.stdout[:200]!r} {p.stderr[:200]!r}"
    problems = []
    for args in (["--workers", "abc"], ["--workers", "0"], ["--log-level", "nonsense"],
                 ["--bogus-option"]):
        p = run_loopd(env, *args)
        if p.returncode != 2 or not p.stderr.strip():
            problems.append(f"loopd {' '.join(args)} exited {p.returncode}, stderr {p.stderr.strip()!r}")
    assert not problems, "usage errors must exit 2 with a message: " + "; ".join(problems)


# --------------------------------------------------------------------------- 7. errors name their object

def test_error_messages_name_their_object(env):
    """Hole 7. All three passed before; kept as the contract ("Every error message
    names the object it is about")."""
    unknown = highest_diskseq() + 1000
    e = expect_error("NotFound", detach_call, unknown)
    assert str(unknown) in e.message, f"Detach: {e.message!r} does not name diskseq {unknown}"

    e = expect_error("NotFound", pydbus_call, "WaitReady", "st",
                     ["no-such-ref", dbus.UInt64(1_000_000)])
    assert "'no-such-ref'" in e.message or '"no-such-ref"' in e.message, \
        f"WaitReady: {e.message!r} does not quote 'no-such-ref'"

    missing = env.path("no-such.img")
    e = attach_refused("NotFound", missing)
    assert missing in e.message, f"Attach: {e.message!r} does not name {missing}"


# --------------------------------------------------------------------------- 8. DeviceRemoved reasons

def test_detach_sends_one_device_removed_detached(env):
    """Hole 8: a Detach call's device is removed with exactly one
    DeviceRemoved(reason "detached"). Passed before; kept as the contract."""
    image, fence_image = env.image("gpt3"), env.image("none")
    reply = attach(image.path)
    watcher, detached, fence = None, False, None
    try:
        verify_reply(reply, image)
        watcher = SignalWatcher()  # before acting
        busctl_detach(reply["diskseq"])
        detached = True
        verify_detached(reply["devnode"], reply["diskseq"])
        first = watcher.removed(reply["diskseq"], time.monotonic() + SIGNAL_DEADLINE)
        assert first, f"no DeviceRemoved for diskseq {reply['diskseq']} within {SIGNAL_DEADLINE} s"
        # A fence instead of a pause: loopd's signals reach this connection in the
        # order loopd sent them, so once the fence device's DeviceRemoved is here,
        # any duplicate sent before it is here too.
        fence = attach(fence_image.path)
        busctl_detach(fence["diskseq"])
        fence["detached"] = True
        assert watcher.removed(fence["diskseq"], time.monotonic() + SIGNAL_DEADLINE), \
            "no DeviceRemoved for the fence device"
        removed = watcher.removed(reply["diskseq"], 0)
        assert removed == [[reply["device"], reply["diskseq"], "detached"]], \
            f"DeviceRemoved for diskseq {reply['diskseq']}: {removed}, expected exactly one, reason detached"
    finally:
        if watcher:
            watcher.close()
        if not detached:
            detach_quietly(reply["diskseq"])
        if fence and not fence.get("detached"):
            detach_quietly(fence["diskseq"])


def test_release_not_confirmed_in_time_is_timeout(env):
    """Hole 8, reason `timeout` (API.md: "a release was started but not confirmed
    within the deadline; the Detach caller got Timeout"). DetachFlow confirms a
    release by the partitions' remove events or a newer diskseq on the number,
    from events or, at each 1 s nudge, from sysfs; the deadline is 10 s. Here
    every event is withheld (--test-drop random:1, kernel:random:1) and, once the
    kernel has released the device, this test removes it (LOOP_CTL_REMOVE), so
    sysfs has nothing to show: the release is never confirmed. The caller gets
    Timeout, DeviceRemoved says `timeout`, and the device is gone with its link.
    Failed before: the caller got Timeout, but DeviceRemoved said `detached`."""
    env.require_own_udevd()
    env.restart_loopd(kill=False, loopd_args=["--test-drop", "random:1", "--test-drop", "kernel:random:1"])
    image = env.image("gpt3")
    reply = attach(image.path, ref=dbus.String("gone"))  # ready by udev's database (the nudge)
    name, number = loop_name(reply["devnode"]), int(loop_name(reply["devnode"])[4:])
    watcher, detach, removed, paused = None, None, False, False
    try:
        verify_reply(reply, image)
        # No udev worker may hold the released device open when this test removes
        # it (LOOP_CTL_REMOVE is EBUSY then): udevd finishes what it has, then
        # pauses; loopd sees none of its events here anyway.
        run("udevadm", "settle", "--timeout=30")
        os.kill(env.udevd_pid, signal.SIGSTOP)
        paused = True
        watcher = SignalWatcher()
        started = time.monotonic()
        detach = Background(detach_call, reply["diskseq"])
        poll(f"{reply['devnode']} released", lambda: sysfs(name, "diskseq") != str(reply["diskseq"]))
        # Before loopd's first nudge (1 s) reads sysfs; a udev worker may still
        # hold the device open for a moment (EBUSY).
        deadline = time.monotonic() + 0.5
        while not removed:
            try:
                loop_control(LOOP_CTL_REMOVE, number)
                removed = True
            except OSError as e:
                assert e.errno == errno.EBUSY and time.monotonic() < deadline, \
                    f"LOOP_CTL_REMOVE {reply['devnode']}: {e}"
                time.sleep(0.002)
        detach.wait(CALL_TIMEOUT, "Detach")
        took = time.monotonic() - started
        assert isinstance(detach.error, CallError) and detach.error.name == ERROR_PREFIX + "Timeout", \
            f"Detach of {reply['devnode']} with its release unconfirmed: {detach.error or 'succeeded'} " \
            f"after {took:.1f} s, expected {ERROR_PREFIX}Timeout"
        assert reply["devnode"] in detach.error.message or str(reply["diskseq"]) in detach.error.message, \
            f"Timeout message {detach.error.message!r} names neither {reply['devnode']} nor {reply['diskseq']}"
        # The DeviceRemoved signal goes out right after the reply.
        removed_signals = watcher.removed(reply["diskseq"], time.monotonic() + SIGNAL_DEADLINE)
        assert removed_signals == [[reply["device"], reply["diskseq"], "timeout"]], \
            f"DeviceRemoved for diskseq {reply['diskseq']}: {removed_signals}, expected one, reason timeout"
        problems = []
        if reply["device"] in listed_objects():
            problems.append(f"{reply['device']} is still listed")
        if devices_count() != 0:
            problems.append(f"Devices is {devices_count()}, expected 0")
        if os.path.lexists(by_ref(env, "gone")):
            problems.append(f"by-ref/gone -> {link_target(by_ref(env, 'gone'))}")
        if os.path.exists(f"/sys/block/{name}"):
            problems.append(f"/sys/block/{name} is back: {sysfs(name, 'loop/backing_file')}")
        assert not problems, "after Timeout: " + "; ".join(problems)
        print(f"# Detach answered Timeout after {took:.1f} s")
    finally:
        if paused:
            os.kill(env.udevd_pid, signal.SIGCONT)
        if watcher:
            watcher.close()
        if detach is None:
            detach_quietly(reply["diskseq"])
        elif not detach.done.wait(CALL_TIMEOUT) or (not removed and detach.error):
            detach_quietly(reply["diskseq"])
        if removed:
            try:
                loop_control(LOOP_CTL_ADD, number)  # the number as it was: a device, unbound
            except OSError as e:
                if e.errno != errno.EEXIST:
                    print(f"# clean-up: LOOP_CTL_ADD {number}: {e}")


# --------------------------------------------------------------------------- 9. an attach abandoned once

def attach_bound_to_time_out(env, image):
    """With udevd paused, an Attach(readiness=udev) of image in the background,
    which will time out: (the call, the devnode it was configured on). The
    deadline only says when the undo starts; 3 s, well after the configure."""
    call = Background(attach, image.path, readiness=dbus.String("udev"), timeout_usec=dbus.UInt64(3_000_000))
    backing = os.path.realpath(image.path)
    devnode = poll(f"{image.path} attached", lambda: next(
        (dev for dev, f in env.attached_here() if f == backing), None))
    return call, devnode


def open_or_none(node):
    """A read-only fd of node, or None while it does not exist yet."""
    try:
        return os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def test_sigterm_while_a_timed_out_attach_is_undone(env):
    """Hole 9, "shutdown can abandon an attach twice": SIGTERM while an attach
    that timed out is being undone. udevd is paused, so readiness=udev never
    comes; this test holds partition 1 open, so the undo (partitions removed
    last to first, then LOOP_CLR_FD) waits on it, retrying BLKPG for up to 5 s:
    SIGTERM lands inside the undo, and the partition is let go once loopd has
    logged the signal. loopd exits 0 once the
    undo is done, the caller gets the Timeout its attach had (naming the image),
    and nothing is left attached. Failed before: SIGTERM abandoned the attach a
    second time (a second worker on the same, moved fd), whose continuation
    answered Failed "loopd is stopping" in place of Timeout; had both
    continuations run, the second would have extracted an empty node (UB)."""
    env.require_own_udevd()
    image = env.image("gpt3")
    os.kill(env.udevd_pid, signal.SIGSTOP)
    paused, holder, call = True, None, None
    try:
        call, devnode = attach_bound_to_time_out(env, image)
        name = loop_name(devnode)
        holder = poll(f"{devnode}p1 opened", lambda: open_or_none(devnode + "p1"))
        # p2 and p3 may not be added yet when p1 is: only once loopd has logged
        # all three added does their absence mean the undo removed them.
        poll("loopd's log line for the configured attach",
             lambda: "partitions added: p1 p2 p3" in read_text(env.loopd_log))
        poll(f"{devnode}p3 and p2 removed by the undo after the timeout",
             lambda: not any(os.path.exists(f"/sys/block/{name}/{name}p{k}") for k in (2, 3)))
        env.loopd.send_signal(signal.SIGTERM)
        poll("loopd's log line for SIGTERM", lambda: "signal 15 received" in read_text(env.loopd_log))
        os.close(holder)  # the undo goes on: partition 1, LOOP_CLR_FD, the release
        holder = None
        try:
            status = env.loopd.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError("loopd did not exit within 15 s of SIGTERM") from None
        call.wait(CALL_TIMEOUT, "Attach")
        problems = []
        if status != 0:
            problems.append(f"loopd exited with status {status} on SIGTERM")
        e = call.error
        if not isinstance(e, CallError) or e.name != ERROR_PREFIX + "Timeout":
            problems.append(f"Attach: {e or call.result}, expected {ERROR_PREFIX}Timeout")
        elif image.path not in e.message:
            problems.append(f"Timeout message {e.message!r} does not name {image.path}")
        if env.attached_here():
            problems.append(f"left attached: {env.attached_here()}")
        assert not problems, "; ".join(problems)
    finally:
        if holder is not None:
            os.close(holder)
        if paused:
            os.kill(env.udevd_pid, signal.SIGCONT)
        if call is not None and call.done.wait(CALL_TIMEOUT) and call.result:
            detach_quietly(call.result["diskseq"])
        if env.loopd.poll() is not None:
            env._start_loopd()


def test_timed_out_attach_with_a_partition_held_is_released_at_its_close(env):
    """An attach that timed out is undone; someone holds partition 1 open past the
    undo's BLKPG retries (5 s). The reply says so (Timeout naming the image and
    that the device is detached at the last close), and the holder's close does
    release it, partitions and all. Failed before: the reply said "it was
    detached again" while the device stayed attached after the close (leaked)."""
    env.require_own_udevd()
    image = env.image("gpt3")
    os.kill(env.udevd_pid, signal.SIGSTOP)
    paused, holder, call = True, None, None
    try:
        call, devnode = attach_bound_to_time_out(env, image)
        name = loop_name(devnode)
        diskseq = sysfs(name, "diskseq")
        holder = poll(f"{devnode}p1 opened", lambda: open_or_none(devnode + "p1"))
        call.wait(CALL_TIMEOUT, "Attach")
        e = call.error
        assert isinstance(e, CallError) and e.name == ERROR_PREFIX + "Timeout", \
            f"Attach: {e or call.result}, expected {ERROR_PREFIX}Timeout"
        assert image.path in e.message and "detached at the last close" in e.message, \
            f"the Timeout does not say the device waits for its last close: {e.message!r}"
        assert sysfs(name, "diskseq") == diskseq and sysfs(name, "loop/autoclear") == "1", \
            f"{devnode} is not the attachment, marked autoclear, while its partition is held"
        os.close(holder)
        holder = None
        poll(f"{devnode} released at its last close", lambda: sysfs(name, "diskseq") != diskseq)
        poll(f"{devnode}'s partitions dropped",
             lambda: not any(os.path.exists(f"/sys/block/{name}/{name}p{k}") for k in (1, 2, 3)))
    finally:
        if holder is not None:
            os.close(holder)
        if paused:
            os.kill(env.udevd_pid, signal.SIGCONT)
        if call is not None and call.done.wait(CALL_TIMEOUT) and call.result:
            detach_quietly(call.result["diskseq"])


if __name__ == "__main__":
    main(globals())
