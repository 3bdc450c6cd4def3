#!/usr/bin/python3
"""Nothing outside loopd stalls it (DESIGN.md, "Nothing outside stalls loopd"):
a loop device someone else holds flock()ed is passed over, not waited for under
the loop-control lock; backing files whose reads never return (a FUSE
filesystem, stuck_fs.py) stall only their own attaches, which fail with Timeout
within their own deadline and are undone once the reads return.
"""

import fcntl
import os
import statistics
import subprocess
import sys
import threading
import time

import dbus

from harness import (CALL_TIMEOUT, CallError, detach_quietly, detaching, loop_devices_backed_under, loop_name,
                     main, pydbus_attach, pydbus_options, read_text, verify_reply)

STUCK_FS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stuck_fs.py")
# More than loopd has workers (4): before, they all hung in the stuck reads.
STUCK_ATTACHES = 6
STUCK_DEADLINE = 8.0  # their timeout-usec: long enough for the samples taken meanwhile

# A reply later than this waited for the lock: udev holds a device locked for
# milliseconds, the test holds it for the whole attach.
NOT_WAITED = 5.0
# Another caller's attach while a stall lasts, against its median with no stall
# in the same run. Medians of a few, each checked at reply. Issue 13's target is
# 2x (1.0-1.6x measured); the check fails beyond 3x, above a sanitizer build's
# noise (2.2x seen under ASan) and far below what a stall costs (seconds).
SAMPLES = 5
STALL_TARGET = 2.0
STALL_LIMIT = 3.0


