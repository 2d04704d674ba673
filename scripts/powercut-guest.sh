#!/bin/bash
# Guest side of scripts/powercut: records, through dm-log-writes, every
# write the target side of snapsync makes to its disk while it copies,
# deltas and spills a replica, so that the host can rebuild that disk as a
# power cut at any point could have left it (scripts/powercut-check).
#
#   powercut-guest.sh SNAPSYNC_BIN REPLAY_LOG_BIN OUTDIR [TRIALS]
#
# Layout (the one the host can replay without the VM): an ext4 on the
# logged device holds both the target's state directory and the replica,
# an image file. The sources are on tmpfs, not logged. Writes OUTDIR/log.bin
# (the used part of the log) and OUTDIR/guest.log; prints
# `RECORDED <entries> entries` on success.
#
# Marks in the log name the session's phases (scripts/powercut-check reads
# them): gens:VERSION, then per session phase:NAME:N:KIND before it (N the
# generation it goes to, KIND journal or inplace) and done:NAME after it.
# Add a scenario: one more `session` line (and a generation in
# powercut-gen.py if it needs new content).
set -u
BIN=${1:?usage: powercut-guest.sh SNAPSYNC_BIN REPLAY_LOG_BIN OUTDIR}
RL=${2:?usage}
OUT=${3:?usage}
TRIALS=${4:-0}
HERE=$(cd "$(dirname "$0")" && pwd)
# A tmpfs of our own: snapsync creates no replica file under /dev.
P=/tmp/snapsync-powercut
exec 3>&1
exec >>"$OUT/guest.log" 2>&1
export LC_ALL=C
PY=/usr/bin/python3
[ -x "$PY" ] || PY=python3
fail() { echo "FAILED: $*"; echo "FAIL record: $*" >&3; exit 1; }
T0=$(date +%s)
# Timestamps on every traced command: the VM is slow, know where it goes.
PS4='+ $EPOCHREALTIME '
set -x

modprobe -a loop dm-mod dm-log-writes || fail "modprobe dm-log-writes"
rm -rf "$P"
mkdir -p "$P"
mount -t tmpfs -o mode=0700 snapsync-powercut "$P" || fail "mount a tmpfs on $P"
mkdir -p "$P/mnt"
version=$($PY -S "$HERE/powercut-gen.py" "$P") || fail "generating sources"
truncate -s 48M "$P/dev.img"
truncate -s 256M "$P/log.img"
DEV=$(losetup -f --show "$P/dev.img") || fail "losetup"
LOGDEV=$(losetup -f --show "$P/log.img") || fail "losetup"
dmsetup create sspc --table "0 $(blockdev --getsz "$DEV") log-writes $DEV $LOGDEV" ||
    fail "dmsetup create log-writes"
mark() { sync; dmsetup message sspc 0 mark "$1" || fail "mark $1"; }

# Small ext4 with everything initialised now (no lazy init writing in the
# background while snapsync runs) and no discards.
mkfs.ext4 -q -F -b 4096 -N 64 -J size=4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 \
    /dev/mapper/sspc || fail "mkfs.ext4"
mount /dev/mapper/sspc "$P/mnt" || fail "mount"
mkdir "$P/mnt/state"
mark "gens:$version"

# session NAME N KIND [SYNC OPTIONS...]: syncs genN into the replica.
session() {
    local name=$1 n=$2 kind=$3
    shift 3
    cp "$P/gen$n.img" "$P/src.img"
    mark "phase:$name:$n:$kind"
    timeout -k 5 120 "$BIN" sync --json --state-dir "$P/mnt/state" "$@" "$P/src.img" "$P/mnt/replica.img" \
        >"$P/$name.json" || fail "session $name: exit $?"
    cat "$P/$name.json"
    cmp "$P/gen$n.img" "$P/mnt/replica.img" || fail "session $name: replica differs"
    mark "done:$name"
}
session first-copy 1 inplace
grep -q '"apply_mode":"in-place"' "$P/first-copy.json" || fail "first copy not in place"
session delta 2 journal
grep -q '"apply_mode":"journal"' "$P/delta.json" || fail "delta not journaled"
session spill 3 inplace --journal-max 256KiB
grep -q '"apply_mode":"in-place"' "$P/spill.json" || fail "the oversize delta did not spill in place"

umount "$P/mnt" || fail "umount"
dmsetup remove sspc || fail "dmsetup remove"
size=$("$RL" size "$LOGDEV") || fail "reading the log"
head -c "$size" "$LOGDEV" >"$OUT/log.bin" || fail "copying the log"
losetup -d "$LOGDEV" "$DEV"
set +x
echo "RECORDED $("$RL" list "$OUT/log.bin" | wc -l) entries, $size bytes in $(($(date +%s) - T0)) s" >&3

