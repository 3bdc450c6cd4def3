#!/usr/bin/python3
"""loopd holding many devices: RSS, open fds, attach latency and GetManagedObjects
time as the count grows. A program that prints numbers, not a test.

Run as root from the build tree, with the soft fd limit of a plain shell (1024) so
that loopd has to raise its own, as under loopd.service (LimitNOFILE=524288):
    prlimit --nofile=1024:HARD env LOOPD=$PWD/build/loopd LOOPCTL=$PWD/build/loopctl \\
        LOOPD_SRC=$PWD PYTHONPATH=tests/integration tests/bench/many_devices.py [COUNT] [--hook CMD]
Held images are distinct files without a partition table (the fd and memory cost
is per device; partitions only add udev work).
"""
import argparse
import os
import signal
import statistics
import sys
import subprocess
import threading
import time

import dbus
import dbus.lowlevel

from harness import (LOOPCTL, LOOPD, Env, detach_quietly, loop_numbers, pydbus_attach, pydbus_call, pydbus_options,
                     remove_loop_devices, verify_reply)

THREADS = 8


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def rss_mib(pid):
    return rss_kib(pid) / 1024


def attach_latency(env, rounds=10):
    samples = []
    for _ in range(rounds):
        image = env.image("gpt3")
        started = time.monotonic()
        reply = pydbus_attach(image.path, pydbus_options())
        samples.append((time.monotonic() - started) * 1000)
        verify_reply(reply, image)
        detach_quietly(reply["diskseq"])
    return samples


def managed_objects_ms():
    started = time.monotonic()
    pydbus_call("GetManagedObjects", "", [], iface="org.freedesktop.DBus.ObjectManager")
    return (time.monotonic() - started) * 1000


def managed_objects_raw_ms(rounds=5, name="org.loopd1"):
    """The call's round trip without decoding the reply (libdbus reads and
    validates it, dbus-python makes no objects of it): loopd and dbus-daemon,
    not the client. The best of a few, on one connection."""
    conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
    try:
        best = float("inf")
        for _ in range(rounds):
            call = dbus.lowlevel.MethodCallMessage(name, "/org/loopd1", "org.freedesktop.DBus.ObjectManager",
                                                   "GetManagedObjects")
            started = time.monotonic()
            conn.send_message_with_reply_and_block(call, 60)
            best = min(best, (time.monotonic() - started) * 1000)
        return best
    finally:
        conn.close()


FLOOR = os.path.join(os.path.dirname(LOOPD), "tests", "bench", "loopd-managed-floor")
FLOOR_POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor-bus-policy.conf")
FLOOR_NAME = "org.loopd1.bench.Floor"


