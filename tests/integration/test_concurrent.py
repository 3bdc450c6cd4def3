#!/usr/bin/python3
"""Sixteen clients attach at once, each its own busctl process and bus connection.
Every reply must name a distinct device and diskseq, and each must be ready the
moment its own reply arrives, while the others are still being set up."""

import subprocess

from harness import (CALL_TIMEOUT, CallError, Parallel, busctl_attach_cmd,
                     detaching, main, parse_busctl_attach, verify_detached, verify_reply)

CLIENTS = 16


def start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def reply_of(proc):
    out, err = proc.communicate(timeout=CALL_TIMEOUT + 30)
    if proc.returncode != 0:
        raise CallError(None, err.strip().removeprefix("Call failed: "), "busctl")
    return out


def test_sixteen_attaches_at_once(env):
    images = [env.image("gpt3") for _ in range(CLIENTS)]
    # Every client is running before the first reply is read.
    procs = [start(busctl_attach_cmd(image.path)) for image in images]
    replies = [None] * CLIENTS
    held = detaching()

    def attach_and_verify(i):
        # Runs on its own thread so the check happens as this reply arrives.
        replies[i] = held.add(parse_busctl_attach(reply_of(procs[i])))
        verify_reply(replies[i], images[i])

    with held:
        Parallel(CLIENTS, attach_and_verify).raise_first()
        devnodes = {r["devnode"] for r in replies}
        diskseqs = {r["diskseq"] for r in replies}
        assert len(devnodes) == CLIENTS, f"devnodes not distinct: {sorted(devnodes)}"
        assert len(diskseqs) == CLIENTS, f"diskseqs not distinct: {sorted(diskseqs)}"
        detach_all_at_once(replies)


def detach_all_at_once(replies):
    """Sixteen concurrent Detach calls; each device must be gone at its own reply."""
    procs = [start(["busctl", "--system", f"--timeout={CALL_TIMEOUT}", "call", "org.loopd1",
                    "/org/loopd1", "org.loopd1.Manager", "Detach", "ta{sv}",
                    str(r["diskseq"]), "0"]) for r in replies]

    def detach_and_verify(i):
        reply_of(procs[i])
        verify_detached(replies[i]["devnode"], replies[i]["diskseq"])

    Parallel(CLIENTS, detach_and_verify).raise_first()


if __name__ == "__main__":
    main(globals())
