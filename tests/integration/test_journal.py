#!/usr/bin/env python3
"""loopd's journal (issue 14): under systemd each message is a journal entry with
structured fields, so that `journalctl DISKSEQ=S` tells one attachment's story.

loopd runs as systemd runs it: stdout and stderr a stream into a real
systemd-journald, JOURNAL_STREAM set; it must notice and send its messages through
the native protocol instead (_TRANSPORT=journal), with DISKSEQ=, LOOPD_DEVICE=,
LOOPD_REF=, LOOPD_CALLER_UID=, LOOPD_REQUEST=, PRIORITY and CODE_FILE/CODE_LINE.
"""

import os
import re

import dbus

from harness import (LOOPCTL, Journald, busctl_detach, detach_quietly, expect_error, main, pydbus_attach,
                     pydbus_call, pydbus_options, run, verify_detached, verify_reply)


def story(env, diskseq):
    return Journald.entries(f"DISKSEQ={diskseq}", f"_PID={env.loopd.pid}")


def one(entries, pattern, what):
    found = [e for e in entries if re.search(pattern, e.get("MESSAGE", ""))]
    assert len(found) == 1, f"{what}: {len(found)} entries match {pattern!r} in " + \
        repr([e.get("MESSAGE") for e in entries])
    return found[0]


def fields(entry, **expected):
    wrong = {k: (entry.get(k), v) for k, v in expected.items() if entry.get(k) != v}
    assert not wrong, f"entry {entry.get('MESSAGE')!r}: field (is, expected): {wrong}"


def test_one_attachment_story(env):
    """Attach and detach: the journal, filtered by the attachment's diskseq, says
    what was configured, which partitions were added, when it was ready and why,
    who detached it, each entry with the fields an admin filters by."""
    image = env.image("gpt3")
    reply = pydbus_attach(image.path, pydbus_options(ref=dbus.String("story")))
    diskseq, devnode = reply["diskseq"], reply["devnode"]
    try:
        verify_reply(reply, image)
    except BaseException:
        detach_quietly(diskseq)
        raise
    busctl_detach(diskseq)
    verify_detached(devnode, diskseq)
    entries = story(env, diskseq)

    configured = one(entries, rf"^configured dev={devnode} diskseq={diskseq} file={re.escape(image.path)} .*"
                              r"partitions added: p1 p2 p3$", "configured")
    # Read after the detach: the "attached" line, which times the reply, is
    # written just after the reply is sent.
    ready = one(entries, rf"^attached dev={devnode} diskseq={diskseq} partitions=3 .* uid=0 .*authorized "
                          r"[\d.]+, configured [\d.]+, partitions added [\d.]+, disk ready [\d.]+, "
                          r"last partition ready [\d.]+, reply [\d.]+", "the attach's timeline")
    asked = one(entries, rf"^detach of dev={devnode} diskseq={diskseq} asked by uid=0 ", "who detached")
    detached = one(entries, rf"^detached dev={devnode} \(diskseq {diskseq}\) reason=detached by uid=0 .* in "
                            r"[\d.]+ ms: claims checked [\d.]+, cleared [\d.]+, released [\d.]+, "
                            r"confirmed [\d.]+$", "the detach's timeline")
    for entry in entries:
        fields(entry, LOOPD_DEVICE=devnode, LOOPD_REF="story", SYSLOG_IDENTIFIER="loopd", _TRANSPORT="journal")
        assert entry.get("CODE_FILE", "").endswith(".cpp") and entry.get("CODE_LINE", "").isdigit(), \
            f"entry {entry.get('MESSAGE')!r} has no CODE_FILE/CODE_LINE"
    for entry in (configured, ready, asked, detached):
        fields(entry, PRIORITY="6", LOOPD_CALLER_UID="0")
    assert configured["LOOPD_REQUEST"] == ready["LOOPD_REQUEST"], "attach entries of one call, two request ids"
    assert asked["LOOPD_REQUEST"] == detached["LOOPD_REQUEST"] != ready["LOOPD_REQUEST"], \
        "the detach is a call of its own: one request id for it, another than the attach's"
    # Who asked for the attach is logged before the diskseq exists: its request id
    # joins it to the rest.
    request = Journald.entries(f"LOOPD_REQUEST={ready['LOOPD_REQUEST']}", f"_PID={env.loopd.pid}")
    one(request, rf"^attach of {re.escape(image.path)} asked by uid=0 sender=:\S+ ref=story$", "who attached")


