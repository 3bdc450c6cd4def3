#!/usr/bin/python3
"""Issue 15: what losetup, udisks2 and systemd users ask for. Each test checks at
reply time what a user would check, through busctl, python3-dbus or loopctl.

  Find       a renamed image and one reached through a symlinked directory still
             match; a file replaced under the same name does not.
  deferred   Detach(deferred) of a mounted whole-disk image replies at once, the
             device stays until umount, then DeviceRemoved(reason autoclear).
  autoclear  attached with autoclear, the device stays while loopd is the only
             one to have used it (udev's and loopd's own opens do not count);
             mounted by someone else, it is released at umount and reported as
             DeviceRemoved(reason autoclear), whole disk or partition.
  Resize     an image grown by 16 MiB with a 4th partition appended: at reply time
             the 4th partition exists, udev has it, and its size is right; a
             shrink under a mounted partition is Busy and changes nothing.
"""

import json
import os
import pwd
import shutil
import time

import dbus

from harness import (DEVICE_IFACE, LOOPCTL, LOOPD_SRC, MANAGER_IFACE, MANAGER_PATH, CallError, SignalWatcher, Skip,
                     _udev_info, busctl_get_property, busctl_managed_objects, detaching,
                     expect_error, loop_name, main, make_gpt3, partition_numbers_in_sysfs, pydbus_attach, pydbus_call,
                     pydbus_options, read_text, run, verify_detached, verify_ready,
                     verify_reply)
from test_security import USER, ensure_users

SIGNAL_DEADLINE = 5.0  # a DeviceRemoved later than this after the umount is lost
MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers

def find(path):
    return [str(o) for o in pydbus_call("Find", "s", [path])]


def detach_call(diskseq, **options):
    return pydbus_call("Detach", "ta{sv}", [dbus.UInt64(diskseq), pydbus_options(**options)])


def resize_call(device):
    size, partitions = pydbus_call("Resize", "a{sv}", [pydbus_options()], path=device,
                                   iface=DEVICE_IFACE)
    return int(size), [str(p) for p in partitions]


def listed_objects():
    return {path for path, ifaces in busctl_managed_objects().items() if DEVICE_IFACE in ifaces}


def bound(devnode, diskseq):
    name = loop_name(devnode)
    return read_text(f"/sys/block/{name}/diskseq") == str(diskseq) and \
        os.path.exists(f"/sys/block/{name}/loop/backing_file")


# --------------------------------------------------------------------------- Find

def test_find_follows_the_file_not_the_name(env):
    """Find matches by st_dev/st_ino of what the path names now."""
    image = env.image("gpt3")
    reply = pydbus_attach(image.path, pydbus_options())
    with detaching(reply):
        verify_reply(reply, image)
        device = reply["device"]
        assert find(image.path) == [device], f"Find {image.path}: {find(image.path)}"

        # Renamed: the new name matches, the old one names nothing.
        renamed = env.path("renamed.img")
        os.rename(image.path, renamed)
        assert find(renamed) == [device], f"Find {renamed} after rename: {find(renamed)}"
        expect_error("NotFound", find, image.path)

        # Reached through a symlinked directory.
        real_dir, link_dir = env.path("real"), env.path("link")
        os.makedirs(real_dir)
        moved = os.path.join(real_dir, "disk.img")
        os.rename(renamed, moved)
        os.symlink(real_dir, link_dir)
        through_link = os.path.join(link_dir, "disk.img")
        assert find(through_link) == [device], f"Find {through_link}: {find(through_link)}"

        # loopctl find, by the same path, in JSON.
        out = json.loads(run(LOOPCTL, "find", "--json", through_link).stdout)
        assert [d["Object"] for d in out] == [device] and out[0]["DevNode"] == reply["devnode"], out

        # Replaced: a copy renamed over the name is another file.
        copy = os.path.join(real_dir, "copy.img")
        shutil.copyfile(moved, copy)
        os.rename(copy, moved)
        assert find(through_link) == [], f"Find {through_link} after replacing it: {find(through_link)}"
        p = run(LOOPCTL, "find", through_link, check=False)
        assert p.returncode == 1 and p.stdout == "", f"loopctl find of a replaced file: {p}"

        detach_call(reply["diskseq"])
        verify_detached(reply["devnode"], reply["diskseq"])


