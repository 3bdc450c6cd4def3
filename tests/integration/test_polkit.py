#!/usr/bin/python3
"""What loopd does while polkit thinks (issue 13's review items), against a real
polkitd on the private bus with the rules of test_security.py plus those below, and
non-root callers (test_security.py's users and client).

Slow checks: a test writes an answer ("yes" or "no") to MARKS/<action>.<user>
(slow_polkit()); while it is there, that user's checks of that action touch
<plan>.started, take SLOW_POLKIT s (an agent waiting for a password would), touch
<plan>.done and then answer so. The markers tell the test where polkit is without
sleeping: it waits for them with inotify.

polkitd runs its rules in its main thread (polkit.spawn waits for the child), so
it answers checks in the order it got them: the answer to a quick check asked after
<plan>.done reaches loopd after the slow one's (sequence_polkit()).

A real agent: pkttyagent --process PID on a pty of the test's own, registered for
one caller process (Agent); "ask" as the answer of a plan makes that
check AUTH_ADMIN (root authenticates, as addAdminRule below says).
"""

import ctypes
import fcntl
import json
import os
import pty
import pwd
import select
import shutil
import subprocess
import termios
import threading
import time

import dbus

import test_security as sec
from harness import (CALL_TIMEOUT, CallError, SignalWatcher,
                     busctl_detach, detaching, expect_error, force_detach, main, pydbus_attach,
                     pydbus_options, verify_detached)
from test_security import (ACCESS_DENIED, USER, USER2, USER3, Client, check_owned, give,
                           loop_devices_backed_by, nothing_attached)

SLOW_POLKIT = 3  # seconds a slow check takes
# The markers' directory, outside any test's temp dir (the rules are written once
# per file, before any test has one); removed after each test that makes it.
MARKS = f"/run/loopd-test-polkit-{os.getpid()}"
ALLOWED = f"{MARKS}/allowed.img"  # the one file loopd-test2 may attach (details test)

SLOW_RULES = f"""// loopd integration tests (tests/integration/test_polkit.py), removed after the run.
// Slow or interactive answers a test switched on (slow_polkit()).
polkit.addRule(function(action, subject) {{
    if (action.id.indexOf("org.loopd1.") != 0 ||
        (subject.user != "{USER}" && subject.user != "{USER3}"))
        return;
    var plan = "{MARKS}/" + action.id + "." + subject.user, answer;
    try {{
        answer = polkit.spawn(["cat", plan]).trim();
    }} catch (e) {{
        return;  // no plan: the rules below decide
    }}
    if (answer == "ask")
        return polkit.Result.AUTH_ADMIN;
    polkit.spawn(["touch", plan + ".started"]);
    polkit.spawn(["sleep", "{SLOW_POLKIT}"]);
    polkit.spawn(["touch", plan + ".done"]);
    return answer == "yes" ? polkit.Result.YES : polkit.Result.NO;
}});
// The details loopd passes: loopd-test2 may attach exactly one file, by its path.
polkit.addRule(function(action, subject) {{
    if (action.id == "org.loopd1.attach" && subject.user == "{USER2}")
        return action.lookup("loopd.file") == "{ALLOWED}" ? polkit.Result.YES : polkit.Result.NO;
}});
// An agent authenticates root for loopd's actions (Debian's default is group sudo).
polkit.addAdminRule(function(action, subject) {{
    if (action.id.indexOf("org.loopd1.") == 0)
        return ["unix-user:0"];
}});
"""

RULES = SLOW_RULES + sec.RULES

# The leaving caller: sends one Attach, says its bus name, and leaves the bus
# (exits) when its stdin closes, without waiting for the answer.
LEAVER = r'''
import dbus, dbus.lowlevel, json, os, sys
bus = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
options = dbus.Dictionary({k: dbus.String(v) for k, v in json.loads(sys.argv[2]).items()},
                          signature="sv")
msg = dbus.lowlevel.MethodCallMessage("org.loopd1", "/org/loopd1", "org.loopd1.Manager", "Attach")
msg.append(sys.argv[1], options, signature="sa{sv}")
bus.send_message(msg)
bus.flush()
print(bus.get_unique_name(), flush=True)
sys.stdin.read()
'''


