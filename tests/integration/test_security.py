#!/usr/bin/python3
"""Who may attach what (issue 4, API.md "Security"), against a real polkitd on the
private bus (Env(polkit=True)) with the test rules below, and non-root clients: the
test users run python3-dbus (exact error names) through runuser or setpriv.

Test users (created with useradd --system if missing, and kept: concurrent runs
share them):
  loopd-test   polkit: org.loopd1.attach                 (not detach-others)
  loopd-test2  polkit: org.loopd1.detach-others          (not attach)
  loopd-test3  polkit: org.loopd1.attach; its primary group is not its uid, and the
               group whose gid equals its uid is not one of its groups
Everything else falls to the actions' defaults (auth_admin) with no agent: refused.
Without logind subjects have no session, so the rules decide by subject.user.
"""

import gc
import grp
import json
import os
import pwd
import threading
import time

import dbus

from harness import (BUS_NAME, DEVICE_IFACE, MANAGER_IFACE, CallError, busctl_get_property,
                     detach_quietly, detaching, expect_error, force_detach, main,
                     pydbus_attach, pydbus_call, pydbus_options, read_text, run,
                     verify_detached, verify_ready, verify_reply)

USER = "loopd-test"
SLOW_POLKIT = 3  # seconds polkit's rule takes for the squat test
USER2 = "loopd-test2"
USER3 = "loopd-test3"
USER3_GROUP = "loopd-test3p"     # loopd-test3's primary group, gid != its uid
UID_GROUP = "loopd-test3u"       # made with gid == loopd-test3's uid if no group has it

RULES = f"""// loopd integration tests (tests/integration/test_security.py), removed after the run.
polkit.addRule(function(action, subject) {{
    // A check that takes its time (an agent waiting for a password), then says no.
    if (action.id == "org.loopd1.attach" && subject.user == "{USER}" &&
        action.lookup("loopd.ref") == "squat") {{
        polkit.spawn(["sleep", "{SLOW_POLKIT}"]);
        return polkit.Result.NO;
    }}
    if (action.id == "org.loopd1.attach" &&
        (subject.user == "{USER}" || subject.user == "{USER3}"))
        return polkit.Result.YES;
    if (action.id == "org.loopd1.detach-others" && subject.user == "{USER2}")
        return polkit.Result.YES;
}});
"""

ACCESS_DENIED = "org.loopd1.Error.AccessDenied"
BUS_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"

# The non-root client: one D-Bus connection, one operation, a JSON answer on stdout.
# Written into the test's temp dir and run as a test user with Debian's python3.
CLIENT = r'''
import dbus, json, os, sys

bus = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
NAME, MANAGER = "org.loopd1", "/org/loopd1"

def plain(v):
    if isinstance(v, (list, dbus.Array, dbus.Struct, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, (dict, dbus.Dictionary)):
        return {plain(k): plain(x) for k, x in v.items()}
    if isinstance(v, dbus.Boolean):
        return bool(v)
    if isinstance(v, (int, dbus.Byte)):
        return int(v)
    if isinstance(v, str):
        return str(v)
    return v

def options(text):
    out = dbus.Dictionary({}, signature="sv")
    for k, v in json.loads(text).items():
        out[k] = dbus.Boolean(v) if isinstance(v, bool) else \
                 dbus.UInt64(v) if isinstance(v, int) else dbus.String(v)
    return out

def call(method, sig, args, path=MANAGER, iface="org.loopd1.Manager", dest=NAME):
    return bus.call_blocking(dest, path, iface, method, sig, args, timeout=60)

def answer(fn):
    try:
        return {"ok": plain(fn())}
    except dbus.exceptions.DBusException as e:
        return {"error": e.get_dbus_name(), "message": e.get_dbus_message()}

def prop(obj, name):
    return plain(call("Get", "ss", ["org.loopd1.Device", name], path=obj,
                      iface="org.freedesktop.DBus.Properties"))

op, args = sys.argv[1], sys.argv[2:]
if op == "id":
    out = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
           "bus": answer(lambda: call("GetConnectionCredentials", "s", [bus.get_unique_name()],
                                      path="/org/freedesktop/DBus", iface="org.freedesktop.DBus",
                                      dest="org.freedesktop.DBus"))}
elif op == "attach":
    out = answer(lambda: call("Attach", "sa{sv}", [args[0], options(args[1])]))
elif op == "attachfd":
    fd = os.open(args[0], os.O_RDWR if args[1] == "rw" else os.O_RDONLY)
    out = answer(lambda: call("AttachFd", "ha{sv}", [dbus.types.UnixFd(fd), options(args[2])]))
elif op == "detach":
    out = answer(lambda: call("Detach", "ta{sv}", [dbus.UInt64(int(args[0])),
                                                   dbus.Dictionary({}, signature="sv")]))
elif op == "device-detach":
    out = answer(lambda: call("Detach", "a{sv}", [dbus.Dictionary({}, signature="sv")],
                              path=args[0], iface="org.loopd1.Device"))
elif op == "resize":
    out = answer(lambda: call("Resize", "a{sv}", [dbus.Dictionary({}, signature="sv")],
                              path=args[0], iface="org.loopd1.Device"))
elif op == "find":
    out = answer(lambda: call("Find", "s", [args[0]]))
elif op == "request-name":
    out = answer(lambda: call("RequestName", "su", [args[0], dbus.UInt32(int(args[1]))],
                              path="/org/freedesktop/DBus", iface="org.freedesktop.DBus",
                              dest="org.freedesktop.DBus"))
elif op == "attach-loop":
    # Attach args[0] args[1] times; each success: what loopd and the kernel say
    # backs it, then detach it again (a user may detach its own devices).
    out = []
    for _ in range(int(args[1])):
        r = answer(lambda: call("Attach", "sa{sv}", [args[0], options("{}")]))
        if "ok" in r:
            obj, devnode = r["ok"][0], r["ok"][1]
            name = os.path.basename(devnode)
            try:
                r["BackingInode"] = prop(obj, "BackingInode")
                r["BackingDevice"] = prop(obj, "BackingDevice")
                r["BackingFile"] = prop(obj, "BackingFile")
                with open(f"/sys/block/{name}/loop/backing_file") as f:
                    r["sysfs"] = f.read().strip()
            finally:
                r["detach"] = answer(lambda: call("Detach", "ta{sv}",
                                                  [dbus.UInt64(r["ok"][2]),
                                                   dbus.Dictionary({}, signature="sv")]))
        out.append(r)
else:
    sys.exit(f"unknown op {op}")
print(json.dumps(out))
'''


