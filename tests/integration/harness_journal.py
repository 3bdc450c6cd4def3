"""A real systemd-journald for tests of loopd's journal output (issue 14): it runs
standalone here (no systemd as PID 1); the test that starts it stops it by PID.
Part of harness.py (see there)."""

import json
import os
import socket
import subprocess
import time

from harness_base import run

__all__ = ["JOURNALD", "Journald", "journal_stream"]

JOURNALD = "/lib/systemd/systemd-journald"
SOCKET_DIR = "/run/systemd/journal"
START_LIMIT = 10.0


def _answers(path, kind):
    s = socket.socket(socket.AF_UNIX, kind)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def journald_running():
    return _answers(os.path.join(SOCKET_DIR, "stdout"), socket.SOCK_STREAM)


def journal_stream(identifier):
    """A stream into the journal, as systemd gives a service's stdout and stderr
    (StandardError=journal): journald's stream protocol header, then lines."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.path.join(SOCKET_DIR, "stdout"))
    s.shutdown(socket.SHUT_RD)
    # identifier, unit id, priority, level prefix, to syslog, to kmsg, to console
    s.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
    st = os.fstat(s.fileno())
    return s, f"{st.st_dev}:{st.st_ino}"


class Journald:
    """Uses the journald that runs, or starts one and stops it (by PID) at exit."""

    def __init__(self):
        self.proc = None

    def __enter__(self):
        if journald_running():
            return self
        self.proc = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # journald's start-up, not anything of loopd's: poll until it answers.
        deadline = time.monotonic() + START_LIMIT
        while not journald_running():
            assert self.proc.poll() is None, f"systemd-journald exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, f"systemd-journald did not answer within {START_LIMIT} s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return False

    @staticmethod
    def entries(*matches):
        """The journal's entries matching all of `matches` ("FIELD=value"), oldest
        first, as dicts. `journalctl --sync` first: journald writes what it was sent
        before this reads (a reply of loopd's comes after its log lines were sent)."""
        run("journalctl", "--sync")
        out = run("journalctl", "--no-pager", "-o", "json", *matches,
                  check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]