def test_nudge_is_part_of_the_story(env):
    """udev's events of partition 1 are dropped (--test-drop part1): what loopd did
    about the missing event is in that attachment's story."""
    env.restart_loopd(loopd_args=["--test-drop", "part1"])
    image = env.image("gpt3")
    reply = pydbus_attach(image.path, pydbus_options())
    try:
        verify_reply(reply, image)
    finally:
        detach_quietly(reply["diskseq"])
    entries = story(env, reply["diskseq"])
    repaired = [e for e in entries if re.search(r"missing|re-enumerat|synthetic trigger", e["MESSAGE"])]
    assert repaired, "nothing in the story says how the missing event was made up for: " + \
        repr([e["MESSAGE"] for e in entries])
    for entry in repaired:
        fields(entry, LOOPD_DEVICE=reply["devnode"], PRIORITY="6")


def test_refused_detach_is_in_the_story(env):
    """A Detach refused with Busy (the device is mounted) is a warning in the
    device's story, naming who asked and why it was refused."""
    image = env.image("none")
    run("mkfs.ext4", "-q", "-F", image.path)
    reply = pydbus_attach(image.path, pydbus_options())
    diskseq = reply["diskseq"]
    mnt = env.path("mnt")
    os.makedirs(mnt)
    mounted = False
    try:
        verify_reply(reply, image)
        run("mount", reply["devnode"], mnt)
        mounted = True
        expect_error("Busy", pydbus_call, "Detach", "ta{sv}", [dbus.UInt64(diskseq), {}])
        refused = one(story(env, diskseq), rf"^detach of diskseq={diskseq} refused sender=:\S+: .*in use",
                      "the refusal")
        fields(refused, PRIORITY="4", LOOPD_CALLER_UID="0", LOOPD_DEVICE=reply["devnode"])
    finally:
        if mounted:
            run("umount", mnt)
        detach_quietly(diskseq)


def test_status_ends_with_the_story(env):
    """`loopctl status REF` ends, like `systemctl status`, with the last lines of
    that attachment's journal, and only of that attachment."""
    other = pydbus_attach(env.image("none").path, pydbus_options())
    image = env.image("gpt3")
    reply = pydbus_attach(image.path, pydbus_options(ref=dbus.String("told")))
    try:
        verify_reply(reply, image)
        entries = story(env, reply["diskseq"])
        configured = one(entries, r"^configured ", "configured")["MESSAGE"]
        out = run(LOOPCTL, "status", "told").stdout
        assert configured in out, f"loopctl status does not end with the device's journal:\n{out}"
        assert f"diskseq={other['diskseq']}" not in out, f"another device's lines in its status:\n{out}"
        quiet = run(LOOPCTL, "status", "--lines", "0", "told").stdout
        assert configured not in quiet, f"--lines 0 still shows journal lines:\n{quiet}"
    finally:
        detach_quietly(reply["diskseq"])
        detach_quietly(other["diskseq"])


def test_forged_line_is_one_escaped_entry(env):
    """A caller's string with a newline and a priority prefix stays inside one
    entry, escaped, at loopd's own priority."""
    forged = "x\n<0>FORGED"
    expect_error("NotFound", pydbus_call, "WaitReady", "st", [forged, dbus.UInt64(0)])
    entries = [e for e in Journald.entries(f"_PID={env.loopd.pid}") if "FORGED" in str(e.get("MESSAGE"))]
    assert len(entries) == 1, f"{len(entries)} entries hold the forged text: {entries}"
    assert "x\\n<0>FORGED" in entries[0]["MESSAGE"], f"not escaped: {entries[0]['MESSAGE']!r}"
    assert entries[0]["PRIORITY"] != "0", "the caller chose the entry's priority"


if __name__ == "__main__":
    main(globals(), journal=True)
