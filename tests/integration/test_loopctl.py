#!/usr/bin/python3
"""loopctl for admins (issue 18), run as a user would run it, its output checked
against what the device really is: sysfs, the backing file's stat, loopd's
ownership record, the moment of the reply. Devices are attached by other clients
(busctl, python3-dbus), so loopctl describes what it did not make itself.

- status: the systemctl-like layout, values in IEC units and words, defaults left
  out, partitions with size and udev state, colours only on a terminal.
- list: every -o column with --raw, the fitted table, -n, -b, order by loop number.
- monitor --json: ready and removed events of another client's attach and detach,
  in order, with their diskseqs, each line flushed as it happens; exit 0 on
  SIGINT/SIGTERM, 1 when loopd leaves the bus.
- bash completion: subcommands, options, columns, and the refs loopd lists now.
- exit statuses: 1 with the D-Bus error on stderr after what stdout printed, 2 for
  usage."""

import calendar
import json
import os
import pty
import pwd
import queue
import re
import select
import signal
import subprocess
import threading
import time

import dbus

from harness import (LOOPCTL, LOOPD, LOOPD_SRC, busctl_attach, busctl_detach, busctl_get_all,
                     DEVICE_IFACE, detaching, loop_name, main, pydbus_attach, pydbus_call,
                     pydbus_options, read_text, run)

COLUMNS = ["DEVICE", "DISKSEQ", "REF", "PARTS", "SIZE", "RO", "DIO", "AUTOCLEAR", "LIFETIME",
           "OWNER", "READY-SINCE", "BACKING-FILE", "BACKING-INODE"]
UNITS = "BKMGTPE"
EVENT_LIMIT = 10  # seconds a monitor may take to print an event that has happened

# Times are read back as UTC: loopctl prints local time, so the tests fix the zone.
os.environ["TZ"] = "UTC"


def loopctl(*args, env=None, check=True):
    p = subprocess.run([LOOPCTL, *map(str, args)], capture_output=True, text=True, timeout=90,
                       env=env)
    if check:
        assert p.returncode == 0, f"loopctl {args} exited {p.returncode}: {p.stderr}"
    return p


def iec_to_bytes(text):
    """'64.0M' -> (67108864.0, 104857.6): the value and how far rounding may be off."""
    m = re.fullmatch(r"(\d+)B|(\d+\.\d)([KMGTPE])", text)
    assert m, f"not an IEC size: {text!r}"
    if m.group(1):
        return int(m.group(1)), 0
    unit = 1024 ** UNITS.index(m.group(3))
    return float(m.group(2)) * unit, unit * 0.05


def assert_size(text, size, what):
    value, slack = iec_to_bytes(text)
    assert abs(value - size) <= slack, f"{what}: loopctl says {text}, sysfs {size} bytes"


def sysfs_bytes(name):
    return int(read_text(f"/sys/class/block/{name}/size")) * 512


def record_of(env, diskseq):
    """loopd's ownership record of `diskseq` (JSON, padded to a page)."""
    d = os.path.join(env.tmp, "run", "records")
    for name in os.listdir(d):
        with open(os.path.join(d, name), "rb") as f:
            text = f.read().rstrip(b"\0 \n").decode()
        record = json.loads(text)
        if record["diskseq"] == diskseq:
            return record
    raise AssertionError(f"no ownership record for diskseq {diskseq} in {d}")


def unescape_raw(field):
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), field)


def parse_status(text):
    """status output -> (header, {label: value}, [partition lines]) for the lines up to
    the first blank one (the journal, if any, follows it)."""
    lines = text.split("\n\n", 1)[0].splitlines()
    fields, partitions = {}, []
    for line in lines[1:]:
        m = re.fullmatch(r" *([A-Z][A-Za-z ]*): (.*)", line)
        if m:
            fields[m.group(1)] = m.group(2)
            if m.group(1) == "Partitions":
                partitions.append(m.group(2))
        else:
            assert line.startswith(" " * 13), f"status line neither labelled nor continued: {line!r}"
            partitions.append(line.strip())
    return lines[0], fields, partitions


# ---------------------------------------------------------------- status

