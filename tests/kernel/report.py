#!/usr/bin/python3
"""Reads what a kernel-matrix guest left in its results folder (see guest-run.sh)
and prints the matrix table; exits 0 only if the guest ran every test file and all
of them passed.

Usage: report.py RESULTS_DIR --tests N --elapsed S --qemu-status RC [--host-log FILE]

Figures and where they come from:
  tests passed/failed   PASS/FAIL lines of the harness in each <test>.log
  synthetic trigger     attaches (distinct diskseqs) for which loopd logged
                          'synthetic trigger dev=/dev/loopN diskseq=S uuid=U missing=...'
                        i.e. wrote 'change <uuid>' to a uevent file (src/service/daemon.cpp)
  kernel events missing attaches whose own kernel uevents (without SYNTH_UUID) lack the
                        disk event or an 'add' for one of the partitions loopd expected;
                        from the guest's 'udevadm monitor --kernel' log and loopd's
                          'configured dev=/dev/loopN diskseq=S partitions=K' lines
  double scan           attaches where a partition was removed and added again with the
                        attachment's own DISKSEQ before its detach
  probe                 the 'quirks:' line of probe_quirks.py (raw ioctls, no loopd)

--known-failures names test functions that are known to fail on this kernel for a
reason recorded in scripts/test-kernel: their FAILs are shown as 'known' and do not
fail the run, unless the failure message reports a leaked device; if one passes,
the report says so, so the entry can be removed.
"""

import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict

SYNTHETIC = re.compile(r"synthetic trigger dev=\S+ diskseq=(\d+) uuid=")
CONFIGURED = re.compile(r"configured dev=/dev/(loop\d+) diskseq=(\d+) partitions=(\d+)")


def read(path, default=""):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def test_outcomes(res):
    """{test file: ([passed names], [(failed name, message)])} from the harness's
    'PASS name (...)' and 'FAIL name: message' lines."""
    outcomes = {}
    for log in sorted(glob.glob(os.path.join(res, "*.py.log"))):
        text = read(log)
        passed = re.findall(r"^PASS (\w+)", text, re.M)
        failed = re.findall(r"^FAIL (\w+): (.*)$", text, re.M)
        outcomes[os.path.basename(log)[:-len(".log")]] = (passed, failed)
    return outcomes


def is_known(name, message, known):
    # A leak is never excused: it harms every test that runs after it.
    return name in known and "leaked" not in message


def loopd_logs(res):
    return "".join(read(p) for p in sorted(glob.glob(os.path.join(res, "loopd-logs", "*.log"))))


def kernel_events(res):
    """{(loopN, diskseq): [(action, part or 0, synthetic)]} from udevadm monitor's
    property blocks, in order."""
    events = defaultdict(list)
    for block in read(os.path.join(res, "uevents.log")).split("\n\n"):
        props = dict(l.split("=", 1) for l in block.splitlines() if "=" in l)
        m = re.fullmatch(r"/dev/(loop\d+)(?:p(\d+))?", props.get("DEVNAME", ""))
        if props.get("SUBSYSTEM") != "block" or not m or "DISKSEQ" not in props:
            continue
        events[(m.group(1), props["DISKSEQ"])].append(
            (props.get("ACTION"), int(m.group(2) or 0), "SYNTH_UUID" in props))
    return events


def attach_analysis(res, logs):
    """(attaches, missing kernel events, double scans) over every attach loopd made."""
    attaches = {(m.group(1), m.group(2)): int(m.group(3)) for m in CONFIGURED.finditer(logs)}
    events = kernel_events(res)
    missing = double = 0
    for key, nparts in attaches.items():
        natural = [(a, p) for a, p, synth in events.get(key, []) if not synth]
        if not any(p == 0 for _, p in natural) or \
                any(("add", k) not in natural for k in range(1, nparts + 1)):
            missing += 1
        seen_remove = set()
        for action, part in natural:
            if part and action == "remove":
                seen_remove.add(part)
            elif part and action == "add" and part in seen_remove:
                double += 1
                break
    return len(attaches), missing, double


