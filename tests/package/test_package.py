"""The Debian package as a user gets it: installed on this machine with dpkg, run
as installed, and purged without a trace.

  test_package.py DEB        (scripts/test runs it on what scripts/package built)

1. `dpkg -i DEB`: every file lands where it belongs (/usr/sbin/loopd,
   /usr/bin/loopctl, the units in systemd.pc's unit directory, the bus policy in
   /usr/share/dbus-1/system.d, the activation file, the polkit actions, both man
   pages); debhelper's maintainer scripts enabled loopd.service (its Alias=), did
   not start anything (no systemd runs here, as in a chroot), and restart rather
   than stop it on an upgrade.
2. The INSTALLED /usr/sbin/loopd under a real systemd manager (the
   test_systemd_manager.py fixture) that loads the INSTALLED unit files and
   activation file, next to a bus that includes the INSTALLED policy: a busctl
   call activates it, busctl and /usr/bin/loopctl attach and detach images, an
   image unit (loopd-image@NAME) holds one, and `systemctl restart loopd.service`
   (what the postinst does on an upgrade) keeps every device: the same diskseq,
   object and image unit, adopted by the new loopd.
3. `dpkg --purge loopd`: nothing of `dpkg -L loopd` is left, and no file or link
   named *loopd* appeared anywhere under /etc, /usr, /var/lib, /var/cache,
   /var/log, /opt or /srv (enable links, dpkg's own records, debhelper's state).

Whatever fails, the package is purged, the manager and its processes stopped and
the loop devices detached. A loopd package installed before the test is left
alone (the test refuses to run). Files of the package that existed before
without belonging to any package (scripts/run installs the bus policy by hand)
are put back after the purge.

Root; exits 77 otherwise. Uses loop devices and udevd: run it under
`flock /tmp/loopd-itest.lock`, like the integration tests.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(HERE))
SBIN_LOOPD = "/usr/sbin/loopd"
BIN_LOOPCTL = "/usr/bin/loopctl"
# The harness's clients (loopctl_attach_json, ...) use these.
os.environ["LOOPD"] = SBIN_LOOPD
os.environ["LOOPCTL"] = BIN_LOOPCTL
os.environ.setdefault("LOOPD_SRC", SRC)
sys.path.insert(0, os.path.join(SRC, "tests/integration"))

import harness  # noqa: E402
from harness import loop_name, read_text, run, verify_detached, verify_ready, verify_reply  # noqa: E402
from test_systemd_manager import UserManager  # noqa: E402

PACKAGE = "loopd"
POLICY = "/usr/share/dbus-1/system.d/org.loopd1.conf"
ACTIVATION = "/usr/share/dbus-1/system-services/org.loopd1.service"
IMAGES_DIR = "/etc/loopd/images"
SEARCH_ROOTS = ("/etc", "/usr", "/var/lib", "/var/cache", "/var/log", "/opt", "/srv")
# /usr/share/dbus-1/system.d/org.loopd1.conf and the like, the units, dpkg's
# records, /etc/systemd/system/dbus-org.loopd1.service: all named *loopd*.
NAME_PATTERN = "*loopd*"


def unit_dir():
    return run("pkg-config", "--variable=systemdsystemunitdir", "systemd").stdout.strip()


def expected_files():
    units = unit_dir()
    return {
        SBIN_LOOPD: "x", BIN_LOOPCTL: "x",
        f"{units}/loopd.service": "f", f"{units}/loopd-image@.service": "f",
        POLICY: "f", ACTIVATION: "f",
        "/usr/share/dbus-1/interfaces/org.loopd1.xml": "f",
        "/usr/share/polkit-1/actions/org.loopd1.policy": "f",
        "/usr/share/man/man8/loopd.8.gz": "f", "/usr/share/man/man1/loopctl.1.gz": "f",
        "/usr/share/doc/loopd/copyright": "f",
        IMAGES_DIR: "d",
    }


# --------------------------------------------------------------------------- dpkg

def dpkg_status(package):
    """dpkg's two-letter state ("ii" installed, "un"/"pn" not), "" if unknown."""
    p = run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", package, check=False)
    return p.stdout.strip() if p.returncode == 0 else ""


def not_installed(package):
    return dpkg_status(package) in ("", "un", "pn")


def deb_paths(deb):
    """The paths the .deb holds (dpkg -c), without the leading '.'."""
    paths = []
    for line in run("dpkg", "-c", deb).stdout.splitlines():
        name = line.split(None, 5)[5].split(" -> ")[0]
        name = name.removeprefix(".").rstrip("/")
        if name:
            paths.append(name)
    return paths


