#!/bin/bash
# Guest side of scripts/powercut: records, through dm-log-writes, every
# write the target side of snapsync makes to its disk while it copies,
# deltas and spills a replica, so that the host can rebuild that disk as a
# power cut at any point could have left it (scripts/powercut-check).
#
#   powercut-guest.sh SNAPSYNC_BIN REPLAY_LOG_BIN OUTDIR [TRIALS [LVM_SAMPLES LVM_STRIDE]]
#
# Layout (the one the host can replay without the VM): an ext4 on the
# logged device holds both the target's state directory and the replica,
# an image file. The sources are on tmpfs, not logged. Writes OUTDIR/log.bin
# (the used part of the log) and OUTDIR/guest.log; prints
# `RECORDED <entries> entries` on success.
#
# Marks in the log name the session's phases (scripts/powercut-check reads
# them): gens:VERSION, then per session phase:NAME:N:KIND before it (N the
# generation it goes to, KIND journal, inplace or snapshot: which
# guarantee powercut-check holds it to) and done:NAME after it. Add a
# scenario: one more `session` (or `record`) line, and a generation in
# powercut-gen.py if it needs new content.
set -u
BIN=${1:?usage: powercut-guest.sh SNAPSYNC_BIN REPLAY_LOG_BIN OUTDIR}
RL=${2:?usage}
OUT=${3:?usage}
TRIALS=${4:-0}
# The LVM layout's replays, here in the VM: random cuts, and every
# STRIDE-th flush point (each point activates a VG: seconds under emulation).
LVM_SAMPLES=${5:-10}
LVM_STRIDE=${6:-4}
HERE=$(cd "$(dirname "$0")" && pwd)
# A tmpfs of our own: snapsync creates no replica file under /dev.
P=/tmp/snapsync-powercut
exec 3>&1
exec >>"$OUT/guest.log" 2>&1
export LC_ALL=C
# Durable marks every 512 KiB of an in-place copy (not every 256 MiB):
# the copies here are 2 MiB, and a cut between marks must resume.
export SNAPSYNC_MARK_BYTES=$((512 << 10))
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
# The logged device marks go to.
LOGGED=sspc
mark() { sync; dmsetup message "$LOGGED" 0 mark "$1" || fail "mark $1"; }
# record NAME N KIND MODE REPLICA COMMAND...: COMMAND is a session taking
# REPLICA to generation N (applied as MODE: the report's apply_mode),
# between the marks phase:NAME:N:KIND and done:NAME.
record() {
    local name=$1 n=$2 kind=$3 mode=$4 replica=$5
    shift 5
    mark "phase:$name:$n:$kind"
    timeout -k 5 300 "$@" >"$P/$name.json" || fail "session $name: exit $?"
    cat "$P/$name.json"
    grep -q "\"apply_mode\":\"$mode\"" "$P/$name.json" || fail "session $name: not $mode"
    cmp "$P/gen$n.img" "$replica" || fail "session $name: replica differs"
    mark "done:$name"
}

# Small ext4 with everything initialised now (no lazy init writing in the
# background while snapsync runs) and no discards.
mkfs.ext4 -q -F -b 4096 -N 64 -J size=4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 \
    /dev/mapper/sspc || fail "mkfs.ext4"
mount /dev/mapper/sspc "$P/mnt" || fail "mount"
mkdir "$P/mnt/state"
mark "gens:$version"

# session NAME N KIND MODE [SYNC OPTIONS...]: syncs genN into the replica.
session() {
    local name=$1 n=$2 kind=$3 mode=$4
    shift 4
    cp "$P/gen$n.img" "$P/src.img"
    record "$name" "$n" "$kind" "$mode" "$P/mnt/replica.img" \
        "$BIN" sync --json --state-dir "$P/mnt/state" "$@" "$P/src.img" "$P/mnt/replica.img"
}
session first-copy 1 inplace in-place
session delta 2 journal journal
# An oversize delta spills in place.
session spill 3 inplace in-place --journal-max 256KiB

umount "$P/mnt" || fail "umount"
dmsetup remove sspc || fail "dmsetup remove"
size=$("$RL" size "$LOGDEV") || fail "reading the log"
head -c "$size" "$LOGDEV" >"$OUT/log.bin" || fail "copying the log"
losetup -d "$LOGDEV" "$DEV"
set +x
echo "RECORDED $("$RL" list "$OUT/log.bin" | wc -l) entries, $size bytes in $(($(date +%s) - T0)) s" >&3

