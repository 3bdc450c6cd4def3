#!/usr/bin/env python3
"""Writes the seed corpus in corpus/<target>/: scripted scenarios in the input
format of each target, so the fuzzer starts from the event sequences the kernel and
udev really send (see tests/unit/registry_test.cpp for the same stories as tests).

    tests/fuzz/make_seeds.py        # rewrite the seeds (they are committed)

Registry input: a sequence of operations, each an opcode byte (taken % 8) and its
operand bytes; reading past the end gives zeros.
  0 event     flags(bit0 udev, bits1-2 add/change/remove/other, bit3 SYNTH_UUID)
              number(%4) partition(%5) diskseq(%8; 0xff = 2^64-1)
              -- rendered as the properties libudev gives the monitor, parsed back
  1 raw       flags(bit0 udev; bits1-4: action, sysname, DISKSEQ, SYNTH_UUID present)
              length(2 bytes, big endian, %2048) then those four properties as
              NUL-separated text, as libudev would give them to makeUevent
  2 ready     watch: b(number = b%4, bit2 kernel source) diskseq(%7+1) partition mask
              (bit k-1 = partition k), deadline(+s, %32), nudge(0 none, else +s %16)
  3 released  same operands as ready
  4 cancel    request id (% (next id + 1))
  5 time      advance the clock by (%16) s, then onTime
  6 resync    b(number, bit2 kernel) diskseq(%8) mask(bit0 disk, bits1-4 partitions)
  7 nudges    retry(%8 + 1) s

Options input: count(%12), then per entry a key byte (< 0xe0: documented key
number %11; else a near miss or a string) and a value: type(%5: b u t s other),
form, operands (see options_fuzz.cpp).
"""
import os
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
ADD, CHANGE, REMOVE, OTHER = 0, 1, 2, 3
UDEV, KERNEL = 1, 0


def event(action, number, partition, diskseq, source=UDEV, synth=False):
    flags = source | action << 1 | (8 if synth else 0)
    return bytes([0, flags, number, partition, diskseq])


def raw(action, sysname, diskseq=None, synth=None, source=KERNEL):
    """Properties as libudev gives them; None: absent."""
    fields = [action, sysname, diskseq, synth]
    flags = source | sum(2 << i for i, f in enumerate(fields) if f is not None)
    text = b"\0".join((f or "").encode() for f in fields)
    return bytes([1, flags, len(text) >> 8, len(text) & 0xff]) + text


def sysname(number, partition=0):
    return f"loop{number}p{partition}" if partition else f"loop{number}"


def watch_op(op, number, diskseq, partitions, source=UDEV, deadline=10, nudge=0):
    mask = sum(1 << (p - 1) for p in partitions)
    return bytes([op, number | (0 if source == UDEV else 4), diskseq - 1, mask, deadline, nudge])


def ready(*args, **kwargs):
    return watch_op(2, *args, **kwargs)


def released(*args, **kwargs):
    return watch_op(3, *args, **kwargs)


def cancel(request):
    return bytes([4, request])


def time(seconds):
    return bytes([5, seconds])


def resync(number, diskseq, disk, partitions, source=UDEV):
    mask = (1 if disk else 0) | sum(1 << p for p in partitions)
    return bytes([6, number | (0 if source == UDEV else 4), diskseq, mask])


def nudges(retry):
    return bytes([7, retry - 1])


def attach_events(number, diskseq, partitions, source=UDEV):
    return event(CHANGE, number, 0, diskseq, source) + b"".join(
        event(ADD, number, p, diskseq, source) for p in partitions)


