#!/usr/bin/python3
"""Attach-to-ready benchmark: loopd side by side with the floor and the tools users
pick today. Run it with scripts/bench (root), which installs what it needs and builds.

Contenders, all on the same 64 MiB GPT image with 3 partitions, interleaved in one
run (each round shuffles their order, at each concurrency):

  floor    the raw kernel sequence inside loopd-bench (tests/bench/floor.cpp)
  loopd    Manager.Attach / Manager.Detach over D-Bus, one connection per client
  losetup  losetup -f --show -P + partx -a + udevadm settle; losetup -d + udevadm settle
  udisks2  Manager.LoopSetup / Loop.Delete (Debian's udisksd with polkitd, on the
           private bus; started for its own batches only, so its event processing
           does not load the machine while the others run)

Every reply is checked at reply time, like harness.verify_ready(): a contender that
answers before the device and every partition are present and udev-processed is
marked, and its latency is not comparable. This program measures and prints; it
never asserts anything about speed.

Output: a markdown table on stdout (and --markdown FILE), the raw samples as JSON
(--json FILE), and a PNG of the latency distributions drawn by gnuplot (--plot FILE).
"""

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import harness  # tests/integration: private bus, udevd, loopd from the build tree
from gpt_copies import gpt_copies

CONTENDERS = ("floor", "loopd", "losetup", "udisks2")
CLK_TCK = os.sysconf("SC_CLK_TCK")
UDISKSD = "/usr/libexec/udisks2/udisksd"
POLKITD = "/usr/lib/polkit-1/polkitd"
DBUS_POLICIES = ("/usr/share/dbus-1/system.d/org.freedesktop.UDisks2.conf",
                 "/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")

# Cycles per client per batch, and rounds, per concurrency: enough samples for a
# p99 that is not just the maximum of a handful.
PLAN = {1: (10, 12), 8: (3, 6), 32: (1, 5)}
QUICK_PLAN = {1: (5, 2), 8: (2, 1), 32: (1, 1)}

# ------------------------------------------------------------------ environment