def first_free_loop():
    """The device LOOP_CTL_GET_FREE hands out next (losetup -f asks the same)."""
    return subprocess.run(["losetup", "-f"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_locked_free_device_is_passed_over(env):
    """Failed before (issue 13): the attach blocked in flock() while holding the
    loop-control lock; no caller got a reply until the lock was released."""
    unloaded = median_attach(env)
    image = env.image("gpt3")
    locked = first_free_loop()
    holder = os.open(locked, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        with detaching() as held:
            reply = held.add(pydbus_attach(image.path))
            took = time.monotonic() - started
            assert took < NOT_WAITED, f"Attach took {took:.1f} s with {locked} locked"
            assert reply["devnode"] != locked, f"Attach took {locked}, which another process holds locked"
            verify_reply(reply, image)
            name = loop_name(locked)
            backing = f"/sys/block/{name}/loop/backing_file"
            assert not os.path.exists(backing) or not read_text(backing), \
                f"{locked}, locked by someone else, was configured anyway"
            # The lock still held: every attach now passes it over.
            stalled = median_attach(env)
            if stalled / unloaded > STALL_LIMIT:
                # Another job on the machine can spoil one median (CI: 3.6x once);
                # the lock, held throughout, would spoil every one.
                print(f"# median {stalled * 1000:.1f} ms over {STALL_LIMIT}x: sampled again")
                stalled = min(stalled, median_attach(env))
            within_ratio(f"with {locked} locked by another process", unloaded, stalled)
    finally:
        os.close(holder)


def attach_timed(held, image):
    """Seconds an attach of image took; its reply checked at reply time. Detached
    when `held` (harness.detaching) ends."""
    before = time.monotonic()
    reply = held.add(pydbus_attach(image.path))
    took = time.monotonic() - before
    verify_reply(reply, image)
    return took


def median_attach(env):
    """Median seconds of SAMPLES attaches (and detaches) of fresh gpt3 images, one
    after another, each checked at reply time."""
    times = []
    for _ in range(SAMPLES):
        with detaching() as held:
            times.append(attach_timed(held, env.image("gpt3")))
    return statistics.median(times)


def within_ratio(what, unloaded, stalled):
    """Another caller's median attach while a stall lasts, against the unloaded one."""
    ratio = stalled / unloaded
    print(f"# attach median {what}: {stalled * 1000:.1f} ms, unloaded {unloaded * 1000:.1f} ms "
          f"({ratio:.2f}x; target {STALL_TARGET}x)")
    assert ratio <= STALL_LIMIT, \
        f"attaches {what} took {ratio:.2f}x their unloaded median ({stalled * 1000:.1f} vs " \
        f"{unloaded * 1000:.1f} ms), over {STALL_LIMIT}x"


class StuckFs:
    """stuck_fs.py mounted under the test's temp dir; reads block until release()."""

    def __init__(self, env, size=64 << 20):
        self.mnt, self.flag = env.path("stuck"), env.path("stuck.release")
        os.makedirs(self.mnt)
        self.proc = subprocess.Popen([sys.executable, STUCK_FS, self.mnt, str(size), self.flag])
        deadline = time.monotonic() + 10
        while not os.path.ismount(self.mnt):  # the FUSE process starting up
            assert self.proc.poll() is None and time.monotonic() < deadline, "stuck_fs.py did not mount"
            time.sleep(0.05)
        self.image = os.path.join(self.mnt, "image")

    def release_and_unmount(self):
        """Lets every read return, then unmounts once nothing holds the image: the
        late attaches come back and are undone, their files closed (until then the
        unmount is busy). Fails if that does not happen within CALL_TIMEOUT."""
        open(self.flag, "w").close()
        deadline = time.monotonic() + CALL_TIMEOUT
        while subprocess.run(["fusermount", "-u", self.mnt], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                left = loop_devices_backed_under(self.mnt)
                subprocess.run(["fusermount", "-u", "-z", self.mnt], check=False)
                raise AssertionError(f"the stuck image is still in use {CALL_TIMEOUT} s after its reads "
                                     f"returned; attached: {left}")
            time.sleep(0.1)  # loopd letting go of what it set up
        self.proc.wait(timeout=10)


def test_backing_files_that_never_answer_stall_nobody(env):
    """Failed before (issue 13): the stuck attaches took every worker, and another
    caller's attach of a normal image got no reply until the reads returned."""
    unloaded = median_attach(env)
    fs = StuckFs(env)
    stuck, answers = [], []
    try:
        started = time.monotonic()

        def stuck_attach():
            try:
                reply = pydbus_attach(fs.image, pydbus_options(timeout_usec=dbus.UInt64(int(STUCK_DEADLINE * 1e6))))
                answers.append((time.monotonic() - started, None, reply))
            except CallError as e:
                answers.append((time.monotonic() - started, e, None))

        stuck += [threading.Thread(target=stuck_attach, daemon=True) for _ in range(STUCK_ATTACHES)]
        for t in stuck:
            t.start()
        time.sleep(0.5)  # not a readiness wait: lets the stuck attaches reach their reads first
        image = env.image("gpt3")
        with detaching() as held:
            took = attach_timed(held, image)
            assert took < NOT_WAITED, f"a normal attach took {took:.1f} s beside {STUCK_ATTACHES} stuck ones"
            print(f"# a normal attach beside {STUCK_ATTACHES} stuck ones: {took * 1000:.0f} ms")
        stalled = median_attach(env)
        sampled = time.monotonic() - started
        for t in stuck:
            t.join(CALL_TIMEOUT + 30)
        assert len(answers) == STUCK_ATTACHES, f"{STUCK_ATTACHES - len(answers)} stuck attaches got no answer"
        for seconds, error, reply in answers:
            assert reply is None, f"an attach of a file whose reads never return succeeded: {reply}"
            assert error.name == "org.loopd1.Error.Timeout", f"a stuck attach answered {error}, expected Timeout"
            assert fs.image in error.message, f"the Timeout message does not name {fs.image}: {error.message}"
            assert seconds < STUCK_DEADLINE + NOT_WAITED, \
                f"a stuck attach was answered after {seconds:.1f} s, its deadline {STUCK_DEADLINE} s"
        if sampled < STUCK_DEADLINE:
            within_ratio(f"beside {STUCK_ATTACHES} stuck ones", unloaded, stalled)
        else:  # a machine so slow that the stall ended first: nothing to compare
            print(f"# the samples took {sampled:.1f} s, past the stall: no ratio")
    finally:
        # The stuck attaches end (Timeout) before the reads are let go, also when a
        # check above failed early; any that did attach is detached.
        for t in stuck:
            t.join(CALL_TIMEOUT + 30)
        for _, _, reply in answers:
            if reply is not None:
                detach_quietly(reply["diskseq"])
        fs.release_and_unmount()


FLOODERS = 16
# Each unprivileged flooder: a tight loop of calls that need no authorization.
FLOOD = r"""
import dbus, os, sys
bus = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
manager = bus.get_object("org.loopd1", "/org/loopd1")
while True:
    try:
        manager.WaitReady("no-such-device", dbus.UInt64(0), dbus_interface="org.loopd1.Manager")
    except dbus.exceptions.DBusException:
        pass
"""


def test_a_flood_of_calls_starves_nothing(env):
    """16 unprivileged clients call loopd as fast as they can while root attaches:
    uevents, workers and replies must not starve behind the bus traffic. The
    attach is ready at its reply and comes within NOT_WAITED."""
    os.chmod(env.tmp, 0o711)  # the private bus's socket lies in it, for nobody too
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    flooders = [subprocess.Popen([*nobody, "/usr/bin/python3", "-c", FLOOD], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE) for _ in range(FLOODERS)]
    try:
        time.sleep(1)  # not a readiness wait: lets the flood build up
        assert all(p.poll() is None for p in flooders), \
            f"a flooder died: {[p.stderr.read() for p in flooders if p.poll() is not None][:1]}"
        for _ in range(3):
            image = env.image("gpt3")
            with detaching() as held:
                took = attach_timed(held, image)
                print(f"# attach under a flood of {FLOODERS} clients: {took * 1000:.0f} ms")
                assert took < NOT_WAITED, f"an attach under the flood took {took:.1f} s"
    finally:
        for p in flooders:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main(globals())
