#!/usr/bin/python3
"""Bad requests get the exact org.loopd1.Error.* name (seen through python3-dbus, a
client that shows error names), a message naming the object, and leave nothing
attached. Devices loopd did not attach are never touched."""

import glob
import json
import os
import subprocess

import dbus

from harness import (CALL_TIMEOUT, ERROR_PREFIX, LOOPCTL, MANAGER_IFACE, busctl_detach, busctl_managed_objects,
                     detaching, expect_error, loopctl_detach, main, pydbus_attach, pydbus_call, pydbus_options,
                     read_text, run, verify_reply, CallError)


def manager_devices():
    return pydbus_call("Get", "ss", [MANAGER_IFACE, "Devices"],
                       iface="org.freedesktop.DBus.Properties")


def refused(env, name, names_object, fn, *args, still_attached=(), **kw):
    """fn(*args, **kw) must fail with org.loopd1.Error.<name>, its message must contain
    `names_object`, and afterwards loopd is alive, owns no new device and no loop
    device is backed by the test's files except `still_attached`."""
    devices_before = manager_devices()
    err = expect_error(name, fn, *args, **kw)
    assert str(names_object) in err.message, \
        f"{err.name}: message {err.message!r} does not name {names_object}"
    env.assert_loopd_alive()
    left = [d for d, _ in env.attached_here() if d not in still_attached]
    assert not left, f"after {err.name}: still attached: {left}"
    assert manager_devices() == devices_before, \
        f"after {err.name}: Devices {manager_devices()}, was {devices_before}"
    return err


def attach(path, timeout=CALL_TIMEOUT, **options):
    return pydbus_attach(path, pydbus_options(**options), timeout=timeout)


def highest_diskseq():
    return max(int(read_text(p)) for p in glob.glob("/sys/block/*/diskseq"))


# ---------------------------------------------------------------- the backing file

def test_file_name_not_utf8_is_listed_escaped(env):
    """A file name is bytes; a D-Bus string must be UTF-8. A user who attached
    `bad-<0xff>.img` (through its fd, or a symlink: Attach's own path is a string)
    made sd-bus refuse BackingFile, and with it every GetManagedObjects and every
    `loopctl list`: one user's file name took the device list from all. Now the
    invalid byte is listed as \\xff, and the rest of the name as it is."""
    raw = os.fsencode(env.path("bad-")) + b"\xff-\xc3\xa9.img"
    with open(raw, "wb") as f:
        f.truncate(1 << 20)
    attached = subprocess.run([LOOPCTL, "attach", "--json", raw], capture_output=True, timeout=CALL_TIMEOUT + 30)
    assert attached.returncode == 0, attached.stderr
    diskseq = int(json.loads(attached.stdout)["DiskSeq"])
    with detaching(diskseq):
        expected = env.path("bad-") + "\\xff-\u00e9.img"
        obj = f"/org/loopd1/device/{diskseq}"
        listed = pydbus_call("GetManagedObjects", iface="org.freedesktop.DBus.ObjectManager")
        assert listed[obj]["org.loopd1.Device"]["BackingFile"] == expected, listed[obj]
        assert busctl_managed_objects()[obj]["org.loopd1.Device"]["BackingFile"] == expected
        got = pydbus_call("Get", "ss", ["org.loopd1.Device", "BackingFile"], path=obj,
                          iface="org.freedesktop.DBus.Properties")
        assert got == expected, got
        table = run(LOOPCTL, "list", "--output", "DISKSEQ,BACKING-FILE", "--noheadings").stdout
        assert f"{diskseq} {expected}" in table.splitlines(), table
    # The log says it the same way: journalctl shows a line that is not UTF-8 as
    # "[N blob data]".
    with open(env.loopd_log, "rb") as f:
        log = f.read()
    assert b"\xff" not in log, "loopd logged the file name's raw byte"
    assert os.fsencode(expected) in log, "loopd's log does not name the file"


def test_missing_file(env):
    path = env.path("no-such.img")
    refused(env, "NotFound", path, attach, path)


def test_directory(env):
    path = env.path("a-directory")
    os.mkdir(path)
    refused(env, "InvalidArgument", path, attach, path)


def test_empty_file(env):
    path = env.path("empty.img")
    open(path, "w").close()
    refused(env, "InvalidArgument", path, attach, path)


def test_fifo(env):
    path = env.path("a-fifo")
    os.mkfifo(path)
    try:
        # A daemon that opens a fifo without O_NONBLOCK hangs until a writer comes:
        # the call then times out (NoReply) and the assertion says so. Rejecting a
        # bad file type takes no readiness wait, so 15 s is plenty.
        refused(env, "InvalidArgument", path, attach, path, timeout=15)
    finally:
        release_fifo_reader(path)