# dm-flakey trials: a sync session whose disk (state dir and replica on
# one ext4) stops taking writes at a random moment (drop_writes: they
# succeed but are lost), then the process is killed, the fs unmounted, the
# caches dropped and the disk put back. Unlike the replays above, writes
# complete before the cut all survive; this tests the whole stack at once.
[ "$TRIALS" -gt 0 ] || exit 0
T0=$(date +%s)
modprobe dm-flakey || fail "modprobe dm-flakey"
truncate -s 48M "$P/fdev.img"
FDEV=$(losetup -f --show "$P/fdev.img") || fail "losetup"
SZ=$(blockdev --getsz "$FDEV")
# No udev in the guest: waiting for its cookie costs seconds per call.
table() {
    dmsetup suspend --noudevsync --nolockfs ssfl && dmsetup load ssfl --table "$1" &&
        dmsetup resume --noudevsync ssfl
}
dmsetup create ssfl --table "0 $SZ linear $FDEV 0" || fail "dmsetup create"
mkfs.ext4 -q -F -b 4096 -N 64 -J size=4 -E nodiscard /dev/mapper/ssfl || fail "mkfs"
mkdir -p "$P/fmnt"
# The first MiB of each generation: sessions take long under emulation.
for g in 1 2 3; do head -c 1M "$P/gen$g.img" >"$P/fgen$g.img"; done
mount /dev/mapper/ssfl "$P/fmnt" || fail "mount"
fsync_args=(--json --quiet --state-dir "$P/fmnt/state")
cp "$P/fgen1.img" "$P/fsrc.img"
timeout -k 5 120 "$BIN" sync "${fsync_args[@]}" "$P/fsrc.img" "$P/fmnt/replica.img" || fail "first flakey sync"
# Cuts fall anywhere in a session: a window of what one takes here.
t=$(date +%s%N)
cp "$P/fgen2.img" "$P/fsrc.img"
timeout -k 5 120 "$BIN" sync "${fsync_args[@]}" "$P/fsrc.img" "$P/fmnt/replica.img" || fail "second flakey sync"
WINDOW_MS=$(( ($(date +%s%N) - t) / 1000000 + 1 ))
tpass=0 tfail=0
set -x
for t in $(seq 1 "$TRIALS"); do
    echo "### trial $t"
    g=$(( (t % 3) + 1 ))
    extra=()
    [ $((t % 4)) = 1 ] && extra=(--journal-max 256KiB)
    cp "$P/fgen$g.img" "$P/fsrc.img"
    "$BIN" sync "${fsync_args[@]}" "${extra[@]}" "$P/fsrc.img" "$P/fmnt/replica.img" >/dev/null 2>&1 &
    pid=$!
    delay=$(( RANDOM % WINDOW_MS ))
    sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
    table "0 $SZ flakey $FDEV 0 0 3600 1 drop_writes"
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    umount "$P/fmnt"
    echo 3 >/proc/sys/vm/drop_caches
    table "0 $SZ linear $FDEV 0"
    why=""
    mount /dev/mapper/ssfl "$P/fmnt" || why="remount failed"
    if [ -z "$why" ]; then
        timeout -k 5 120 "$BIN" sync "${fsync_args[@]}" "$P/fsrc.img" "$P/fmnt/replica.img" >"$P/trial.json" 2>"$P/trial.err" ||
            why="next session failed (exit $?): $(cat "$P/trial.err")"
    fi
    [ -n "$why" ] || cmp -s "$P/fgen$g.img" "$P/fmnt/replica.img" || why="replica differs from generation $g"
    for f in "$P"/fmnt/state/*journal*; do [ -n "$why" ] || [ ! -e "$f" ] || why="a journal was left behind"; done
    [ -n "$why" ] || grep -q '"consistent": true' "$P"/fmnt/state/*.json || why="state not consistent"
    if [ -z "$why" ]; then
        tpass=$((tpass + 1))
        echo "trial $t: cut at ${delay} ms (generation $g ${extra[*]}): ok, $(cat "$P/trial.json")"
    else
        tfail=$((tfail + 1))
        echo "FAIL flakey trial $t: cut at ${delay} ms into a sync to generation $g ${extra[*]}: $why" | tee /dev/fd/3
    fi
done
umount "$P/fmnt"
echo "FLAKEY $tpass passed, $tfail failed in $(($(date +%s) - T0)) s (cuts within $WINDOW_MS ms)" >&3
[ "$tfail" = 0 ]