# --------------------------------------------------------------------------- users

def _useradd(*args):
    # check=False: a concurrent run may have made the same user a moment ago;
    # the caller checks the result instead.
    run("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
        "--shell", "/usr/sbin/nologin", *args, check=False)


def _exists(getter, name):
    try:
        getter(name)
        return True
    except KeyError:
        return False


def ensure_users():
    for user in (USER, USER2):
        if not _exists(pwd.getpwnam, user):
            _useradd(user)
        pwd.getpwnam(user)  # raises if it could not be made
    # loopd-test3: first the user (its uid decides), then a group with gid == uid if
    # none has it, then its own primary group, which therefore gets another gid.
    if not _exists(pwd.getpwnam, USER3):
        _useradd("--no-user-group", "--gid", "nogroup", USER3)
    uid3 = pwd.getpwnam(USER3).pw_uid
    try:
        grp.getgrgid(uid3)
    except KeyError:
        run("groupadd", "--system", "--gid", str(uid3), UID_GROUP, check=False)
    if not _exists(grp.getgrnam, USER3_GROUP):
        run("groupadd", "--system", USER3_GROUP, check=False)
    primary = grp.getgrnam(USER3_GROUP).gr_gid
    if pwd.getpwnam(USER3).pw_gid != primary:
        run("usermod", "--gid", USER3_GROUP, USER3)
    uid_group = grp.getgrgid(uid3)
    assert primary != uid3 and USER3 not in uid_group.gr_mem, \
        f"{USER3} (uid {uid3}, gid {primary}) is not the user this test needs"


def uid_of(user):
    return pwd.getpwnam(user).pw_uid


def give(path, user, mode=0o644):
    """chown path to user (and its primary group), chmod mode."""
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    os.chmod(path, mode)


# --------------------------------------------------------------------------- clients

