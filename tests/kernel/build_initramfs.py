#!/usr/bin/python3
"""Builds the test guest's initramfs: busybox-static, the init script beside this
file, and the kernel modules the guest needs before it can reach the host's root
over virtio 9p (plus loop and virtio-rng), with their dependencies.

Usage: build_initramfs.py MODULES_DIR OUTPUT.cpio.gz

MODULES_DIR is lib/modules/<version> of a kernel package unpacked with dpkg-deb -x.
Debian's package carries no modules.dep (depmod writes it at install time) and kmod
may not be installed, so dependencies are read from each module's own .modinfo
"depends=" string. The archive (newc cpio) is written here too, so building needs
neither root (for /dev/console) nor the cpio package.
"""

import gzip
import os
import re
import sys

# Which modules and why. Debian 6.1 (config-6.1.0-*-amd64) builds all of these as
# modules (=m), not into the kernel: check the config when moving to another kernel.
WANTED = [
    "virtio_pci",     # the PCI transport of every virtio device below
    "9pnet_virtio",   # 9p over virtio: the host's root and the results folder
    "9p",             # the 9p filesystem itself
    "loop",           # the subject under test
    "virtio-rng",     # entropy at boot: python and dbus-daemon read getrandom()
]

BUSYBOX = "/bin/busybox"  # Debian's busybox-static: needs no libraries in the image
INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "init")


def module_index(modules_dir):
    """{canonical name: path} of every .ko; names compare with '-' as '_' like
    the kernel does."""
    index = {}
    for root, _, files in os.walk(modules_dir):
        for f in files:
            if f.endswith(".ko"):
                index[f[:-3].replace("-", "_")] = os.path.join(root, f)
    return index


def depends_of(path):
    with open(path, "rb") as f:
        m = re.search(rb"\0depends=([^\0]*)\0", f.read())
    if not m or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",")]


def load_order(index, wanted):
    """Every wanted module after its dependencies, each once."""
    order = []

    def visit(name, chain):
        if name in order:
            return
        if name not in index:
            sys.exit(f"build_initramfs: no module {name} (needed by {' <- '.join(chain)}): "
                     "is it built into this kernel? Check its config.")
        for dep in depends_of(index[name]):
            visit(dep, chain + [name])
        order.append(name)

    for w in wanted:
        visit(w.replace("-", "_"), [])
    return order


class Cpio:
    """A newc ("070701") archive, written entry by entry."""

    def __init__(self, out):
        self.out = out
        self.ino = 0

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        self.ino += 1
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.out.write(header + name.encode() + b"\0")
        self.out.write(b"\0" * (-(len(header) + len(name) + 1) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def dir(self, name):
        self._entry(name, 0o040755)

    def file(self, name, source, mode=0o100644):
        with open(source, "rb") as f:
            self._entry(name, mode, f.read())

    def chardev(self, name, major, minor):
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    modules_dir, output = sys.argv[1], sys.argv[2]
    index = module_index(modules_dir)
    order = load_order(index, WANTED)
    tmp = output + ".tmp"
    # mtime 0 in gzip and cpio: the same inputs give the same bytes.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        cpio = Cpio(out)
        for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
            cpio.dir(d)
        # The kernel opens /dev/console for init's stdio before init could mount
        # devtmpfs (Debian does not set DEVTMPFS_MOUNT): it must be in the archive.
        cpio.chardev("dev/console", 5, 1)
        cpio.file("bin/busybox", BUSYBOX, 0o100755)
        cpio.file("init", INIT, 0o100755)
        for name in order:
            cpio.file(f"modules/{name}.ko", index[name])
        order_text = "".join(n + "\n" for n in order).encode()
        cpio._entry("modules/order", 0o100644, order_text)
        cpio.finish()
    os.replace(tmp, output)
    print(f"initramfs {output}: modules {' '.join(order)}")


if __name__ == "__main__":
    main()
