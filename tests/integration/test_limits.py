#!/usr/bin/python3
"""loopd holds more devices than a plain shell's soft fd limit: it holds one fd per
device and raises its soft limit to the hard one at start (loopd.service sets
LimitNOFILE=524288). Started here with a soft limit of 1024, it must hold 1100.
Failed before (adbd7c0): EMFILE ("Too many open files") at 1008 devices.
"""

import resource
import threading

from harness import (detach_quietly, loop_numbers, main, pydbus_attach, pydbus_options, remove_loop_devices,
                     verify_reply)

SOFT = 1024
HELD = 1100
THREADS = 8


def test_more_devices_than_a_1024_soft_fd_limit(env):
    images = [env.image("none") for _ in range(HELD)]
    held, errors, lock = [], [], threading.Lock()
    before = loop_numbers()

    def attach_some(i):
        for image in images[i::THREADS]:
            try:
                reply = pydbus_attach(image.path, pydbus_options())
            except Exception as e:  # reported below, after the others are done
                with lock:
                    errors.append(e)
                return
            with lock:
                held.append((reply, image))

    workers = [threading.Thread(target=attach_some, args=(i,)) for i in range(THREADS)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors, f"{len(held)} attached, then: {errors[0]}"
        verify_reply(*held[-1])  # the last one is ready like the first
        with open(f"/proc/{env.loopd.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max open files"))
        assert int(line.split()[3]) > SOFT, f"loopd's soft limit stayed at {line.split()[3]}"
    finally:
        def detach_some(i):
            for reply, _ in held[i::THREADS]:
                detach_quietly(reply["diskseq"])
        workers = [threading.Thread(target=detach_some, args=(i,)) for i in range(THREADS)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        # The ~1090 loop devices the kernel made for them go too: left idle, they
        # slow udev and every later test.
        left = remove_loop_devices(loop_numbers() - before)
        assert not left, f"{left} loop devices this test made could not be removed"


if __name__ == "__main__":
    # Lowered before Env starts dbus-daemon, udevd and loopd, which inherit it.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, hard))
    main(globals())