class BenchEnv(harness.Env):
    """harness.Env whose private bus also lets udisksd and polkitd own their names:
    their Debian policy files are added to the bus configuration the harness wrote,
    which the bus then reloads."""

    def __enter__(self):
        # A temp dir of our own prefix: clean-ups of loopd-test-* by others must not
        # pull the bus socket and the image from under a long run.
        mkdtemp = tempfile.mkdtemp
        harness.tempfile = type("T", (), {"mkdtemp": staticmethod(
            lambda **kw: mkdtemp(**{**kw, "prefix": "loopd-bench-"}))})
        try:
            return super().__enter__()
        finally:
            harness.tempfile = tempfile

    def _start_bus(self):
        super()._start_bus()
        config = os.path.join(self.tmp, "bus.conf")
        text = harness.read_text(config)
        extra = "".join(f"  <include>{p}</include>\n" for p in DBUS_POLICIES
                        if os.path.exists(p) and p not in text)
        if extra:
            with open(config, "w") as f:
                f.write(text.replace("</busconfig>", extra + "</busconfig>"))
            harness.run("busctl", "--system", "call", "org.freedesktop.DBus", "/org/freedesktop/DBus",
                        "org.freedesktop.DBus", "ReloadConfig")

    def _start_loopd(self):
        # loopd's runtime dir (records, by-ref links) on tmpfs, as /run is on any
        # systemd machine. This machine's /run lies on the root ext4, which has no
        # journal: there every new inode makes ext4 scan past recently deleted
        # ones (recently_deleted() in perf), a cost no production /run has.
        run = os.path.join(self.tmp, "run")
        if not os.path.ismount(run):
            os.makedirs(run, exist_ok=True)
            harness.run("mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "loopd-bench-run", run)
        super()._start_loopd()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            # The harness's clean-up could not remove the mount point.
            run = os.path.join(self.tmp, "run")
            if os.path.ismount(run):
                harness.run("umount", "--lazy", run, check=False)
                if not os.environ.get("LOOPD_TEST_KEEP"):
                    shutil.rmtree(self.tmp, ignore_errors=True)

    def ensure_udevd(self):
        """Someone else's udevd may have been stopped by its owner meanwhile."""
        if not harness.udevd_running():
            print("# udevd is gone (its owner stopped it); starting one", file=sys.stderr)
            self._start_udevd()


def name_has_owner(name):
    p = harness.run("busctl", "--system", "status", name, check=False)
    return p.returncode == 0


def wait_for_name(proc, name, what, limit=20.0):
    deadline = time.monotonic() + limit
    while not name_has_owner(name):  # a daemon's start-up, not a measurement
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not own {name} within {limit} s")
        time.sleep(0.02)


class Udisks:
    """polkitd for the whole run, udisksd only around udisks2 batches."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.polkitd = None
        self.udisksd = None
        self.log = open(os.path.join(tmp, "udisks.log"), "a")

    def start_polkitd(self):
        if name_has_owner("org.freedesktop.PolicyKit1"):
            return  # the harness started one (Env(polkit=True))
        # polkitd drops to its own user, which the Debian policy lets own the name.
        self.polkitd = subprocess.Popen([POLKITD, "--no-debug"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_name(self.polkitd, "org.freedesktop.PolicyKit1", "polkitd")

    def start(self):
        self.udisksd = subprocess.Popen([UDISKSD], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_name(self.udisksd, "org.freedesktop.UDisks2", "udisksd")

    def stop(self):
        if self.udisksd is not None:
            self.udisksd.send_signal(signal.SIGINT)  # its unit's KillSignal
            try:
                self.udisksd.wait(10)
            except subprocess.TimeoutExpired:
                self.udisksd.kill()
                self.udisksd.wait()
            self.udisksd = None

    def close(self):
        self.stop()
        if self.polkitd is not None:
            self.polkitd.terminate()
            try:
                self.polkitd.wait(10)
            except subprocess.TimeoutExpired:
                self.polkitd.kill()
                self.polkitd.wait()
        self.log.close()


class Driver:
    """loopd-bench, one JSON command and one JSON answer per line."""

    def __init__(self, exe, image):
        self.proc = subprocess.Popen(
            [exe, "--image", image.path, "--partitions", str(image.nparts),
             "--table-uuid", image.table_uuid or ""],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def call(self, **command):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"loopd-bench exited ({self.proc.wait()}) during {command}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.call(cmd="release", concurrency=8)
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(120)


# ------------------------------------------------------------------ measurements


def loopd_pid(env):
    """loopd's own pid: the harness's child, or that child's child when a profiler
    wraps it (--wrap-loopd: strace, perf)."""
    pid = env.loopd.pid
    with open(f"/proc/{pid}/comm") as f:
        if f.read().strip() == "loopd":
            return pid
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm == "loopd" and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            return int(entry)
    return pid  # valgrind runs loopd inside its own process


def proc_cpu_seconds(pid):
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat


def proc_rss_kib(pid, field="VmRSS"):
    """VmRSS, or RssAnon / RssFile (heap and stacks / mapped libraries)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def idle_cpu_percent(pid, seconds=4.0):
    """loopd's CPU use while nobody calls it: its periodic work (housekeeping)."""
    before = proc_cpu_seconds(pid)
    time.sleep(seconds)
    return 100 * (proc_cpu_seconds(pid) - before) / seconds


def others_running():
    """Other people's test runs on this machine (they share udevd and loop devices)."""
    p = subprocess.run(["pgrep", "-f", "test_"], capture_output=True, text=True)
    mine = {str(os.getpid())}
    return [pid for pid in p.stdout.split() if pid not in mine]


def loop_device_count():
    return sum(1 for n in os.listdir("/sys/block") if re.fullmatch(r"loop\d+", n))


def percentile(sorted_values, q):
    """Nearest rank."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def median(values):
    v = sorted(values)
    if not v:
        return float("nan")
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


class Results:
    def __init__(self):
        self.batches = []  # the raw answers of loopd-bench, plus our own fields

    def add(self, batch):
        self.batches.append(batch)

    def of(self, contender, concurrency, phase="main"):
        return [b for b in self.batches if b["contender"] == contender
                and b["concurrency"] == concurrency and b.get("phase", "main") == phase]

    def summary(self, contender, concurrency, phase="main"):
        batches = self.of(contender, concurrency, phase)
        samples = [s for b in batches for s in b["samples"]]
        if not batches:
            return None
        ok = [s for s in samples if "error" not in s]
        attach = sorted(s["attach_ms"] for s in ok)
        detach = sorted(s["detach_ms"] for s in ok)
        early = [s for s in ok if "not_ready" in s]
        wall = sum(b["wall_ms"] for b in batches) / 1000
        out = {
            "n": len(samples), "errors": len(samples) - len(ok), "early": len(early),
            "early_example": early[0]["not_ready"] if early else "",
            "early_disk_ready": sum(1 for s in early if s.get("disk_ready")),
            "error_example": next((s["error"] for s in samples if "error" in s), ""),
            "not_released": sum(1 for s in ok if "not_released" in s),
            "released_example": next((s["not_released"] for s in ok if "not_released" in s), ""),
            "median": median(attach), "p90": percentile(attach, 0.9), "p99": percentile(attach, 0.99),
            "detach_median": median(detach),
            "cycles_per_s": len(ok) / wall if wall > 0 else float("nan"),
            "disturbed": sum(1 for b in batches if b.get("disturbed")),
            "batches": len(batches),
        }
        cpu = [b["loopd_cpu_s"] for b in batches if "loopd_cpu_s" in b]
        if cpu and ok:
            out["loopd_cpu_ms_per_cycle"] = 1000 * sum(cpu) / len(ok)
        return out


def run_batch(env, driver, udisks, results, contender, concurrency, cycles, phase="main"):
    env.ensure_udevd()
    if contender == "udisks2":
        udisks.start()
    disturbed = bool(others_running())
    cpu_before = proc_cpu_seconds(loopd_pid(env))
    started = time.monotonic()  # CLOCK_MONOTONIC: perf record -k CLOCK_MONOTONIC lines up
    try:
        batch = driver.call(cmd="batch", contender=contender, concurrency=concurrency, cycles=cycles)
    finally:
        if contender == "udisks2":
            udisks.stop()
    if "error" in batch and "samples" not in batch:
        raise RuntimeError(f"{contender} c={concurrency}: {batch['error']}")
    batch["loopd_cpu_s"] = proc_cpu_seconds(loopd_pid(env)) - cpu_before
    if contender != "loopd":
        batch.pop("loopd_cpu_s")  # loopd's CPU while others ran is only event filtering
    batch["disturbed"] = disturbed or bool(others_running())
    batch["phase"] = phase
    batch["monotonic"] = [started, time.monotonic()]
    results.add(batch)
    env.assert_loopd_alive()
    return batch


def many_devices_phase(env, driver, udisks, results, args):
    """RSS with 1, 100, half of --many and --many attached (per-device slope), and
    latency with --many attached against none."""
    out = {"max_loop": harness.read_text("/sys/module/loop/parameters/max_loop"),
           "loop_devices_before": loop_device_count()}
    existing = harness.loop_numbers()
    pid = loopd_pid(env)
    out["rss_kib"] = {"0": proc_rss_kib(pid)}
    out["idle_cpu_pct"] = {"0": idle_cpu_percent(pid)}
    out["rss_anon_kib"] = {"0": proc_rss_kib(pid, "RssAnon")}
    out["rss_file_kib_0"] = proc_rss_kib(pid, "RssFile")
    cycles, rounds = args.many_latency
    # Both latency groups start with udev's queue empty: right after filling, udev
    # is still busy with the close-after-write changes of the last attaches, and
    # that backlog is not what "latency with N attached" means.
    harness.run("udevadm", "settle", check=False)
    for _ in range(rounds):  # with none held: the baseline, just before
        for c in random.sample(("floor", "loopd"), 2):
            run_batch(env, driver, udisks, results, c, 1, cycles, phase="none-held")
    # Distinct images (each its own sfdisk run, so its own table and partition
    # UUIDs), as 1000 real images would be. The same image 1000 times makes every
    # partition claim the same /dev/disk/by-partuuid links, and udev 252 then scans
    # all claimants on each event: a udev cost that the floor pays as much.
    images = []
    if args.held_images == "distinct":
        images = gpt_copies(env.image("gpt3").path, args.many, env.tmp)
    out["held_images"] = args.held_images
    held = 0
    cpu_before = proc_cpu_seconds(pid)
    for target in sorted({t for t in (1, 100, args.many // 2, args.many) if 0 < t <= args.many}):
        answer = driver.call(cmd="hold", count=target - held, concurrency=args.hold_concurrency,
                             partscan=not args.hold_no_partscan, images=images)
        if answer.get("errors"):
            out.setdefault("hold_errors", []).extend(answer["errors"][:3])
        held = answer["held"]
        out["rss_kib"][str(target)] = proc_rss_kib(pid)
        out.setdefault("rss_anon_kib", {})[str(target)] = proc_rss_kib(pid, "RssAnon")
        out.setdefault("hold", []).append({"target": target, "held": held, "wall_ms": answer["wall_ms"]})
    out["hold_cpu_ms_per_attach"] = 1000 * (proc_cpu_seconds(pid) - cpu_before) / max(held, 1)
    out["loop_devices_with_held"] = loop_device_count()
    out["held"] = held
    out["idle_cpu_pct"][str(held)] = idle_cpu_percent(pid)
    harness.run("udevadm", "settle", check=False)
    for _ in range(rounds):
        for c in random.sample(("floor", "loopd"), 2):
            run_batch(env, driver, udisks, results, c, 1, cycles, phase="many-held")
    out["rss_kib_after_cycles"] = proc_rss_kib(pid)
    released = driver.call(cmd="release", concurrency=args.hold_concurrency)
    out["release_wall_ms"] = released["wall_ms"]
    if released.get("errors"):
        out["release_errors"] = released["errors"][:3]
    out["rss_kib_after_release"] = proc_rss_kib(pid)
    # The baseline again, after: "none held" pools samples from both sides of the
    # held phase, so a drift of this (shared) machine's speed meanwhile does not
    # pass for an effect of the held devices.
    harness.run("udevadm", "settle", check=False)
    for _ in range(rounds):
        for c in random.sample(("floor", "loopd"), 2):
            run_batch(env, driver, udisks, results, c, 1, cycles, phase="none-held")
    # The loop devices the kernel made for the held ones go again: left idle, they
    # slow udev in every later run (the scale part, the tests).
    out["loop_devices_not_removed"] = harness.remove_loop_devices(harness.loop_numbers() - existing)
    return out


# ------------------------------------------------------------------ reporting


def machine_description():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])

    def version(pkg):
        p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True)
        return p.stdout.strip() or "?"

    debian = harness.read_text("/etc/debian_version") if os.path.exists("/etc/debian_version") else "?"
    return (f"Linux {platform.release()}, {os.cpu_count()} CPUs ({cpu}), {mem_kib // 1024} MiB RAM, "
            f"Debian {debian}; udev {version('udev')}, dbus {version('dbus')}, util-linux "
            f"{version('util-linux')}, udisks2 {version('udisks2')}, polkitd {version('polkitd')}")


def fmt(x, digits=1):
    if x is None or x != x:  # NaN
        return "-"
    return f"{x:.{digits}f}"


def markdown(results, plan, many, meta):
    lines = [f"Run {meta['started']} on: {meta['machine']}", ""]
    if meta["disturbed_batches"]:
        lines += [f"**{meta['disturbed_batches']} of {meta['batches']} batches ran while other test "
                  "runs were active on this machine (shared udevd and loop devices).**", ""]
    lines += ["attach = call to ready reply (ms); cycles/s = attach + check + detach, all clients; "
              "ready at reply = the reply came with disk and every partition present and "
              "udev-processed with the attachment's diskseq.", "",
              "| contender | clients | attach median | p90 | p99 | detach median | cycles/s | "
              "ready at reply | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for c in plan:
        for name in CONTENDERS:
            s = results.summary(name, c)
            if s is None:
                continue
            ready = f"{s['n'] - s['errors'] - s['early']}/{s['n'] - s['errors']}"
            mark = ""
            if s["early"]:
                ready += " **NOT READY**"
                mark = " †"
            lines.append(f"| {name}{mark} | {c} | {fmt(s['median'])} | {fmt(s['p90'])} | {fmt(s['p99'])} | "
                         f"{fmt(s['detach_median'])} | {fmt(s['cycles_per_s'])} | {ready} | {s['errors']} |")
    lines.append("")
    notes = []
    for name in CONTENDERS:
        for c in plan:
            s = results.summary(name, c)
            if s and s["early"]:
                notes.append(f"† {name} (clients {c}): {s['early']} replies came before readiness, "
                             f"e.g. \"{s['early_example']}\"; its latency is not comparable.")
                break
    for name in CONTENDERS:
        for c in plan:
            s = results.summary(name, c)
            if s and s["not_released"]:
                notes.append(f"{name} (clients {c}): after {s['not_released']} detach replies the attachment was "
                             f"not released yet, e.g. \"{s['released_example']}\".")
    for name in CONTENDERS:
        for c in plan:
            s = results.summary(name, c)
            if s and s["early"] and s["early_disk_ready"] == s["early"]:
                notes.append(f"{name} (clients {c}): in all {s['early']} early replies the disk itself was "
                             "ready; what was missing were partitions.")
    for name in CONTENDERS:
        for c in plan:
            s = results.summary(name, c)
            if s and s["errors"]:
                notes.append(f"{name} (clients {c}): {s['errors']} failed cycles, e.g. \"{s['error_example']}\"")
    lines += notes + ([""] if notes else [])

    # loopd's own figures
    cpu = [results.summary("loopd", c).get("loopd_cpu_ms_per_cycle") for c in plan if results.summary("loopd", c)]
    lines.append("loopd CPU time (utime+stime from /proc/<pid>/stat) per attach+detach cycle: " +
                 ", ".join(f"{fmt(v, 2)} ms at {c} clients" for v, c in zip(cpu, plan) if v is not None) +
                 (f"; per attach alone (filling {many['held']} devices): {fmt(many['hold_cpu_ms_per_attach'], 2)} ms"
                  if many else ""))
    lines.append("")
    if many:
        rss = many["rss_kib"]
        lines.append(f"loop module max_loop={many['max_loop']}; loop devices before {many['loop_devices_before']}, "
                     f"with {many['held']} held {many['loop_devices_with_held']} (LOOP_CTL_GET_FREE creates them). "
                     + ("Held devices: each its own GPT-3 image (own table and partition UUIDs)."
                        if many.get("held_images") == "distinct" else
                        "Held devices: all the same GPT-3 image (their partitions share by-partuuid links)."))
        lines.append("")
        lines.append("| loopd devices attached | 0 | 1 | 100 | " + f"{many['held']} | after release |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        lines.append("| loopd RSS (MiB) | " + " | ".join(fmt(rss.get(k, 0) / 1024, 2) for k in
                                                         ("0", "1", "100", str(max(int(k) for k in rss)))) +
                     f" | {fmt(many['rss_kib_after_release'] / 1024, 2)} |")
        anon = many.get("rss_anon_kib", {})
        lines.append("| of which RssAnon (heap, stacks) | " + " | ".join(
            fmt(anon.get(k, 0) / 1024, 2) for k in ("0", "1", "100", str(many["held"]))) + " | |")
        marks = sorted(int(k) for k in rss if int(k) > 0)
        slopes = [f"{(rss[str(b)] - rss[str(a)]) / (b - a):.2f} KiB per device from {a} to {b}"
                  for a, b in zip(marks, marks[1:]) if b - a >= 100]
        lines.append("")
        lines.append(f"Idle RSS {fmt(rss['0'] / 1024, 2)} MiB; per device: {fmt(rss_per_device_kib(many), 2)} KiB "
                     f"((RSS with {many['held']} - idle) / {many['held']}); " + "; ".join(slopes) + ".")
        lines.append("")
        idle = many.get("idle_cpu_pct", {})
        lines.append(f"| loopd CPU while idle (%) | {fmt(idle.get('0'), 2)} | | | "
                     f"{fmt(idle.get(str(many['held'])), 2)} | |")
        lines.append("")
        lines.append(f"| attach, 1 client, GPT-3 | median with none held (before and after) | p90 | "
                     f"median with {many['held']} held | p90 | ratio |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for name in ("floor", "loopd"):
            a = results.summary(name, 1, "none-held")
            b = results.summary(name, 1, "many-held")
            if a and b:
                lines.append(f"| {name} | {fmt(a['median'])} | {fmt(a['p90'])} | {fmt(b['median'])} | "
                             f"{fmt(b['p90'])} | {fmt(b['median'] / a['median'], 2)} |")
        lines.append("")
    lines += targets(results, many)
    return "\n".join(lines)


def rss_per_device_kib(many):
    """Memory is judged per attached device: (RSS with the most held - idle) / held."""
    rss = many["rss_kib"]
    top = max(int(k) for k in rss)
    return (rss[str(top)] - rss["0"]) / top if top else float("nan")


def ratio(a, b):
    return a / b if a and b and a == a and b == b else float("nan")


def targets(results, many):
    def s(name, c, phase="main"):
        return results.summary(name, c, phase) or {}

    rows = []
    r = ratio(s("loopd", 1).get("median"), s("floor", 1).get("median"))
    rows.append(("loopd median / floor median, 1 client", "≤ 1.2", r, r <= 1.2))
    r = ratio(s("loopd", 32).get("cycles_per_s"), s("floor", 32).get("cycles_per_s"))
    rows.append(("loopd cycles/s / floor cycles/s, 32 clients", "≥ 0.8", r, r >= 0.8))
    r = ratio(s("loopd", 8).get("cycles_per_s"), s("losetup", 8).get("cycles_per_s"))
    if s("losetup", 8).get("early"):
        note = " (losetup answered early)"
    else:
        note = ""
    rows.append(("loopd cycles/s / losetup cycles/s, 8 clients" + note, "≥ 3", r, r >= 3))
    if many:
        r = ratio(s("loopd", 1, "many-held").get("median"), s("loopd", 1, "none-held").get("median"))
        rows.append((f"loopd median with {many['held']} attached / with none", "≤ 1.2", r, r <= 1.2))
        per_device = rss_per_device_kib(many)
        rows.append((f"loopd RSS per device, ({many['held']} held - idle) / {many['held']} (KiB)", "≤ 4",
                     per_device, per_device <= 4))
    lines = ["| target | wanted | measured | met |", "|---|---|---:|---|"]
    for what, wanted, value, met in rows:
        lines.append(f"| {what} | {wanted} | {fmt(value, 2)} | {'yes' if met else '**no**'} |")
    return lines + [""]


def plot(results, plan, path, tmp):
    """CDFs of attach latency, one panel per concurrency, log time axis."""
    if not shutil.which("gnuplot"):
        print("# gnuplot not found: no plot", file=sys.stderr)
        return False
    panels = []
    for c in plan:
        series = []
        for name in CONTENDERS:
            batches = results.of(name, c)
            values = sorted(s["attach_ms"] for b in batches for s in b["samples"] if "error" not in s)
            if not values:
                continue
            early = sum(1 for b in batches for s in b["samples"] if "not_ready" in s and "error" not in s)
            data = os.path.join(tmp, f"cdf-{name}-{c}.dat")
            with open(data, "w") as f:
                for i, v in enumerate(values):
                    f.write(f"{v:.4f} {(i + 1) / len(values):.5f}\n")
            title = name + (f" ({early}/{len(values)} not ready at reply)" if early else "")
            series.append(f"'{data}' using 1:2 with steps lw 2 title '{title}'")
        if series:
            panels.append(f"set title 'attach to ready, {c} client{'s' if c > 1 else ''}'\n"
                          "plot " + ", ".join(series) + "\n")
    script = os.path.join(tmp, "plot.gp")
    with open(script, "w") as f:
        f.write(f"set terminal pngcairo size {500 * len(panels)},420 font 'sans,10'\n"
                f"set output '{path}'\n"
                "set logscale x\nset xlabel 'ms (log)'\nset ylabel 'fraction of attaches'\n"
                "set key bottom right\nset grid\nset yrange [0:1]\n"
                f"set multiplot layout 1,{len(panels)}\n" + "".join(panels) + "unset multiplot\n")
    p = subprocess.run(["gnuplot", script], capture_output=True, text=True)
    if p.returncode != 0:
        print(f"# gnuplot failed: {p.stderr.strip()}", file=sys.stderr)
        return False
    return True


# ------------------------------------------------------------------ main


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(harness.LOOPD_SRC, "build"), help="meson build directory")
    ap.add_argument("--quick", action="store_true", help="few samples: a smoke run of the whole benchmark")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--many", type=int, default=2000, help="devices held for the RSS / latency-under-load figures (0: skip)")
    ap.add_argument("--hold-concurrency", type=int, default=8)
    ap.add_argument("--hold-no-partscan", action="store_true", help="hold devices without partitions")
    ap.add_argument("--held-images", choices=("distinct", "same"), default="distinct",
                    help="the held devices: each its own GPT-3 image (default), or all the benchmark's image "
                         "(their partitions then contend for the same by-partuuid links in udev)")
    ap.add_argument("--markdown", help="also write the tables here")
    ap.add_argument("--json", help="write every sample here")
    ap.add_argument("--plot", help="PNG to write (default: BUILD/bench/attach_latency.png)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--wrap-loopd", help="profile: run loopd under this command, e.g. "
                    "'strace -f -tt -T -o /tmp/loopd.strace' or 'perf record -g -o /tmp/loopd.perf --'")
    args = ap.parse_args()
    if args.plot is None:
        os.makedirs(os.path.join(args.build, "bench"), exist_ok=True)
        args.plot = os.path.join(args.build, "bench", "attach_latency.png")
    args.contenders = [c for c in args.contenders.split(",") if c]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.many_latency = (10, 4) if not args.quick else (5, 1)
    return args


def run_all(env, args, plan, results, meta, exe):
    image = env.image("gpt3")
    udisks = Udisks(env.tmp)
    driver = Driver(exe, image)
    try:
        if "udisks2" in args.contenders:
            udisks.start_polkitd()
        # Warm-up: one cycle each, not recorded (page cache, first allocations).
        for name in args.contenders:
            run_batch(env, driver, udisks, Results(), name, 1, 1)
        for c, (cycles, rounds) in plan.items():
            for r in range(rounds):
                for name in random.sample(args.contenders, len(args.contenders)):
                    b = run_batch(env, driver, udisks, results, name, c, cycles)
                    print(f"# c={c} round {r + 1}/{rounds} {name}: {len(b['samples'])} cycles in "
                          f"{b['wall_ms']:.0f} ms", file=sys.stderr)
        if args.many:
            meta["many"] = many_devices_phase(env, driver, udisks, results, args)
    finally:
        driver.close()
        udisks.close()
        meta["leftovers"] = env.attached_here()
        meta["ended"] = datetime.datetime.now().isoformat(timespec="seconds")
        if args.plot:
            meta["plot"] = plot(results, plan, os.path.abspath(args.plot), env.tmp) and args.plot


def main():
    if os.geteuid() != 0:
        print("SKIP: the benchmark needs root (real loop devices, udevd, a private bus)")
        sys.exit(77)
    args = parse_args()
    exe = os.path.join(args.build, "tests/bench/loopd-bench")
    harness.LOOPD = os.environ.get("LOOPD") or os.path.join(args.build, "loopd")
    for binary in (exe, harness.LOOPD):
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} is not built (run scripts/bench, or ninja -C {args.build})")
    if args.wrap_loopd:
        # The harness starts one binary with its arguments: a script that execs the
        # profiler with loopd (loopd's pid is then the profiler's child, found below).
        wrapper = os.path.join(tempfile.gettempdir(), f"loopd-bench-wrap-{os.getpid()}.sh")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec {args.wrap_loopd} {harness.LOOPD} "$@"\n')
        os.chmod(wrapper, 0o755)
        harness.LOOPD = wrapper
    for tool in ("udisks2",):
        if tool in args.contenders and not os.access(UDISKSD, os.X_OK):
            print(f"# {UDISKSD} missing: udisks2 left out (scripts/bench installs it)", file=sys.stderr)
            args.contenders.remove(tool)
    # loopd's default level: debug logging would be measured too.
    os.environ.setdefault("LOOPD_LOG_LEVEL", "info")
    random.seed(args.seed)
    base_plan = QUICK_PLAN if args.quick else PLAN
    plan = {c: base_plan.get(c, (1, 3)) for c in args.concurrency}
    meta = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine_description(),
            "plan": plan, "others_at_start": others_running()}
    if meta["others_at_start"]:
        print(f"# other test runs are active ({len(meta['others_at_start'])} processes): "
              "numbers may be disturbed", file=sys.stderr)

    results = Results()
    try:
        # The harness runs polkitd on the bus when asked (loopd asks polkit about
        # callers other than root; udisksd asks about everyone).
        env = BenchEnv(polkit="udisks2" in args.contenders)
    except TypeError:  # a harness without polkit support: Udisks starts its own
        env = BenchEnv()
    try:
        with env:
            run_all(env, args, plan, results, meta, exe)
    except AssertionError as e:  # the harness's leak and daemon checks at exit
        meta["cleanup_problem"] = str(e)
        print(f"# clean-up: {e}", file=sys.stderr)
    many = meta.pop("many", None)
    meta["batches"] = len(results.batches)
    meta["disturbed_batches"] = sum(1 for b in results.batches if b.get("disturbed"))
    text = markdown(results, plan, many, meta)
    print(text)
    if meta.get("leftovers"):
        print(f"\nleft attached (and removed by the clean-up): {meta['leftovers']}")
    if meta.get("cleanup_problem"):
        print(f"\nclean-up: {meta['cleanup_problem']}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "many": many, "batches": results.batches}, f, indent=1)
    if meta.get("plot"):
        print(f"\nplot: {meta['plot']}")


if __name__ == "__main__":
    main()
