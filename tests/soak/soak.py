#!/usr/bin/python3
"""Soak: many clients attach and detach in a loop against a loopd that drops udev
events on purpose (--test-drop random:P), and nothing may go wrong (issue 3).

Each client has its own bus connection (python3-dbus) and its own image, and runs
cycles of Attach -> verify_ready (at reply time) -> Detach -> verify_detached.
Counted: wrong devices (a reply whose device was not what API.md promises),
hung calls (no reply within --call-timeout), error replies, and, after the run,
leaked devices (loop devices backed by the soak's images, devices loopd still
lists, partitions left on released devices, ownership records left). loopd's open
fd count and RSS are read when every client has finished --sample-after cycles
(all idle, nothing attached) and again at the end: the fd counts must be equal.

Prints a summary table; exits 1 on any wrong, hung, error or leak or a changed fd
count, 77 when not root (meson: skipped). Uses the integration tests' harness for
the private bus, udevd and loopd (LOOPD, LOOPCTL, LOOPD_SRC as there).

    tests/soak/soak.py --clients 32 --cycles 300 --drop-ratio 0.05
"""

import argparse
from collections import Counter
import os
import random
import re
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
os.environ.setdefault("LOOPD_LOG_LEVEL", "info")  # a debug log of a long soak is huge

import dbus  # noqa: E402

import harness  # noqa: E402
from harness import (BUS_NAME, MANAGER_IFACE, MANAGER_PATH, Env, _attach_reply,  # noqa: E402
                     _plain, loop_name, read_text, unbound_loop_devices_with_partitions,
                     verify_detached, verify_reply)