REGISTRY = {
    "attach-gpt3-then-detach": ready(3, 5, [1, 2, 3]) + attach_events(3, 5, [1, 2, 3]) + released(3, 5, [1, 2, 3])
    + b"".join(event(REMOVE, 3, p, 5) for p in (1, 2, 3)) + event(CHANGE, 3, 0, 5),
    "events-before-expect": event(ADD, 1, 2, 4) + event(ADD, 1, 1, 4) + event(CHANGE, 1, 0, 4) + ready(1, 4, [1, 2]),
    "stale-then-current": ready(0, 6, [1]) + attach_events(0, 5, [1]) + event(REMOVE, 0, 1, 5)
    + attach_events(0, 6, [1]),
    "taken-over": ready(2, 3, [1, 2]) + event(CHANGE, 2, 0, 3) + event(ADD, 2, 1, 3) + event(CHANGE, 2, 0, 4),
    "double-scan": ready(3, 7, [1, 2]) + event(ADD, 3, 1, 7) + event(REMOVE, 3, 1, 7) + event(CHANGE, 3, 0, 7)
    + event(ADD, 3, 2, 7) + event(ADD, 3, 1, 7),
    "duplicates": ready(1, 2, []) + event(CHANGE, 1, 0, 2) + event(CHANGE, 1, 0, 2) + ready(1, 2, [])
    + event(CHANGE, 1, 0, 2),
    "timeout-and-nudges": ready(0, 2, [1, 2, 3], deadline=8, nudge=2) + event(CHANGE, 0, 0, 2) + time(3)
    + nudges(2) + event(ADD, 0, 1, 2) + time(2) + nudges(2) + time(5),
    "lost-events-resync": ready(2, 5, [1, 2], nudge=1) + event(CHANGE, 2, 0, 5) + time(1) + nudges(1)
    + resync(2, 5, True, [1, 2]),
    "resync-newer": ready(1, 3, [1]) + resync(1, 4, False, [], source=KERNEL),
    "client-vanished-cancel": ready(3, 2, [1]) + ready(3, 2, [1]) + cancel(1) + attach_events(3, 2, [1]) + cancel(2),
    "kernel-readiness": ready(1, 6, [1, 2], source=KERNEL) + event(ADD, 1, 1, 6, KERNEL)
    + event(ADD, 1, 2, 6, KERNEL, synth=True) + event(CHANGE, 1, 0, 6, KERNEL),
    "detach-remove-events-missing": ready(2, 3, [1, 2]) + attach_events(2, 3, [1, 2])
    + released(2, 3, [1, 2], nudge=2) + event(REMOVE, 2, 1, 3) + time(3) + nudges(1) + event(REMOVE, 2, 2, 3),
    "detach-without-partitions": ready(0, 1, []) + event(CHANGE, 0, 0, 1) + released(0, 1, []),
    "raw-kernel-attach": ready(3, 4, [1, 2], source=KERNEL) + raw("change", sysname(3), "4")
    + raw("add", sysname(3, 1), "4") + raw("add", sysname(3, 2), "4"),
    "raw-synthetic-change": ready(0, 3, [], source=KERNEL)
    + raw("change", sysname(0), "3", "0a1b2c3d-0000-4000-8000-000000000001"),
    "raw-detach": ready(2, 7, [1], source=KERNEL) + raw("change", sysname(2), "7") + raw("add", sysname(2, 1), "7")
    + released(2, 7, [1], source=KERNEL) + raw("remove", sysname(2, 1), "7") + raw("change", sysname(2), "8"),
    "raw-udev-attach": ready(1, 5, [1]) + raw("change", sysname(1), "5", source=UDEV)
    + raw("add", sysname(1, 1), "5", source=UDEV),
    "raw-not-ours": ready(0, 2, []) + raw("change", "sda", "2", source=UDEV) + raw("change", "loop-control", "2")
    + raw("change", sysname(0), "-1", source=UDEV) + raw("bind", sysname(0), "2", source=UDEV)
    + raw("change", sysname(0), None, source=UDEV) + raw("change", sysname(0), "2", source=UDEV),
}


def key(number):
    return bytes([number])


def b(value):
    return bytes([0, 1 if value else 0])


def u(index):  # interesting[index]: 0 1 511 512 513 1024 2048 4096 8192 10e6 day day+1
    return bytes([1, index])


def u_raw(value):
    return bytes([1, 0x80]) + value.to_bytes(4, "big")


def t(index):
    return bytes([2, index])


def t_blocks(blocks):
    return bytes([2, 0x60]) + blocks.to_bytes(2, "big")


def t_raw(value):
    return bytes([2, 0xc0]) + value.to_bytes(8, "big")


def s(index):  # words[index]: persistent client auto udev kernel . .. a/b Udev "demo " "" r*63
    return bytes([3, 0, index])


def s_raw(text):
    data = text.encode() if isinstance(text, str) else text
    return bytes([3, 0, 0x80, len(data)]) + data


def other(signature):
    return bytes([4, len(signature) - 1]) + signature.encode()


KEYS = {name: i for i, name in enumerate(["read-only", "offset", "size-limit", "sector-size", "direct-io",
                                          "partscan", "autoclear", "lifetime", "ref", "timeout-usec",
                                          "readiness"])}


def options(*entries):
    return bytes([len(entries)]) + b"".join(key(KEYS[k]) + v for k, v in entries)


OPTIONS = {
    "empty": bytes([0]),
    "everything-valid": options(("read-only", b(True)), ("offset", t_blocks(8)), ("size-limit", t_blocks(2048)),
                                ("sector-size", u(7)), ("direct-io", b(True)), ("partscan", b(False)),
                                ("autoclear", b(True)), ("lifetime", s(1)), ("ref", s_raw("demo")),
                                ("timeout-usec", t(9)), ("readiness", s(3))),
    "offset-not-multiple": options(("offset", t(4))),
    "sector-size-bad": options(("sector-size", u_raw(3000))),
    "sector-size-as-t": options(("sector-size", t(3))),
    "ref-too-long": options(("ref", s_raw("r" * 64))),
    "ref-slash": options(("ref", s(7))),
    "ref-dotdot": options(("ref", s(6))),
    "ref-control-byte": options(("ref", s_raw(b"a\x01b"))),
    "ref-utf8": options(("ref", s_raw("d\u00e9mo"))),
    "timeout-zero": options(("timeout-usec", t(0))),
    "timeout-past-a-day": options(("timeout-usec", t(11))),
    "timeout-a-day": options(("timeout-usec", t(10))),
    "lifetime-bad": options(("lifetime", s(2))),
    "readiness-case": options(("readiness", s(8))),
    "unknown-key": bytes([1, 0xf0, 0x80, 5]) + b"bogus" + b(True),
    "near-miss-key": bytes([1, 0xe1]) + b(True),
    "variant-of-variant": options(("read-only", other("v"))),
    "size-limit-huge": options(("size-limit", t_raw(2**64 - 512))),
}


def main():
    for target, seeds in (("registry", REGISTRY), ("options", OPTIONS)):
        directory = HERE / "corpus" / target
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            old.unlink()
        for name, data in seeds.items():
            (directory / name).write_bytes(data)
        print(f"{directory.relative_to(HERE.parent.parent)}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