class Floor:
    """loopd-managed-floor serving a copy of loopd's reply as it is now: the same
    bytes from a server that spends nothing on them, so that what is left of a
    round trip is dbus-daemon and the client."""

    def __enter__(self):
        self.server = subprocess.Popen([FLOOR, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.server.stdout.readline().strip() == "ready", "loopd-managed-floor did not start"
        return self

    def __exit__(self, *exc):
        self.server.stdin.close()
        self.server.wait(timeout=10)


def sdbus_managed_objects_ms(name, rounds=5):
    """The best round trip through sd-bus, reading nothing of the reply: what
    loopd and dbus-daemon take, as loopctl, busctl and systemd's tools see it."""
    return float(subprocess.run([FLOOR, "call", name, str(rounds)], check=True, capture_output=True,
                                text=True).stdout)


def best_of(argv, rounds=5):
    """Wall time of a command (ms), the best of a few: what the command costs,
    not what the shared machine did meanwhile."""
    best = float("inf")
    for _ in range(rounds):
        started = time.monotonic()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        best = min(best, (time.monotonic() - started) * 1000)
    return best


def busctl_managed_objects_ms():
    return best_of(["busctl", "--system", "call", "org.loopd1", "/org/loopd1",
                    "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"])


def loopctl_list_ms():
    return best_of([LOOPCTL, "list"])


def cpu_ms(pid):
    """CPU time of every thread of pid so far (schedstat: ns, not clock ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return total / 1e6


def restart(env, held, perf_restart=None):
    """loopd killed with every device held, and started again: how long until it
    owns its name again, and until it answers WaitReady for a held device. Every
    device must be adopted (listed), none re-attached (same diskseqs).
    Returns (named ms, answered ms)."""
    perf = None
    if perf_restart:
        # System-wide (loopd's pid is not known before it starts); read with
        # perf report --comm loopd.
        perf = subprocess.Popen(["perf", "record", "-a", "-g", "-o", perf_restart], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(1)  # perf's own start-up, before the clock starts
    started = time.monotonic()
    env.restart_loopd(kill=True)  # returns once the name is owned (polled every 20 ms)
    named = (time.monotonic() - started) * 1000
    cpu = cpu_ms(env.loopd.pid)
    if held:
        pydbus_call("WaitReady", "st", [str(held[-1]), 0])
    answered = (time.monotonic() - started) * 1000
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    listed = pydbus_call("GetManagedObjects", "", [], iface="org.freedesktop.DBus.ObjectManager")
    diskseqs = {int(path.rsplit("/", 1)[1]) for path in listed if "/device/" in path}
    assert diskseqs == set(held), f"after the restart {len(diskseqs)} devices listed, {len(held)} held"
    print(f"restart with {len(held)} held (SIGKILL, start again): name owned after {named:.0f} ms, "
          f"WaitReady answered after {answered:.0f} ms; all {len(held)} adopted; loopd's CPU until its name "
          f"was owned {cpu:.0f} ms", flush=True)
    return named, answered


def hook(command, env, held):
    """--hook: a command run at each mark (e.g. tests/bench/cpu_split.py, perf or
    strace against $LOOPD_PID; $BUS_PID is dbus-daemon's), to profile at that scale."""
    if command:
        subprocess.run(["sh", "-c", command], check=False,
                       env=dict(os.environ, LOOPD_PID=str(env.loopd.pid), BUS_PID=str(env.bus.pid),
                                  HELD=str(len(held))))


def attach_all(env, held, lock, todo):
    images = [env.image("none") for _ in range(todo)]

    def attach_some(i):
        for image in images[i::THREADS]:
            reply = pydbus_attach(image.path, pydbus_options())
            with lock:
                held.append(reply["diskseq"])
    workers = [threading.Thread(target=attach_some, args=(i,)) for i in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def detach_all(held):
    def detach_some(i):
        for diskseq in held[i::THREADS]:
            detach_quietly(diskseq)
    workers = [threading.Thread(target=detach_some, args=(i,)) for i in range(THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    held.clear()


def targets_table(count, first, last, attach_none, restarts, rss):
    """Each figure against its target (issue 16) and against its baseline from this
    run: the same figure with no device held."""
    rows = [
        ("attach median, GPT 3 parts (ms)", "≤ 1.1 × none held", attach_none, last["attach"],
         last["attach"] <= 1.1 * attach_none),
        ("GetManagedObjects round trip, sd-bus client, reply not read (ms)", "≤ 50", first["sdbus"], last["sdbus"],
         last["sdbus"] <= 50),
        ("― the same reply from a server that only copies it (floor, ms)", "-", first["sdbus_floor"],
         last["sdbus_floor"], None),
        ("GetManagedObjects round trip, libdbus client, reply validated, not decoded (ms)", "≤ 50", first["raw"],
         last["raw"], last["raw"] <= 50),
        ("― the same reply from a server that only copies it (floor, ms)", "-", first["raw_floor"],
         last["raw_floor"], None),
        ("GetManagedObjects, busctl (ms)", "≤ 50", first["busctl"], last["busctl"], last["busctl"] <= 50),
        ("GetManagedObjects, python3-dbus (ms)", "≤ 50", first["python"], last["python"], last["python"] <= 50),
        ("loopctl list (ms)", "≤ 100", first["list"], last["list"], last["list"] <= 100),
        ("restart: name owned (ms)", "≤ 1000", restarts[0][0], restarts[1][0], restarts[1][0] <= 1000),
        ("restart: WaitReady answered (ms)", "≤ 1000", restarts[0][1], restarts[1][1], restarts[1][1] <= 1000),
        ("RSS per device (KiB), (held - idle) / held", "≤ 4", None, (rss[count] - rss[0]) / count,
         (rss[count] - rss[0]) / count <= 4),
    ]
    print(f"\n| figure | target | none held (baseline) | {count} held | ratio | met |")
    print("|---|---|---:|---:|---:|---|")
    for name, target, base, value, met in rows:
        ratio = f"{value / base:.2f}" if base else "-"
        base_text = f"{base:.1f}" if base is not None else "-"
        met_text = "-" if met is None else "yes" if met else "no"
        print(f"| {name} | {target} | {base_text} | {value:.1f} | {ratio} | {met_text} |", flush=True)
    return rows


def summary_table(count, runs):
    """Each figure over every run: value (ratio to that run's baseline), and in
    how many runs its target was met."""
    print(f"\n{len(runs)} runs at {count} held:\n")
    print("| figure | target | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | met |")
    print("|---|---|" + "---:|" * len(runs) + "---|")
    for i, (name, target, *_rest) in enumerate(runs[0]):
        cells = []
        for rows in runs:
            _, _, base, value, _ = rows[i]
            cells.append(f"{value:.1f}" + (f" ({value / base:.2f} ×)" if base else ""))
        met = "-" if runs[0][i][4] is None else f"{sum(1 for rows in runs if rows[i][4])} of {len(runs)}"
        print(f"| {name} | {target} | " + " | ".join(cells) + f" | {met} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("count", type=int, nargs="?", default=2000)
    parser.add_argument("--hook", help="shell command run at each mark ($LOOPD_PID, $HELD set)")
    parser.add_argument("--perf-restart", metavar="FILE", help="perf record -a -g the restart with all held")
    parser.add_argument("--runs", type=int, default=1, help="runs, each in a fresh environment; a summary "
                        "table over all of them at the end")
    args = parser.parse_args()
    count = args.count
    runs = []
    for i in range(args.runs):
        if args.runs > 1:
            print(f"\n### run {i + 1} of {args.runs}\n", flush=True)
        before = loop_numbers()
        try:
            runs.append(run(args, count))
        finally:
            made = loop_numbers() - before
            print(f"loop devices made by this run: {len(made)}, left after removing them: "
                  f"{remove_loop_devices(made)}", flush=True)
    if len(runs) > 1:
        summary_table(count, runs)


def run(args, count):
    with Env(bus_policies=[FLOOR_POLICY]) as env:
        held, lock = [], threading.Lock()
        marks = sorted({0, count // 2, count})
        rss, figures, samples = {}, {}, {}
        restarts = [restart(env, held)]  # the baseline: nothing to adopt
        pid = env.loopd.pid
        print("| held | loopd RSS (MiB) | loopd fds | attach median (ms, GPT 3 parts) | GetManagedObjects, sd-bus, "
              "not read (ms) / floor | GetManagedObjects, libdbus, not decoded (ms) / floor | GetManagedObjects, "
              "python3-dbus (ms) | GetManagedObjects, busctl (ms) | loopctl list (ms) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        try:
            for mark in marks:
                attach_all(env, held, lock, mark - len(held))
                assert len(held) == mark, f"{len(held)} held, expected {mark}"
                rss[mark] = rss_kib(pid)
                hook(args.hook, env, held)
                samples[mark] = attach_latency(env)
                f = figures[mark] = {"attach": statistics.median(samples[mark]), "raw": managed_objects_raw_ms(),
                                     "sdbus": sdbus_managed_objects_ms("org.loopd1"),
                                     "python": managed_objects_ms(), "busctl": busctl_managed_objects_ms(),
                                     "list": loopctl_list_ms()}
                with Floor():
                    f["raw_floor"] = managed_objects_raw_ms(name=FLOOR_NAME)
                    f["sdbus_floor"] = sdbus_managed_objects_ms(FLOOR_NAME)
                print(f"| {mark} | {rss[mark] / 1024:.2f} | {fds(pid)} | {f['attach']:.1f} | {f['sdbus']:.1f} / "
                      f"{f['sdbus_floor']:.1f} | {f['raw']:.1f} / {f['raw_floor']:.1f} | {f['python']:.1f} | "
                      f"{f['busctl']:.1f} | {f['list']:.1f} |", flush=True)
            restarts.append(restart(env, held, args.perf_restart))
            pid = env.loopd.pid
            # Memory is judged per attached device: the slope, not a total.
            print(f"idle RSS {rss[0]:.0f} KiB; per device ({count} held - idle) / {count}: "
                  f"{(rss[count] - rss[0]) / count:.2f} KiB; from {count // 2} to {count}: "
                  f"{(rss[count] - rss[count // 2]) / (count - count // 2):.2f} KiB", flush=True)
        finally:
            detach_all(held)
            print(f"after releasing all: RSS {rss_mib(pid):.2f} MiB, {fds(pid)} fds", flush=True)
        # None held again: the attach baseline pools before and after, so that a
        # machine that got busier meanwhile does not pass for an effect of the devices.
        after = attach_latency(env)
        attach_none = statistics.median(samples[0] + after)
        print(f"attach median with none held: before {figures[0]['attach']:.1f} ms, after "
              f"{statistics.median(after):.1f} ms, pooled {attach_none:.1f} ms", flush=True)
        return targets_table(count, figures[0], figures[count], attach_none, restarts, rss)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("root needed")
    main()
