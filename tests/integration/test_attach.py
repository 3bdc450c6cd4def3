#!/usr/bin/python3
"""Attach and detach every kind of image through loopctl and through busctl, and
check at reply time (no waiting) that the device and all its partitions are ready,
and right after the Detach reply that everything is gone."""

import os
import time

from harness import (DEVICE_IFACE, MANAGER_IFACE, MANAGER_PATH, busctl_attach,
                     busctl_detach, busctl_device_detach, busctl_get_all,
                     busctl_get_property, busctl_managed_objects, detaching,
                     expected_partitions, loop_name, loopctl_attach, loopctl_attach_json,
                     loopctl_detach, main, read_text, verify_detached, verify_reply)


def devices_count():
    return busctl_get_property(MANAGER_PATH, MANAGER_IFACE, "Devices")


def check_device_object(obj, devnode, diskseq, image, attached_after_us):
    """The org.loopd1.Device object describes this attachment."""
    assert obj == f"/org/loopd1/device/{diskseq}", f"object path {obj} for diskseq {diskseq}"
    # One property the way an admin would read it, then all of them at once.
    assert busctl_get_property(obj, DEVICE_IFACE, "DiskSeq") == diskseq
    props = busctl_get_all(obj, DEVICE_IFACE)
    expected = {
        "DevNode": devnode,
        "DiskSeq": diskseq,
        "Number": int(loop_name(devnode)[4:]),
        "BackingFile": os.path.realpath(image.path),
        "Partitions": expected_partitions(devnode, image.nparts),
        "Size": os.path.getsize(image.path),
        "Offset": 0,
        "SectorSize": 512,
        "ReadOnly": False,
        "PartScan": True,
        "Autoclear": False,
        "Lifetime": "persistent",
        "OwnerUid": 0,
    }
    wrong = {k: (props.get(k), v) for k, v in expected.items() if props.get(k) != v}
    assert not wrong, f"{obj}: properties (got, expected): {wrong}"
    ready_at = props.get("ReadyTimestamp", 0)
    assert attached_after_us <= ready_at <= time.time() * 1e6, \
        f"{obj}: ReadyTimestamp {ready_at} is not during the Attach call"


def check_listed(obj, diskseq):
    objects = busctl_managed_objects()
    assert obj in objects, f"GetManagedObjects does not list {obj}: {sorted(objects)}"
    assert objects[obj].get(DEVICE_IFACE, {}).get("DiskSeq") == diskseq, \
        f"GetManagedObjects: {obj} is {objects[obj]}"


def check_not_listed(obj):
    objects = busctl_managed_objects()
    assert obj not in objects, f"GetManagedObjects still lists {obj} after Detach"


# ---------------------------------------------------------------- busctl (not ours)

def attach_detach_busctl(env, kind):
    image = env.image(kind)
    before = devices_count()
    started_us = time.time() * 1e6
    reply = busctl_attach(image.path)
    diskseq = reply["diskseq"]
    with detaching(reply):
        verify_reply(reply, image)  # first, before anything else can take time
        check_device_object(reply["device"], reply["devnode"], diskseq, image, started_us)
        check_listed(reply["device"], diskseq)
        assert devices_count() == before + 1, f"Devices {devices_count()}, expected {before + 1}"

        busctl_detach(diskseq)
        verify_detached(reply["devnode"], diskseq)
        check_not_listed(reply["device"])
        assert devices_count() == before, f"Devices {devices_count()}, expected {before}"


def test_gpt3_busctl(env):
    attach_detach_busctl(env, "gpt3")


def test_mbr2_busctl(env):
    attach_detach_busctl(env, "mbr2")


def test_none_busctl(env):
    attach_detach_busctl(env, "none")


def test_gpt32_busctl(env):
    attach_detach_busctl(env, "gpt32")


# ---------------------------------------------------------------- loopctl, human output

def attach_detach_loopctl(env, kind):
    """Human output; detach by device node."""
    image = env.image(kind)
    reply = loopctl_attach(image.path)
    # The human output carries no diskseq: take it from sysfs, as a user would.
    diskseq = int(read_text(f"/sys/block/{loop_name(reply['devnode'])}/diskseq"))
    with detaching(diskseq):  # not the reply: it has no diskseq
        verify_reply(reply, image)
        check_listed(f"/org/loopd1/device/{diskseq}", diskseq)

        loopctl_detach(reply["devnode"])
        verify_detached(reply["devnode"], diskseq)
        check_not_listed(f"/org/loopd1/device/{diskseq}")


def test_gpt3_loopctl(env):
    attach_detach_loopctl(env, "gpt3")


def test_mbr2_loopctl(env):
    attach_detach_loopctl(env, "mbr2")


def test_none_loopctl(env):
    attach_detach_loopctl(env, "none")


def test_gpt32_loopctl(env):
    attach_detach_loopctl(env, "gpt32")


# ---------------------------------------------------------------- loopctl --json

def attach_detach_loopctl_json(env, kind):
    """JSON output; detach by diskseq."""
    image = env.image(kind)
    started_us = time.time() * 1e6
    reply = loopctl_attach_json(image.path)
    diskseq = reply["diskseq"]
    with detaching(reply):
        verify_reply(reply, image)
        check_device_object(reply["device"], reply["devnode"], diskseq, image, started_us)

        loopctl_detach(diskseq)
        verify_detached(reply["devnode"], diskseq)
        check_not_listed(reply["device"])


def test_gpt3_loopctl_json(env):
    attach_detach_loopctl_json(env, "gpt3")


def test_mbr2_loopctl_json(env):
    attach_detach_loopctl_json(env, "mbr2")


def test_none_loopctl_json(env):
    attach_detach_loopctl_json(env, "none")


def test_gpt32_loopctl_json(env):
    attach_detach_loopctl_json(env, "gpt32")


# ---------------------------------------------------------------- the other detach paths

def test_detach_by_ref_with_loopctl(env):
    image = env.image("gpt3")
    reply = loopctl_attach_json(image.path, "--ref", "attach-test")
    diskseq = reply["diskseq"]
    with detaching(reply):
        verify_reply(reply, image)
        assert busctl_get_property(reply["device"], DEVICE_IFACE, "Ref") == "attach-test"
        loopctl_detach("attach-test")
        verify_detached(reply["devnode"], diskseq)


def test_detach_through_device_object(env):
    image = env.image("gpt3")
    reply = busctl_attach(image.path)
    diskseq = reply["diskseq"]
    with detaching(reply):
        verify_reply(reply, image)
        busctl_device_detach(reply["device"])
        verify_detached(reply["devnode"], diskseq)
        check_not_listed(reply["device"])


if __name__ == "__main__":
    main(globals())
