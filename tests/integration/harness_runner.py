"""The runner: main() runs a test file's test_* functions, each in a fresh Env, and
Parallel runs one check per thread. Part of harness.py (see there)."""

import os
import signal
import sys
import threading
import time
import traceback

from harness_base import LOOPCTL, LOOPD
from harness_env import Env, Skip

__all__ = ["Parallel", "main"]

# --------------------------------------------------------------------------- runner

class Parallel:
    """Runs fn(i) for i in range(n) on n threads; re-raises the first failure after
    all are done. Used to check each concurrent reply the moment it arrives."""

    def __init__(self, n, fn):
        self.results = [None] * n
        self.errors = [None] * n
        # Daemon threads: a SIGTERM (meson's timeout) must not wait for them.
        threads = [threading.Thread(target=self._one, args=(fn, i), daemon=True)
                   for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _one(self, fn, i):
        try:
            self.results[i] = fn(i)
        except BaseException as e:  # reported by raise_first()
            self.errors[i] = e

    def raise_first(self):
        failures = [(i, e) for i, e in enumerate(self.errors) if e is not None]
        if failures:
            i, e = failures[0]
            others = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise AssertionError(f"client {i}: {e}{others}") from e


_terminated = False


def _on_sigterm(signum, frame):
    """meson kills a test that runs too long with SIGTERM: unwind through Env's
    __exit__ so loopd, dbus-daemon and udevd stop and leaked devices are removed."""
    global _terminated
    _terminated = True
    raise SystemExit(128 + signum)


def main(module_globals, **env_options):
    """Runs the module's test_* functions in definition order, each in a fresh Env
    (made with env_options, e.g. polkit=True). argv may name a subset. Exits 1 if a
    test failed, else 77 (meson: skipped) if one raised Skip or if not root, else 0."""
    if os.geteuid() != 0:
        print("SKIP: loopd integration tests need root")
        sys.exit(77)
    for binary in (LOOPD, LOOPCTL):
        if not os.access(binary, os.X_OK):
            print(f"FAIL: {binary} is not an executable (set LOOPD / LOOPCTL)")
            sys.exit(1)
    tests = [(n, f) for n, f in module_globals.items() if n.startswith("test_") and callable(f)]
    if len(sys.argv) > 1:
        tests = [(n, f) for n, f in tests if n in sys.argv[1:]]
    signal.signal(signal.SIGTERM, _on_sigterm)
    failed = skipped = 0
    for name, fn in tests:
        started = time.monotonic()
        try:
            # LOOPD_ARGS: extra daemon options for a run by hand, e.g. a tiny
            # --receive-buffer to make the kernel drop uevents.
            with Env(os.environ.get("LOOPD_ARGS", "").split(), **env_options) as env:
                fn(env)
        except Skip as e:
            skipped += 1
            print(f"SKIP {name}: {e}")
        except Exception as e:
            failed += 1
            print(f"FAIL {name}: {e}")
            if not isinstance(e, AssertionError) or os.environ.get("LOOPD_TEST_TRACEBACK"):
                traceback.print_exc(file=sys.stdout)
        else:
            print(f"PASS {name} ({time.monotonic() - started:.2f} s)")
        sys.stdout.flush()
        if _terminated:
            print("# terminated by SIGTERM")
            sys.exit(1)
    passed = len(tests) - failed - skipped
    print(f"# {passed}/{len(tests)} passed" + (f", {skipped} skipped" if skipped else ""))
    sys.exit(1 if failed else 77 if skipped else 0)
