#!/usr/bin/env python3
"""DESIGN.md's "who may use whom", checked by the compiler: each room's own
compile command (from compile_commands.json) must refuse a file that includes
what the room may not use, and accept one that includes what it may.

Usage: check_rooms.py BUILD_DIR SOURCE_DIR. No root needed."""

import json
import os
import re
import subprocess
import sys
import tempfile

# (a file of the room, an include, whether the room may use it)
CASES = [
    ("src/core/registry.cpp", '"service/device_table.hpp"', False),
    ("src/core/registry.cpp", '"kernel/sysfs.hpp"', False),
    ("src/core/registry.cpp", '"uevent/monitor.hpp"', False),
    ("src/core/registry.cpp", "<sdbus-c++/sdbus-c++.h>", False),
    ("src/core/registry.cpp", "<libudev.h>", False),
    ("src/core/registry.cpp", "<sys/ioctl.h>", False),
    ("src/core/registry.cpp", "<loopd/uevent.hpp>", True),
    ("src/kernel/sysfs.cpp", '"core/registry.hpp"', False),
    ("src/kernel/sysfs.cpp", "<systemd/sd-bus.h>", False),
    ("src/kernel/sysfs.cpp", "<libudev.h>", False),
    ("src/kernel/sysfs.cpp", "<sys/ioctl.h>", True),
    ("src/uevent/monitor.cpp", '"kernel/sysfs.hpp"', False),
    ("src/uevent/monitor.cpp", '"core/registry.hpp"', False),
    ("src/uevent/monitor.cpp", "<sdbus-c++/sdbus-c++.h>", False),
    ("src/service/find_flow.cpp", '"cli/devices.hpp"', False),
    ("src/service/find_flow.cpp", '"kernel/sysfs.hpp"', True),
    ("src/service/find_flow.cpp", '"core/registry.hpp"', True),
    ("src/service/find_flow.cpp", '"uevent/monitor.hpp"', True),
]


def command_for(entries, source):
    for entry in entries:
        if os.path.normpath(os.path.join(entry["directory"], entry["file"])).endswith(source):
            return entry
    sys.exit(f"no compile command for {source} in compile_commands.json")


def try_compile(entry, source_dir, source, include):
    """Compiles a copy of `source` (next to it, so its quoted includes resolve)
    with `include` in front, using the room's own command line."""
    original = os.path.join(source_dir, source)
    folder = os.path.dirname(original)
    with tempfile.NamedTemporaryFile("w", suffix=".cpp", dir=folder, prefix=".room-check-") as probe, \
            tempfile.TemporaryDirectory() as out:
        with open(original) as f:
            probe.write(f"#include {include}\n" + f.read())
        probe.flush()
        command = entry["command"]
        command = re.sub(r"-MD -MQ \S+ -MF \S+", "", command)
        command = re.sub(r"(^|\s)-o \S+", rf"\1-o {out}/probe.o", command)
        command = re.sub(r"-c \S+", f"-c {probe.name}", command)
        command = command.replace("-fdiagnostics-color=always", "-fdiagnostics-color=never")
        done = subprocess.run(command, shell=True, cwd=entry["directory"], capture_output=True, text=True)
        first_error = next((line for line in done.stderr.splitlines() if "error" in line), "")
        return done.returncode == 0, first_error


def main():
    build_dir, source_dir = sys.argv[1], sys.argv[2]
    with open(os.path.join(build_dir, "compile_commands.json")) as f:
        entries = json.load(f)
    failures = 0
    for source, include, allowed in CASES:
        compiled, error = try_compile(command_for(entries, source), source_dir, source, include)
        ok = compiled == allowed
        failures += not ok
        verdict = "compiles" if compiled else "refused: " + error.split("error: ", 1)[-1]
        print(f"{'ok ' if ok else 'BAD'} {source} + #include {include}: {verdict}")
    if failures:
        print(f"{failures} case(s) break the rooms' rule in DESIGN.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