def release_fifo_reader(path):
    """If loopd is stuck opening the fifo for reading, a writer's open frees it, so
    the failure is reported instead of hanging the teardown too."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # ENXIO: nobody has it open for reading, as it should be


# ---------------------------------------------------------------- options

def test_offset_at_end_of_file(env):
    image = env.image("none")
    size = os.path.getsize(image.path)
    refused(env, "InvalidArgument", image.path, attach, image.path, offset=dbus.UInt64(size))
    refused(env, "InvalidArgument", image.path, attach, image.path,
            offset=dbus.UInt64(size + 4096))


def test_offset_not_multiple_of_512(env):
    image = env.image("none")
    refused(env, "InvalidArgument", image.path, attach, image.path, offset=dbus.UInt64(1000))


def test_sector_size_1000(env):
    image = env.image("none")
    refused(env, "InvalidArgument", image.path, attach, image.path,
            sector_size=dbus.UInt32(1000))


def test_unknown_option(env):
    image = env.image("none")
    refused(env, "InvalidArgument", image.path, attach, image.path,
            **{"no-such-option": dbus.Boolean(True)})


def test_option_of_wrong_type(env):
    image = env.image("none")
    refused(env, "InvalidArgument", image.path, attach, image.path, offset=dbus.String("512"))


def test_ref_too_long(env):
    image = env.image("none")
    refused(env, "InvalidArgument", image.path, attach, image.path, ref=dbus.String("r" * 64))
    # 63 bytes is the limit, not past it.
    reply = attach(image.path, ref=dbus.String("r" * 63))
    with detaching(reply):
        verify_reply(reply, image)
        busctl_detach(reply["diskseq"])


def test_duplicate_ref(env):
    first_image, second_image = env.image("none"), env.image("none")
    first = attach(first_image.path, ref=dbus.String("dup"))
    with detaching(first):
        verify_reply(first, first_image)
        refused(env, "InvalidArgument", second_image.path, attach, second_image.path,
                ref=dbus.String("dup"), still_attached=[first["devnode"]])


def test_detach_unknown_option(env):
    image = env.image("gpt3")
    reply = attach(image.path)
    with detaching(reply):
        diskseq = verify_reply(reply, image)
        refused(env, "InvalidArgument", diskseq, pydbus_call, "Detach", "ta{sv}",
                [dbus.UInt64(diskseq), pydbus_options(**{"no-such-option": dbus.Boolean(True)})],
                still_attached=[reply["devnode"]])
        verify_reply(reply, image)  # refused means untouched: still ready, partitions and all


# ---------------------------------------------------------------- naming devices

def test_detach_unknown_diskseq(env):
    unknown = highest_diskseq() + 1000
    refused(env, "NotFound", unknown, pydbus_call, "Detach", "ta{sv}",
            [dbus.UInt64(unknown), pydbus_options()])


def test_loopctl_reports_error_name(env):
    unknown = highest_diskseq() + 1000
    err = expect_error("NotFound", loopctl_detach, unknown)
    assert str(unknown) in err.message, f"loopctl: message {err.message!r} does not name {unknown}"


def unused_loop_devnode():
    highest = max(int(os.path.basename(p)[4:]) for p in glob.glob("/sys/block/loop[0-9]*"))
    return f"/dev/loop{highest + 100}"


def test_wait_ready_unknown_devnode(env):
    unknown = unused_loop_devnode()
    refused(env, "NotFound", unknown, pydbus_call, "WaitReady", "st",
            [unknown, dbus.UInt64(1_000_000)])


def test_detach_device_loopd_did_not_attach(env):
    """loopd must refuse, and leave another tool's device exactly as it was."""
    image = env.image("none")
    devnode = run("losetup", "-f", "--show", image.path).stdout.strip()
    name = os.path.basename(devnode)
    try:
        diskseq = int(read_text(f"/sys/block/{name}/diskseq"))
        try:
            pydbus_call("Detach", "ta{sv}", [dbus.UInt64(diskseq), pydbus_options()])
        except CallError as e:
            # NotFound or AccessDenied are both honest; any loopd error is a refusal.
            assert e.name and e.name.startswith(ERROR_PREFIX), f"Detach of a foreign device: {e}"
        else:
            raise AssertionError(f"loopd detached {devnode} (diskseq {diskseq}), which it did not attach")
        assert read_text(f"/sys/block/{name}/diskseq") == str(diskseq), \
            f"{devnode}: diskseq changed from {diskseq}"
        assert read_text(f"/sys/block/{name}/loop/backing_file") == image.path, \
            f"{devnode} is no longer backed by {image.path}"
    finally:
        run("losetup", "-d", devnode, check=False)


if __name__ == "__main__":
    main(globals())
