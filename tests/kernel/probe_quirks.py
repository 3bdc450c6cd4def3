#!/usr/bin/python3
"""Observes, without loopd, what the running kernel does on a loop attach with
partition scanning, so the kernel matrix can say which quirks loopd meets there:

  partitions-in-configure  the kernel created the partitions inside LOOP_CONFIGURE
                           (they exist when the ioctl returns; BLKPG_ADD then meets
                           EBUSY, which src/kernel/partitions.cpp accepts)
  missing disk event       no kernel uevent for the disk with DISKSEQ=S after attach
  missing partition event  a partition exists in sysfs but no 'add' with DISKSEQ=S
                           came for it
  double scan              a partition was removed and added again after attach

Each round: a fresh 3-partition GPT image, LOOP_CONFIGURE with LO_FLAGS_PARTSCAN on a
free device (the raw ioctls, as loopd does them), then the kernel's uevents are
collected for a fixed window, then LOOP_CLR_FD. This is a measurement, not a test:
the window is how long it looks for late events, nothing waits for readiness.
Prints one line per round and a summary line starting with 'quirks:'.

Usage: probe_quirks.py SCRATCH_DIR [ROUNDS]   (root; SCRATCH_DIR on tmpfs is fine)
"""

import ctypes
import errno
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time

LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_PARTSCAN = 8
BLKGETDISKSEQ = 0x80081280  # _IOR(0x12, 128, __u64)
BLKPG = 0x1269
BLKPG_ADD_PARTITION = 1
BLKPG_DEL_PARTITION = 2
NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
WINDOW = 3.0  # seconds of events after attach and after detach


def loop_config(fd, flags):
    """struct loop_config: fd, block_size, loop_info64 (232 bytes), 8 reserved u64."""
    info = struct.pack("=5Q4I64s64s32s2Q", 0, 0, 0, 0, 0, 0, 0, 0, flags,
                       b"", b"", b"", 0, 0)
    return struct.pack("=II", fd, 0) + info + b"\0" * 64


def blkpg(fd, op, number, start=0, length=0):
    """BLKPG_ADD_PARTITION / BLKPG_DEL_PARTITION; returns 0 or the errno. Native
    alignment ('@'): struct blkpg_partition is padded to 152 bytes and
    struct blkpg_ioctl_arg carries a pointer after three ints."""
    part = ctypes.create_string_buffer(
        struct.pack("@qqi64s64s4x", start, length, number, b"", b""))
    arg = struct.pack("@iiiP", op, 0, ctypes.sizeof(part) - 1, ctypes.addressof(part))
    try:
        fcntl.ioctl(fd, BLKPG, arg)
        return 0
    except OSError as e:
        return e.errno


def uevent_socket():
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    s.bind((0, KERNEL_GROUP))
    return s


def collect(sock, name, seconds):
    """Kernel uevents for block device `name` and its partitions during `seconds`:
    [(action, devname, diskseq)]."""
    events = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data = sock.recv(65536)
        fields = data.split(b"\0")
        props = dict(f.decode(errors="replace").split("=", 1) for f in fields[1:] if b"=" in f)
        dev = props.get("DEVNAME", "")
        if props.get("SUBSYSTEM") == "block" and (dev == name or dev.startswith(name + "p")):
            events.append((props.get("ACTION"), dev, props.get("DISKSEQ")))
    return events


def make_image(path):
    subprocess.run(["truncate", "-s", "64M", path], check=True)
    subprocess.run(["sfdisk", "-q", path], input="label: gpt\n" + " size=8MiB\n" * 3,
                   text=True, check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", path], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    return [(int(p["node"].rsplit("img", 1)[1]), p["start"] * 512, p["size"] * 512)
            for p in table["partitions"]]


def sysfs_partitions(name):
    return sorted(int(e[len(name) + 1:]) for e in os.listdir(f"/sys/block/{name}")
                  if e.startswith(name + "p"))


def one_round(scratch, i):
    img = os.path.join(scratch, f"probe-{i}.img")
    parts = make_image(img)
    sock = uevent_socket()
    backing = os.open(img, os.O_RDWR | os.O_CLOEXEC)
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    os.close(ctl)
    name = f"loop{number}"
    fd = os.open(f"/dev/{name}", os.O_RDWR | os.O_CLOEXEC)
    result = {"dev": name}
    try:
        fcntl.ioctl(fd, LOOP_CONFIGURE, loop_config(backing, LO_FLAGS_PARTSCAN))
        seq = struct.unpack("=Q", fcntl.ioctl(fd, BLKGETDISKSEQ, b"\0" * 8))[0]
        result["diskseq"] = seq
        result["parts_at_return"] = sysfs_partitions(name)
        added = blkpg(fd, BLKPG_ADD_PARTITION, *parts[0])
        result["blkpg_add_p1"] = errno.errorcode.get(added, "0")
        attach_events = collect(sock, name, WINDOW)
        result["parts_after"] = sysfs_partitions(name)
    finally:
        # A kernel without partition parsers keeps BLKPG partitions past
        # LOOP_CLR_FD: remove what the probe itself added.
        if result.get("blkpg_add_p1") == "0":
            blkpg(fd, BLKPG_DEL_PARTITION, parts[0][0])
        fcntl.ioctl(fd, LOOP_CLR_FD)
        os.close(fd)
        os.close(backing)
    detach_events = collect(sock, name, WINDOW)
    sock.close()
    os.unlink(img)
    s = str(result["diskseq"])
    ours = [(a, d) for a, d, ds in attach_events if ds == s]
    # Only this attachment's events: on a shared machine the name may be reused at once.
    result["attach_events"] = [f"{a}:{d.removeprefix(name) or 'disk'}"
                               for a, d, ds in attach_events if ds == s]
    # After LOOP_CLR_FD, events may carry S or the next diskseq: label them.
    result["detach_events"] = [f"{a}:{d.removeprefix(name) or 'disk'}:"
                               f"{'S' if ds == s else f'S{int(ds) - int(s):+d}' if ds else '-'}"
                               for a, d, ds in detach_events]
    result["disk_event"] = any(d == name for _, d in ours)
    result["missing_part_events"] = [k for k in result["parts_after"]
                                     if ("add", f"{name}p{k}") not in ours]
    result["double_scan"] = [k for k in range(1, 4)
                             if ("remove", f"{name}p{k}") in ours]
    return result


def main():
    scratch = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    summary = {"partitions-in-configure": 0, "missing-disk-event": 0,
               "missing-partition-event": 0, "double-scan": 0, "blkpg-ebusy": 0}
    for i in range(rounds):
        r = one_round(scratch, i)
        print("probe:", json.dumps(r))
        summary["partitions-in-configure"] += bool(r["parts_at_return"])
        summary["missing-disk-event"] += not r["disk_event"]
        summary["missing-partition-event"] += bool(r["missing_part_events"])
        summary["double-scan"] += bool(r["double_scan"])
        summary["blkpg-ebusy"] += r["blkpg_add_p1"] == "EBUSY"
    print(f"quirks: rounds={rounds} " + " ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