def test_status_describes_the_device(env):
    image = env.image("gpt3")
    before = time.time()
    reply = busctl_attach(image.path, {"ref": ("s", "demo")})
    replied = time.time()
    with detaching(reply):
        devnode, diskseq, name = reply["devnode"], reply["diskseq"], loop_name(reply["devnode"])
        out = loopctl("status", "demo").stdout
        assert "\x1b" not in out, f"colours on a pipe: {out!r}"
        header, fields, partitions = parse_status(out)

        m = re.fullmatch(r"● (/dev/loop\d+) \((\S+)\) — ready since "
                         r"(\w{3} \d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC; (\d+)s ago", header)
        assert m, f"status header: {header!r}"
        assert m.group(1) == devnode and m.group(2) == "demo", header
        since = calendar.timegm(time.strptime(m.group(3), "%a %Y-%m-%d %H:%M:%S"))
        # Whole seconds: ready at most a second before it is printed as, and by the reply.
        assert int(before) - 1 <= since <= replied, f"ready since {m.group(3)}, replied at {replied}"
        assert replied - since < 2, f"ready since {m.group(3)}, replied at {replied}: not within a second"
        record = record_of(env, diskseq)
        assert since == record["readyTimestamp"] // 1_000_000, (since, record)

        st = os.stat(image.path)
        assert fields["Object"] == reply["device"], fields
        assert fields["DiskSeq"] == str(diskseq) == read_text(f"/sys/block/{name}/diskseq"), fields
        assert fields["Backing"] == f"{os.path.realpath(image.path)} " \
            f"({os.major(st.st_dev)}:{os.minor(st.st_dev)}, inode {st.st_ino})", fields
        assert_size(fields["Size"], sysfs_bytes(name), "Size")
        assert fields["Flags"] == "read-write, partscan", fields
        assert fields["Lifetime"] == "persistent", fields
        owner = record["ownerUid"]
        assert fields["Owner"] == f"{pwd.getpwuid(owner).pw_name} ({owner})", (fields, record)
        assert fields["Udev"] == "ready", fields
        for absent in ("Offset", "Size limit", "Sector size"):
            assert absent not in fields, f"default {absent} shown: {fields}"

        assert len(partitions) == image.nparts == 3, partitions
        for number, line in enumerate(partitions, 1):
            node, size, state = line.split(maxsplit=2)
            assert node == f"{devnode}p{number}", line
            assert_size(size, sysfs_bytes(f"{name}p{number}"), node)
            assert state == "ready", line

        # --json stays as it was: the raw properties by their D-Bus names.
        raw = json.loads(loopctl("status", "--json", str(diskseq)).stdout)
        assert raw["Object"] == reply["device"] and raw["DiskSeq"] == diskseq, raw
        assert raw["Size"] == sysfs_bytes(name) and raw["ReadyTimestamp"] == record["readyTimestamp"], raw
        busctl_detach(diskseq)


def test_status_shows_what_is_not_default(env):
    image = env.image("none")
    options = {"read-only": ("b", True), "offset": ("t", 1 << 20), "size-limit": ("t", 8 << 20),
               "sector-size": ("u", 4096), "direct-io": ("b", True)}
    reply = busctl_attach(image.path, options)
    with detaching(reply):
        header, fields, partitions = parse_status(loopctl("status", reply["devnode"]).stdout)
        assert header.startswith(f"● {reply['devnode']} — ready since "), header
        assert fields["Offset"] == "1.0M (1048576 bytes)", fields
        assert fields["Size limit"] == "8.0M (8388608 bytes)", fields
        assert fields["Sector size"] == "4096" == \
            read_text(f"/sys/block/{loop_name(reply['devnode'])}/queue/logical_block_size"), fields
        assert fields["Size"] == "8.0M" and sysfs_bytes(loop_name(reply["devnode"])) == 8 << 20, fields
        # Direct I/O as the kernel applied it (the backing file system may refuse it).
        dio = read_text(f"/sys/block/{loop_name(reply['devnode'])}/loop/dio") == "1"
        assert fields["Flags"] == "read-only, partscan" + (", direct-io" if dio else ""), fields
        assert partitions == ["none"], partitions
        busctl_detach(reply["diskseq"])