# The LVM layout: a VG on the logged disk, an LV with an ext4 for the
# target's state dir and a thin LV as the replica, written in place under
# --target-snapshot: `run --once` cycles of a thin LV source with CBT (a
# first copy with resume marks, then a CBT delta behind a rollback
# snapshot), then a sync of another source (--force), a full copy behind
# a rollback snapshot too. The host
# has no device-mapper to activate a VG, so powercut-check replays this
# log here, each point with an LVM that sees only the replayed copy of the
# PV.
T0=$(date +%s)
LVG=sspclvg
SVG=sspcsrc
mkdir -p "$P/lvm" "$P/lmnt"
export LVM_SUPPRESS_FD_WARNINGS=1
truncate -s 64M "$P/ldev.img"
truncate -s 512M "$P/llog.img"
truncate -s 32M "$P/lsrc.img"
LDEV=$(losetup -f --show "$P/ldev.img") || fail "losetup"
LLOG=$(losetup -f --show "$P/llog.img") || fail "losetup"
LSRC=$(losetup -f --show "$P/lsrc.img") || fail "losetup"
printf 'devices { global_filter = [ "a|^/dev/mapper/sspcl$|", "a|^%s$|", "r|.*|" ] }\nbackup { backup = 0 archive = 0 }\n' \
    "$LSRC" >"$P/lvm/lvm.conf"
modprobe -a dm-thin-pool || fail "modprobe dm-thin-pool"
dmsetup create sspcl --table "0 $(blockdev --getsz "$LDEV") log-writes $LDEV $LLOG" ||
    fail "dmsetup create log-writes (LVM layout)"
(
    export LVM_SYSTEM_DIR=$P/lvm
    LOGGED=sspcl
    pvcreate -q "$LSRC" && vgcreate -q -s 1M "$SVG" "$LSRC" && lvcreate -q --type thin-pool -L 16M -n pool "$SVG" &&
        lvcreate -q -V 2M -T "$SVG/pool" -n src || fail "source VG"
    pvcreate -q /dev/mapper/sspcl && vgcreate -q -s 1M "$LVG" /dev/mapper/sspcl &&
        lvcreate -q -L 12M -n state "$LVG" && lvcreate -q --type thin-pool -L 16M -n pool "$LVG" &&
        lvcreate -q -V 2M -T "$LVG/pool" -n replica || fail "VG on the logged disk"
    mkfs.ext4 -q -F -b 4096 -N 64 -J size=4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 \
        "/dev/$LVG/state" || fail "mkfs.ext4 (LVM layout)"
    mount "/dev/$LVG/state" "$P/lmnt" || fail "mount (LVM layout)"
    mkdir "$P/lmnt/state"
    printf 'state_dir = "%s"\n[[volume]]\nname = "pc"\nsource = "%s"\ntarget = "%s"\ntarget_state_dir = "%s"\ntarget_snapshot = true\ninterval = "0s"\n' \
        "$P/sstate" "$SVG/src" "/dev/$LVG/replica" "$P/lmnt/state" >"$P/lvm-run.toml"
    mark "gens:$version"
    mark "layout:lvm:$LVG:$((64 << 20))"
    dd if="$P/gen1.img" of="/dev/$SVG/src" bs=64K oflag=direct conv=notrunc status=none || fail "dd"
    record run-first 1 inplace in-place "/dev/$LVG/replica" "$BIN" run --once --json --config "$P/lvm-run.toml"
    dd if="$P/gen2.img" of="/dev/$SVG/src" bs=64K oflag=direct conv=notrunc status=none || fail "dd"
    record run-cbt 2 snapshot snapshot "/dev/$LVG/replica" "$BIN" run --once --json --config "$P/lvm-run.toml"
    grep -q '"mode":"delta"' "$P/run-cbt.json" || fail "the second cycle was no CBT delta"
    cp "$P/gen3.img" "$P/src.img"
    # Another source (--force): a full copy over the replica, behind a
    # rollback snapshot of the consistent replica it replaces.
    record sync-other 3 snapshot snapshot "/dev/$LVG/replica" "$BIN" sync --json --force --target-snapshot \
        --state-dir "$P/lmnt/state" "$P/src.img" "/dev/$LVG/replica"
    umount "$P/lmnt" || fail "umount (LVM layout)"
    vgchange -q -an "$LVG" "$SVG" >/dev/null || fail "vgchange -an"
) || exit 1
dmsetup remove sspcl || fail "dmsetup remove (LVM layout)"
size=$("$RL" size "$LLOG") || fail "reading the log (LVM layout)"
head -c "$size" "$LLOG" >"$OUT/lvm-log.bin" || fail "copying the log (LVM layout)"
losetup -d "$LLOG" "$LDEV" "$LSRC"
rm -f "$P/ldev.img" "$P/llog.img" "$P/lsrc.img"
echo "RECORDED-LVM $("$RL" list "$OUT/lvm-log.bin" | wc -l) entries, $size bytes in $(($(date +%s) - T0)) s" >&3
set +x
T0=$(date +%s)
SNAPSYNC_BIN=$BIN REPLAY_LOG=$RL bash "$HERE/powercut-check" "$OUT/lvm-log.bin" "$LVM_SAMPLES" "$LVM_STRIDE" \
    >"$OUT/lvm-check.log" 2>&1
