"""SignalWatcher: what loopd said on the bus (DeviceRemoved, InterfacesAdded and
InterfacesRemoved, PropertiesChanged), recorded from the moment the watcher is made.

A test subscribes before it acts and then waits for the signal the contract
promises, with its deadline; it never sleeps to let things settle. One GLib main
loop thread dispatches the signals of every watcher.
"""

import os
import threading
import time

import dbus
import dbus.mainloop.glib
from gi.repository import GLib

from harness_base import DEVICE_IFACE, MANAGER_IFACE, MANAGER_PATH
from harness_clients import _plain

__all__ = ["SignalWatcher", "OBJECT_MANAGER_IFACE", "PROPERTIES_IFACE"]

OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"

_glib_thread = None


def _start_glib_loop():
    global _glib_thread
    if _glib_thread is None:
        dbus.mainloop.glib.threads_init()
        loop = GLib.MainLoop()
        _glib_thread = threading.Thread(target=loop.run, daemon=True)
        _glib_thread.start()


class SignalWatcher:
    """Records signals of loopd's interfaces as (monotonic time, member, path,
    args as plain values). The match is known to the bus when __init__ returns,
    so whatever the test does next cannot be missed."""

    def __init__(self):
        _start_glib_loop()
        self.signals = []
        self.cond = threading.Condition()
        self.conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"],
                                           mainloop=dbus.mainloop.glib.DBusGMainLoop())
        for iface in (MANAGER_IFACE, OBJECT_MANAGER_IFACE, PROPERTIES_IFACE):
            self.conn.add_signal_receiver(self._on_signal, dbus_interface=iface,
                                          member_keyword="member", path_keyword="path")
        # AddMatch is sent without waiting; a round trip behind it means the bus has
        # processed it (it handles one connection's messages in order).
        self.conn.call_blocking("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                "org.freedesktop.DBus", "GetId", "", [])

    def _on_signal(self, *args, member=None, path=None):
        with self.cond:
            self.signals.append((time.monotonic(), str(member), str(path),
                                 [_plain(a) for a in args]))
            self.cond.notify_all()

    def _matching(self, match):
        return [entry for entry in self.signals if match(entry[1], entry[2], entry[3])]

    def wait_all(self, match, deadline):
        """Every recorded signal for which match(member, path, args) holds, once at
        least one did or the monotonic `deadline` passed."""
        with self.cond:
            while True:
                found = self._matching(match)
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found
                self.cond.wait(remaining)

    def wait_for(self, match, deadline):
        """The first recorded signal for which match(member, path, args) holds; None
        if none came by the deadline."""
        found = self.wait_all(match, deadline)
        return found[0] if found else None

    def device_removed(self, obj, deadline, reason=None):
        """Waits for DeviceRemoved(obj, ...) (any object if obj is None)."""
        def match(member, path, args):
            return member == "DeviceRemoved" and path == MANAGER_PATH and \
                (obj is None or args[0] == obj) and (reason is None or args[2] == reason)
        return self.wait_for(match, deadline)

    def removed(self, diskseq, deadline=0):
        """The DeviceRemoved signals about `diskseq` as [object, diskseq, reason],
        once at least one came (or the deadline passed)."""
        return [entry[3] for entry in self.wait_all(
            lambda m, p, a: m == "DeviceRemoved" and p == MANAGER_PATH and a[1] == diskseq, deadline)]

    def wait_removed(self, diskseq, deadline):
        """The reasons of the DeviceRemoved signals about `diskseq` (see removed())."""
        return [args[2] for args in self.removed(diskseq, deadline)]

    def removals(self):
        """Every DeviceRemoved so far, as (diskseq, reason)."""
        with self.cond:
            return [(a[1], a[2]) for _, m, p, a in self.signals if m == "DeviceRemoved" and p == MANAGER_PATH]

    def interfaces_removed(self, obj, deadline):
        return self.wait_for(lambda m, p, a: m == "InterfacesRemoved" and a[0] == obj, deadline)

    def listed_with_ref(self, ref, deadline=0):
        """The diskseqs of the devices listed (InterfacesAdded) with `ref`."""
        def match(member, path, args):
            return member == "InterfacesAdded" and args[1].get(DEVICE_IFACE, {}).get("Ref") == ref
        return [entry[3][1][DEVICE_IFACE]["DiskSeq"] for entry in self.wait_all(match, deadline)]

    def wait_changed(self, obj, prop, deadline):
        """Whether PropertiesChanged on `obj` named `prop` (changed or invalidated)."""
        def match(member, path, args):
            return member == "PropertiesChanged" and path == obj and (prop in args[1] or prop in args[2])
        return self.wait_for(match, deadline) is not None

    def readiness_source(self, value, deadline):
        def match(member, path, args):
            return member == "PropertiesChanged" and path == MANAGER_PATH and \
                args[0] == MANAGER_IFACE and args[1].get("ReadinessSource") == value
        return self.wait_for(match, deadline)

    def all(self):
        with self.cond:
            return list(self.signals)

    def close(self):
        self.conn.close()
