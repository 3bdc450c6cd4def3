#!/usr/bin/python3
"""Attach latency under lost events (issue 19): runs tests/soak/soak.py at 1 and
32 clients with no drops, with 1 % and 5 % of udev's events dropped on loopd's
socket (--test-drop random:P), and with every event of the partitions dropped,
the kernel's and udev's alike (kernel:partN and partN, N = 1..3: what a kernel
5.19-6.14 does, whose partitions created in LOOP_CONFIGURE send no uevent, so
udev never sees them either). The configurations are interleaved, round after
round, so that the machine's drift weighs on all alike; each soak holds the
integration tests' lock (/tmp/loopd-itest.lock) for itself only. The order of
the configurations is shuffled in each round.

Prints one markdown table: attach p50 / p99 (ms) per configuration and client
count, each round's figures and their median, and each one's ratio to the no-drop
figures of the same round.

    tests/soak/drop_table.py [--rounds 3] [--cycles-1 60] [--cycles-32 20]
                             [--clients 1,32] [--configs none,udev1,udev5,partitions]
"""

import argparse
import os
import random
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LOCK = "/tmp/loopd-itest.lock"
PARTITION_RULES = [r for k in (1, 2, 3) for r in (f"kernel:part{k}", f"part{k}")]
KEYS = ["none", "udev1", "udev5", "partitions"]
CONFIGS = [
    ("no drops", 0.0, []),
    ("udev 1 %", 0.01, []),
    ("udev 5 %", 0.05, []),
    ("partition events (kernel + udev)", 0.0, PARTITION_RULES),
]


def soak(clients, cycles, ratio, rules):
    cmd = ["flock", LOCK, sys.executable, os.path.join(HERE, "soak.py"), "--clients", str(clients),
           "--cycles", str(cycles), "--drop-ratio", str(ratio)]
    for rule in rules:
        cmd += ["--drop-rule", rule]
    out = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"attach ms p50/p99/max\s+([\d.]+) / ([\d.]+) / ([\d.]+)", out.stdout)
    bad = re.search(r"^FAIL: .*", out.stdout, re.M)
    if out.returncode != 0 or not m:
        print(f"# soak failed ({clients} clients, {ratio}, {rules}): rc {out.returncode}\n"
              f"{out.stdout[-1500:]}\n{out.stderr[-1500:]}", file=sys.stderr)
    triggers = re.search(r"synthetic triggers\s+(\d+)", out.stdout)
    return (float(m.group(1)), float(m.group(2)), int(triggers.group(1)) if triggers else -1,
            bad.group(0) if bad else None) if m else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cycles-1", type=int, default=60, help="cycles of the single client")
    p.add_argument("--cycles-32", type=int, default=20, help="cycles of each of 32 clients")
    p.add_argument("--clients", default="1,32", help="client counts, comma-separated (1 and/or 32)")
    p.add_argument("--configs", default=",".join(KEYS),
                   help="configurations, comma-separated, of: " + ", ".join(KEYS))
    p.add_argument("--seed", type=int, default=None, help="seed of the order shuffle")
    args = p.parse_args()
    rng = random.Random(args.seed)
    chosen = [c for c in CONFIGS if KEYS[CONFIGS.index(c)] in args.configs.split(",")]
    counts = [int(c) for c in args.clients.split(",")]
    if os.geteuid() != 0:
        print("SKIP: the soak needs root")
        sys.exit(77)
    results = {}  # (clients, config) -> [(p50, p99, triggers, fail)] per round
    for rnd in range(args.rounds):
        for clients in counts:
            cycles = args.cycles_1 if clients == 1 else args.cycles_32
            # Shuffled each round, so that no configuration always runs first
            # (the machine is shared: its speed drifts within minutes).
            for name, ratio, rules in rng.sample(chosen, len(chosen)):
                r = soak(clients, cycles, ratio, rules)
                results.setdefault((clients, name), []).append(r)
                print(f"# round {rnd + 1}: {clients} client(s), {name}: {r}", file=sys.stderr, flush=True)
    print("| clients | drops | attach p50 ms (rounds) | p99 ms (rounds) | p50 / no-drop | p99 / no-drop "
          "| synthetic triggers |")
    print("|---:|---|---|---|---:|---:|---:|")
    for clients in counts:
        base = results[(clients, "no drops")]
        for name, _, _ in chosen:
            runs = results[(clients, name)]
            ok = [(r, b) for r, b in zip(runs, base) if r and b]
            p50s = " / ".join(f"{r[0]:.1f}" if r else "fail" for r in runs)
            p99s = " / ".join(f"{r[1]:.1f}" if r else "fail" for r in runs)
            r50 = statistics.median(r[0] / b[0] for r, b in ok) if ok else float("nan")
            r99 = statistics.median(r[1] / b[1] for r, b in ok) if ok else float("nan")
            trig = sum(r[2] for r in runs if r)
            print(f"| {clients} | {name} | {p50s} | {p99s} | {r50:.2f} | {r99:.2f} | {trig} |")
    fails = [r[3] for runs in results.values() for r in runs if r and r[3]]
    for f in fails:
        print(f"soak: {f}")
    sys.exit(1 if fails or any(r is None for runs in results.values() for r in runs) else 0)


if __name__ == "__main__":
    main()