lvm_rc=$?
echo "LVM-CHECK exit $lvm_rc in $(($(date +%s) - T0)) s: $(tail -n 1 "$OUT/lvm-check.log")" >&3
[ "$lvm_rc" = 0 ] || grep '^FAIL' "$OUT/lvm-check.log" | head -n 20 >&3
set -x

# dm-flakey trials of whole `run --once` cycles (thin LV source, CBT):
# at a random moment of a cycle, the disk of one side stops taking writes
# (drop_writes: they succeed but are lost), then the cycle is killed with
# all it started, the fs unmounted, the caches dropped and the disk put
# back; the next cycle must end with the replica equal to the source's
# base snapshot, one snapshot of the volume left (the base) and no pool
# metadata snapshot held. The trials take turns: one cuts the target's
# disk (its state dir and the replica file), one the source's state dir
# with its CBT base, one the state dir of a thick LV source that keeps a
# digest map there (a map that claimed a generation the replica does not
# hold would make the next cycle ship too little: the replica would
# differ). Unlike the replays above, writes completed before the cut all
# survive; this tests the whole stack at once.
[ "$TRIALS" -gt 0 ] || exit "$lvm_rc"
T0=$(date +%s)
export LVM_SUPPRESS_FD_WARNINGS=1
modprobe -a dm-flakey dm-snapshot dm-thin-pool || fail "modprobe dm-flakey dm-thin-pool"
VG=sspcvg
truncate -s 64M "$P/pv.img"
PV=$(losetup -f --show "$P/pv.img") || fail "losetup"
pvcreate -q "$PV" && vgcreate -q -s 1M "$VG" "$PV" && lvcreate -q --type thin-pool -L 24M -n pool "$VG" &&
    lvcreate -q -V 1M -T "$VG/pool" -n src && lvcreate -q -L 1M -n tk "$VG" || fail "thin pool, thick LV"
SRC=/dev/$VG/src
TK=/dev/$VG/tk
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
mkdir -p "$P/fmnt" "$P/local"
mount /dev/mapper/ssfl "$P/fmnt" || fail "mount"
# config FILE VOLUME SOURCE_LV STATE_DIR TARGET TARGET_STATE_DIR [LINE]
config() {
    printf 'state_dir = "%s"\n[[volume]]\nname = "%s"\nsource = "%s"\ntarget = "%s"\ntarget_state_dir = "%s"\ninterval = "0s"\n%s\n' \
        "$4" "$2" "$VG/$3" "$5" "$6" "${7:-}" >"$1"
}
# Target series: the flakey disk holds the replica and the target's
# state; source series: it holds the source's state dir (CBT bases, or
# the thick source's digest map).
config "$P/ft.toml" ft src "$P/local/sstate" "$P/fmnt/replica.img" "$P/fmnt/tstate"
config "$P/fs.toml" fs src "$P/fmnt/sstate" "$P/local/replica.img" "$P/local/tstate"
config "$P/fm.toml" fm tk "$P/fmnt/mstate" "$P/local/mreplica.img" "$P/local/mtstate" 'snapshot_size = "2MiB"'
# dirty DEV G: DEV becomes generation G's first MiB in a random run of
# 64 KiB chunks (CBT sees those chunks).
dirty() {
    local k=$((RANDOM % 16)) c
    c=$((RANDOM % (16 - k) + 1))
    dd if="$P/gen$2.img" of="$1" bs=64K skip="$k" seek="$k" count="$c" oflag=direct conv=notrunc status=none
}
# The first MiB of each generation: cycles take long under emulation.
for dev in "$SRC" "$TK"; do
    dd if="$P/gen1.img" of="$dev" bs=64K count=16 oflag=direct status=none || fail "dd"