def find_as(user, path):
    """Manager.Find through busctl run as `user` (setpriv, its own groups)."""
    pw = pwd.getpwnam(user)
    p = run("setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
            "busctl", "--system", "--json=short", "call", "org.loopd1", MANAGER_PATH, MANAGER_IFACE,
            "Find", "s", path, check=False,
            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": os.environ["DBUS_SYSTEM_BUS_ADDRESS"]})
    if p.returncode != 0:
        raise CallError(None, p.stderr.strip().removeprefix("Call failed: "), f"busctl as {user}")
    return json.loads(p.stdout)["data"][0]


def test_find_looks_the_path_up_as_the_caller(env):
    """Find resolves the path with the caller's identity: a user who cannot search
    the directory is refused (and learns nothing); once it can, it finds the
    device without read permission on the image (an O_PATH lookup)."""
    private = env.path("private")
    os.makedirs(private, mode=0o700)
    image = make_gpt3(os.path.join(private, "disk.img"))
    os.chmod(image.path, 0o600)  # root's, unreadable by the user
    reply = pydbus_attach(image.path, pydbus_options())
    with detaching(reply):
        verify_reply(reply, image)
        try:
            devices = find_as(USER, image.path)
            raise AssertionError(f"{USER} found {devices} through a directory it cannot search")
        except CallError as e:
            assert "cannot open" in e.message and image.path in e.message, e.message
        os.chmod(private, 0o711)
        assert find_as(USER, image.path) == [reply["device"]]
        assert find(image.path) == [reply["device"]]
        detach_call(reply["diskseq"])
        verify_detached(reply["devnode"], reply["diskseq"])


# --------------------------------------------------------------------------- deferred detach

def test_deferred_detach_of_mounted_disk(env):
    """Detach(deferred) of a mounted whole-disk image: the reply comes while it is
    mounted, the device stays (listed, bound, Autoclear=true) until umount, then it
    is released and reported as DeviceRemoved(reason autoclear)."""
    image = env.image("none")
    run("mkfs.ext4", "-q", "-F", image.path)
    reply = pydbus_attach(image.path, pydbus_options())
    diskseq, devnode = reply["diskseq"], reply["devnode"]
    mnt = env.path("mnt")
    os.makedirs(mnt)
    with detaching(reply):
        verify_reply(reply, image)
        run("mount", devnode, mnt)
        mounted = True
        watcher = SignalWatcher()
        try:
            expect_error("Busy", detach_call, diskseq)  # without deferred: refused
            detach_call(diskseq, deferred=dbus.Boolean(True))
            # At reply time: still there, marked for release at its last close.
            assert bound(devnode, diskseq), f"{devnode} was released while mounted"
            assert reply["device"] in listed_objects(), f"{reply['device']} is no longer listed"
            assert busctl_get_property(reply["device"], DEVICE_IFACE, "Autoclear") is True
            assert read_text(f"/sys/block/{loop_name(devnode)}/loop/autoclear") == "1"
            assert watcher.wait_changed(reply["device"], "Autoclear", time.monotonic() + SIGNAL_DEADLINE), \
                "no PropertiesChanged for Autoclear"
            assert not watcher.removals(), f"DeviceRemoved before umount: {watcher.removals()}"
            # A second deferred detach is already arranged: success, nothing changes.
            detach_call(diskseq, deferred=dbus.Boolean(True))

            run("umount", mnt)
            mounted = False
            reasons = watcher.wait_removed(diskseq, time.monotonic() + SIGNAL_DEADLINE)
            assert reasons == ["autoclear"], f"DeviceRemoved for {diskseq}: {reasons}"
            # At signal time: released and gone from the bus.
            assert not bound(devnode, diskseq), f"{devnode} still bound at diskseq {diskseq}"
            assert reply["device"] not in listed_objects(), f"{reply['device']} still listed"
            expect_error("NotFound", detach_call, diskseq)
        finally:
            watcher.close()
            if mounted:
                run("umount", mnt, check=False)


def test_deferred_detach_of_mounted_partition(env):
    """Detach(deferred) with partition 2 mounted: replies at once, the device and
    all its partitions stay until umount; then the kernel's release (partscan is
    on) drops the partitions, and DeviceRemoved(reason autoclear) is sent."""
    image = env.image("gpt3")
    reply = pydbus_attach(image.path, pydbus_options())
    diskseq, devnode = reply["diskseq"], reply["devnode"]
    name = loop_name(devnode)
    mnt = env.path("mnt")
    os.makedirs(mnt)
    with detaching(reply):
        verify_reply(reply, image)
        run("mkfs.ext4", "-q", "-F", reply["partitions"][1])
        run("mount", reply["partitions"][1], mnt)
        mounted = True
        watcher = SignalWatcher()
        try:
            detach_call(diskseq, deferred=dbus.Boolean(True))
            assert bound(devnode, diskseq) and partition_numbers_in_sysfs(name) == [1, 2, 3], \
                f"{devnode} at reply time: bound {bound(devnode, diskseq)}, partitions " \
                f"{partition_numbers_in_sysfs(name)}"
            run("umount", mnt)
            mounted = False
            reasons = watcher.wait_removed(diskseq, time.monotonic() + SIGNAL_DEADLINE)
            assert reasons == ["autoclear"], f"DeviceRemoved for {diskseq}: {reasons}"
            assert not bound(devnode, diskseq), f"{devnode} still bound at diskseq {diskseq}"
            verify_detached(devnode, diskseq)
        finally:
            watcher.close()
            if mounted:
                run("umount", mnt, check=False)


# --------------------------------------------------------------------------- autoclear

AUTOCLEAR_QUIET = 1.0  # no DeviceRemoved within this long: loopd kept the device


def attach_autoclear(path, ref):
    return pydbus_attach(path, pydbus_options(autoclear=dbus.Boolean(True), ref=dbus.String(ref)))


def ref_link(env, ref):
    return os.path.join(env.tmp, "run", "by-ref", ref)


def losetup_lists(image):
    return run("losetup", "-j", image).stdout.strip()


def check_kept(env, watcher, reply, ref, why):
    """The autoclear device is still attached, listed and linked, and no
    DeviceRemoved came for it."""
    diskseq, devnode = reply["diskseq"], reply["devnode"]
    assert bound(devnode, diskseq), f"{devnode} was released {why}"
    assert reply["device"] in listed_objects(), f"{reply['device']} is no longer listed {why}"
    assert os.path.islink(ref_link(env, ref)), f"by-ref/{ref} is gone {why}"
    assert not [r for d, r in watcher.removals() if d == diskseq], f"DeviceRemoved {why}: {watcher.removals()}"


def check_released(env, watcher, reply, ref, image, what):
    """After `what` (the last close): the kernel released the device, loopd said so
    with DeviceRemoved(reason autoclear) and lists or links nothing of it."""
    diskseq, devnode = reply["diskseq"], reply["devnode"]
    reasons = watcher.wait_removed(diskseq, time.monotonic() + SIGNAL_DEADLINE)
    assert reasons == ["autoclear"], f"DeviceRemoved for {diskseq} after {what}: {reasons}"
    assert not bound(devnode, diskseq), f"{devnode} still bound at diskseq {diskseq} after {what}"
    assert losetup_lists(image) == "", f"losetup -j still lists {image}: {losetup_lists(image)}"
    assert reply["device"] not in listed_objects(), f"{reply['device']} still listed after {what}"
    assert not os.path.lexists(ref_link(env, ref)), f"by-ref/{ref} left after {what}"
    expect_error("NotFound", detach_call, diskseq)


def released_at_umount_of_disk(env, ref, *mount_options):
    image = env.image("none")
    run("mkfs.ext4", "-q", "-F", image.path)
    watcher = SignalWatcher()
    reply = attach_autoclear(image.path, ref)
    mnt = env.path("mnt")
    os.makedirs(mnt)
    mounted = False
    try:
        with detaching(reply):
            verify_reply(reply, image)
            assert busctl_get_property(reply["device"], DEVICE_IFACE, "Autoclear") is True
            run("mount", *mount_options, reply["devnode"], mnt)
            mounted = True
            check_kept(env, watcher, reply, ref, "by mount")
            run("umount", mnt)
            mounted = False
            check_released(env, watcher, reply, ref, image.path, "umount")
    finally:
        watcher.close()
        if mounted:
            run("umount", mnt, check=False)


def test_autoclear_released_at_umount_of_disk(env):
    """autoclear, a filesystem image without a table: `mount /dev/loopN` keeps the
    device (attached, listed, linked); `umount` is the last close: the kernel
    releases it and loopd reports DeviceRemoved(reason autoclear). Failed before
    (loopd held its fd until Detach): no DeviceRemoved after the umount, the device
    still bound."""
    released_at_umount_of_disk(env, "ac-disk")


def test_autoclear_mount_without_probe_released_at_umount(env):
    """The same with `mount -t ext4`, which opens no node (no probe; mount(2)
    opens the block device by number): seen in the mount table. Failed before as
    the test above."""
    released_at_umount_of_disk(env, "ac-typed", "-t", "ext4")


def test_autoclear_released_at_umount_of_partition(env):
    """autoclear, a GPT image: `mount /dev/loopNp1` keeps the device with all its
    partitions; `umount` releases it (DeviceRemoved reason autoclear) and the
    partitions go with it. Failed before: nothing after the umount."""
    image = env.image("gpt3")
    # The filesystem is made on an attachment of its own: mkfs on an autoclear
    # device would be its first user, and its exit would release it.
    plain = pydbus_attach(image.path, pydbus_options())
    with detaching(plain):
        run("mkfs.ext4", "-q", "-F", plain["partitions"][0])
        detach_call(plain["diskseq"])
    watcher = SignalWatcher()
    reply = attach_autoclear(image.path, "ac-part")
    name = loop_name(reply["devnode"])
    mnt = env.path("mnt")
    os.makedirs(mnt)
    mounted = False
    try:
        with detaching(reply):
            verify_reply(reply, image)
            run("mount", reply["partitions"][0], mnt)
            mounted = True
            check_kept(env, watcher, reply, "ac-part", "by mounting partition 1")
            assert partition_numbers_in_sysfs(name) == [1, 2, 3], \
                f"{reply['devnode']}'s partitions while mounted: {partition_numbers_in_sysfs(name)}"
            run("umount", mnt)
            mounted = False
            check_released(env, watcher, reply, "ac-part", image.path, "umount")
            verify_detached(reply["devnode"], reply["diskseq"])
    finally:
        watcher.close()
        if mounted:
            run("umount", mnt, check=False)


def test_autoclear_not_released_by_udev_or_loopd(env):
    """udev processing the device (`udevadm trigger --action=change` and settle)
    and loopd's own look at it (`loopctl status`) are not someone else's use: the
    autoclear device stays. Then `blkid /dev/loopN` by the user is: released at
    its exit and reported. Failed before at the last step (blkid released
    nothing)."""
    image = env.image("none")
    run("mkfs.ext4", "-q", "-F", image.path)
    watcher = SignalWatcher()
    reply = attach_autoclear(image.path, "ac-udev")
    devnode = reply["devnode"]
    try:
        with detaching(reply):
            verify_reply(reply, image)
            run("udevadm", "trigger", "--action=change", devnode)
            run("udevadm", "settle")
            run(LOOPCTL, "status", devnode)
            assert not watcher.wait_removed(reply["diskseq"], time.monotonic() + AUTOCLEAR_QUIET), \
                "released after udev processed it or loopctl status looked at it"
            check_kept(env, watcher, reply, "ac-udev", "by udev or loopctl status")
            # udev's worker did open it (blkid): it found the filesystem.
            assert _udev_info(devnode)[1].get("ID_FS_TYPE") == "ext4", _udev_info(devnode)
            run("blkid", devnode)
            check_released(env, watcher, reply, "ac-udev", image.path, "blkid")
    finally:
        watcher.close()


def test_autoclear_unopened_stays_until_detach(env):
    """An autoclear device nobody else opens stays attached and listed (loopd
    holds it, idle), and Detach releases it as usual (DeviceRemoved reason
    detached). A guard: this held before too."""
    image = env.image("gpt3")
    watcher = SignalWatcher()
    reply = attach_autoclear(image.path, "ac-idle")
    try:
        with detaching(reply):
            verify_reply(reply, image)
            assert not watcher.wait_removed(reply["diskseq"], time.monotonic() + AUTOCLEAR_QUIET), \
                "released though nobody opened it"
            check_kept(env, watcher, reply, "ac-idle", "while nobody used it")
            detach_call(reply["diskseq"])
            verify_detached(reply["devnode"], reply["diskseq"])
            reasons = watcher.wait_removed(reply["diskseq"], time.monotonic() + SIGNAL_DEADLINE)
            assert reasons == ["detached"], f"DeviceRemoved for {reply['diskseq']}: {reasons}"
            assert not os.path.lexists(ref_link(env, "ac-idle")), "by-ref/ac-idle left after Detach"
    finally:
        watcher.close()


# --------------------------------------------------------------------------- Resize

def partition_bytes(devnode, k):
    name = loop_name(devnode)
    return int(read_text(f"/sys/block/{name}/{name}p{k}/size")) * 512


def test_resize_grow_adds_fourth_partition(env):
    """Grow by 16 MiB, sfdisk --append a 4th partition, Resize: at reply time the
    4th partition exists with the right size and udev has processed it (DISKSEQ,
    ID_PART_ENTRY_NUMBER, ID_PART_ENTRY_SIZE); Size and Partitions changed, with
    PropertiesChanged; the diskseq is the same."""
    image = env.image("gpt3")
    reply = pydbus_attach(image.path, pydbus_options())
    devnode, diskseq = reply["devnode"], reply["diskseq"]
    with detaching(reply):
        verify_reply(reply, image)
        old_size = busctl_get_property(reply["device"], DEVICE_IFACE, "Size")
        run("truncate", "-s", "+16M", image.path)
        run("sfdisk", "-q", "--relocate", "gpt-bak-std", image.path)
        run("sfdisk", "-q", "--append", image.path, input=" size=12MiB\n")
        table = json.loads(run("sfdisk", "--json", image.path).stdout)["partitiontable"]
        p4 = table["partitions"][3]
        watcher = SignalWatcher()
        try:
            started = time.monotonic()
            size, partitions = resize_call(reply["device"])
            elapsed = time.monotonic() - started
            # At reply time.
            assert size == old_size + 16 * MiB, f"Resize says {size}, expected {old_size + 16 * MiB}"
            assert int(read_text(f"/sys/block/{loop_name(devnode)}/size")) * 512 == size
            assert partitions == [f"{devnode}p{k}" for k in range(1, 5)], partitions
            verify_ready(devnode, diskseq, 4, image.table_uuid)  # same diskseq, udev done
            assert partition_bytes(devnode, 4) == p4["size"] * 512 == 12 * MiB, \
                f"{devnode}p4 is {partition_bytes(devnode, 4)} bytes, the table says {p4['size'] * 512}"
            _, props = _udev_info(f"{devnode}p4")
            assert props.get("ID_PART_ENTRY_SIZE") == str(p4["size"]), \
                f"udev's {devnode}p4: ID_PART_ENTRY_SIZE={props.get('ID_PART_ENTRY_SIZE')}, table {p4['size']}"
            assert busctl_get_property(reply["device"], DEVICE_IFACE, "Size") == size
            assert busctl_get_property(reply["device"], DEVICE_IFACE, "Partitions") == partitions
            for prop in ("Size", "Partitions"):
                assert watcher.wait_changed(reply["device"], prop, time.monotonic() + SIGNAL_DEADLINE), \
                    f"no PropertiesChanged for {prop}"
            print(f"# resize to 4 partitions replied in {elapsed * 1000:.1f} ms")
        finally:
            watcher.close()

        # loopctl resize with nothing changed: same answer.
        out = json.loads(run(LOOPCTL, "resize", "--json", devnode).stdout)
        assert out["Size"] == size and out["Partitions"] == partitions and out["DiskSeq"] == diskseq, out

        detach_call(diskseq)
        verify_detached(devnode, diskseq)


def test_resize_shrink_under_mounted_partition_is_busy(env):
    """A shrink that would cut off a mounted partition is Busy and changes nothing:
    size, partitions and udev's view stay; after umount and the file restored, the
    device detaches as usual."""
    image = env.image("gpt3")
    reply = pydbus_attach(image.path, pydbus_options())
    devnode, diskseq = reply["devnode"], reply["diskseq"]
    mnt = env.path("mnt")
    os.makedirs(mnt)
    with detaching(reply):
        verify_reply(reply, image)
        run("mkfs.ext4", "-q", "-F", reply["partitions"][2])
        run("mount", reply["partitions"][2], mnt)
        mounted = True
        try:
            size = busctl_get_property(reply["device"], DEVICE_IFACE, "Size")
            run("truncate", "-s", "20M", image.path)  # partition 3 lies at 17-25 MiB
            e = expect_error("Busy", resize_call, reply["device"])
            assert f"{devnode}p3" in e.message, f"Busy message names no partition: {e.message}"
            assert int(read_text(f"/sys/block/{loop_name(devnode)}/size")) * 512 == size, \
                "the device's size changed after Busy"
            assert busctl_get_property(reply["device"], DEVICE_IFACE, "Size") == size
            verify_ready(devnode, diskseq, 3, image.table_uuid)
        finally:
            run("truncate", "-s", "64M", image.path)
            if mounted:
                run("umount", mnt, check=False)
        detach_call(diskseq)
        verify_detached(devnode, diskseq)


# --------------------------------------------------------------------------- hidden

class project_udev_rule:
    """The project's udev/90-loopd.rules, put where the running udevd reads rules
    at run time (/run/udev/rules.d, as `meson install` puts it in udevdir/rules.d)
    and reloaded; taken out again on exit."""

    PATH = "/run/udev/rules.d/90-loopd.rules"

    def __enter__(self):
        os.makedirs(os.path.dirname(self.PATH), exist_ok=True)
        shutil.copyfile(os.path.join(LOOPD_SRC, "udev", "90-loopd.rules"), self.PATH)
        run("udevadm", "control", "--reload")
        return self

    def __exit__(self, *exc):
        os.unlink(self.PATH)
        run("udevadm", "control", "--reload", check=False)
        return False


def test_hidden_tags_in_udev_database_at_reply_time(env):
    """Attach(hidden, ref): at reply time udev's database has UDISKS_IGNORE=1,
    LOOPD_REF and LOOPD_OWNER_UID for the disk and every partition (and the device
    is ready as always). A device attached without hidden has none of them."""
    with project_udev_rule():
        image = env.image("gpt3")
        reply = pydbus_attach(image.path, pydbus_options(hidden=dbus.Boolean(True), ref=dbus.String("desk")))
        plain_image = env.image("mbr2")
        with detaching(reply):
            verify_reply(reply, image)
            for node in [reply["devnode"]] + reply["partitions"]:
                _, props = _udev_info(node)
                tags = {k: props.get(k) for k in ("UDISKS_IGNORE", "LOOPD_REF", "LOOPD_OWNER_UID")}
                assert tags == {"UDISKS_IGNORE": "1", "LOOPD_REF": "desk", "LOOPD_OWNER_UID": "0"}, \
                    f"udev's {node} at reply time: {tags}"
            plain = pydbus_attach(plain_image.path, pydbus_options())
            with detaching(plain):
                verify_reply(plain, plain_image)
                for node in [plain["devnode"]] + plain["partitions"]:
                    _, props = _udev_info(node)
                    assert "UDISKS_IGNORE" not in props and "LOOPD_REF" not in props, \
                        f"udev's {node} has loopd's tags without hidden: {props}"
                detach_call(plain["diskseq"])
            detach_call(reply["diskseq"])
            verify_detached(reply["devnode"], reply["diskseq"])
            assert not os.path.exists(f"/run/loopd/udev/{reply['diskseq']}"), \
                "the udev properties file outlived its device"


def test_hidden_without_the_udev_rule_fails_and_attaches_nothing(env):
    """Without 90-loopd.rules in udev's rules directories udev cannot import the
    properties, so "in udev's database before readiness" cannot hold: Attach(hidden)
    fails (Failed, naming the device and the rule), nothing stays attached and the
    ref is free again. Failed on 5b0445e: it answered ready without the tags."""
    installed = [d for d in ("/etc/udev/rules.d", "/run/udev/rules.d", "/usr/lib/udev/rules.d",
                             "/lib/udev/rules.d") if os.path.exists(os.path.join(d, "90-loopd.rules"))]
    if installed:
        raise Skip(f"90-loopd.rules is installed in {installed}")
    image = env.image("gpt3")
    err = expect_error("Failed", pydbus_attach, image.path,
                       pydbus_options(hidden=dbus.Boolean(True), ref=dbus.String("desk")))
    assert "90-loopd.rules" in err.message and image.path in err.message, err.message
    assert env.attached_here() == [], f"left attached: {env.attached_here()}"
    reply = pydbus_attach(image.path, pydbus_options(ref=dbus.String("desk")))
    with detaching(reply):
        verify_reply(reply, image)


# --------------------------------------------------------------------------- Open, lifetime=fd

RULES = f"""// loopd integration tests (tests/integration/test_features.py), removed after the run.
polkit.addRule(function(action, subject) {{
    if (action.id == "org.loopd1.attach" && subject.user == "{USER}")
        return polkit.Result.YES;
}});
"""

# Run as the test user: attaches its own image (AttachFd), shows it cannot open the
# device node itself, gets an fd of partition 1 with Open and probes it with
# libblkid through that fd (blkid's library, as ctypes: the blkid command would
# reopen /dev/fd/N, which checks the node's permissions again). JSON on stdout.
OPEN_CLIENT = r'''
import ctypes, dbus, json, os, sys
bus = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
mgr = dbus.Interface(bus.get_object("org.loopd1", "/org/loopd1"), "org.loopd1.Manager")
out = {"uid": os.getuid()}
with open(sys.argv[1], "r+b") as image:
    obj, devnode, diskseq, parts = mgr.AttachFd(dbus.types.UnixFd(image), dbus.Dictionary({}, signature="sv"))
out.update(object=str(obj), devnode=str(devnode), diskseq=int(diskseq))
try:
    os.close(os.open(str(parts[0]), os.O_RDONLY))
    out["node_open"] = "allowed"
except PermissionError:
    out["node_open"] = "denied"
device = dbus.Interface(bus.get_object("org.loopd1", obj), "org.loopd1.Device")
fd = device.Open(dbus.Dictionary({"partition": dbus.UInt32(1)}, signature="sv")).take()
try:
    os.write(fd, b"x")
    out["writable"] = True
except OSError:
    out["writable"] = False
blkid = ctypes.CDLL("libblkid.so.1")
blkid.blkid_new_probe.restype = ctypes.c_void_p
probe = blkid.blkid_new_probe()
blkid.blkid_probe_set_device.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
blkid.blkid_do_safeprobe.argtypes = [ctypes.c_void_p]
blkid.blkid_probe_lookup_value.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                           ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p]
assert blkid.blkid_probe_set_device(probe, fd, 0, 0) == 0
out["probe"] = blkid.blkid_do_safeprobe(probe)
for key in ("TYPE", "UUID"):
    value = ctypes.c_char_p()
    if blkid.blkid_probe_lookup_value(probe, key.encode(), ctypes.byref(value), None) == 0:
        out[key] = value.value.decode()
try:
    try:
        device.Open(dbus.Dictionary({"read-only": dbus.Boolean(False), "partition": dbus.UInt32(9)},
                                    signature="sv"))
    except dbus.exceptions.DBusException as e:
        out["partition9"] = e.get_dbus_name()
finally:
    os.close(fd)
mgr.Detach(dbus.UInt64(diskseq), dbus.Dictionary({}, signature="sv"))
print(json.dumps(out))
'''


def test_open_as_unprivileged_owner(env):
    """The owner (a test user, through setpriv) cannot open its partition's node,
    but Device.Open gives it a read-only fd on which libblkid finds the ext4 root
    made there; another user gets AccessDenied."""
    image = env.image("gpt3")
    pw = pwd.getpwnam(USER)
    os.chown(image.path, pw.pw_uid, pw.pw_gid)
    script = env.path("open_client.py")
    with open(script, "w") as f:
        f.write(OPEN_CLIENT)
    # The filesystem is made through a device of root's, then detached again.
    reply = pydbus_attach(image.path, pydbus_options())
    with detaching(reply):
        run("mkfs.ext4", "-q", "-F", "-U", "8f6e4e51-0a4c-4fb3-9a2b-2d7b43c1d9a1", reply["partitions"][0])
        # Root owns this one: a test user may not Open it.
        p = run("setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                "busctl", "--system", "call", "org.loopd1", reply["device"], DEVICE_IFACE, "Open",
                "a{sv}", "0", check=False,
                env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": os.environ["DBUS_SYSTEM_BUS_ADDRESS"]})
        assert p.returncode != 0 and "owner or root" in p.stderr, f"Open of root's device as {USER}: {p}"
        detach_call(reply["diskseq"])

    p = run("setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
            "--inh-caps=-all", "--bounding-set=-all", "/usr/bin/python3", script, image.path,
            check=False, env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": os.environ["DBUS_SYSTEM_BUS_ADDRESS"]})
    assert p.returncode == 0, f"client as {USER} failed: {p.stderr}"
    out = json.loads(p.stdout)
    try:
        assert out["uid"] == pw.pw_uid, out
        assert out["node_open"] == "denied", f"{USER} could open {out['devnode']}p1 itself: {out}"
        assert out["probe"] == 0 and out.get("TYPE") == "ext4" and \
            out.get("UUID") == "8f6e4e51-0a4c-4fb3-9a2b-2d7b43c1d9a1", f"libblkid on the Open fd: {out}"
        assert out["writable"] is False, "the fd of Open without read-only=false was writable"
        assert out["partition9"] == "org.loopd1.Error.NotFound", out
        verify_detached(out["devnode"], out["diskseq"])
    finally:
        if bound(out["devnode"], out["diskseq"]):
            detach_call(out["diskseq"])


def test_lifetime_fd_released_at_last_close(env):
    """lifetime=fd: the attaching connection leaves after the first Open, the
    device stays while any fd of Open is open (Autoclear=true), and is released
    at the last close, reported as DeviceRemoved(reason autoclear)."""
    image = env.image("gpt3")
    conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
    watcher = SignalWatcher()
    fds = []
    try:
        reply = conn.call_blocking("org.loopd1", MANAGER_PATH, MANAGER_IFACE, "Attach", "sa{sv}",
                                   [image.path, pydbus_options(lifetime=dbus.String("fd"))])
        device, devnode, diskseq = str(reply[0]), str(reply[1]), int(reply[2])
        with detaching(diskseq):
            verify_ready(devnode, diskseq, 3, image.table_uuid)
            for options in ({}, {"partition": dbus.UInt32(2)}):
                fd = conn.call_blocking("org.loopd1", device, DEVICE_IFACE, "Open", "a{sv}",
                                        [pydbus_options(**options)])
                fds.append(fd.take())
            conn.close()  # the client leaves: the fds hold the device now
            assert busctl_get_property(device, DEVICE_IFACE, "Autoclear") is True
            assert busctl_get_property(device, DEVICE_IFACE, "Lifetime") == "fd"
            assert bound(devnode, diskseq), f"{devnode} released while fds of it are open"
            os.close(fds.pop(0))
            assert not watcher.wait_removed(diskseq, time.monotonic() + 0.5), \
                "released while an fd of a partition was still open"
            assert bound(devnode, diskseq), f"{devnode} released with an fd still open"
            # loopd's own hold (and the close of its writable fd, which makes udev
            # try BLKRRPART) is long gone: the partitions are still there.
            assert partition_numbers_in_sysfs(loop_name(devnode)) == [1, 2, 3], \
                f"{devnode}'s partitions after loopd handed over: {partition_numbers_in_sysfs(loop_name(devnode))}"
            os.close(fds.pop())
            reasons = watcher.wait_removed(diskseq, time.monotonic() + SIGNAL_DEADLINE)
            assert reasons == ["autoclear"], f"DeviceRemoved for {diskseq}: {reasons}"
            assert not bound(devnode, diskseq), f"{devnode} still bound after the last close"
            assert device not in listed_objects(), f"{device} still listed"
    finally:
        for fd in fds:
            os.close(fd)
        watcher.close()
        conn.close()


if __name__ == "__main__":
    if os.geteuid() == 0:
        ensure_users()
    main(globals(), polkit=True, polkit_rules=RULES)