def host_row(path):
    """The host kernel's row, from meson's log of the run scripts/test just made."""
    if not path or not os.path.exists(path):
        return None
    passed = failed = 0
    for line in read(path).splitlines():
        t = json.loads(line)
        # meson names them "<project>:<suite> / <test>".
        if ":integration / " not in t.get("name", ""):
            continue
        out = t.get("stdout") or ""
        passed += len(re.findall(r"^PASS ", out, re.M))
        failed += len(re.findall(r"^FAIL ", out, re.M))
    return f"| {os.uname().release} (host) | host | {passed} | {failed} | - | n/a (logs not kept) | n/a |"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("res")
    ap.add_argument("--tests", type=int, required=True, help="test files the guest should run")
    ap.add_argument("--elapsed", type=int, required=True)
    ap.add_argument("--qemu-status", type=int, required=True)
    ap.add_argument("--host-log")
    ap.add_argument("--known-failures", default="", help="test names, comma-separated")
    a = ap.parse_args()
    known = set(filter(None, a.known_failures.split(",")))

    problems = []
    if a.qemu_status in (124, 137):
        problems.append("qemu was killed at the hard time limit")
    elif a.qemu_status != 0:
        problems.append(f"qemu exited with status {a.qemu_status}")
    if not os.path.exists(os.path.join(a.res, "finished")):
        problems.append("the guest did not finish its run (see console.log)")
    results = [l.split() for l in read(os.path.join(a.res, "results")).splitlines() if l.strip()]
    if len(results) != a.tests:
        problems.append(f"the guest ran {len(results)} of {a.tests} test files")
    outcomes = test_outcomes(a.res)
    for name, rc, secs in results:
        failures = outcomes.get(name, ([], []))[1]
        excused = rc == "1" and failures and all(is_known(n, m, known) for n, m in failures)
        if rc != "0" and not excused:
            problems.append(f"{name} exited with {rc} after {secs} s")
        if rc == "0" and name in outcomes and not any(outcomes[name]):
            # The harness selects functions by name: a renamed test would run nothing.
            problems.append(f"{name} ran no test")
    passed = sum(len(p) for p, _ in outcomes.values())
    failures = [(n, m) for _, f in outcomes.values() for n, m in f]
    known_failed = [n for n, m in failures if is_known(n, m, known)]
    failed = len(failures) - len(known_failed)
    known_passed = [n for p, _ in outcomes.values() for n in p if n in known]
    logs = loopd_logs(a.res)
    synthetic = len(set(SYNTHETIC.findall(logs)))
    attaches, missing, double = attach_analysis(a.res, logs)
    kernel = read(os.path.join(a.res, "kernel")).strip() or "?"
    probe = re.search(r"^quirks: (.*)$", read(os.path.join(a.res, "probe.log")), re.M)

    print()
    print("## Kernel matrix")
    print()
    print("| kernel | where | tests passed | tests failed | known failures "
          "| attaches with synthetic trigger | attaches missing kernel events |")
    print("|---|---|---|---|---|---|---|")
    row = host_row(a.host_log)
    if row:
        print(row)
    print(f"| {kernel} | qemu TCG, {a.elapsed} s | {passed} | {failed} | {len(known_failed)} | "
          f"{synthetic} of {attaches} | {missing} of {attaches} |")
    print()
    for n in known_failed:
        print(f"known failure on {kernel}: {n} (see KNOWN_FAILURES in scripts/test-kernel)")
    for n in known_passed:
        print(f"known failure passed this time: {n}")
    print(f"{kernel}: partitions removed and re-added (double scan) in {double} of {attaches} attaches")
    print(f"{kernel} probe without loopd: {probe.group(1) if probe else 'not run'}")
    for p in problems:
        print(f"problem: {p}")
    print(f"guest logs: {a.res}")
    print()
    print(f"kernel-matrix: {passed} passed, {failed} failed")
    return 1 if problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
