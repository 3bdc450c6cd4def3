"""The clients: busctl and python3-dbus (tools no one here wrote, one of which
shows D-Bus error names) and the project's loopctl; CallError, expect_error()
and the option helpers. Part of harness.py (see there)."""

import json
import os
import re

import dbus  # python3-dbus: an independent client that reports D-Bus error names

from harness_base import (BUS_NAME, CALL_TIMEOUT, DEVICE_IFACE, ERROR_PREFIX, LOOPCTL,
                          MANAGER_IFACE, MANAGER_PATH, run)

__all__ = [
    "CallError", "busctl_options", "busctl_attach_cmd", "parse_busctl_attach",
    "busctl_attach", "busctl_detach", "busctl_device_detach", "busctl_wait_ready",
    "busctl_get_property", "busctl_get_all", "busctl_managed_objects",
    "pydbus_call", "pydbus_options", "pydbus_attach", "expect_error",
    "LoopctlError", "loopctl_attach", "loopctl_attach_json", "loopctl_detach",
]

# --------------------------------------------------------------------------- errors

class CallError(Exception):
    """A D-Bus call answered with an error. name is None when the client (busctl)
    does not show the error name."""

    def __init__(self, name, message, client):
        super().__init__(f"{client}: {name or '<name not shown>'}: {message}")
        self.name = name
        self.message = message
        self.client = client


# --------------------------------------------------------------------------- busctl

def _busctl(*args, json_out=True, check=True):
    cmd = ["busctl", "--system", f"--timeout={CALL_TIMEOUT}"]
    if json_out:
        cmd.append("--json=short")
    p = run(*cmd, *args, check=False)
    if p.returncode != 0 and check:
        # busctl 252 prints only "Call failed: <message>", never the error name.
        msg = p.stderr.strip()
        msg = msg.removeprefix("Call failed: ")
        raise CallError(None, msg, "busctl")
    return p


def _busctl_json(*args):
    return json.loads(_busctl(*args).stdout)


def busctl_options(options):
    """{'offset': ('t', 512), ...} -> busctl's flattened a{sv} arguments."""
    out = [str(len(options or {}))]
    for key, (typ, value) in (options or {}).items():
        if typ == "b":
            value = "true" if value else "false"
        out += [key, typ, str(value)]
    return out


def _attach_reply(data):
    device, devnode, diskseq, partitions = data
    return {"device": device, "devnode": devnode, "diskseq": int(diskseq),
            "partitions": list(partitions)}


def busctl_attach_cmd(path, options=None):
    """The busctl command line for Attach, for callers that run it themselves."""
    return ["busctl", "--system", f"--timeout={CALL_TIMEOUT}", "--json=short", "call",
            BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Attach", "sa{sv}", str(path),
            *busctl_options(options)]


def parse_busctl_attach(stdout):
    reply = json.loads(stdout)
    assert reply["type"] == "ostas", reply
    return _attach_reply(reply["data"])


def busctl_attach(path, options=None):
    """Manager.Attach via busctl. Returns dict device/devnode/diskseq/partitions."""
    p = run(*busctl_attach_cmd(path, options), check=False)
    if p.returncode != 0:
        raise CallError(None, p.stderr.strip().removeprefix("Call failed: "), "busctl")
    return parse_busctl_attach(p.stdout)


def busctl_detach(diskseq, options=None):
    _busctl("call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "Detach", "ta{sv}",
            str(diskseq), *busctl_options(options))


def busctl_device_detach(obj, options=None):
    _busctl("call", BUS_NAME, obj, DEVICE_IFACE, "Detach", "a{sv}", *busctl_options(options))


def busctl_wait_ready(device, timeout_usec):
    reply = _busctl_json("call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "WaitReady", "st",
                         str(device), str(timeout_usec))
    return _attach_reply(reply["data"])


def busctl_get_property(obj, iface, prop):
    return _busctl_json("get-property", BUS_NAME, obj, iface, prop)["data"]


