#!/usr/bin/python3
"""A FUSE filesystem with one file, `image`, whose reads block until the file
RELEASE exists (then every read, waiting or later, answers with zeros).
Everything else answers at once: open, stat, directory listing. For
test_stalls.py: a backing file whose reads never return, as a hung network
filesystem's would.

    stuck_fs.py MOUNTPOINT SIZE_BYTES RELEASE   (in the foreground until unmounted)

A file, not a signal: Python runs signal handlers only in the main thread, which
sits in libfuse's loop.
"""

import errno
import os
import stat
import sys
import threading
import time

import fusepy


class StuckFs(fusepy.Operations):
    def __init__(self, size):
        self.size = size
        self.released = threading.Event()
        self.now = time.time()

    def getattr(self, path, fh=None):
        common = {"st_uid": 0, "st_gid": 0, "st_atime": self.now, "st_mtime": self.now,
                  "st_ctime": self.now}
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **common}
        if path == "/image":
            return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": self.size, **common}
        raise fusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", "..", "image"]

    def open(self, path, flags):
        return 0

    def read(self, path, size, offset, fh):
        self.released.wait()
        return b"\0" * max(0, min(size, self.size - offset))

    def write(self, path, data, offset, fh):
        self.released.wait()
        return len(data)


def watch_release(fs, flag):
    while not os.path.exists(flag):
        time.sleep(0.05)
    fs.released.set()


def main():
    mountpoint, size, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    fs = StuckFs(size)
    threading.Thread(target=watch_release, args=(fs, flag), daemon=True).start()
    # Threads, so that stat and open answer while reads wait; direct_io so every
    # read reaches us instead of a page cache filled by an earlier one.
    fusepy.FUSE(fs, mountpoint, foreground=True, nothreads=False, allow_other=True, direct_io=True)


if __name__ == "__main__":
    main()