# --------------------------------------------------------------------------- markers

_IN_CREATE, _IN_ATTRIB, _IN_MOVED_TO = 0x100, 0x4, 0x80


class FileWatch:
    """Waits for files to appear in a directory (inotify: no polling)."""

    def __init__(self, directory):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, f"inotify_init1: {os.strerror(ctypes.get_errno())}"
        if libc.inotify_add_watch(self.fd, directory.encode(),
                                  _IN_CREATE | _IN_ATTRIB | _IN_MOVED_TO) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")

    def wait(self, path, limit):
        deadline = time.monotonic() + limit
        while not os.path.exists(path):
            left = deadline - time.monotonic()
            assert left > 0, f"{path} did not appear within {limit} s"
            select.select([self.fd], [], [], left)
            try:
                os.read(self.fd, 65536)
            except BlockingIOError:
                pass

    def close(self):
        os.close(self.fd)


class slow_polkit:
    """with slow_polkit(action, user, answer) as slow: that user's checks of that
    action are slow and then answer `answer` ("yes", "no"), or are AUTH_ADMIN
    ("ask"). slow.started / slow.done are the rule's markers; slow.wait(path)
    waits for one."""

    def __init__(self, action, user, answer):
        self.plan = f"{MARKS}/{action}.{user}"
        self.started, self.done = self.plan + ".started", self.plan + ".done"
        self.answer = answer

    def __enter__(self):
        make_marks()
        with open(self.plan, "w") as f:
            f.write(self.answer)
        os.chmod(self.plan, 0o644)
        self.watch = FileWatch(MARKS)
        return self

    def wait(self, path, limit=CALL_TIMEOUT):
        self.watch.wait(path, limit)

    def __exit__(self, *exc):
        self.watch.close()
        shutil.rmtree(MARKS, ignore_errors=True)
        return False


def make_marks():
    """MARKS, writable by polkitd (its rules touch markers there), searchable by all."""
    if not os.path.isdir(MARKS):
        os.mkdir(MARKS, 0o755)
    polkitd = pwd.getpwnam("polkitd")
    os.chown(MARKS, polkitd.pw_uid, polkitd.pw_gid)


def sequence_polkit(env):
    """One more check through loopd and polkitd, answered at once (loopd-test2 may
    not attach a file of the temp dir): polkitd answers in order, so when this
    reply is here, loopd has had the answer to every check asked before it."""
    image = env.image("none")
    give(image.path, USER2, 0o600)
    err = expect_error("AccessDenied", Client(env, USER2).attach, image.path)
    assert "org.loopd1.attach" in err.message, err.message


