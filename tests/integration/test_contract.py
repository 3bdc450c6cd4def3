#!/usr/bin/python3
"""What API.md promises where the daemon once broke it: a refused Detach changes
nothing, refs and their by-ref links never collide, restart recovery unlinks
what it forgets, names resolve never ambiguously, readiness=udev without udevd
fails at once, loopd's usage errors exit 2, errors name their object, and a
Detach sends exactly one DeviceRemoved.

Each test says in its docstring whether the daemon before the fix failed it.
"""

import json
import os
import subprocess
import threading
import time

import xml.etree.ElementTree as ET

import dbus
import dbus.mainloop.glib
from gi.repository import GLib

from harness import (ERROR_PREFIX, DEVICE_IFACE, LOOPCTL, LOOPD, LOOPD_SRC, MANAGER_IFACE, MANAGER_PATH,
                     CallError, busctl_detach, busctl_get_property,
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


class DeviceRemovedWatcher:
    """Records the Manager's DeviceRemoved signals (args as plain values) from the
    moment it is made; a GLib loop thread dispatches them (as in test_reliability)."""

    def __init__(self):
        dbus.mainloop.glib.threads_init()
        self._loop = GLib.MainLoop()
        threading.Thread(target=self._loop.run, daemon=True).start()
        self.seen = []
        self.cond = threading.Condition()
        self.conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"],
                                           mainloop=dbus.mainloop.glib.DBusGMainLoop())
        self.conn.add_signal_receiver(self._on_signal, signal_name="DeviceRemoved",
                                      dbus_interface=MANAGER_IFACE, path=MANAGER_PATH)
        # A round trip behind the AddMatch: the bus has the match when this returns.
        self.conn.call_blocking("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                "org.freedesktop.DBus", "GetId", "", [])

    def _on_signal(self, *args):
        with self.cond:
            self.seen.append([str(args[0]), int(args[1]), str(args[2])])  # (o, t, s)
            self.cond.notify_all()

    def wait_for(self, diskseq, deadline):
        """The DeviceRemoved signals about `diskseq` once at least one came (or the
        deadline passed)."""
        with self.cond:
            while True:
                found = [s for s in self.seen if s[1] == diskseq]
                if found or time.monotonic() >= deadline:
                    return found
                self.cond.wait(deadline - time.monotonic())

    def close(self):
        self.conn.close()
        self._loop.quit()


# --------------------------------------------------------------------------- 0. the interface

def interface_members(root, name):
    """Methods (with in/out signatures) and properties (with types) of an
    interface in introspection XML."""
    iface = next(i for i in root.iter("interface") if i.get("name") == name)
    methods = {m.get("name"): tuple("".join(a.get("type") for a in m.iter("arg") if a.get("direction", "in") == d)
                                    for d in ("in", "out"))
               for m in iface.iter("method")}
    props = {p.get("name"): (p.get("type"), p.get("access")) for p in iface.iter("property")}
    signals = {g.get("name"): "".join(a.get("type") for a in g.iter("arg")) for g in iface.iter("signal")}
    return methods, props, signals


def test_device_object_matches_the_interface_xml(env):
    """A device object, as the bus introspects it, has exactly the methods,
    signatures and properties dbus/org.loopd1.xml declares for org.loopd1.Device
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
    walk) lists exactly the attached devices, each with the interfaces its
    introspection names and, per interface, what Properties.GetAll returns, value
    and type, read through dbus-python and through busctl --json."""
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
                assert set(listed[path]) == interfaces, \
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
        watcher = DeviceRemovedWatcher()  # before acting
        busctl_detach(reply["diskseq"])
        detached = True
        verify_detached(reply["devnode"], reply["diskseq"])
        first = watcher.wait_for(reply["diskseq"], time.monotonic() + SIGNAL_DEADLINE)
        assert first, f"no DeviceRemoved for diskseq {reply['diskseq']} within {SIGNAL_DEADLINE} s"
        # A fence instead of a pause: loopd's signals reach this connection in the
        # order loopd sent them, so once the fence device's DeviceRemoved is here,
        # any duplicate sent before it is here too.
        fence = attach(fence_image.path)
        busctl_detach(fence["diskseq"])
        fence["detached"] = True
        assert watcher.wait_for(fence["diskseq"], time.monotonic() + SIGNAL_DEADLINE), \
            "no DeviceRemoved for the fence device"
        removed = watcher.wait_for(reply["diskseq"], 0)
        assert removed == [[reply["device"], reply["diskseq"], "detached"]], \
            f"DeviceRemoved for diskseq {reply['diskseq']}: {removed}, expected exactly one, reason detached"
    finally:
        if watcher:
            watcher.close()
        if not detached:
            detach_quietly(reply["diskseq"])
        if fence and not fence.get("detached"):
            detach_quietly(fence["diskseq"])


if __name__ == "__main__":
    main(globals())
