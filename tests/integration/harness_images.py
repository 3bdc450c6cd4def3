"""Test images: backing files with a partition table made by sfdisk, and what
each should produce. Part of harness.py (see there)."""

import json

from harness_base import run

__all__ = ["Image", "make_gpt3", "make_mbr2", "make_gpt32", "make_none", "IMAGE_MAKERS"]

# --------------------------------------------------------------------------- images

class Image:
    """A backing file, and what its partition table should produce."""

    def __init__(self, path, nparts, table_uuid=None):
        self.path = path
        self.nparts = nparts
        self.table_uuid = table_uuid  # as udev spells ID_PART_TABLE_UUID, or None

    def __repr__(self):
        return f"Image({self.path}, {self.nparts} partitions)"


def _sfdisk_image(path, size, script, nparts):
    # A fresh sfdisk run per image gives every image its own random table and
    # partition UUIDs, so a stale udev entry from an earlier image can never pass
    # for this one.
    run("truncate", "-s", size, path)
    run("sfdisk", "-q", path, input=script)
    table = json.loads(run("sfdisk", "--json", path).stdout)["partitiontable"]
    assert len(table["partitions"]) == nparts, f"sfdisk made {table} for {path}"
    table_uuid = table["id"].lower()
    if table["label"] == "dos":
        table_uuid = table_uuid.removeprefix("0x")  # udev: "d56a72a8", sfdisk: "0xd56a72a8"
    return Image(path, nparts, table_uuid)


def make_gpt3(path):
    return _sfdisk_image(path, "64M", "label: gpt\n" + " size=8MiB\n" * 3, 3)


def make_mbr2(path):
    return _sfdisk_image(path, "32M", "label: dos\n" + " size=8MiB\n" * 2, 2)


def make_gpt32(path):
    # GPT has room for 128 entries; 32 x 1 MiB fits a 64 MiB image.
    return _sfdisk_image(path, "64M", "label: gpt\n" + " size=1MiB\n" * 32, 32)


def make_none(path):
    run("truncate", "-s", "16M", path)  # all zeroes: no partition table at all
    return Image(path, 0, None)


IMAGE_MAKERS = {"gpt3": make_gpt3, "mbr2": make_mbr2, "none": make_none, "gpt32": make_gpt32}
