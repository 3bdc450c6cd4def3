#!/usr/bin/python3
"""udev watches loop devices: when anyone closes the disk node after opening it for
writing (dd, mkfs, ...), udevd re-reads the partition table with BLKRRPART unless it
can lock the device. This kernel has no partition parsers, so a re-read wipes the
partitions loopd added with BLKPG. loopd holds a shared lock for as long as it owns
the device; with it, the partitions must survive."""

import os

from harness import (busctl_attach, busctl_detach, detaching, loop_name,
                     main, partition_numbers_in_sysfs, read_text, run, verify_detached,
                     verify_ready, verify_reply)


def rewrite_one_sector(devnode):
    """Opens the disk O_WRONLY and writes back the bytes already there, so the data
    does not change but the close is a close-after-write. The sector lies 1 MiB before
    the end: past every partition of the gpt3 image and before its backup GPT."""
    size = int(read_text(f"/sys/block/{loop_name(devnode)}/size")) * 512
    offset = size - 1024 * 1024
    with open(devnode, "rb") as f:
        f.seek(offset)
        data = f.read(512)
    assert len(data) == 512, f"short read from {devnode}"
    fd = os.open(devnode, os.O_WRONLY | os.O_CLOEXEC)
    try:
        assert os.pwrite(fd, data, offset) == 512, f"short write to {devnode}"
    finally:
        os.close(fd)  # this close is what udev's inotify watch reacts to


def test_partitions_survive_close_after_write(env):
    image = env.image("gpt3")
    reply = busctl_attach(image.path)
    diskseq = reply["diskseq"]
    with detaching(reply):
        verify_reply(reply, image)
        rewrite_one_sector(reply["devnode"])
        # The only settle in the suite: not to wait for readiness, but to let udevd
        # finish whatever the close set off, so we can assert that it changed nothing.
        run("udevadm", "settle", "--timeout=30")
        found = partition_numbers_in_sysfs(loop_name(reply["devnode"]))
        assert found == [1, 2, 3], \
            f"{reply['devnode']}: partitions {found} after close-after-write, expected [1, 2, 3]"
        verify_ready(reply["devnode"], diskseq, image.nparts, image.table_uuid)

        busctl_detach(diskseq)
        verify_detached(reply["devnode"], diskseq)


if __name__ == "__main__":
    main(globals())