def owned_by_a_package(path):
    return run("dpkg", "-S", path, check=False).returncode == 0


def loopd_named_files():
    found = set()
    for root in SEARCH_ROOTS:
        p = subprocess.run(["find", root, "-xdev", "-name", NAME_PATTERN], capture_output=True, text=True)
        found.update(p.stdout.split())
    return found


def dpkg(*args):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run(["dpkg", *args], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, f"dpkg {' '.join(args)} exited {p.returncode}:\n{p.stdout}{p.stderr}"
    return p.stdout


# --------------------------------------------------------------------------- checks

def check_installed_files():
    listed = set(run("dpkg", "-L", PACKAGE).stdout.split())
    for path, kind in expected_files().items():
        assert path in listed, f"{path} is not in dpkg -L {PACKAGE}"
        if kind == "x":
            assert os.path.isfile(path) and os.access(path, os.X_OK), f"{path} is not an executable"
        elif kind == "d":
            assert os.path.isdir(path), f"{path} is not a directory"
        else:
            assert os.path.isfile(path), f"{path} is not a file"
    units = unit_dir()
    service = read_text(f"{units}/loopd.service")
    assert f"ExecStart={SBIN_LOOPD} " in service, service
    assert f"ExecStart={BIN_LOOPCTL} attach --hold --ref=%i --config={IMAGES_DIR}/%i.conf" in \
        read_text(f"{units}/loopd-image@.service")
    assert f"Exec={SBIN_LOOPD}\n" in read_text(ACTIVATION), read_text(ACTIVATION)
    # The pages render, and name the installed locations.
    page = run("man", "-P", "cat", "-l", "/usr/share/man/man8/loopd.8.gz",
               env=dict(os.environ, MANWIDTH="200")).stdout
    assert "/etc/loopd/loopd.conf" in page and f"{units}/loopd.service" in page, page
    page = run("man", "-P", "cat", "-l", "/usr/share/man/man1/loopctl.1.gz").stdout
    assert "loopctl - attach and detach loop devices" in page, page
    return listed


def check_maintainer_scripts():
    """debhelper's dh_installsystemd: enabled (the Alias= link), nothing started
    without a running systemd (a chroot, this machine), restart on upgrade, stop
    only on removal."""
    link = "/etc/systemd/system/dbus-org.loopd1.service"
    assert os.path.islink(link) and os.readlink(link) == f"{unit_dir()}/loopd.service", \
        f"{link} is not the Alias= link to loopd.service (enabled by the postinst)"
    if os.path.isdir("/run/systemd/system"):
        print("# systemd runs as init here: the postinst may start loopd.service; not checked")
    else:
        p = run("pgrep", "-x", "loopd", check=False)
        running = [pid for pid in p.stdout.split() if os.path.realpath(f"/proc/{pid}/exe") == SBIN_LOOPD]
        assert not running, f"dpkg -i without a running systemd started {SBIN_LOOPD}: {running}"
    postinst = read_text(f"/var/lib/dpkg/info/{PACKAGE}.postinst")
    assert "_dh_action=restart" in postinst and "deb-systemd-invoke $_dh_action 'loopd.service'" in postinst, \
        f"postinst does not restart loopd.service on upgrade:\n{postinst}"
    assert "[ -d /run/systemd/system ]" in postinst, "postinst starts loopd.service without systemd"
    prerm = read_text(f"/var/lib/dpkg/info/{PACKAGE}.prerm")
    assert "deb-systemd-invoke stop 'loopd.service'" in prerm and '"$1" = remove' in prerm, \
        f"prerm should stop loopd.service on removal only:\n{prerm}"
    for script in ("preinst", "postrm", "prerm", "postinst"):
        path = f"/var/lib/dpkg/info/{PACKAGE}.{script}"
        if os.path.exists(path):
            text = read_text(path)
            body = [ln for ln in text.splitlines()
                    if ln.strip() and not ln.startswith("#") and ln.strip() != "set -e"]
            assert "# Automatically added by dh_" in text or not body, \
                f"{script} has content debhelper did not generate:\n{text}"


class InstalledUnits(UserManager):
    """The fixture's systemd manager and bus, with the package's own files: the
    unit files and activation file linked from where dpkg put them, the policy
    included from there."""

    policy_file = POLICY

    def _write_project_units(self):
        units = unit_dir()
        for name in ("loopd.service", "loopd-image@.service"):
            os.symlink(f"{units}/{name}", os.path.join(self.units, name))
        os.symlink(ACTIVATION, os.path.join(self.services, "org.loopd1.service"))


def main_pid_exe(m, unit):
    pid = int(m.show(unit, "MainPID")["MainPID"])
    assert pid > 0, f"{unit} has no main process"
    return pid, os.path.realpath(f"/proc/{pid}/exe")


def device_diskseq(m, obj):
    out = m.busctl("get-property", "org.loopd1", obj, "org.loopd1.Device", "DiskSeq").stdout.split()
    assert out[0] == "t", out
    return int(out[1])


def run_installed(m, image_name):
    """Attach and detach through busctl, loopctl and an image unit; restart loopd
    in between. m: the manager; image_name: NAME of loopd-image@NAME."""
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = m.bus_address  # the harness's busctl and loopctl
    for unit in ("loopd.service", f"loopd-image@{image_name}.service"):
        fragment = os.path.realpath(m.show(unit, "FragmentPath")["FragmentPath"])
        assert os.path.dirname(fragment) == os.path.realpath(unit_dir()), f"{unit} is loaded from {fragment}, not the installed file"
    assert m.show("loopd.service", "ActiveState")["ActiveState"] == "inactive"

    # busctl: the call activates the installed loopd.service.
    a = harness.make_gpt3(m.path("a.img"))
    reply_a = harness.busctl_attach(a.path, {"ref": ("s", "pkg-a")})
    diskseq_a = verify_reply(reply_a, a)
    pid, exe = main_pid_exe(m, "loopd.service")
    assert exe == SBIN_LOOPD, f"org.loopd1 is served by {exe}, not the installed {SBIN_LOOPD}"
    print(f"# busctl: {reply_a['devnode']} diskseq {diskseq_a}, served by {exe} (pid {pid})")

    # /usr/bin/loopctl.
    b = harness.make_mbr2(m.path("b.img"))
    reply_b = harness.loopctl_attach_json(b.path, "--ref", "pkg-b")
    diskseq_b = verify_reply(reply_b, b)
    listing = run(BIN_LOOPCTL, "list").stdout
    assert reply_a["devnode"] in listing and reply_b["devnode"] in listing, listing

    # An image unit holds a third device.
    c = harness.make_gpt3(m.path("c.img"))
    with open(f"{IMAGES_DIR}/{image_name}.conf", "w") as f:
        f.write(f"# written by tests/package/test_package.py\nimage = {c.path}\n")
    image_unit = f"loopd-image@{image_name}.service"
    m.systemctl("start", image_unit)
    devnode_c = os.readlink(m.by_ref(image_name))
    diskseq_c = int(read_text(f"/sys/block/{loop_name(devnode_c)}/diskseq"))
    verify_ready(devnode_c, diskseq_c, c.nparts, c.table_uuid)
    holder = m.show(image_unit, "MainPID", "ActiveState")
    print(f"# loopctl: {reply_b['devnode']} diskseq {diskseq_b}; {image_unit}: {devnode_c} diskseq {diskseq_c}")

    # What the postinst does on an upgrade: every device stays, adopted.
    m.systemctl("restart", "loopd.service")
    new_pid, exe = main_pid_exe(m, "loopd.service")
    assert new_pid != pid and exe == SBIN_LOOPD, (pid, new_pid, exe)
    print(f"# restarted loopd.service: pid {pid} -> {new_pid}; {image_unit} kept pid {holder['MainPID']}")
    assert m.show(image_unit, "MainPID", "ActiveState") == holder, \
        f"restarting loopd.service restarted {image_unit}: {holder} -> {m.show(image_unit, 'MainPID', 'ActiveState')}"
    assert device_diskseq(m, reply_a["device"]) == diskseq_a, "busctl's device not adopted under its object"
    assert device_diskseq(m, reply_b["device"]) == diskseq_b, "loopctl's device not adopted under its object"
    for devnode, diskseq, image in ((reply_a["devnode"], diskseq_a, a), (reply_b["devnode"], diskseq_b, b),
                                    (devnode_c, diskseq_c, c)):
        verify_ready(devnode, diskseq, image.nparts, image.table_uuid)
    assert os.readlink(m.by_ref(image_name)) == devnode_c
    status = run(BIN_LOOPCTL, "status", "--json", image_name).stdout
    assert f'"DiskSeq": {diskseq_c}' in status, status

    # Detach: busctl, loopctl, the image unit's stop.
    harness.busctl_detach(diskseq_a)
    verify_detached(reply_a["devnode"], diskseq_a)
    harness.loopctl_detach("pkg-b")
    verify_detached(reply_b["devnode"], diskseq_b)
    m.systemctl("stop", image_unit)
    verify_detached(devnode_c, diskseq_c)
    devices = m.busctl("get-property", "org.loopd1", "/org/loopd1", "org.loopd1.Manager", "Devices").stdout
    assert devices.split() == ["u", "0"], devices


# --------------------------------------------------------------------------- main

class Steps:
    def __init__(self):
        self.failed = []
        self.passed = 0

    def run(self, name, fn, *args):
        started = time.monotonic()
        try:
            result = fn(*args)
        except Exception as e:
            self.failed.append(name)
            print(f"FAIL {name}: {e}")
            if not isinstance(e, AssertionError) or os.environ.get("LOOPD_TEST_TRACEBACK"):
                traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
            return None
        self.passed += 1
        print(f"PASS {name} ({time.monotonic() - started:.2f} s)")
        sys.stdout.flush()
        return result


def back_up_unowned(paths, store):
    """Files the package would overwrite that no package owns (scripts/run's copy
    of the bus policy): kept in store, {path: copy}."""
    saved = {}
    for path in paths:
        if os.path.isfile(path) and not os.path.islink(path) and not owned_by_a_package(path):
            copy = os.path.join(store, str(len(saved)))
            shutil.copy2(path, copy)
            saved[path] = copy
    return saved


def purge_and_check(listed, dirs_before, files_before, saved):
    dpkg("--purge", PACKAGE)
    assert not_installed(PACKAGE), f"after purge: dpkg status {dpkg_status(PACKAGE)!r}"
    left = []
    for path in sorted(listed):
        if not os.path.lexists(path) or path in saved or path == "/.":
            continue
        if path in dirs_before:
            continue  # a directory that was there before (/usr/share/man/man8, /lib -> usr/lib)
        left.append(path)
    assert not left, f"dpkg --purge left files of dpkg -L {PACKAGE}: {left}"
    new = loopd_named_files() - files_before
    assert not new, f"after dpkg --purge, files named {NAME_PATTERN} that were not there before: {sorted(new)}"


def main():
    if os.geteuid() != 0:
        print("SKIP: installing a package needs root")
        sys.exit(77)
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".deb"):
        print(__doc__)
        sys.exit(2)
    deb = os.path.abspath(sys.argv[1])
    # SIGTERM (a timeout) unwinds like a failure: the package is still purged.
    signal.signal(signal.SIGTERM, harness._on_sigterm)
    if not not_installed(PACKAGE):
        print(f"FAIL: package {PACKAGE} is installed already ({dpkg_status(PACKAGE)!r}); "
              f"this test installs and purges it, so it leaves yours alone")
        sys.exit(1)

    steps = Steps()
    image_name = f"pkgtest{os.getpid()}"
    store = tempfile.mkdtemp(prefix="loopd-package-backup-", dir="/var/tmp")
    paths = deb_paths(deb)
    dirs_before = {p for p in paths if os.path.isdir(p)}
    files_before = loopd_named_files()
    saved = back_up_unowned(paths, store)
    listed = None
    try:
        steps.run("dpkg -i", dpkg, "-i", deb)
        if dpkg_status(PACKAGE) == "ii":
            listed = steps.run("installed files", check_installed_files)
            steps.run("maintainer scripts", check_maintainer_scripts)

            def installed_under_systemd():
                with InstalledUnits() as m:
                    try:
                        run_installed(m, image_name)
                    finally:
                        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
            steps.run("installed loopd under systemd: busctl, loopctl, image unit, restart",
                      installed_under_systemd)
    finally:
        # The manager has stopped (its exit stops every unit and detaches leaks).
        conf = f"{IMAGES_DIR}/{image_name}.conf"
        if os.path.exists(conf):
            os.unlink(conf)
        if listed is None:
            listed = set(run("dpkg", "-L", PACKAGE, check=False).stdout.split())
        if not not_installed(PACKAGE):
            steps.run("dpkg --purge leaves nothing", purge_and_check, listed, dirs_before, files_before, saved)
        for path, copy in saved.items():
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                shutil.copy2(copy, path)
        shutil.rmtree(store, ignore_errors=True)
    print(f"{steps.passed} passed, {len(steps.failed)} failed")
    sys.exit(1 if steps.failed else 0)


if __name__ == "__main__":
    main()
