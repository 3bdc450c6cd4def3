"""Checks, all at reply time and without waiting: readiness (verify_ready,
verify_reply), release (verify_detached), the sysfs and udev readers they use, the
leak finders, and the clean-up of attachments a test leaves behind (detaching,
detach_quietly, force_detach). Part of harness.py (see there)."""

import fcntl
import os
import re
import stat
import time

from harness_base import read_text, run
from harness_clients import busctl_detach

__all__ = [
    "read_uevent", "loop_name", "partition_numbers_in_sysfs", "partition_nodes_in_dev",
    "expected_partitions", "verify_ready", "verify_reply", "verify_detached",
    "loop_devices_backed_under", "detach_quietly", "still_attached", "detaching",
    "unbound_loop_devices_with_partitions", "force_detach", "loop_numbers", "remove_loop_devices",
]

# --------------------------------------------------------------------------- sysfs

def read_uevent(path):
    """KEY=value lines of a sysfs uevent file as a dict."""
    return dict(line.split("=", 1) for line in read_text(path).splitlines() if "=" in line)


def loop_name(devnode):
    """'/dev/loop3' -> 'loop3'."""
    name = os.path.basename(devnode)
    assert re.fullmatch(r"loop\d+", name), f"{devnode!r} is not a loop device node"
    return name


def partition_numbers_in_sysfs(name):
    """Numbers K of /sys/block/<name>/<name>pK, sorted."""
    pattern = re.compile(re.escape(name) + r"p(\d+)")
    nums = []
    for entry in os.listdir(f"/sys/block/{name}"):
        m = pattern.fullmatch(entry)
        if m:
            nums.append(int(m.group(1)))
    return sorted(nums)


def partition_nodes_in_dev(name):
    return sorted(e for e in os.listdir("/dev") if re.fullmatch(re.escape(name) + r"p\d+", e))


def expected_partitions(devnode, nparts):
    return [f"{devnode}p{k}" for k in range(1, nparts + 1)]

# --------------------------------------------------------------------------- checks

def _udev_info(devnode):
    """udev's view of a device: (symlinks from the database, properties)."""
    out = run("udevadm", "info", f"--name={devnode}").stdout
    links = [line[3:] for line in out.splitlines() if line.startswith("S: ")]
    props = dict(line[3:].split("=", 1) for line in out.splitlines()
                 if line.startswith("E: ") and "=" in line)
    return links, props


def _check_udev_db(node, majmin, diskseq, what):
    assert os.path.exists(f"/run/udev/data/b{majmin}"), \
        f"{what} {node}: no udev database entry /run/udev/data/b{majmin}"
    links, props = _udev_info(node)
    assert "USEC_INITIALIZED" in props, f"{what} {node}: udev entry not initialized"
    assert "ID_PROCESSING" not in props, f"{what} {node}: udev is still processing it"
    assert props.get("DISKSEQ") == str(diskseq), \
        f"{what} {node}: udev DISKSEQ={props.get('DISKSEQ')}, expected {diskseq}"
    return links, props