def busctl_get_all(obj, iface):
    """Properties.GetAll as {name: plain value}."""
    reply = _busctl_json("call", BUS_NAME, obj, "org.freedesktop.DBus.Properties",
                         "GetAll", "s", iface)
    return {k: v["data"] for k, v in reply["data"][0].items()}


def busctl_managed_objects():
    """ObjectManager.GetManagedObjects as {path: {iface: {prop: value}}}."""
    reply = _busctl_json("call", BUS_NAME, MANAGER_PATH,
                         "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    return {path: {iface: {k: v["data"] for k, v in props.items()}
                   for iface, props in ifaces.items()}
            for path, ifaces in reply["data"][0].items()}


# --------------------------------------------------------------------------- python3-dbus

def _plain(value):
    """dbus-python values -> plain Python values."""
    if isinstance(value, (dbus.Array, list)):
        return [_plain(v) for v in value]
    if isinstance(value, (dbus.Dictionary, dict)):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, (int, dbus.Byte)):
        return int(value)
    if isinstance(value, str):
        return str(value)
    return value


def pydbus_call(method, signature="", args=(), path=MANAGER_PATH, iface=MANAGER_IFACE,
                timeout=CALL_TIMEOUT):
    """One call on a private connection of its own, like a separate client process.
    Raises CallError with the exact D-Bus error name."""
    conn = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])
    try:
        reply = conn.call_blocking(BUS_NAME, path, iface, method, signature, list(args),
                                   timeout=timeout)
    except dbus.exceptions.DBusException as e:
        raise CallError(e.get_dbus_name(), e.get_dbus_message(), "python3-dbus") from None
    finally:
        conn.close()
    return _plain(reply)


def pydbus_options(**options):
    """Option values must already carry their D-Bus type (dbus.UInt64(512), ...): the
    variant type is part of what is being tested."""
    return dbus.Dictionary({k.replace("_", "-"): v for k, v in options.items()},
                           signature="sv")


def pydbus_attach(path, options=None, timeout=CALL_TIMEOUT):
    reply = pydbus_call("Attach", "sa{sv}", [str(path), options or pydbus_options()],
                        timeout=timeout)
    return _attach_reply(reply)


def expect_error(name, fn, *args, **kw):
    """Calls fn expecting a CallError named `name` (e.g. 'NotFound'); returns it."""
    full = name if name.startswith(ERROR_PREFIX) else ERROR_PREFIX + name
    try:
        result = fn(*args, **kw)
    except CallError as e:
        assert e.name == full, f"expected {full}, got {e}"
        return e
    raise AssertionError(f"expected {full}, but the call succeeded: {result}")


# --------------------------------------------------------------------------- loopctl

class LoopctlError(CallError):
    pass


def _loopctl(*args):
    p = run(LOOPCTL, *args, check=False)
    if p.returncode != 0:
        # Contract: "<org.loopd1.Error.Name>: <message>" on stderr, exit status 1.
        m = None
        for line in p.stderr.strip().splitlines():
            m = re.match(r"(org\.loopd1\.Error\.\w+): (.*)", line) or m
        assert p.returncode == 1, f"loopctl {args} exited {p.returncode}: {p.stderr}"
        assert m, f"loopctl {args}: error not in 'Name: message' form: {p.stderr!r}"
        raise LoopctlError(m.group(1), m.group(2), "loopctl")
    return p.stdout


def loopctl_attach(path, *args):
    """`loopctl attach IMAGE` (human output). The human form carries no diskseq or
    object path, so those are None."""
    lines = _loopctl("attach", *args, path).splitlines()
    assert lines, "loopctl attach printed nothing"
    return {"device": None, "devnode": lines[0], "diskseq": None, "partitions": lines[1:]}


def loopctl_attach_json(path, *args):
    reply = json.loads(_loopctl("attach", "--json", *args, path))
    return {"device": reply["Object"], "devnode": reply["DevNode"],
            "diskseq": int(reply["DiskSeq"]), "partitions": list(reply["Partitions"])}


def loopctl_detach(target):
    _loopctl("detach", str(target))