KINDS = ["gpt3", "mbr2", "none"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--cycles", type=int, default=300, help="attach/detach cycles per client")
    p.add_argument("--drop-ratio", type=float, default=0.05,
                   help="probability with which loopd's fault hook drops each udev event")
    p.add_argument("--drop-rule", action="append", default=[], metavar="RULE",
                   help="another --test-drop rule for loopd (repeatable), e.g. kernel:part1 "
                        "or part1 (every event of partition 1 the kernel sent on its own)")
    p.add_argument("--seed", type=int, default=None, help="fault hook seed (default: random)")
    p.add_argument("--sample-after", type=int, default=100,
                   help="cycles after which fds and RSS are read first (default 100; "
                        "half the cycles if there are not more than that)")
    p.add_argument("--call-timeout", type=float, default=30.0,
                   help="seconds after which a call counts as hung (loopd's own "
                        "readiness deadline is 10 s)")
    args = p.parse_args()
    if args.clients < 1 or args.cycles < 1 or not 0 <= args.drop_ratio <= 1:
        p.error("--clients and --cycles must be positive, --drop-ratio within 0..1")
    if args.sample_after >= args.cycles:
        args.sample_after = max(1, args.cycles // 2)
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    return args


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.cycles = 0
        self.wrong = []
        self.hung = []
        self.errors = []
        self.attach_ms = []

    def add(self, field, what):
        with self.lock:
            getattr(self, field).append(what)

    def done_cycle(self, total):
        with self.lock:
            self.cycles += 1
            if total >= 1000 and self.cycles % (total // 10) == 0:
                print(f"# {self.cycles}/{total} cycles, {len(self.wrong)} wrong, "
                      f"{len(self.hung)} hung, {len(self.errors)} errors", flush=True)


def daemon_usage(pid):
    """(open fds, VmRSS in KiB, threads, what the fds are, RssAnon, RssFile) of a process."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    status = dict(line.split(":", 1) for line in read_text(f"/proc/{pid}/status").splitlines())
    kib = {k: int(status[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")}
    return len(targets), kib["VmRSS"], int(status["Threads"]), targets, kib["RssAnon"], kib["RssFile"]


def fd_growth(before, after):
    """What the extra fds point at, most frequent first: 'loop*' for loop devices."""
    def kind(target):
        return "/dev/loop*" if target.startswith("/dev/loop") else target.split(":[")[0]
    grown = Counter(map(kind, after)) - Counter(map(kind, before))
    return ", ".join(f"{n} x {k}" for k, n in grown.most_common())


class Client(threading.Thread):
    def __init__(self, index, image, args, stats, barrier):
        super().__init__(daemon=True)
        self.index, self.image, self.args, self.stats, self.barrier = \
            index, image, args, stats, barrier

    def call(self, conn, method, signature, call_args):
        """(reply, None) or (None, error name); a hung call raises Hung."""
        started = time.monotonic()
        try:
            reply = conn.call_blocking(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, method, signature,
                                       call_args, timeout=self.args.call_timeout)
            return _plain(reply), None, time.monotonic() - started
        except dbus.exceptions.DBusException as e:
            elapsed = time.monotonic() - started
            if e.get_dbus_name() == "org.freedesktop.DBus.Error.NoReply" or \
                    elapsed >= self.args.call_timeout:
                raise Hung(f"client {self.index}: {method} got no reply in {elapsed:.1f} s") from None
            return None, f"{e.get_dbus_name()}: {e.get_dbus_message()}", elapsed

    def run(self):
        conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
        sampled = False
        try:
            for cycle in range(1, self.args.cycles + 1):
                self.cycle(conn, cycle)
                if cycle == self.args.sample_after:
                    sampled = True
                    try:
                        self.barrier.wait()  # the last to arrive samples loopd
                    except threading.BrokenBarrierError:
                        pass  # another client stopped early: no mid-run sample
        except Hung as e:
            self.stats.add("hung", str(e))  # what it left attached shows up as a leak
        except Exception as e:  # noqa: BLE001 - a bug here must not pass for a hang
            self.stats.add("errors", f"client {self.index}: {type(e).__name__}: {e}")
        finally:
            if not sampled:
                self.barrier.abort()  # the others must not wait for this one
            conn.close()

    def cycle(self, conn, cycle):
        what = f"client {self.index} cycle {cycle}"
        options = dbus.Dictionary({}, signature="sv")
        reply, error, elapsed = self.call(conn, "Attach", "sa{sv}", [self.image.path, options])
        if error:
            self.stats.add("errors", f"{what}: Attach: {error}")
            return
        reply = _attach_reply(reply)
        self.stats.add("attach_ms", elapsed * 1000)
        try:
            verify_reply(reply, self.image)  # at reply time
        except AssertionError as e:
            self.stats.add("wrong", f"{what}: {reply['devnode']} diskseq {reply['diskseq']}: {e}")
        _, error, _ = self.call(conn, "Detach", "ta{sv}", [dbus.UInt64(reply["diskseq"]), options])
        if error:
            self.stats.add("errors", f"{what}: Detach {reply['diskseq']}: {error}")
            return
        try:
            verify_detached_despite_reuse(reply["devnode"], reply["diskseq"])
        except AssertionError as e:
            self.stats.add("wrong", f"{what}: after Detach of {reply['devnode']}: {e}")
        self.stats.done_cycle(self.args.clients * self.args.cycles)


class Hung(Exception):
    pass


def leaks(env):
    """Everything the run left behind."""
    found = [f"{devnode} still attached (backed by {backing})"
             for devnode, backing in env.attached_here()]
    conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
    try:
        count = conn.call_blocking(BUS_NAME, MANAGER_PATH, "org.freedesktop.DBus.Properties",
                                   "Get", "ss", [MANAGER_IFACE, "Devices"])
    finally:
        conn.close()
    if count:
        found.append(f"loopd still lists {int(count)} device(s)")
    found += [f"{d}: partitions left after release"
              for d in sorted(unbound_loop_devices_with_partitions() - env.stale_before)]
    records = os.path.join(env.tmp, "run", "records")
    if os.path.isdir(records):
        found += [f"ownership record {name} left" for name in sorted(os.listdir(records))]
    return found


def verify_detached_despite_reuse(devnode, diskseq):
    """verify_detached, except that another client may attach the freed number
    between its reads (then the partitions it sees are that client's): a failure
    counts only if the device's diskseq did not move and it is still unbound."""
    sysfs = f"/sys/block/{loop_name(devnode)}"
    before = read_text(f"{sysfs}/diskseq")
    try:
        verify_detached(devnode, diskseq)
    except AssertionError:
        if read_text(f"{sysfs}/diskseq") != before or os.path.exists(f"{sysfs}/loop/backing_file"):
            return  # re-attached by someone else meanwhile: this check saw their device
        raise


def kind_of(message):
    """A message with its numbers and names blanked, for counting by kind."""
    message = re.sub(r"^client \d+ cycle \d+: ", "", message)
    message = re.sub(r"/var/tmp/\S+", "FILE", message)
    return re.sub(r"\d+", "N", message)


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def soak(env, args):
    images = [env.image(KINDS[i % len(KINDS)]) for i in range(args.clients)]
    stats = Stats()
    samples = {}

    def sample_mid():
        samples["mid"] = daemon_usage(env.loopd.pid)

    barrier = threading.Barrier(args.clients, action=sample_mid)
    started = time.monotonic()
    clients = [Client(i, images[i], args, stats, barrier) for i in range(args.clients)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    duration = time.monotonic() - started
    env.assert_loopd_alive()
    samples["end"] = daemon_usage(env.loopd.pid)
    leaked = leaks(env)
    log = read_text(env.loopd_log)
    return stats, samples, leaked, duration, log


def report(args, stats, samples, leaked, duration, log):
    mid, end = samples.get("mid"), samples.get("end")
    total = args.clients * args.cycles
    rows = [
        ("clients x cycles", f"{args.clients} x {args.cycles}"),
        ("drop ratio, seed", f"{args.drop_ratio}, {args.seed}"),
        ("drop rules", " ".join(args.drop_rule) or "none"),
        ("cycles completed", f"{stats.cycles} of {total} in {duration:.1f} s"),
        ("wrong devices", len(stats.wrong)),
        ("hung calls", len(stats.hung)),
        ("error replies", len(stats.errors)),
        ("leaked", len(leaked)),
        ("synthetic triggers", log.count("synthetic trigger")),
        ("re-enumerations", log.count("re-enumerat")),
        ("attach ms p50/p99/max", "{:.1f} / {:.1f} / {:.1f}".format(
            percentile(stats.attach_ms, 50), percentile(stats.attach_ms, 99),
            max(stats.attach_ms, default=float("nan")))),
        (f"loopd fds after {args.sample_after} / end", f"{mid[0] if mid else 'n/a'} / {end[0]}"),
        (f"loopd VmRSS KiB after {args.sample_after} / end", f"{mid[1] if mid else 'n/a'} / {end[1]}"),
        # Heap and stacks apart from library pages first touched by a rarer path.
        ("  of which RssAnon, RssFile", f"{mid[4] if mid else 'n/a'} / {end[4]}, "
                                         f"{mid[5] if mid else 'n/a'} / {end[5]}"),
        (f"loopd threads after {args.sample_after} / end", f"{mid[2] if mid else 'n/a'} / {end[2]}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("loopd soak")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    for name, items in (("WRONG", stats.wrong), ("HUNG", stats.hung),
                        ("ERROR", stats.errors), ("LEAK", leaked)):
        for item in items[:10]:
            print(f"{name}: {item}")
        if len(items) > 10:
            print(f"{name}: ... and {len(items) - 10} more; all of them by kind:")
            for kind, n in Counter(map(kind_of, items)).most_common():
                print(f"{name}: {n:6} x {kind}")
    problems = []
    if stats.wrong or stats.hung or stats.errors or leaked:
        problems.append("wrong/hung/error/leaked above")
    if stats.cycles != total and not (stats.hung or stats.errors):
        problems.append(f"only {stats.cycles} of {total} cycles completed")
    if mid is None:
        problems.append(f"no sample after {args.sample_after} cycles (a client stopped early)")
    elif mid[0] != end[0]:
        problems.append(f"loopd's open fds went from {mid[0]} to {end[0]} "
                        f"(more: {fd_growth(mid[3], end[3]) or 'none'})")
    for p in problems:
        print(f"FAIL: {p}")
    return not problems


def main():
    args = parse_args()
    if os.geteuid() != 0:
        print("SKIP: the soak needs root")
        sys.exit(77)
    signal.signal(signal.SIGTERM, harness._on_sigterm)  # meson's timeout: clean up
    ok = False
    try:
        loopd_args = ["--test-drop", f"random:{args.drop_ratio}", "--test-seed", str(args.seed)]
        for rule in args.drop_rule:
            loopd_args += ["--test-drop", rule]
        with Env(loopd_args) as env:
            ok = report(args, *soak(env, args))
            if not ok:
                os.environ["LOOPD_TEST_KEEP"] = "1"  # the logs explain the failure: keep them
    except AssertionError as e:  # Env's own checks at exit (leaks, loopd's exit)
        text = str(e)
        print(f"FAIL: {text[:600]}{' ...' if len(text) > 600 else ''}")
        ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
