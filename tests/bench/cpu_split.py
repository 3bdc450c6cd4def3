#!/usr/bin/python3
"""Where a GetManagedObjects or a `loopctl list` spends its time: CPU of loopd, of
dbus-daemon and of the client per call (schedstat of every thread, so ns, not
clock ticks), next to the wall time. A program that prints numbers, not a test.

Run by many_devices.py's --hook with some devices held:
    many_devices.py 1000 --hook 'tests/bench/cpu_split.py'
(LOOPD_PID, BUS_PID and DBUS_SYSTEM_BUS_ADDRESS come from there; LOOPCTL too.)
"""
import os
import resource
import statistics
import subprocess
import time

import dbus
import dbus.lowlevel

ROUNDS = 5


def cpu_ms(pid):
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total / 1e6


def children_cpu_ms():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def measure(name, call):
    """call() returns the client's own CPU ms; the rest is read around it."""
    rows = []
    for _ in range(ROUNDS):
        loopd, bus = cpu_ms(int(os.environ["LOOPD_PID"])), cpu_ms(int(os.environ["BUS_PID"]))
        started = time.monotonic()
        client = call()
        wall = (time.monotonic() - started) * 1000
        rows.append((wall, cpu_ms(int(os.environ["LOOPD_PID"])) - loopd, cpu_ms(int(os.environ["BUS_PID"])) - bus,
                     client))
    wall, loopd, bus, client = (statistics.median(column) for column in zip(*rows))
    print(f"| {os.environ.get('HELD', '?')} | {name} | {wall:.1f} | {loopd:.1f} | {bus:.1f} | {client:.1f} |",
          flush=True)


def main():
    conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])

    def raw(decode):
        def call():
            message = dbus.lowlevel.MethodCallMessage("org.loopd1", "/org/loopd1",
                                                      "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
            started = time.process_time()
            reply = conn.send_message_with_reply_and_block(message, 60)
            if decode:
                reply.get_args_list()
            return (time.process_time() - started) * 1000
        return call

    def command(argv):
        def call():
            before = children_cpu_ms()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            return children_cpu_ms() - before
        return call

    print("| held | client | wall (ms) | loopd CPU (ms) | dbus-daemon CPU (ms) | client CPU (ms) |")
    print("|---:|---|---:|---:|---:|---:|")
    measure("GetManagedObjects, python3-dbus, reply not decoded", raw(False))
    measure("GetManagedObjects, python3-dbus, decoded", raw(True))
    measure("GetManagedObjects, busctl", command(["busctl", "--system", "call", "org.loopd1", "/org/loopd1",
                                                  "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"]))
    measure("loopctl list", command([os.environ["LOOPCTL"], "list"]))
    conn.close()


if __name__ == "__main__":
    main()