def _check_block_node(node, sys_dir, what):
    st = os.stat(node)  # raises (and so fails) if missing
    assert stat.S_ISBLK(st.st_mode), f"{what} {node} is not a block device"
    majmin = read_text(f"{sys_dir}/dev")
    assert f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" == majmin, \
        f"{what} {node} is {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, sysfs says {majmin}"
    return majmin


def verify_ready(devnode, diskseq, nparts, table_uuid=None):
    """Checks, at reply time and without any waiting, that the attachment `diskseq`
    on `devnode` is ready as API.md defines it: kernel devices for the disk and each
    of its `nparts` partitions carrying DISKSEQ=diskseq, and udev done with all of
    them. `table_uuid` (from the image) additionally proves udev's entries describe
    this image's table, not a previous attachment's."""
    name = loop_name(devnode)
    sys_dir = f"/sys/block/{name}"
    disk_majmin = _check_block_node(devnode, sys_dir, "disk")
    assert read_text(f"{sys_dir}/diskseq") == str(diskseq), \
        f"{devnode}: sysfs diskseq {read_text(f'{sys_dir}/diskseq')}, reply said {diskseq}"
    assert os.path.exists(f"{sys_dir}/loop/backing_file"), f"{devnode} is not bound"

    found = partition_numbers_in_sysfs(name)
    assert found == list(range(1, nparts + 1)), \
        f"{devnode}: kernel has partitions {found}, expected 1..{nparts}"

    links, props = _check_udev_db(devnode, disk_majmin, diskseq, "disk")
    # udev makes this link only while processing an event with DISKSEQ=diskseq.
    assert f"disk/by-diskseq/{diskseq}" in links, \
        f"{devnode}: udev has not processed an event with DISKSEQ={diskseq} (links {links})"
    if table_uuid:
        assert props.get("ID_PART_TABLE_UUID") == table_uuid, \
            f"{devnode}: udev saw table {props.get('ID_PART_TABLE_UUID')}, image has {table_uuid}"
    link = f"/dev/disk/by-diskseq/{diskseq}"
    assert os.path.realpath(link) == devnode, \
        f"{link} -> {os.path.realpath(link) if os.path.lexists(link) else 'missing'}, expected {devnode}"

    for k in range(1, nparts + 1):
        pnode, psys = f"{devnode}p{k}", f"{sys_dir}/{name}p{k}"
        majmin = _check_block_node(pnode, psys, "partition")
        ue = read_uevent(f"{psys}/uevent")
        assert ue.get("DISKSEQ") == str(diskseq), \
            f"{pnode}: kernel DISKSEQ={ue.get('DISKSEQ')}, expected {diskseq}"
        _, pprops = _check_udev_db(pnode, majmin, diskseq, "partition")
        assert pprops.get("ID_PART_ENTRY_NUMBER") == str(k) and \
            pprops.get("ID_PART_ENTRY_DISK") == disk_majmin, \
            f"{pnode}: udev has not probed it as partition {k} of {disk_majmin}: {pprops}"
        if table_uuid:
            assert pprops.get("ID_PART_TABLE_UUID") == table_uuid, \
                f"{pnode}: udev saw table {pprops.get('ID_PART_TABLE_UUID')}, image has {table_uuid}"


def verify_reply(reply, image):
    """The reply's shape, then readiness of what it names."""
    devnode = reply["devnode"]
    name = loop_name(devnode)
    assert reply["partitions"] == expected_partitions(devnode, image.nparts), \
        f"partitions {reply['partitions']}, expected {expected_partitions(devnode, image.nparts)}"
    if reply["diskseq"] is not None:
        assert reply["device"] == f"/org/loopd1/device/{reply['diskseq']}", \
            f"object {reply['device']} for diskseq {reply['diskseq']}"
        diskseq = reply["diskseq"]
    else:
        diskseq = int(read_text(f"/sys/block/{name}/diskseq"))  # human output has none
    verify_ready(devnode, diskseq, image.nparts, image.table_uuid)
    assert os.path.realpath(read_text(f"/sys/block/{name}/loop/backing_file")) == \
        os.path.realpath(image.path), f"{devnode} is not backed by {image.path}"
    return diskseq


def verify_detached(devnode, diskseq):
    """Checks, right after a Detach reply, that the attachment `diskseq` is gone: no
    backing file, no partitions in sysfs or /dev, and sysfs past `diskseq`."""
    name = loop_name(devnode)
    sys_dir = f"/sys/block/{name}"
    if not os.path.isdir(sys_dir):
        return  # the loop device itself was removed: nothing can be left
    now = int(read_text(f"{sys_dir}/diskseq"))
    assert now != diskseq, f"{devnode} still has diskseq {diskseq}"
    assert now > diskseq, f"{devnode} diskseq went back from {diskseq} to {now}"
    if os.path.exists(f"{sys_dir}/loop/backing_file"):
        # Someone else (not a test here) attached it since; it is no longer ours.
        return
    assert partition_numbers_in_sysfs(name) == [], \
        f"{devnode}: partitions {partition_numbers_in_sysfs(name)} left in sysfs"
    assert partition_nodes_in_dev(name) == [], \
        f"{devnode}: partition nodes {partition_nodes_in_dev(name)} left in /dev"


# --------------------------------------------------------------------------- leaks and clean-up

def loop_devices_backed_under(directory):
    """[(devnode, backing file)] for every bound loop device whose file lies under
    `directory`."""
    prefix = os.path.realpath(directory) + "/"
    found = []
    for name in sorted(os.listdir("/sys/block")):
        try:
            backing = read_text(f"/sys/block/{name}/loop/backing_file")
        except OSError:
            continue
        if backing.startswith(prefix):
            found.append((f"/dev/{name}", backing))
    return found


def detach_quietly(diskseq):
    """Best-effort clean-up through loopd for a test that failed half-way; the leak
    check in Env catches whatever this cannot remove."""
    if diskseq is None:
        return
    try:
        busctl_detach(diskseq)
    except Exception as e:  # the test has already failed; say why clean-up did too
        print(f"# clean-up: Detach {diskseq} failed: {e}")


def still_attached(diskseq, devnode=None):
    """Whether the attachment `diskseq` is still bound: its loop device (`devnode`,
    or any loop device if None) shows that diskseq in sysfs and has a backing file.
    A detach bumps the diskseq, so a number reused since is never taken for it."""
    if devnode is not None:
        names = [os.path.basename(devnode)]
    else:
        names = [n for n in os.listdir("/sys/block") if n.startswith("loop")]
    for name in names:
        try:
            if read_text(f"/sys/block/{name}/diskseq") == str(diskseq) and \
                    os.path.exists(f"/sys/block/{name}/loop/backing_file"):
                return True
        except OSError:
            continue
    return False


class detaching:
    """Clean-up for the attachments a test makes:

        reply = busctl_attach(image.path)
        with detaching(reply):
            verify_reply(reply, image)
            busctl_detach(reply["diskseq"])
            verify_detached(reply["devnode"], reply["diskseq"])

    or, for attachments made inside the block (add() returns its argument and may
    be called from Parallel's threads):

        with detaching() as held:
            a = held.add(pydbus_attach(a_image.path))

    An attachment is an attach reply (a dict with "diskseq" and "devnode") or a bare
    diskseq. On exit, normal or not, each one that sysfs still shows bound at its
    diskseq (still_attached) is detached through loopd (detach_quietly); one the
    block detached itself, or that someone else released, is left alone. It asserts
    nothing: tests check their own detaches, and Env's leak check catches whatever
    this could not remove."""

    def __init__(self, *attachments):
        self._held = []
        for attachment in attachments:
            self.add(attachment)

    def add(self, attachment):
        if isinstance(attachment, dict):
            diskseq, devnode = attachment["diskseq"], attachment.get("devnode")
        else:
            diskseq, devnode = attachment, None
        if diskseq is None:
            raise ValueError(f"no diskseq to detach by: {attachment!r}")
        self._held.append((int(diskseq), devnode))  # list.append: safe across threads
        return attachment

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        for diskseq, devnode in self._held:
            try:
                attached = still_attached(diskseq, devnode)
            except Exception as e:  # never hide the block's own failure
                print(f"# clean-up: cannot tell whether diskseq {diskseq} is attached: {e}")
                attached = True
            if attached:
                detach_quietly(diskseq)
        return False


def unbound_loop_devices_with_partitions():
    """Loop devices with no backing file that still have partitions: on this kernel
    (no partition parsers) BLKPG partitions can outlive the attachment."""
    found = set()
    for name in os.listdir("/sys/block"):
        if name.startswith("loop") and not os.path.exists(f"/sys/block/{name}/loop") \
                and partition_numbers_in_sysfs(name):
            found.add(f"/dev/{name}")
    return found


def force_detach(devnode):
    """Removes a loop device the way an admin would: partitions first (this kernel
    does not drop BLKPG partitions for us), then the binding."""
    run("partx", "-d", devnode, check=False)
    run("losetup", "-d", devnode, check=False)


LOOP_CTL_REMOVE = 0x4C81


def loop_numbers():
    """The loop devices that exist now (/sys/block/loopN), by number."""
    return {int(name[4:]) for name in os.listdir("/sys/block") if name.startswith("loop") and name[4:].isdigit()}


def remove_loop_devices(numbers):
    """Removes loop devices a test made the kernel create (LOOP_CTL_GET_FREE adds
    one whenever none is free): thousands of idle loopN left behind slow udev and
    every later test. The kernel refuses (EBUSY) a bound one, so only unbound ones
    go. Returns how many of `numbers` remain."""
    fd = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    left = set(numbers) & loop_numbers()
    # A device udev still has open (its events after a release) is EBUSY for a
    # moment: asked again a few times, then counted.
    deadline = time.monotonic() + 5
    try:
        while left:
            for number in sorted(left):
                try:
                    fcntl.ioctl(fd, LOOP_CTL_REMOVE, number)
                except OSError:
                    pass  # bound (someone's), open, or gone
            left &= loop_numbers()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        os.close(fd)
    return len(left)
