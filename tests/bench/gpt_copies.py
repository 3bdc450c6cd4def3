"""Distinct copies of a GPT image for the benchmark's held devices."""

import os
import struct
import uuid
import zlib

SECTOR = 512


def _guid_bytes():
    return uuid.uuid4().bytes_le


def gpt_copies(template, count, directory, prefix="held"):
    """`count` copies of the GPT image `template` (sparse), each with its own disk
    GUID and partition GUIDs, as separate sfdisk runs would give: made by patching
    both GPT headers and entry arrays (CRC32s recomputed), without sfdisk's fsync
    per image. Returns the paths."""
    size = os.path.getsize(template)
    with open(template, "rb") as f:
        head = bytearray(f.read(34 * SECTOR))
        f.seek(size - 33 * SECTOR)
        tail = bytearray(f.read(33 * SECTOR))
    hdr = SECTOR  # primary header in LBA 1, entries from LBA 2
    assert head[hdr:hdr + 8] == b"EFI PART", f"{template} has no GPT"
    entries_lba, n_entries, entry_size = struct.unpack_from("<QII", head, hdr + 72)
    header_size = struct.unpack_from("<I", head, hdr + 12)[0]
    entries_len = n_entries * entry_size
    backup_hdr = len(tail) - SECTOR  # backup header in the last LBA, its entries before it
    used = [i for i in range(n_entries)
            if any(head[entries_lba * SECTOR + i * entry_size:entries_lba * SECTOR + i * entry_size + 16])]
    paths = []
    for k in range(count):
        disk_guid = _guid_bytes()
        part_guids = {i: _guid_bytes() for i in used}
        for buf, h, e in ((head, hdr, entries_lba * SECTOR), (tail, backup_hdr, 0)):
            for i, g in part_guids.items():
                buf[e + i * entry_size + 16:e + i * entry_size + 32] = g
            entries_crc = zlib.crc32(bytes(buf[e:e + entries_len]))
            buf[h + 56:h + 72] = disk_guid
            struct.pack_into("<I", buf, h + 88, entries_crc)
            struct.pack_into("<I", buf, h + 16, 0)
            struct.pack_into("<I", buf, h + 16, zlib.crc32(bytes(buf[h:h + header_size])))
        path = os.path.join(directory, f"{prefix}-{k}.img")
        with open(path, "wb") as f:
            f.truncate(size)
            f.write(head)
            f.seek(size - len(tail))
            f.write(tail)
        paths.append(path)
    return paths