done
for cfg in ft fs fm; do
    timeout -k 5 600 "$BIN" run --once --config "$P/$cfg.toml" >/dev/null || fail "first $cfg cycle"
done
# Cuts fall anywhere in a cycle: a window of what a delta cycle takes here.
# (Bounds of 600 s: on a machine busy with other VMs and builds, a CBT
# delta cycle under emulation was seen to take over 120 s.)
dirty "$SRC" 2
t=$(date +%s%N)
timeout -k 5 600 "$BIN" run --once --config "$P/ft.toml" >/dev/null || fail "second ft cycle"
WINDOW_MS=$(( ($(date +%s%N) - t) / 1000000 + 1 ))
# snaps VOLUME: the LVs tagged as that volume's snapshots.
snaps() { lvs --noheadings -o lv_name,lv_tags "$VG" | awk -v t="snapsync-volume-$1" '{n = split($2, a, ","); for (i = 1; i <= n; i++) if (a[i] == t) print $1}'; }
tpass=0 tfail=0
set -x
for t in $(seq 1 "$TRIALS"); do
    echo "### trial $t"
    case $((t % 3)) in
        1) cfg=ft side=target dev=$SRC bases=1 ;;
        2) cfg=fs side=source dev=$SRC bases=1 ;;
        0) cfg=fm side="digest-map source" dev=$TK bases=0 ;;
    esac
    dirty "$dev" $(( (t / 3 % 3) + 1 ))
    setsid "$BIN" run --once --config "$P/$cfg.toml" >/dev/null 2>&1 &
    pid=$!
    delay=$(( RANDOM % WINDOW_MS ))
    sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
    table "0 $SZ flakey $FDEV 0 0 3600 1 drop_writes"
    kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    dmsetup info -c --noheadings -o name,attr
    umount "$P/fmnt"
    echo 3 >/proc/sys/vm/drop_caches
    table "0 $SZ linear $FDEV 0"
    why=""
    mount /dev/mapper/ssfl "$P/fmnt" || why="remount failed"
    t1=$(date +%s)
    if [ -z "$why" ]; then
        timeout -k 5 600 "$BIN" run --once --config "$P/$cfg.toml" --json >"$P/trial.json" 2>"$P/trial.err" ||
            why="next cycle failed (exit $?): $(cat "$P/trial.json" "$P/trial.err")"
        cat "$P/trial.err"
    fi
    left=$(snaps "$cfg")
    [ -n "$why" ] || [ "$(echo "$left" | wc -w)" = "$bases" ] || why="snapshots left: $left"
    [ -n "$why" ] || [ "$(dmsetup status "$VG-pool-tpool" | cut -d' ' -f7)" = - ] || why="a metadata snapshot is held"
    case $cfg in
        ft) rep=$P/fmnt/replica.img ;;
        fs) rep=$P/local/replica.img ;;
        fm) rep=$P/local/mreplica.img ;;
    esac
    [ -n "$why" ] || [ "$bases" = 0 ] || cmp -s "/dev/$VG/$left" "$rep" || why="replica differs from the base snapshot $left"
    [ -n "$why" ] || cmp -s "$dev" "$rep" || why="replica differs from the source"
    if [ -z "$why" ]; then
        tpass=$((tpass + 1))
        echo "trial $t: $side cut at ${delay} ms: ok, next cycle $(($(date +%s) - t1)) s, $(cat "$P/trial.json")"
    else
        tfail=$((tfail + 1))
        echo "FAIL flakey trial $t: $side cut at ${delay} ms into a run --once cycle: $why" | tee /dev/fd/3
    fi
done
set +x
umount "$P/fmnt"
vgchange -q -an "$VG" >/dev/null
echo "FLAKEY $tpass passed, $tfail failed in $(($(date +%s) - T0)) s (run --once cycles, cuts within $WINDOW_MS ms)" >&3
[ "$tfail" = 0 ] && [ "$lvm_rc" = 0 ]
