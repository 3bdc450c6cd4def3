#!/bin/bash
# Runs inside the kernel-matrix guest (started by tests/kernel/init), as root, in a
# chroot of the host's own root: the host's Debian userland on the guest's kernel.
# /run, /tmp and /var/tmp are the guest's tmpfs; OUT is the host's results folder
# over 9p. Usage: guest-run.sh TOP OUT
#
# OUT/config (written by scripts/test-kernel) sets LOOPD, LOOPCTL, TESTS (file names
# under tests/integration, each optionally followed by ':' and test function names
# joined by ','), PROBE_ROUNDS and TEST_TIMEOUT. Writes, in OUT: kernel, probe.log,
# <test>.log, results (one line per test file: name, exit status, seconds),
# loopd-logs/, uevents.log, dmesg.log and finally 'finished'.
set -u
top=$1 out=$2
# shellcheck source=/dev/null
. "$out/config"

uname -r >"$out/kernel"
mkdir -p "$out/loopd-logs"

# The same environment tests/integration/meson.build gives each test.
export LOOPD LOOPCTL LOOPD_SRC=$top PYTHONPATH=$top/tests/integration
# Keep each test's temp dir so loopd's debug log (where the synthetic-trigger lines
# are) can be copied out; this script removes the dirs right after.
export LOOPD_TEST_KEEP=1
export LOOPD_LOG_LEVEL=${LOG_LEVEL:-debug}
# systemd's tools notice the chroot (PID 1's root differs) and some refuse to work
# ("udevadm monitor": "Running in chroot, ignoring request"); this guest is a whole
# machine of its own, so tell them to go ahead.
export SYSTEMD_IGNORE_CHROOT=1
# TCG runs the guest 10-50x slower than the host: tests that state how soon
# something happens (test_events.py) allow this many times as long.
export LOOPD_TEST_TIME_FACTOR=${LOOPD_TEST_TIME_FACTOR:-10}

# Every kernel uevent of the run, as evidence for what the kernel sent.
udevadm monitor --kernel --property >"$out/uevents.log" 2>&1 &
monitor=$!

echo "== probing the kernel's loop quirks ($PROBE_ROUNDS rounds, udevd running)"
/lib/systemd/systemd-udevd >"$out/probe-udevd.log" 2>&1 &
udevd=$!
for _ in $(seq 200); do udevadm control --ping 2>/dev/null && break; sleep 0.05; done
mkdir -p /var/tmp/probe
python3 "$top/tests/kernel/probe_quirks.py" /var/tmp/probe "$PROBE_ROUNDS" 2>&1 | tee "$out/probe.log"
rm -rf /var/tmp/probe
kill "$udevd"
wait "$udevd"

for spec in $TESTS; do
  file=${spec%%:*}
  names=()
  [ "$spec" != "$file" ] && IFS=, read -r -a names <<<"${spec#*:}"
  echo "== $file ${names[*]}"
  started=$(date +%s)
  timeout -k 10 "$TEST_TIMEOUT" python3 "$top/tests/integration/$file" "${names[@]}" 2>&1 |
    tee "$out/$file.log"
  rc=${PIPESTATUS[0]}
  echo "$file $rc $(($(date +%s) - started))" >>"$out/results"
  for d in /var/tmp/loopd-test-*/; do
    [ -f "$d/loopd.log" ] && cp "$d/loopd.log" "$out/loopd-logs/$file-$(basename "$d").log"
    rm -rf "$d"
  done
done

kill "$monitor"
dmesg >"$out/dmesg.log"
sync
echo done >"$out/finished"
