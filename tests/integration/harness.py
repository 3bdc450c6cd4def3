"""Shared fixture for loopd's integration tests.

Each test runs against a fresh world: a private system-bus dbus-daemon whose policy
is Debian's default plus the project's own dbus/org.loopd1.conf, a real
systemd-udevd, and the loopd binary from the build tree. Clients are the project's
loopctl and tools no one here wrote: busctl and python3-dbus.

The product's promise is that a reply means "ready", so nothing here sleeps, settles
or retries before checking a reply. The only polls are for the daemon's own start-up
and for processes to exit.

Run under Debian's /usr/bin/python3 (python3-dbus is installed for it). Needs root;
exits 77 (meson: skipped) otherwise.

Environment: LOOPD (daemon binary), LOOPCTL (CLI binary), LOOPD_SRC (source root).
Without them, paths default to the source tree this file is in and its build/ dir.
For runs by hand: LOOPD_ARGS (extra daemon options), LOOPD_LOG_LEVEL (default
debug), LOOPD_TEST_KEEP=1 (keep the temp dir), LOOPD_TEST_TRACEBACK=1 (tracebacks
for assertion failures too).
Test names given as arguments select a subset.

A test may raise Skip (Env.require_own_udevd() does, when a udevd ran before the
test: it is not ours to stop); it is reported as SKIP, not PASS, and the file then
exits 77 (meson: skipped) unless a test failed.

This module is the facade the tests import (`import harness`, `from harness import
X`); the code lives beside it, by concern:
  harness_base     configuration (paths, bus names, limits), run(), read_text()
  harness_images   Image and the sfdisk-made images (make_gpt3, IMAGE_MAKERS, ...)
  harness_clients  busctl, python3-dbus and loopctl callers, CallError, expect_error
  harness_checks   verify_ready/_reply/_detached, sysfs and udev readers, leak
                   finders, clean-up (detaching, detach_quietly, force_detach)
  harness_env      Env: temp dir, private bus, polkitd, udevd, loopd; Skip
  harness_runner   main() and Parallel
  harness_signals  SignalWatcher: loopd's signals, recorded from before a test acts
"""

import sys
import types

import harness_base
import harness_checks
import harness_clients
import harness_env
import harness_images
import harness_journal
import harness_runner
import harness_signals
from harness_base import *  # noqa: F401,F403
from harness_checks import *  # noqa: F401,F403
from harness_clients import *  # noqa: F401,F403
from harness_env import *  # noqa: F401,F403
from harness_images import *  # noqa: F401,F403
from harness_journal import *  # noqa: F401,F403
from harness_runner import *  # noqa: F401,F403
from harness_signals import *  # noqa: F401,F403
# Private names that tests, tests/soak and tests/bench use (and the rest, for
# scripts by hand that reached into the single-file harness).
from harness_base import _built  # noqa: F401
from harness_checks import _check_block_node, _check_udev_db, _udev_info  # noqa: F401
from harness_clients import (_attach_reply, _busctl, _busctl_json, _loopctl,  # noqa: F401
                             _plain)
from harness_env import _pid_alive, _stop_child  # noqa: F401
from harness_images import _sfdisk_image  # noqa: F401
from harness_runner import _on_sigterm  # noqa: F401

_MODULES = (harness_base, harness_images, harness_clients, harness_checks, harness_env,
            harness_journal, harness_runner, harness_signals)

__all__ = [name for m in _MODULES for name in m.__all__]


class _Facade(types.ModuleType):
    """`harness.NAME = value` rebinds NAME in every harness_* module that has it, as
    it did when the harness was one module: tests/bench/bench.py sets harness.LOOPD
    (which Env starts) and harness.tempfile (which Env's temp dir comes from)."""

    def __setattr__(self, name, value):
        for m in _MODULES:
            if name in vars(m):
                setattr(m, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Facade
