#!/usr/bin/python3
"""loopd holding many devices: RSS, open fds, attach latency and GetManagedObjects
time as the count grows. A program that prints numbers, not a test.

Run as root from the build tree, with the soft fd limit of a plain shell (1024) so
that loopd has to raise its own, as under loopd.service (LimitNOFILE=524288):
    prlimit --nofile=1024:HARD env LOOPD=$PWD/build/loopd LOOPCTL=$PWD/build/loopctl \\
        LOOPD_SRC=$PWD PYTHONPATH=tests/integration tests/bench/many_devices.py [COUNT]
Held images are distinct files without a partition table (the fd and memory cost
is per device; partitions only add udev work).
"""
import os
import statistics
import sys
import subprocess
import threading
import time

from harness import (LOOPCTL, Env, detach_quietly, pydbus_attach, pydbus_call, pydbus_options,
                     verify_reply)

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
    return statistics.median(samples)


def managed_objects_ms():
    started = time.monotonic()
    pydbus_call("GetManagedObjects", "", [], iface="org.freedesktop.DBus.ObjectManager")
    return (time.monotonic() - started) * 1000


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


def restart(env, held):
    """loopd killed with every device held, and started again: how long until it
    owns its name again, and until it answers WaitReady for a held device. Every
    device must be adopted (listed), none re-attached (same diskseqs)."""
    started = time.monotonic()
    env.restart_loopd(kill=True)  # returns once the name is owned (polled every 20 ms)
    named = (time.monotonic() - started) * 1000
    pydbus_call("WaitReady", "st", [str(held[-1]), 0])
    answered = (time.monotonic() - started) * 1000
    listed = pydbus_call("GetManagedObjects", "", [], iface="org.freedesktop.DBus.ObjectManager")
    diskseqs = {int(path.rsplit("/", 1)[1]) for path in listed if "/device/" in path}
    assert diskseqs == set(held), f"after the restart {len(diskseqs)} devices listed, {len(held)} held"
    print(f"restart with {len(held)} held (SIGKILL, start again): name owned after {named:.0f} ms, "
          f"WaitReady answered after {answered:.0f} ms; all {len(held)} adopted", flush=True)


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with Env() as env:
        pid = env.loopd.pid
        held, lock = [], threading.Lock()
        marks = sorted({0, count // 2, count})
        rss = {}
        print("| held | loopd RSS (MiB) | loopd fds | attach median (ms, GPT 3 parts) | GetManagedObjects, "
              "python3-dbus (ms) | GetManagedObjects, busctl (ms) | loopctl list (ms) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        try:
            for mark in marks:
                todo = mark - len(held)
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
                assert len(held) == mark, f"{len(held)} held, expected {mark}"
                rss[mark] = rss_kib(pid)
                print(f"| {mark} | {rss[mark] / 1024:.2f} | {fds(pid)} | {attach_latency(env):.1f} | "
                      f"{managed_objects_ms():.1f} | {busctl_managed_objects_ms():.1f} | {loopctl_list_ms():.1f} |",
                      flush=True)
            restart(env, held)
            pid = env.loopd.pid
            # Memory is judged per attached device: the slope, not a total.
            print(f"idle RSS {rss[0]:.0f} KiB; per device ({count} held - idle) / {count}: "
                  f"{(rss[count] - rss[0]) / count:.2f} KiB; from {count // 2} to {count}: "
                  f"{(rss[count] - rss[count // 2]) / (count - count // 2):.2f} KiB", flush=True)
        finally:
            def detach_some(i):
                for diskseq in held[i::THREADS]:
                    detach_quietly(diskseq)
            workers = [threading.Thread(target=detach_some, args=(i,)) for i in range(THREADS)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            print(f"after releasing all: RSS {rss_mib(pid):.2f} MiB, {fds(pid)} fds")


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("root needed")
    main()