class Client:
    """A test user's client: `runuser -u USER -- python3 client.py OP ...` (or setpriv
    with explicit ids). Calls raise harness.CallError with the exact error name."""

    def __init__(self, env, user, via="runuser", gid=None, prefix=None):
        self.env = env
        self.user = user
        self.script = env.path("client.py")
        if not os.path.exists(self.script):
            with open(self.script, "w") as f:
                f.write(CLIENT)
            os.chmod(self.script, 0o644)
        if prefix is not None:  # a command line of the test's own
            self.prefix = prefix
        elif via == "runuser":
            self.prefix = ["runuser", "-u", user, "--"]
        elif gid is None:  # setpriv: the user's uid, primary gid and groups
            pw = pwd.getpwnam(user)
            self.prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                           "--init-groups", "--inh-caps=-all", "--bounding-set=-all"]
        else:  # setpriv: the user's uid with gid `gid` and no other group
            self.prefix = ["setpriv", f"--reuid={uid_of(user)}", f"--regid={gid}",
                           "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]

    def raw(self, op, *args):
        p = run(*self.prefix, "/usr/bin/python3", self.script, op, *args, check=False,
                env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": os.environ["DBUS_SYSTEM_BUS_ADDRESS"]})
        assert p.returncode == 0, f"client {op} as {self.user} failed ({p.returncode}): {p.stderr}"
        return json.loads(p.stdout)

    def _result(self, op, *args):
        r = self.raw(op, *args)
        if "error" in r:
            raise CallError(r["error"], r["message"], f"python3-dbus as {self.user}")
        return r["ok"]

    def attach(self, path, **options):
        return _reply(self._result("attach", str(path), json.dumps(options)))

    def attach_fd(self, path, mode="rw", **options):
        """The user opens path itself (mode r or rw) and passes the fd."""
        return _reply(self._result("attachfd", str(path), mode, json.dumps(options)))

    def detach(self, diskseq):
        self._result("detach", str(diskseq))

    def device_detach(self, obj):
        self._result("device-detach", obj)

    def resize(self, obj):
        return self._result("resize", obj)

    def find(self, path):
        return self._result("find", str(path))

    def request_name(self, name, flags):
        return self._result("request-name", name, str(flags))


def _reply(data):
    device, devnode, diskseq, partitions = data
    return {"device": device, "devnode": devnode, "diskseq": int(diskseq),
            "partitions": list(partitions)}


# --------------------------------------------------------------------------- checks

def devices_count():
    return pydbus_call("Get", "ss", [MANAGER_IFACE, "Devices"],
                       iface="org.freedesktop.DBus.Properties")


def loop_devices_backed_by(path):
    """Bound loop devices whose backing file is `path` (any loop device on the
    machine: a file outside the temp dir is not covered by Env's leak check)."""
    real = os.path.realpath(path)
    found = []
    for name in sorted(os.listdir("/sys/block")):
        try:
            backing = read_text(f"/sys/block/{name}/loop/backing_file")
        except OSError:
            continue
        if backing == real or backing == real + " (deleted)":
            found.append(f"/dev/{name}")
    return found


def nothing_attached(env, what, foreign=()):
    """After a refusal: loopd owns no device, none is backed by the test's files or
    by any of `foreign` (files outside the temp dir; force-detached if found)."""
    leaked = [d for f in foreign for d in loop_devices_backed_by(f)]
    for devnode in leaked:
        force_detach(devnode)
    assert not leaked, f"after {what}: {leaked} attached to {list(foreign)}"
    assert env.attached_here() == [], f"after {what}: attached: {env.attached_here()}"
    assert devices_count() == 0, f"after {what}: loopd has {devices_count()} devices"


def denied(env, what, fn, *args, foreign=(), **kw):
    """fn must fail with org.loopd1.Error.AccessDenied and attach nothing. A device
    it attached all the same is detached again before the test fails."""
    try:
        reply = fn(*args, **kw)
    except CallError as e:
        assert e.name == ACCESS_DENIED, f"{what}: expected {ACCESS_DENIED}, got {e}"
        err = e
    else:
        detach_quietly(reply["diskseq"])
        raise AssertionError(f"{what}: expected {ACCESS_DENIED}, but it attached {reply}")
    finally:
        nothing_attached(env, what, foreign)
    env.assert_loopd_alive()
    return err


def device_prop(reply, name):
    return busctl_get_property(reply["device"], DEVICE_IFACE, name)


def check_owned(reply, image, user):
    """The reply is ready (checked by root, at reply time), backed by the image's
    very inode, and owned by the user."""
    diskseq = verify_reply(reply, image)
    st = os.stat(image.path)
    assert device_prop(reply, "BackingInode") == st.st_ino, \
        f"{reply['devnode']}: BackingInode {device_prop(reply, 'BackingInode')}, image has {st.st_ino}"
    assert device_prop(reply, "OwnerUid") == uid_of(user), \
        f"{reply['devnode']}: OwnerUid {device_prop(reply, 'OwnerUid')}, expected {user}'s {uid_of(user)}"
    return diskseq


def still_ready(reply, image):
    verify_ready(reply["devnode"], reply["diskseq"], image.nparts, image.table_uuid)


def root_attach(image):
    return pydbus_attach(image.path, pydbus_options())


# --------------------------------------------------------------------------- tests

def test_polkit_runs_and_users_are_who_they_seem(env):
    """The set-up the other tests rely on: polkitd answers for loopd's actions on
    this bus, and the test users' connections carry their own uid and groups."""
    conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
    try:
        owner = conn.get_name_owner("org.freedesktop.PolicyKit1")
        creds = conn.call_blocking("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                   "org.freedesktop.DBus", "GetConnectionUnixUser", "s", [owner])
        assert creds == uid_of("polkitd"), f"polkitd runs as uid {creds}"
        authority = conn.get_object("org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority")
        actions = authority.EnumerateActions("", dbus_interface="org.freedesktop.PolicyKit1.Authority")
        ids = {str(a[0]) for a in actions}
        assert {"org.loopd1.attach", "org.loopd1.detach-others"} <= ids, \
            f"polkitd does not know loopd's actions: {sorted(i for i in ids if 'loopd' in i)}"
    finally:
        conn.close()
    for user in (USER, USER2, USER3):
        me = Client(env, user).raw("id")
        pw = pwd.getpwnam(user)
        assert me["uid"] == pw.pw_uid, me
        assert me["bus"]["ok"]["UnixUserID"] == pw.pw_uid, me


def test_unauthorized_user_cannot_attach(env):
    """loopd-test2 has no org.loopd1.attach: Attach (read-write and read-only) and
    AttachFd of its own image are AccessDenied, and nothing is attached. The same
    image attaches for root, and for loopd-test, which the rule authorizes."""
    image = env.image("gpt3")
    give(image.path, USER2, 0o600)
    user2 = Client(env, USER2)
    err = denied(env, "Attach by loopd-test2", user2.attach, image.path)
    assert "org.loopd1.attach" in err.message, err.message
    denied(env, "read-only Attach by loopd-test2", user2.attach, image.path, **{"read-only": True})
    denied(env, "AttachFd by loopd-test2", user2.attach_fd, image.path, "rw")
    denied(env, "read-only AttachFd by loopd-test2", user2.attach_fd, image.path, "r")

    # Not the image's fault: root may attach it.
    reply = root_attach(image)
    with detaching(reply):
        check_owned(reply, image, "root")
    verify_detached(reply["devnode"], reply["diskseq"])


def test_authorized_user_attaches_and_detaches_own(env):
    """loopd-test has org.loopd1.attach (not detach-others): Attach by path and
    AttachFd work and are ready at reply time; it detaches its own devices, by
    Manager.Detach and by Device.Detach."""
    gpt, mbr = env.image("gpt3"), env.image("mbr2")
    give(gpt.path, USER, 0o600)
    give(mbr.path, USER, 0o600)
    user = Client(env, USER)
    with detaching() as held:
        first = held.add(user.attach(gpt.path))
        check_owned(first, gpt, USER)
        second = held.add(user.attach_fd(mbr.path, "rw"))
        check_owned(second, mbr, USER)
        assert device_prop(second, "ReadOnly") is False
        assert devices_count() == 2

        user.detach(first["diskseq"])
        verify_detached(first["devnode"], first["diskseq"])
        user.device_detach(second["device"])
        verify_detached(second["devnode"], second["diskseq"])
        nothing_attached(env, "loopd-test's detaches")


def test_detach_of_others_needs_detach_others(env):
    """Detach of someone else's device: AccessDenied for loopd-test (root's device)
    and loopd-test3 (loopd-test's device), by diskseq and by the Device object, and
    the devices stay attached and ready; loopd-test2, which has detach-others,
    detaches both."""
    root_img, user_img = env.image("gpt3"), env.image("mbr2")
    give(user_img.path, USER, 0o600)
    user, user2, user3 = Client(env, USER), Client(env, USER2), Client(env, USER3)
    with detaching() as held:
        root_dev = held.add(root_attach(root_img))
        check_owned(root_dev, root_img, "root")
        user_dev = held.add(user.attach(user_img.path))
        check_owned(user_dev, user_img, USER)

        for who, client, dev, img in ((USER, user, root_dev, root_img),
                                      (USER3, user3, user_dev, user_img)):
            for how, fn, arg in (("Detach", client.detach, dev["diskseq"]),
                                 ("Device.Detach", client.device_detach, dev["device"])):
                err = expect_error("AccessDenied", fn, arg)
                assert str(dev["diskseq"]) in err.message or dev["devnode"] in err.message, \
                    f"{how} by {who}: message does not name the device: {err.message}"
                still_ready(dev, img)
        assert devices_count() == 2

        user2.detach(user_dev["diskseq"])
        verify_detached(user_dev["devnode"], user_dev["diskseq"])
        user2.device_detach(root_dev["device"])
        verify_detached(root_dev["devnode"], root_dev["diskseq"])
        nothing_attached(env, "loopd-test2's detaches")


def test_authorized_user_cannot_attach_what_it_cannot_open(env):
    """Authorization to attach is not a way to read files: loopd-test's Attach by
    path of /etc/shadow, of loopd-test2's mode-600 file, of a file in a directory it
    cannot search, and for writing of a file it may only read, is AccessDenied and
    attaches nothing. What it may read, it attaches read-only."""
    user = Client(env, USER)
    # The premise: loopd-test cannot read /etc/shadow itself.
    assert run("runuser", "-u", USER, "--", "test", "-r", "/etc/shadow",
               check=False).returncode == 1, "loopd-test can read /etc/shadow"
    for ro in (False, True):
        denied(env, f"Attach /etc/shadow (read-only {ro})", user.attach, "/etc/shadow",
               foreign=["/etc/shadow"], **{"read-only": ro})

    others = env.image("gpt3")
    give(others.path, USER2, 0o600)
    for ro in (False, True):
        denied(env, f"Attach of loopd-test2's mode-600 file (read-only {ro})",
               user.attach, others.path, **{"read-only": ro})

    hidden_dir = env.path("root-only")
    os.mkdir(hidden_dir, 0o700)
    hidden = env.image("none")
    os.rename(hidden.path, os.path.join(hidden_dir, "hidden.img"))
    os.chmod(os.path.join(hidden_dir, "hidden.img"), 0o666)
    denied(env, "Attach of a file in a root-only directory", user.attach,
           os.path.join(hidden_dir, "hidden.img"), **{"read-only": True})

    readable = env.image("mbr2")
    os.chmod(readable.path, 0o644)  # root's, readable by all, writable by root only
    err = denied(env, "read-write Attach of a read-only file", user.attach, readable.path)
    assert readable.path in err.message, err.message
    reply = user.attach(readable.path, **{"read-only": True})
    with detaching(reply):
        check_owned(reply, readable, USER)
        assert device_prop(reply, "ReadOnly") is True
    verify_detached(reply["devnode"], reply["diskseq"])


def test_path_is_opened_with_the_callers_groups(env):
    """loopd opens a path with the caller's uid and groups, never with its uid as a
    gid. loopd-test3's uid is also the gid of a group it is not in: a mode-640 file
    of that group is AccessDenied; one of its primary group (gid != uid) attaches."""
    uid3 = uid_of(USER3)
    uid_group = grp.getgrgid(uid3)
    primary = pwd.getpwnam(USER3).pw_gid
    user3 = Client(env, USER3)
    me = user3.raw("id")
    assert uid3 not in me["groups"] and uid3 not in me["bus"]["ok"]["UnixGroupIDs"], me

    not_mine = env.image("gpt3")
    os.chown(not_mine.path, 0, uid_group.gr_gid)
    os.chmod(not_mine.path, 0o640)
    denied(env, f"Attach of a mode-640 file of group {uid_group.gr_name} (gid {uid3} == uid)",
           user3.attach, not_mine.path, **{"read-only": True})

    mine = env.image("mbr2")
    os.chown(mine.path, 0, primary)
    os.chmod(mine.path, 0o640)
    reply = user3.attach(mine.path, **{"read-only": True})
    with detaching(reply):
        check_owned(reply, mine, USER3)
    verify_detached(reply["devnode"], reply["diskseq"])


def test_path_is_opened_with_the_callers_gid_not_the_user_database(env):
    """The caller is the process, not its passwd entry: loopd-test3 running with gid
    nogroup and no other group (setpriv --regid --clear-groups; the bus reports
    exactly that in UnixGroupIDs) cannot attach a mode-640 file of its passwd
    primary group, which that process cannot open; a nogroup file it can open
    attaches."""
    primary = pwd.getpwnam(USER3).pw_gid
    nogroup = grp.getgrnam("nogroup").gr_gid
    user3 = Client(env, USER3, via="setpriv", gid=nogroup)
    me = user3.raw("id")
    assert me["gid"] == nogroup and me["groups"] == [] and \
        me["bus"]["ok"]["UnixGroupIDs"] == [nogroup], me

    primarys = env.image("gpt3")
    os.chown(primarys.path, 0, primary)
    os.chmod(primarys.path, 0o640)
    assert run(*user3.prefix, "test", "-r", primarys.path, check=False).returncode == 1
    denied(env, f"Attach by a loopd-test3 process without group {primary} of a mode-640 "
           f"file of that group", user3.attach, primarys.path, **{"read-only": True})

    nogroups = env.image("mbr2")
    os.chown(nogroups.path, 0, nogroup)
    os.chmod(nogroups.path, 0o640)
    reply = user3.attach(nogroups.path, **{"read-only": True})
    with detaching(reply):
        check_owned(reply, nogroups, USER3)
    verify_detached(reply["devnode"], reply["diskseq"])


def test_only_root_may_own_the_name(env):
    """The bus policy lets only root own org.loopd1: RequestName by a test user
    (via setpriv, and via runuser) is refused by the bus, whatever the flags. Root's
    RequestName is not refused, just told the name is taken (EXISTS), and loopd
    keeps it."""
    conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
    try:
        owner = conn.get_name_owner(BUS_NAME)
        for user, via in ((USER, "setpriv"), (USER2, "runuser")):
            client = Client(env, user, via=via)
            for flags in (0, 2, 4, 6):  # none, REPLACE_EXISTING, DO_NOT_QUEUE, both
                r = client.raw("request-name", BUS_NAME, str(flags))
                assert r.get("error") == BUS_ACCESS_DENIED, \
                    f"RequestName({BUS_NAME}, {flags}) by {user} via {via}: {r}"
        DBUS_NAME_FLAG_DO_NOT_QUEUE, DBUS_REQUEST_NAME_REPLY_EXISTS = 4, 3
        assert conn.request_name(BUS_NAME, DBUS_NAME_FLAG_DO_NOT_QUEUE) == \
            DBUS_REQUEST_NAME_REPLY_EXISTS
        assert conn.get_name_owner(BUS_NAME) == owner, "org.loopd1 changed owner"
    finally:
        conn.close()
    env.assert_loopd_alive()


def test_no_polkit_means_denied(env):
    """Fail closed: with polkitd gone from the bus, loopd-test's Attach (which the
    rules would allow) is AccessDenied at once, and nothing is attached; root still
    needs no polkit."""
    image = env.image("none")
    give(image.path, USER, 0o600)
    user = Client(env, USER)
    reply = user.attach(image.path)  # allowed while polkitd runs
    with detaching(reply):
        check_owned(reply, image, USER)
    verify_detached(reply["devnode"], reply["diskseq"])

    env.polkitd.terminate()
    env.polkitd.wait(10)
    conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
    try:
        assert not conn.name_has_owner("org.freedesktop.PolicyKit1"), "polkitd still on the bus"
    finally:
        conn.close()
    denied(env, "Attach by loopd-test without polkitd", user.attach, image.path)
    denied(env, "AttachFd by loopd-test without polkitd", user.attach_fd, image.path, "rw")

    reply = root_attach(image)
    with detaching(reply):
        check_owned(reply, image, "root")
    verify_detached(reply["devnode"], reply["diskseq"])


def test_symlink_swapped_during_attach(env):
    """A root thread keeps flipping a symlink between loopd-test's image and
    /etc/shadow while loopd-test calls Attach on the link, over and over: every
    success is backed by the image's inode, the others are AccessDenied, and
    /etc/shadow is never attached. Both outcomes must occur, or the race was not run."""
    image = env.image("none")
    give(image.path, USER, 0o600)
    st = os.stat(image.path)
    link, spare = env.path("flip"), env.path("flip.new")
    os.symlink(image.path, link)
    stop = threading.Event()
    flips = [0]

    def flipper():
        targets = (image.path, "/etc/shadow")
        while not stop.is_set():
            try:
                os.unlink(spare)
            except FileNotFoundError:
                pass
            os.symlink(targets[flips[0] % 2], spare)
            os.replace(spare, link)  # atomic: the link always exists
            flips[0] += 1

    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    try:
        results = Client(env, USER).raw("attach-loop", link, "100")
    finally:
        stop.set()
        thread.join()
        nothing_attached(env, "the symlink race", foreign=["/etc/shadow"])

    ok = [r for r in results if "ok" in r]
    refused = [r for r in results if "error" in r]
    for r in ok:
        assert r["BackingInode"] == st.st_ino and r["BackingDevice"] == st.st_dev, \
            f"attached inode {r['BackingDevice']}:{r['BackingInode']}, image is {st.st_dev}:{st.st_ino}: {r}"
        assert r["sysfs"] == os.path.realpath(image.path), f"kernel backing file {r['sysfs']}: {r}"
        assert "ok" in r["detach"], f"loopd-test could not detach its own device: {r}"
    for r in refused:
        assert r["error"] == ACCESS_DENIED, f"unexpected error: {r}"
    assert ok and refused, \
        f"the race did not happen: {len(ok)} attached, {len(refused)} refused, {flips[0]} flips"
    print(f"# symlink race: {len(ok)} attached the image, {len(refused)} refused, {flips[0]} flips")


# --------------------------------------------------------------------------- hostile callers (issue 13)

CAPLESS_ROOT = ["setpriv", "--reuid=0", "--regid=0", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all"]


def test_capless_root_is_not_root(env):
    """uid 0 without CAP_DAC_OVERRIDE and CAP_SYS_ADMIN is treated like any other
    user: its Attach of another user's mode-600 file is AccessDenied (polkit lets a
    uid-0 subject through; the open, checked as that process's own would be, does
    not). Failed before: loopd opened it with its own powers and attached it."""
    image = env.image("gpt3")
    give(image.path, USER2, 0o600)
    capless = Client(env, "root", prefix=CAPLESS_ROOT)
    # The premise: the capless process cannot read the file itself.
    assert run(*CAPLESS_ROOT, "head", "-c1", image.path, check=False).returncode != 0, \
        "a capless uid-0 process can read a mode-600 file of another user"
    for ro in (False, True):
        err = denied(env, f"Attach by capless root (read-only {ro})", capless.attach, image.path,
                     **{"read-only": ro})
        assert image.path in err.message, err.message


def test_capless_root_gets_nothing_polkit_would_decide(env):
    """polkitd lets every uid-0 subject through without reading its rules, so for
    uid 0 without root's powers loopd does not ask it: Attach of a file it may read
    (by path and by fd), Detach and Resize of root's device and of another user's
    are AccessDenied naming the object and the missing powers; Find still works.
    Failed on 5b0445e: the Attach of the readable file succeeded (an outside review
    found the Detach and Resize too)."""
    readable = env.image("none")
    os.chmod(readable.path, 0o644)
    capless = Client(env, "root", prefix=CAPLESS_ROOT)
    err = denied(env, "Attach by capless root of a file it can read", capless.attach, readable.path)
    assert readable.path in err.message and "CAP_SYS_ADMIN" in err.message, err.message
    err = denied(env, "AttachFd by capless root", capless.attach_fd, readable.path, "ro")
    assert "CAP_SYS_ADMIN" in err.message, err.message
    gpt = env.image("gpt3")
    os.chmod(gpt.path, 0o644)
    roots = root_attach(gpt)
    image = env.image("none")
    give(image.path, USER, 0o600)
    users = Client(env, USER).attach(image.path)
    with detaching(roots), detaching(users):
        for reply, whose in ((roots, "root's"), (users, f"{USER}'s")):
            for what, call in (("Detach", lambda: capless.detach(reply["diskseq"])),
                               ("Resize", lambda: capless.resize(reply["device"]))):
                try:
                    call()
                except CallError as e:
                    assert e.name == ACCESS_DENIED, f"{what} of {whose} device by capless root: {e}"
                    assert str(reply["diskseq"]) in e.message or reply["devnode"] in e.message, e.message
                else:
                    raise AssertionError(f"{what} of {whose} device by capless root succeeded")
                verify_ready(reply["devnode"], reply["diskseq"], 0 if reply is users else 3)
        found = capless.find(gpt.path)
        assert found == [roots["device"]], f"Find by capless root of {gpt.path}: {found}"


def test_confined_caller_path_is_refused_with_a_pointer_to_attachfd(env):
    """A caller in a mount namespace of its own (PrivateTmp=, InaccessiblePaths=, a
    chroot are all that) cannot have its path resolved in loopd's: AccessDenied
    naming AttachFd; the fd route works. Failed before: loopd resolved the path in
    its own namespace and attached what the caller could not reach."""
    image = env.image("gpt3")
    give(image.path, USER, 0o600)
    confined = Client(env, USER, prefix=["unshare", "--mount", "--propagation", "private",
                                         "runuser", "-u", USER, "--"])
    err = denied(env, "Attach by path from another mount namespace", confined.attach, image.path)
    assert "AttachFd" in err.message and image.path in err.message, err.message
    reply = confined.attach_fd(image.path, "rw")
    with detaching(reply):
        check_owned(reply, image, USER)
    verify_detached(reply["devnode"], reply["diskseq"])


def test_magic_links_are_refused(env):
    """/proc/self/... names loopd's own process: a path through a magic link is
    InvalidArgument, for root too. Failed before: /proc/self/root/<image> attached."""
    image = env.image("none")
    for path in (f"/proc/self/root{image.path}", "/proc/self/fd/0"):
        err = expect_error("InvalidArgument", pydbus_attach, path, pydbus_options())
        assert path in err.message, err.message
        nothing_attached(env, f"Attach {path}")


def test_attachfd_refuses_what_cannot_back_a_device(env):
    """AttachFd takes regular files and block devices open for reading: an O_PATH
    fd, a write-only one, procfs and sysfs files are InvalidArgument, naming the
    file. Failed before: the write-only fd and the sysfs file were attached."""
    image = env.image("none")
    cases = [("O_PATH", image.path, os.O_PATH), ("write-only", image.path, os.O_WRONLY),
             ("procfs", "/proc/self/stat", os.O_RDONLY),
             ("sysfs", "/sys/kernel/uevent_seqnum", os.O_RDONLY)]
    for what, path, flags in cases:
        fd = os.open(path, flags | os.O_CLOEXEC)
        try:
            err = expect_error("InvalidArgument", pydbus_call, "AttachFd", "ha{sv}",
                               [dbus.types.UnixFd(fd), pydbus_options()])
        finally:
            os.close(fd)
        nothing_attached(env, f"AttachFd of a {what} fd")
        assert err.message, what
    # One of loopd's own devices (a partition of it) as backing: refused, naming it.
    image = env.image("gpt3")
    reply = root_attach(image)
    with detaching(reply):
        for node in (reply["devnode"], reply["partitions"][0]):
            fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
            passed = dbus.types.UnixFd(fd)  # a dup of fd, held until taken back
            try:
                message = expect_error("InvalidArgument", pydbus_call, "AttachFd", "ha{sv}",
                                       [passed, pydbus_options()]).message
            finally:
                os.close(fd)
                os.close(passed.take())
            # The error's traceback keeps libdbus's message, and with it another dup
            # of the fd: collected, no opener of ours keeps the device from its detach.
            gc.collect()
            assert reply["devnode"] in message, message
        assert devices_count() == 1, f"loopd has {devices_count()} devices, expected 1"


def test_quotas(env):
    """A non-root caller holds at most max-devices-per-user devices, an image has at
    most max-partitions partitions (for root too): beyond, LimitExceeded, naming the
    image, and nothing attached. Before, neither limit existed (unknown options)."""
    env.restart_loopd(kill=False, loopd_args=["--max-devices-per-user", "2", "--max-partitions", "2"])
    user = Client(env, USER)
    images = [env.image("mbr2") for _ in range(3)]
    for image in images:
        give(image.path, USER, 0o600)
    with detaching() as held:
        for image in images[:2]:
            check_owned(held.add(user.attach_fd(image.path, "rw")), image, USER)
        try:
            extra = user.attach_fd(images[2].path, "rw")
        except CallError as e:
            assert e.name == "org.loopd1.Error.LimitExceeded", f"a third device: {e}"
            assert images[2].path in e.message, e.message
        else:
            held.add(extra)
            raise AssertionError(f"loopd-test got a third device beyond max-devices-per-user 2: {extra}")
        # Root has no device quota, but the partition limit holds for everyone.
        check_owned(held.add(root_attach(images[2])), images[2], "root")
        big = env.image("gpt3")
        err = expect_error("LimitExceeded", root_attach, big)
        assert big.path in err.message and "max-partitions" in err.message, err.message
        assert not loop_devices_backed_by(big.path), f"{big.path} attached after LimitExceeded"


def test_nothing_is_reserved_before_polkit_answers(env):
    """Authorization first, state second: while polkit still considers loopd-test's
    Attach with ref "squat" (the rule takes SLOW_POLKIT s, then says no), root can
    attach with that ref. Failed before: the ref was reserved at the call, and
    root's attach was InvalidArgument ("already used")."""
    user = Client(env, USER)
    image, other = env.image("none"), env.image("none")
    give(image.path, USER, 0o600)
    result = {}
    squatter = threading.Thread(target=lambda: result.update(r=user.raw(
        "attachfd", image.path, "rw", json.dumps({"ref": "squat"}))), daemon=True)
    started = time.monotonic()
    squatter.start()
    time.sleep(1)  # not a readiness wait: lets the squatter's call reach polkit first
    try:
        with detaching() as held:
            reply = held.add(pydbus_attach(other.path, pydbus_options(ref=dbus.String("squat"))))
            assert time.monotonic() - started < SLOW_POLKIT, "root's attach was not done while polkit thought"
            assert device_prop(reply, "Ref") == "squat"
    finally:
        squatter.join(60)
    assert result.get("r", {}).get("error") == ACCESS_DENIED, f"the squatter got {result}"
    nothing_attached(env, "the squatter's refused attach")


if __name__ == "__main__":
    if os.geteuid() == 0:
        ensure_users()
    main(globals(), polkit=True, polkit_rules=RULES)
