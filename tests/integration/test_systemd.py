"""loopd under a real systemd manager: the project's own loopd.service (hardened,
Type=dbus, watchdog), loopd-image@.service, and the bus activation file, run by
`systemd --user` (see test_systemd_manager.py for how it is kept private).

Readiness is checked at the moment a unit becomes active, never after a sleep: a
dependent unit (Requires= + After= on loopd-image@NAME) runs the checks as its own
ExecStart, which systemd starts the instant the image unit is active.
"""

import json
import os
import random
import re
import signal
import sys
import time

import harness
from harness import loop_name, read_text, verify_ready, verify_detached
from test_systemd_manager import BUILD, json_dump, main

THIS = os.path.abspath(__file__)
# loopd.service's capability bounding set, and why, is in systemd-units/loopd.service.in.
CAPS = {"CAP_DAC_OVERRIDE": 1, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SYS_ADMIN": 21}
EXPOSURE_LIMIT = 2.5


# --------------------------------------------------------------------------- helpers

def make_image_with_marker(m, kind="gpt3"):
    """An image whose first partition starts with a random marker, so a reader of
    by-ref/NAME-part1 proves the link leads to this image's first partition."""
    path = m.path(f"{kind}-{random.randrange(1 << 30)}.img")
    image = harness.IMAGE_MAKERS[kind](path)
    table = json.loads(harness.run("sfdisk", "--json", path).stdout)["partitiontable"]
    offset = table["partitions"][0]["start"] * table.get("sectorsize", 512)
    marker = f"loopd-marker-{random.randrange(1 << 62):x}".encode()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(marker)
    return image, marker.decode()


def reader_unit(m, ref, image, marker):
    """A unit that needs loopd-image@REF and, as its only job, checks readiness and
    reads the first partition through %t/loopd/by-ref (/run/loopd/by-ref under the
    system manager). Its verdict goes to a JSON file; a failed check fails it."""
    result = m.path(f"{ref}-reader.json")
    m.write_unit(f"{ref}-reader.service", f"""[Unit]
Description=reads {ref}'s first partition through its by-ref link
Requires=loopd-image@{ref}.service
After=loopd-image@{ref}.service

[Service]
Type=oneshot
Environment=PYTHONPATH={os.path.dirname(THIS)}
ExecStart=/usr/bin/python3 {THIS} --dependent %t/loopd/by-ref {ref} {image.nparts} {image.table_uuid} {marker} {result}
""")
    return f"{ref}-reader.service", result


def dependent_main(by_ref, ref, nparts, table_uuid, marker, result):
    """Runs inside the reader unit, the moment loopd-image@REF became active."""
    devnode = os.readlink(os.path.join(by_ref, ref))
    diskseq = int(read_text(f"/sys/block/{loop_name(devnode)}/diskseq"))
    verify_ready(devnode, diskseq, int(nparts), table_uuid)
    for k in range(1, int(nparts) + 1):
        link = os.path.join(by_ref, f"{ref}-part{k}")
        assert os.readlink(link) == f"{devnode}p{k}", f"{link} -> {os.readlink(link)}"
    with open(os.path.join(by_ref, f"{ref}-part1"), "rb") as f:
        data = f.read(len(marker))
    assert data == marker.encode(), f"{ref}-part1 starts with {data!r}, not the image's marker"
    json_dump(result, {"devnode": devnode, "diskseq": diskseq})


def exec_start_of(unit_path):
    with open(unit_path) as f:
        return next(line.split("=", 1)[1].strip() for line in f if line.startswith("ExecStart="))


def name_owner_pid(m):
    out = m.busctl("--json=short", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                   "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s", "org.loopd1").stdout
    return json.loads(out)["data"][0]


def name_has_owner(m):
    out = m.busctl("--json=short", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                   "org.freedesktop.DBus", "NameHasOwner", "s", "org.loopd1").stdout
    return json.loads(out)["data"][0]


def check_sandbox(pid):
    """What loopd.service promises is really in force for the running loopd."""
    status = dict(line.split(":", 1) for line in read_text(f"/proc/{pid}/status").splitlines())
    bounding = int(status["CapBnd"].strip(), 16)
    expected = sum(1 << bit for bit in CAPS.values())
    assert bounding == expected, \
        f"loopd's bounding set is {bounding:#x}, the unit says {expected:#x} ({sorted(CAPS)})"
    assert status["NoNewPrivs"].strip() == "1", "NoNewPrivileges= is not in force"
    assert status["Seccomp"].strip() == "2", "no system call filter is in force"
    mounts = [line.split() for line in read_text(f"/proc/{pid}/mountinfo").splitlines()]
    options = {fields[4]: fields[5].split(",") for fields in mounts}
    # ProtectSystem=full: the OS (/usr, /etc) is read-only; /var and /srv stay
    # writable so Attach by path can open images read-write.
    for path in ("/usr", "/etc"):
        assert "ro" in options.get(path, []), f"{path} is not read-only for loopd: {options.get(path)}"
    assert "rw" in options.get("/sys/devices/virtual/block", []), \
        "/sys/devices/virtual/block is not writable for loopd (lost-event triggers)"
    assert os.path.exists(f"/proc/{pid}/root/run/udev/control"), "loopd cannot see udevd"
    # The autoclear open watch (fanotify_init and fanotify_mark, taken back from
    # @privileged): loopd holds its fanotify fd.
    fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert "anon_inode:[fanotify]" in fds, "loopd has no fanotify fd: autoclear opens are not watched"


def exposure(m, unit):
    out = harness.run("systemd-analyze", "--user", "security", "--no-pager", unit, env=m.env).stdout
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert found, f"no exposure level in: {out[-500:]}"
    return float(found.group(1))


# --------------------------------------------------------------------------- tests

def test_image_unit_ready_reader_and_stop(m):
    image, marker = make_image_with_marker(m)
    m.image_config("t1", f"# test image\nimage = {image.path}\nread-only = no\n")
    reader, result = reader_unit(m, "t1", image, marker)
    m.reload()
    assert m.show("loopd-image@t1.service", "ActiveState")["ActiveState"] == "inactive"

    # Pulls in loopd-image@t1 (and loopd.service); the reader runs the moment t1 is active.
    m.systemctl("start", reader)
    with open(result) as f:
        seen = json.load(f)
    devnode, diskseq = seen["devnode"], seen["diskseq"]
    unit = m.show("loopd-image@t1.service", "ActiveState", "SubState", "StatusText")
    assert unit["ActiveState"] == "active", unit
    assert unit["StatusText"] == f"Holding {devnode} (diskseq {diskseq})", unit
    assert os.path.realpath(read_text(f"/sys/block/{loop_name(devnode)}/loop/backing_file")) == \
        os.path.realpath(image.path)

    m.systemctl("stop", "loopd-image@t1.service")
    # stop returns when loopctl has exited, i.e. after loopd confirmed the detach.
    verify_detached(devnode, diskseq)
    for name in ["t1"] + [f"t1-part{k}" for k in range(1, image.nparts + 1)]:
        assert not os.path.lexists(m.by_ref(name)), f"by-ref/{name} outlived the detach"
    unit = m.show("loopd-image@t1.service", "ActiveState", "Result")
    assert unit == {"ActiveState": "inactive", "Result": "success"}, unit
    devices = json.loads(m.busctl("--json=short", "get-property", "org.loopd1", "/org/loopd1",
                                  "org.loopd1.Manager", "Devices").stdout)["data"]
    assert devices == 0, f"loopd still has {devices} device(s)"


def test_missing_image_fails_with_loopds_error(m):
    missing = m.path("missing.img")
    m.image_config("t2", f"image = {missing}\n")
    image, marker = make_image_with_marker(m, "mbr2")  # only for the reader's arguments
    reader, result = reader_unit(m, "t2", image, marker)
    m.reload()

    p = m.systemctl("start", reader, check=False)
    assert p.returncode != 0, "starting a unit that needs a missing image succeeded"
    unit = m.show("loopd-image@t2.service", "ActiveState", "Result", "StatusText")
    assert unit["ActiveState"] == "failed" and unit["Result"] == "exit-code", unit
    assert unit["StatusText"].startswith("org.loopd1.Error.NotFound: ") and missing in unit["StatusText"], \
        f"status text is not loopd's error: {unit['StatusText']!r}"
    log = m.log("loopd-image@t2.service")
    assert "org.loopd1.Error.NotFound" in log and missing in log, f"loopd's error not logged: {log!r}"
    assert not os.path.exists(result), "the dependent unit ran although its image failed"
    assert m.show("loopd.service", "ActiveState")["ActiveState"] == "active", \
        "loopd itself should be unaffected by a bad image"
    assert not os.listdir(m.by_ref()), f"by-ref links left: {os.listdir(m.by_ref())}"


def test_image_unit_fails_when_its_device_goes(m):
    """Someone else detaches the held device: the image unit must not stay active
    with nothing behind it."""
    image, _ = make_image_with_marker(m, "mbr2")
    m.image_config("t4", f"image = {image.path}\n")
    m.reload()
    m.systemctl("start", "loopd-image@t4.service")
    devnode = os.readlink(m.by_ref("t4"))
    diskseq = int(read_text(f"/sys/block/{loop_name(devnode)}/diskseq"))

    m.busctl("call", "org.loopd1", "/org/loopd1", "org.loopd1.Manager", "Detach", "ta{sv}",
             str(diskseq), "0")
    verify_detached(devnode, diskseq)
    deadline = time.monotonic() + 10
    while (unit := m.show("loopd-image@t4.service", "ActiveState", "Result", "StatusText"))["ActiveState"] \
            != "failed":
        # loopctl reacts to DeviceRemoved; this waits for systemd to record its exit.
        assert time.monotonic() < deadline, f"image unit still {unit} after its device went"
        time.sleep(0.05)
    assert unit["Result"] == "exit-code" and "removed (detached)" in unit["StatusText"], unit


def test_restart_of_loopd_keeps_image_devices(m):
    """`systemctl restart loopd.service` (what the package's postinst does on an
    upgrade) keeps the image unit running and its device attached: the new loopd
    adopts it under the same diskseq, and a later stop still detaches it."""
    image, _ = make_image_with_marker(m)
    m.image_config("t5", f"image = {image.path}\n")
    m.reload()
    m.systemctl("start", "loopd-image@t5.service")
    devnode = os.readlink(m.by_ref("t5"))
    diskseq = int(read_text(f"/sys/block/{loop_name(devnode)}/diskseq"))
    holder = m.show("loopd-image@t5.service", "MainPID", "ActiveState")
    loopd_pid = m.show("loopd.service", "MainPID")["MainPID"]

    m.systemctl("restart", "loopd.service")
    assert m.show("loopd.service", "MainPID")["MainPID"] != loopd_pid, "loopd.service did not restart"
    now = m.show("loopd-image@t5.service", "MainPID", "ActiveState")
    assert now == holder, f"restarting loopd.service restarted the image unit: {holder} -> {now}"
    obj = f"/org/loopd1/device/{diskseq}"
    # As a user of a device attached before the restart would: the new loopd
    # lists it once udev has processed partitions it had to re-add.
    m.busctl("call", "org.loopd1", "/org/loopd1", "org.loopd1.Manager", "WaitReady", "st", str(diskseq), "0")
    adopted = json.loads(m.busctl("--json=short", "get-property", "org.loopd1", obj,
                                  "org.loopd1.Device", "DiskSeq").stdout)["data"]
    assert adopted == diskseq, f"{obj} not adopted by the new loopd: {adopted}"
    verify_ready(devnode, diskseq, image.nparts, image.table_uuid)
    assert os.readlink(m.by_ref("t5")) == devnode

    m.systemctl("stop", "loopd-image@t5.service")
    verify_detached(devnode, diskseq)
    unit = m.show("loopd-image@t5.service", "ActiveState", "Result")
    assert unit == {"ActiveState": "inactive", "Result": "success"}, unit


def test_image_unit_bound_to_its_filesystem(m):
    """loopd-image-generator binds loopd-image@NAME to the filesystem holding its
    image (RequiresMountsFor=): with the image on a tmpfs mount unit, the image
    unit requires and follows the mount, and stopping the mount stops the image
    unit first (the device is detached), then unmounts (which a loop device still
    holding the tmpfs would have made fail)."""
    where = m.path("imagefs")
    os.makedirs(where)
    mount = harness.run("systemd-escape", "--path", "--suffix=mount", where).stdout.strip()
    m.write_unit(mount, "[Unit]\nDescription=tmpfs holding an image\n"
                        f"[Mount]\nWhat=tmpfs\nWhere={where}\nType=tmpfs\nOptions=size=80m\n")
    image = os.path.join(where, "disk.img")
    # The manager (and so the mount) lives in a mount namespace of its own: the
    # image is made there, by a unit on the mount.
    script = m.path("make-image.sh")
    with open(script, "w") as f:
        f.write(f"truncate -s 64M {image}\nprintf 'label: gpt\\n size=8MiB\\n size=8MiB\\n size=8MiB\\n' "
                f"| sfdisk -q {image}\n")
    m.write_unit("make-image.service", f"[Unit]\nRequires={mount}\nAfter={mount}\n"
                                       f"[Service]\nType=oneshot\nExecStart=/bin/sh {script}\n")
    m.image_config("t7", f"image = {image}\n")
    harness.run("/bin/sh", os.path.join(BUILD, "loopd-image-generator"), m.units,
                env={**os.environ, "LOOPD_IMAGES_DIR": m.images})
    m.reload()
    m.systemctl("start", "make-image.service")
    unit = m.show("loopd-image@t7.service", "RequiresMountsFor", "Requires", "After")

    def names(value):  # systemctl show quotes names with escapes, doubling the backslash
        return [n.strip('"').replace("\\\\", "\\") for n in value.split()]
    assert image in unit["RequiresMountsFor"] and mount in names(unit["Requires"]) and \
        mount in names(unit["After"]), f"loopd-image@t7 is not bound to {mount}: {unit}"

    m.systemctl("start", "loopd-image@t7.service")
    devnode = os.readlink(m.by_ref("t7"))
    diskseq = int(read_text(f"/sys/block/{loop_name(devnode)}/diskseq"))
    verify_ready(devnode, diskseq, 3)

    m.systemctl("stop", mount)  # returns once its jobs are done: the image unit's first
    verify_detached(devnode, diskseq)
    assert m.show("loopd-image@t7.service", "ActiveState")["ActiveState"] == "inactive"
    state = m.show(mount, "ActiveState", "Result")
    assert state == {"ActiveState": "inactive", "Result": "success"}, f"{mount}: {state}"


def test_bus_activation_starts_hardened_loopd(m):
    """A call to org.loopd1 with loopd not running: dbus-daemon asks systemd for
    SystemdService=loopd.service, systemd starts it (Type=dbus: active once it owns
    the name), the call is delivered and answered when ready."""
    assert m.show("loopd.service", "ActiveState")["ActiveState"] == "inactive"
    assert not name_has_owner(m), "org.loopd1 is owned before any call"
    image = harness.make_gpt3(m.path("act.img"))

    # Read-only: loopd opens a path as the caller in its own, read-only view of the
    # file system (ProtectSystem=strict); read-write images come as fds (AttachFd).
    options = {"ref": ("s", "act"), "read-only": ("b", True)}
    p = m.busctl(*harness.busctl_attach_cmd(image.path, options)[2:], check=False)
    assert p.returncode == 0, f"Attach through activation failed: {p.stderr.strip()}"
    reply = harness.parse_busctl_attach(p.stdout)
    diskseq = harness.verify_reply(reply, image)

    unit = m.show("loopd.service", "ActiveState", "MainPID", "NRestarts")
    assert unit["ActiveState"] == "active", unit
    pid = int(unit["MainPID"])
    assert pid == name_owner_pid(m), "org.loopd1 is not owned by loopd.service's main process"
    assert os.readlink(m.by_ref("act")) == reply["devnode"]
    check_sandbox(pid)
    score = exposure(m, "loopd.service")
    print(f"# systemd-analyze security loopd.service: {score}")
    assert score <= EXPOSURE_LIMIT, f"exposure {score} > {EXPOSURE_LIMIT}"

    m.busctl("call", "org.loopd1", "/org/loopd1", "org.loopd1.Manager", "Detach", "ta{sv}",
             str(diskseq), "0")
    verify_detached(reply["devnode"], diskseq)


def test_hardened_loopd_recovers_a_lost_event(m):
    """The sandbox leaves /sys/devices/virtual/block writable: with the first
    kernel and udev events for partition 1 dropped on purpose (as kernels 5.19-6.14
    drop some), loopd must write a synthetic change to its uevent file."""
    command = exec_start_of(os.path.join(m.units, "loopd.service"))
    m.drop_in("loopd.service", f"[Service]\nExecStart=\nExecStart={command} --log-level=debug "
              "--test-drop=part1 --test-drop=kernel:part1\n")
    image, _ = make_image_with_marker(m)
    m.image_config("t3", f"image = {image.path}\n")
    m.reload()

    m.systemctl("start", "loopd-image@t3.service")
    devnode = os.readlink(m.by_ref("t3"))
    diskseq = int(read_text(f"/sys/block/{loop_name(devnode)}/diskseq"))
    verify_ready(devnode, diskseq, image.nparts, image.table_uuid)
    log = m.log("loopd.service")
    assert "synthetic trigger" in log, "loopd never needed a synthetic trigger: the test proves nothing"
    assert not re.search(r"synthetic trigger dev=\S+ failed", log), f"a trigger failed: {log[-2000:]}"

    m.systemctl("stop", "loopd-image@t3.service")
    verify_detached(devnode, diskseq)


def test_watchdog_restarts_a_stuck_loopd(m):
    m.drop_in("loopd.service", "[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\n")
    m.reload()
    m.systemctl("start", "loopd.service")
    first = m.show("loopd.service", "MainPID", "NRestarts")
    # Elapsed time is what is tested here: 2.5 watchdog periods with a live loop
    # must not trip it: the loop thread's WATCHDOG=1 pings reach the manager.
    time.sleep(5)
    now = m.show("loopd.service", "ActiveState", "MainPID", "NRestarts")
    assert now == {"ActiveState": "active", **first}, f"watchdog tripped on a live loopd: {first} -> {now}"

    os.kill(int(first["MainPID"]), signal.SIGSTOP)  # a loop that never comes back
    deadline = time.monotonic() + 30
    while True:
        now = m.show("loopd.service", "ActiveState", "MainPID", "NRestarts")
        if int(now["NRestarts"]) >= 1 and now["ActiveState"] == "active":
            break
        assert time.monotonic() < deadline, f"no watchdog restart within 30 s: {now}"
        time.sleep(0.2)
    assert now["MainPID"] != first["MainPID"], now
    assert not os.path.exists(f"/proc/{first['MainPID']}/status") or \
        "zombie" in read_text(f"/proc/{first['MainPID']}/status"), "the stuck loopd still lives"
    source = json.loads(m.busctl("--json=short", "get-property", "org.loopd1", "/org/loopd1",
                                 "org.loopd1.Manager", "ReadinessSource").stdout)["data"]
    assert source == "udev", source


def sanitized(binary):
    with open(binary, "rb") as f:
        return b"__asan_init" in f.read()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--dependent":
        dependent_main(*sys.argv[2:])
    elif os.geteuid() == 0 and sanitized(harness.LOOPD):
        # The production sandbox denies what ASan/LSan need (ptrace for the leak
        # check, writing reports to log_path); loopd's memory safety is what the
        # other integration tests check under sanitizers.
        print("SKIP: loopd.service's sandbox is for the production build, not ASan's")
        sys.exit(77)
    else:
        main(globals())