class Leaver:
    """A caller (the user, through setpriv: its pid is the process on the bus) whose
    Attach is sent; leave() makes it exit, and returns once the bus says it is gone."""

    def __init__(self, env, user, path, options):
        script = env.path("leaver.py")
        with open(script, "w") as f:
            f.write(LEAVER)
        os.chmod(script, 0o644)
        self.proc = subprocess.Popen(
            [*Client(env, user, via="setpriv").prefix, "/usr/bin/python3", script, str(path),
             json.dumps(options)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.name = self.proc.stdout.readline().strip()
        assert self.name.startswith(":"), f"the leaving caller did not connect: {self.proc.wait()}"

    def leave(self):
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0, f"the leaving caller exited with {self.proc.returncode}"
        conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
        try:
            # The bus has told everyone (loopd too) it left before it answers this.
            assert not conn.name_has_owner(self.name), f"{self.name} is still on the bus"
        finally:
            conn.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def outcome_of(watch, ref, spare, limit=20):
    """After loopd has had polkit's answer for an attach with `ref`: what became of
    it, once it is over. Root's attach of `spare` with the same ref is refused while
    that attach is under way or its device exists (the ref is reserved once
    authorized); then its device is waited for to be listed and removed.
    Returns [(diskseq, [removal reasons])] of the devices that attach listed."""
    deadline = time.monotonic() + limit
    spare_diskseq = None
    try:
        reply = pydbus_attach(spare.path, pydbus_options(ref=dbus.String(ref)))
    except CallError as e:
        assert e.name == "org.loopd1.Error.InvalidArgument" and "already used" in e.message, e
        listed = watch.listed_with_ref(ref, deadline)
        assert listed, f"ref {ref} is held, but no device with it was listed within {limit} s"
    else:  # the ref is free: nothing of that attach is left in loopd
        spare_diskseq = reply["diskseq"]
        with detaching(reply):
            busctl_detach(reply["diskseq"])
        verify_detached(reply["devnode"], reply["diskseq"])
    return [(d, watch.wait_removed(d, deadline)) for d in watch.listed_with_ref(ref)
            if d != spare_diskseq]


# --------------------------------------------------------------------------- tests

def test_owners_detach_goes_on_while_polkit_considers_anothers(env):
    """While polkit considers loopd-test3's Detach of loopd-test's device (slow, then
    no), the owner's own Detach of it succeeds at once (polkit has not answered
    yet). loopd-test3 then gets AccessDenied: the refusal is the answer to what it
    asked, whether or not the device is still there. Failed on adbd7c0 (fixed with
    issue 12's split, 0c16e78): the device was marked Detaching at loopd-test3's
    call and the owner's Detach was Busy."""
    image = env.image("mbr2")
    give(image.path, USER, 0o600)
    owner, other = Client(env, USER), Client(env, USER3)
    reply = owner.attach(image.path)
    result = {}
    with detaching(reply), slow_polkit("org.loopd1.detach-others", USER3, "no") as slow:
        check_owned(reply, image, USER)
        thread = threading.Thread(target=lambda: result.update(
            r=other.raw("detach", str(reply["diskseq"]))), daemon=True)
        thread.start()
        try:
            slow.wait(slow.started)
            owner.detach(reply["diskseq"])
            assert not os.path.exists(slow.done), \
                "the owner's Detach was answered only after polkit's answer to another's"
            verify_detached(reply["devnode"], reply["diskseq"])
        finally:
            thread.join(CALL_TIMEOUT)
    r = result.get("r", {})
    assert r.get("error") == ACCESS_DENIED, f"loopd-test3's Detach: {r}"
    assert "detach-others" in r["message"] and str(reply["diskseq"]) in r["message"], r
    nothing_attached(env, "both detaches")


def test_polkit_sees_the_file(env):
    """loopd passes the file to polkit (detail loopd.file): a rule that lets
    loopd-test2 attach exactly ALLOWED lets that Attach through, by path and by fd,
    and refuses another file. Failed on e9b150f^: no details, the rule refused both."""
    make_marks()
    try:
        allowed, other = env.image("mbr2"), env.image("mbr2")
        shutil.move(allowed.path, ALLOWED)
        allowed.path = ALLOWED
        give(ALLOWED, USER2, 0o600)
        give(other.path, USER2, 0o600)
        user2 = Client(env, USER2)
        err = sec.denied(env, "Attach of a file the rule does not name", user2.attach, other.path,
                         foreign=[ALLOWED])
        assert "org.loopd1.attach" in err.message, err.message
        for how in (user2.attach, user2.attach_fd):
            reply = how(ALLOWED)
            with detaching(reply):
                check_owned(reply, allowed, USER2)
                user2.detach(reply["diskseq"])
            verify_detached(reply["devnode"], reply["diskseq"])
        nothing_attached(env, "loopd-test2's detaches", foreign=[ALLOWED])
    finally:
        for devnode in loop_devices_backed_by(ALLOWED):
            force_detach(devnode)
        shutil.rmtree(MARKS, ignore_errors=True)


def _caller_leaves_while_polkit_thinks(env, lifetime):
    """loopd-test's Attach (ref "leaver", lifetime `lifetime`) is slow in polkit and
    then allowed; the caller leaves the bus during the check (the bus says it is
    gone before polkit's rule is done). Once loopd has had polkit's answer: no
    device of that attach was ever listed, the ref is free, and no loop device is
    backed by the image. polkitd cannot cancel a rule that runs; loopd drops the
    authorized attach of a caller that left."""
    image, spare = env.image("mbr2"), env.image("none")
    give(image.path, USER, 0o600)
    watch = SignalWatcher()
    leaver = None
    try:
        with slow_polkit("org.loopd1.attach", USER, "yes") as slow:
            leaver = Leaver(env, USER, image.path, {"ref": "leaver", "lifetime": lifetime})
            slow.wait(slow.started)
            leaver.leave()
            assert not os.path.exists(slow.done), "the caller left only after polkit's answer"
            slow.wait(slow.done)
        sequence_polkit(env)
        outcome = outcome_of(watch, "leaver", spare)
        leaked = loop_devices_backed_by(image.path)
        for devnode in leaked:
            force_detach(devnode)
        assert outcome == [] and not leaked, \
            f"attached for a caller that had left: listed {outcome} (diskseq, removal " \
            f"reasons), still backed by the image: {leaked}"
        nothing_attached(env, "the leaving caller's attach")
    finally:
        if leaver:
            leaver.kill()
        watch.close()


def test_client_lifetime_caller_leaving_while_polkit_thinks(env):
    """lifetime=client, the caller leaves while polkit considers its Attach (slow,
    then yes): nothing is attached, not even for a moment. Failed on e9b150f^ and
    b50e908: the device was attached for nobody, listed, and detached again
    (client-vanished)."""
    _caller_leaves_while_polkit_thinks(env, "client")


def test_persistent_attach_of_a_caller_that_left_is_not_made(env):
    """A persistent Attach whose caller leaves while polkit considers it (slow, then
    yes) is not made. Failed on e9b150f^ and b50e908: it was attached and stayed,
    owned by a user who never got a reply."""
    _caller_leaves_while_polkit_thinks(env, "persistent")


# --------------------------------------------------------------------------- a real agent

def wait_for_text(path, text, limit):
    """Whether the file at `path` contains `text` within `limit` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open(path, errors="replace") as f:
            if text in f.read():
                return True
        time.sleep(0.05)
    return False


class Agent:
    """pkttyagent --process PID: an authentication agent for that process only, on a
    pty of its own (it needs a controlling terminal). Returns once polkitd has it
    registered (it closes --notify-fd then); what it prints is collected."""

    def __init__(self, pid):
        master, slave = pty.openpty()
        ready_r, ready_w = os.pipe()
        self.proc = subprocess.Popen(
            ["pkttyagent", "--process", str(pid), "--notify-fd", str(ready_w)],
            stdin=slave, stdout=slave, stderr=slave, pass_fds=(ready_w,),
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        os.close(ready_w)
        self.master = master
        self.text = ""
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            readable, _, _ = select.select([ready_r], [], [], CALL_TIMEOUT)
            assert readable and os.read(ready_r, 1) == b"", "pkttyagent did not register"
        finally:
            os.close(ready_r)
        assert self.proc.poll() is None, f"pkttyagent exited: {self.output()}"

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.closed = True
                    self.cond.notify_all()
                    return
                self.text += data.decode(errors="replace")
                self.cond.notify_all()

    def output(self):
        with self.cond:
            return self.text

    def wait_for(self, text, limit):
        """Whether the agent printed `text` within `limit` s."""
        deadline = time.monotonic() + limit
        with self.cond:
            while text not in self.text and time.monotonic() < deadline and \
                    not getattr(self, "closed", False):
                self.cond.wait(deadline - time.monotonic())
            return text in self.text

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        os.close(self.master)


class BusctlCaller:
    """busctl Attach as `user`, with or without the allow-interactive-authorization
    flag. Its process exists (and its pid is known, for an agent) before it calls:
    a shell that waits for go(), then becomes busctl (same pid)."""

    def __init__(self, env, user, path, interactive):
        flag = "yes" if interactive else "no"
        self.proc = subprocess.Popen(
            [*Client(env, user, via="setpriv").prefix, "/bin/sh", "-c",
             'read go && exec busctl --system --timeout=20 '
             f'--allow-interactive-authorization={flag} call org.loopd1 /org/loopd1 '
             'org.loopd1.Manager Attach "sa{sv}" "$0" 0', str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def go(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        self.proc.stdin = None  # communicate() must not flush it

    def result(self, limit):
        out, err = self.proc.communicate(timeout=limit)
        return self.proc.returncode, out.strip(), err.strip()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_agent_is_asked_only_when_the_call_allows_it(env):
    """polkit says AUTH_ADMIN for loopd-test's Attach, and an agent is registered for
    the calling process. Without the allow-interactive-authorization flag (busctl
    --allow-interactive-authorization=no) the call is refused at once, the agent
    never asked. With it the agent is asked (its prompt names org.loopd1.attach).
    Failed on e9b150f^: every check allowed interaction, so the call without the
    flag waited for the agent (busctl timed out after 20 s)."""
    image = env.image("none")
    give(image.path, USER, 0o600)
    with slow_polkit("org.loopd1.attach", USER, "ask"):
        for interactive in (False, True):
            caller = BusctlCaller(env, USER, image.path, interactive)
            agent = None
            try:
                agent = Agent(caller.proc.pid)
                caller.go()
                if not interactive:
                    status, out, err = caller.result(CALL_TIMEOUT)
                    assert status != 0 and "was not authorized" in err and \
                        "org.loopd1.attach" in err, f"without the flag: {status} {out!r} {err!r}"
                    assert "AUTHENTICATING" not in agent.output(), \
                        f"the agent was asked for a call without the flag: {agent.output()!r}"
                else:
                    assert agent.wait_for("AUTHENTICATING FOR org.loopd1.attach", CALL_TIMEOUT), \
                        f"with the flag the agent was not asked: {agent.output()!r}"
            finally:
                caller.kill()
                if agent:
                    agent.stop()
            nothing_attached(env, f"the Attach (interactive {interactive})")


def test_check_of_a_caller_that_left_is_cancelled(env):
    """loopd-test's Attach (with the flag) waits for an agent that asks for root's
    password, which nobody types. When the caller leaves the bus, loopd cancels the
    check: the agent's prompt is withdrawn (pkttyagent says so), and nothing is
    attached. Failed on e9b150f^: the agent went on asking for the password (the
    check lasts until the agent answers, or loopd's five-minute limit)."""
    image = env.image("none")
    give(image.path, USER, 0o600)
    with slow_polkit("org.loopd1.attach", USER, "ask"):
        caller = BusctlCaller(env, USER, image.path, True)
        agent = None
        try:
            agent = Agent(caller.proc.pid)
            caller.go()
            assert agent.wait_for("AUTHENTICATING FOR org.loopd1.attach", CALL_TIMEOUT), \
                f"the agent was not asked: {agent.output()!r}"
            caller.kill()
            # polkitd answers loopd's check at once when loopd cancels it.
            assert wait_for_text(env.loopd_log, "was not authorized", 15), \
                "loopd's check did not end after its caller left"
            # pkttyagent reads the password blocking: once "Password: " is out it
            # handles polkitd's cancel only after a line (an empty one here).
            if agent.wait_for("Password: ", 0.5):
                os.write(agent.master, b"\n")
            assert agent.wait_for("Cancelled", 15), \
                f"the agent's prompt was not withdrawn after the caller left: {agent.output()!r}"
            print(f"# agent: {agent.output()!r}")
        finally:
            caller.kill()
            if agent:
                agent.stop()
    sequence_polkit(env)
    nothing_attached(env, "the cancelled Attach")


if __name__ == "__main__":
    if os.geteuid() == 0:
        sec.ensure_users()
    main(globals(), polkit=True, polkit_rules=RULES)
