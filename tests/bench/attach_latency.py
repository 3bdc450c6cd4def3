#!/usr/bin/python3
"""Attach-to-ready latency of loopd for the 3-partition GPT image.

Run as root from the build tree (meson sets nothing here):
    LOOPD=$PWD/build/loopd LOOPCTL=$PWD/build/loopctl LOOPD_SRC=$PWD \
        PYTHONPATH=tests/integration tests/bench/attach_latency.py [ROUNDS]

Each round attaches over D-Bus (python3-dbus, one connection), verifies readiness at
reply time exactly as the integration tests do, and detaches. Prints the
distribution; it asserts nothing about speed.
"""
import statistics
import sys
import time

import harness


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    samples = []
    with harness.Env() as env:
        image = env.image("gpt3")
        for _ in range(rounds):
            start = time.perf_counter()
            reply = harness.pydbus_attach(image.path)
            samples.append((time.perf_counter() - start) * 1000)
            harness.verify_reply(reply, image)
            harness.busctl_detach(reply["diskseq"])
    samples.sort()
    print(f"attach-to-ready, GPT with 3 partitions, {rounds} rounds, one client:")
    print(f"  median {statistics.median(samples):.1f} ms, p90 {samples[int(0.9 * (rounds - 1))]:.1f} ms, "
          f"min {samples[0]:.1f} ms, max {samples[-1]:.1f} ms")


if __name__ == "__main__":
    main()