def run_on_terminal(args, extra_env=None):
    """loopctl with stdout and stderr on a pseudo-terminal; returns what it wrote."""
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm")
    env.pop("NO_COLOR", None)
    env.update(extra_env or {})
    proc = subprocess.Popen([LOOPCTL, *args], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        assert ready, "loopctl on a terminal printed nothing for 60 s"
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(30) == 0, f"loopctl {args} on a terminal exited {proc.returncode}: {out!r}"
    return out.decode()


def test_status_colours_only_on_a_terminal_without_no_color(env):
    image = env.image("mbr2")
    reply = busctl_attach(image.path)
    with detaching(reply):
        coloured = run_on_terminal(["status", reply["devnode"]])
        assert "\x1b[0;1;32m●\x1b[0m" in coloured, f"no green dot on a terminal: {coloured!r}"
        plain = run_on_terminal(["status", reply["devnode"]], {"NO_COLOR": "1"})
        assert "\x1b" not in plain and "● " + reply["devnode"] in plain, plain
        assert "\x1b" not in loopctl("status", reply["devnode"]).stdout
        busctl_detach(reply["diskseq"])


# ---------------------------------------------------------------- list

def expected_cells(props, record):
    """What each column must show for one device, read from sysfs, stat and the record."""
    name = loop_name(props["DevNode"])
    backing = read_text(f"/sys/block/{name}/loop/backing_file")
    return {
        "DEVICE": props["DevNode"],
        "DISKSEQ": read_text(f"/sys/block/{name}/diskseq"),
        "REF": record["ref"],
        "PARTS": str(len([p for p in os.listdir(f"/sys/block/{name}") if p.startswith(name + "p")])),
        "SIZE": sysfs_bytes(name),  # compared as an IEC size
        "RO": read_text(f"/sys/block/{name}/ro"),
        "DIO": read_text(f"/sys/block/{name}/loop/dio"),
        "AUTOCLEAR": read_text(f"/sys/block/{name}/loop/autoclear"),
        "LIFETIME": record["lifetime"],
        "OWNER": pwd.getpwuid(record["ownerUid"]).pw_name,
        "READY-SINCE": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record["readyTimestamp"] // 10**6)),
        "BACKING-FILE": backing,
        "BACKING-INODE": str(os.stat(backing).st_ino),
    }


def check_row(cells, expected, what):
    for column, want in expected.items():
        if column == "SIZE":
            assert_size(cells[column], want, f"{what} SIZE")
        else:
            assert cells[column] == want, f"{what} {column}: {cells[column]!r}, expected {want!r}"


def fitted_table(rows, right=("SIZE",)):
    """The table as issue 18 asks for it: each column as wide as its widest cell,
    one space between, SIZE right-aligned, no trailing blanks."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if rows[0][i] in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append(" ".join(cells).rstrip())
    return lines


def test_list_every_column(env):
    # Three attachments, by two other clients; the first one detached and its loop
    # number taken by a newer attachment: that one lists first although its diskseq
    # is the highest, so the order is by loop number, not by diskseq or object path.
    a, b, c = env.image("gpt3"), env.image("none"), env.image("mbr2")
    first = busctl_attach(a.path, {"ref": ("s", "web")})
    with detaching(first) as held:
        second = held.add(pydbus_attach(b.path, pydbus_options(read_only=dbus.Boolean(True))))
        busctl_detach(first["diskseq"])
        third = held.add(busctl_attach(c.path, {"ref": ("s", "db-1")}))
        devices = sorted([second, third], key=lambda r: int(loop_name(r["devnode"])[4:]))
        if devices[0] is not third:
            print("# note: loopd did not reuse the freed loop number; order by number = by diskseq")

        raw = loopctl("list", "--raw", "-o", ",".join(COLUMNS)).stdout.splitlines()
        assert raw[0].split(" ") == COLUMNS, raw[0]
        assert len(raw) == 3, raw
        for reply, line in zip(devices, raw[1:]):
            fields = [unescape_raw(f) for f in line.split(" ")]
            assert len(fields) == len(COLUMNS), f"raw line with {len(fields)} fields: {line!r}"
            cells = dict(zip(COLUMNS, fields))
            check_row(cells, expected_cells(busctl_get_all(reply["device"], DEVICE_IFACE),
                                            record_of(env, reply["diskseq"])), reply["devnode"])

        # The same as a table: fitted columns; lower-case names and -n, -b too.
        table = loopctl("list", "-o", ",".join(COLUMNS).lower()).stdout.splitlines()
        rows = [[unescape_raw(f) for f in line.split(" ")] for line in raw]
        assert table == fitted_table(rows), "\n".join(table)
        bare = loopctl("list", "-n", "-b", "-o", "DISKSEQ,SIZE").stdout.splitlines()
        assert [line.split() for line in bare] == \
            [[str(r["diskseq"]), str(sysfs_bytes(loop_name(r["devnode"])))] for r in devices], bare
        default = loopctl("list").stdout.splitlines()
        assert default[0].split() == ["DEVICE", "DISKSEQ", "REF", "PARTS", "SIZE", "RO", "BACKING-FILE"]
        assert [line.split()[0] for line in default[1:]] == [r["devnode"] for r in devices], default
        listed = json.loads(loopctl("list", "--json").stdout)
        assert [d["DiskSeq"] for d in listed] == [r["diskseq"] for r in devices], listed
        for reply in (second, third):
            busctl_detach(reply["diskseq"])


def test_exit_statuses_and_order_of_messages(env):
    p = loopctl("list", "-o", "DEVICE,NOPE", check=False)
    assert p.returncode == 2 and "NOPE" in p.stderr and p.stdout == "", p
    assert loopctl("status", check=False).returncode == 2
    # Negative numbers are usage errors, not 2^64 - N sent to loopd.
    image = env.image("none")
    for args in (["attach", "--offset", "-512"], ["attach", "--size-limit", "-1"], ["attach", "--timeout", "-1"],
                 ["attach", "--timeout", "0"], ["wait", "--timeout", "-1", "x"]):
        p = loopctl(*args, *(() if args[0] == "wait" else (image.path,)), check=False)
        assert p.returncode == 2 and args[1] in p.stderr and p.stdout == "", (args, p)
    assert env.attached_here() == [], f"a usage error attached {env.attached_here()}"
    help_text = loopctl("--help").stdout
    assert "Exit status: 0 success; 1 failure" in help_text and "2 usage error" in help_text, help_text
    p = loopctl("status", "no-such-ref", check=False)
    assert p.returncode == 1 and p.stderr.startswith("org.loopd1.Error.NotFound: ") \
        and "no-such-ref" in p.stderr, p
    p = run(LOOPD, "--help")
    assert "Exit status: 0 after SIGTERM or SIGINT" in p.stdout and "2 usage error" in p.stdout, p.stdout

    # stdout and stderr into one file: the error comes after the lines printed
    # before it, even though stdout to a file is block-buffered. The monitor says
    # when the held device is ready.
    image = env.image("gpt3")
    out_path = env.path("hold.out")
    monitor = Monitor("--json")
    with open(out_path, "w") as out:
        hold = subprocess.Popen([LOOPCTL, "attach", "--hold", "--ref", "held", image.path],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        ready = json.loads(monitor.next())
        assert ready["event"] == "ready" and ready["ref"] == "held", ready
        with detaching(ready):
            busctl_detach(ready["diskseq"])
            assert hold.wait(30) == 1, f"attach --hold exited {hold.returncode} after a detach"
    finally:
        for proc in (hold, monitor.proc):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = read_text(out_path).splitlines()
    assert lines[:-1] == [ready["devnode"], *ready["partitions"]], lines
    assert lines[-1].startswith("org.loopd1.Error.DeviceChanged: ") \
        and str(ready["diskseq"]) in lines[-1], lines


# ---------------------------------------------------------------- monitor

class Monitor:
    """`loopctl monitor` in the background; its stdout lines arrive on a queue as
    they are written, so a line that is not flushed is never seen in time."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([LOOPCTL, "monitor", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        # It announces itself once subscribed: events after this line are not missed.
        banner = self.proc.stderr.readline()
        assert banner.startswith("Monitoring loopd"), f"monitor: {banner!r}"
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self):
        try:
            line = self.lines.get(timeout=EVENT_LIMIT)
        except queue.Empty:
            raise AssertionError(f"monitor printed nothing within {EVENT_LIMIT} s") from None
        assert line is not None, f"monitor ended: {self.proc.stderr.read()}"
        return line

    def stop(self, sig=None):
        if sig is not None:
            self.proc.send_signal(sig)
        try:
            status = self.proc.wait(EVENT_LIMIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("monitor did not end") from None
        return status, self.proc.stderr.read()


def check_ready_event(event, reply, ref):
    assert event["event"] == "ready", event
    assert (event["object"], event["devnode"], event["diskseq"], event["partitions"]) == \
        (reply["device"], reply["devnode"], reply["diskseq"], reply["partitions"]), (event, reply)
    assert event["ref"] == ref, event


def test_monitor_json_follows_another_client(env):
    monitor = Monitor("--json")
    try:
        a_image, b_image = env.image("gpt3"), env.image("none")
        a = busctl_attach(a_image.path, {"ref": ("s", "mon-a")})
        with detaching(a) as held:
            check_ready_event(json.loads(monitor.next()), a, "mon-a")
            b = held.add(pydbus_attach(b_image.path))
            check_ready_event(json.loads(monitor.next()), b, "")
            pydbus_call("Detach", "ta{sv}", [a["diskseq"], pydbus_options()])
            removed_a = json.loads(monitor.next())
            busctl_detach(b["diskseq"])
            removed_b = json.loads(monitor.next())
        for event, reply in ((removed_a, a), (removed_b, b)):
            assert {k: event[k] for k in ("event", "object", "devnode", "diskseq", "reason")} == \
                {"event": "removed", "object": reply["device"], "devnode": reply["devnode"],
                 "diskseq": reply["diskseq"], "reason": "detached"}, event
        # loopd stops (cleanly) and starts again: the monitor ends with it, status 1.
        env.restart_loopd(kill=False)
        status, err = monitor.stop()
        assert status == 1 and "left the bus" in err, (status, err)
    finally:
        if monitor.proc.poll() is None:
            monitor.stop(signal.SIGKILL)


def test_monitor_ends_cleanly_on_sigint_and_sigterm(env):
    for sig in (signal.SIGINT, signal.SIGTERM):
        monitor = Monitor()
        image = env.image("mbr2")
        reply = busctl_attach(image.path, {"ref": ("s", f"sig{int(sig)}")})
        with detaching(reply):
            line = monitor.next()
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ready "
                                rf"{reply['devnode']} diskseq={reply['diskseq']} "
                                rf"ref=sig{int(sig)} parts=2", line), line
            busctl_detach(reply["diskseq"])
            assert monitor.next().endswith(f" removed {reply['devnode']} diskseq={reply['diskseq']} "
                                           "reason=detached")
        status, err = monitor.stop(sig)
        assert status == 0, f"monitor exited {status} on signal {sig}: {err}"


# ---------------------------------------------------------------- bash completion

COMPLETION = os.path.join(LOOPD_SRC, "shell-completion/bash/loopctl")


def complete(*words):
    """What bash offers for the last word of `loopctl WORDS...`, with Debian's
    bash-completion loaded as in an interactive shell, and loopctl's script."""
    script = r'''
        source /usr/share/bash-completion/bash_completion
        source "$COMPLETION"
        complete -p loopctl >&2 || exit 3
        read -ra COMP_WORDS <<< "$WORDS"
        [[ $WORDS == *" " ]] && COMP_WORDS+=("")
        COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
        COMP_LINE=$WORDS COMP_POINT=${#WORDS}
        _loopctl "${COMP_WORDS[0]}" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
        printf '%s\n' "${COMPREPLY[@]}"
    '''
    line = " ".join([LOOPCTL, *words])
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, COMPLETION=COMPLETION, WORDS=line))
    assert p.returncode == 0 and "-F _loopctl loopctl" in p.stderr, p
    return sorted(filter(None, p.stdout.splitlines()))


def test_bash_completion_offers_what_loopd_lists(env):
    image = env.image("gpt3")
    reply = busctl_attach(image.path, {"ref": ("s", "completion-demo")})
    with detaching(reply):
        assert complete("status", "comp") == ["completion-demo"]
        offered = complete("detach", "")
        assert {reply["devnode"], str(reply["diskseq"]), "completion-demo"} <= set(offered), offered
        assert complete("mon") == ["monitor"]
        assert complete("list", "--no") == ["--noheadings"]
        assert complete("list", "-o", "DEVICE,BACKING-") == ["DEVICE,BACKING-FILE", "DEVICE,BACKING-INODE"]
        assert complete("attach", "--sector-size", "4") == ["4096"]
        busctl_detach(reply["diskseq"])
    # Nothing attached: nothing offered, and no error shown.
    assert complete("status", "") == []


if __name__ == "__main__":
    main(globals())
