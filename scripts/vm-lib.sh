# shellcheck shell=bash
# Helpers to run commands as root inside a throw-away VM with a real
# device-mapper, LVM and thin-provisioning-tools (see LVM-IN-A-VM.md).
#
# Source this file; it only defines functions and sets no shell options.
#
#   . scripts/vm-lib.sh
#   vm_run /tmp/out 'modprobe dm-thin-pool && lvm version > /tmp/out/v.txt'
#
# Why these flags: the build machines have no device-mapper in their own
# kernel, so the guest boots Debian's kernel under QEMU. `--disable-kvm`
# because a KVM guest hangs after "Probing EDD" here; `--force-9p` because
# virtiofsd fails here. The host's root filesystem is shared read-only;
# the guest may write only to the --rwdir directory and to tmpfs
# (/dev/shm).
#
# Environment overrides:
#   VM_KERNEL   kernel image to boot (default: newest /boot/vmlinuz-*)
#   VM_MEMORY   guest memory (default 2G)
#   VM_CPUS     guest CPUs (default 2)
#   VM_TIMEOUT  seconds before the whole VM is killed (default 900; 0 = none)

# Prints the kernel image to boot: $VM_KERNEL, else the newest
# /boot/vmlinuz-* by version order. Fails when there is none.
vm_kernel() {
    if [ -n "${VM_KERNEL:-}" ]; then
        printf '%s\n' "$VM_KERNEL"
        return 0
    fi
    local k
    k=$(find /boot -maxdepth 1 -name 'vmlinuz-*' -type f 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$k" ]; then
        echo "vm_kernel: no /boot/vmlinuz-* (apt-get install linux-image-amd64)" >&2
        return 1
    fi
    printf '%s\n' "$k"
}

# vm_run DIR CMD...
# Boots the VM, runs CMD (joined with spaces, run by the guest's shell, as
# root) and returns the guest command's exit status. DIR is created if
# needed and is the only host directory the guest can write.
# Returns 124 when VM_TIMEOUT expires (the status of timeout(1)).
vm_run() {
    if [ "$#" -lt 2 ]; then
        echo "usage: vm_run DIR CMD..." >&2
        return 2
    fi
    local dir=$1
    shift
    local kernel
    kernel=$(vm_kernel) || return 1
    if ! command -v vng >/dev/null 2>&1; then
        echo "vm_run: vng not found (pip install virtme-ng)" >&2
        return 1
    fi
    mkdir -p "$dir" || return 1
    local -a limit=()
    if [ "${VM_TIMEOUT:-900}" != 0 ]; then
        # --kill-after: qemu occasionally ignores SIGTERM while booting.
        limit=(timeout --kill-after=30 "${VM_TIMEOUT:-900}")
    fi
    # stdin from /dev/null: CI runs without a terminal, and vng must not
    # wait on one.
    "${limit[@]}" vng --run "$kernel" --disable-kvm --force-9p \
        --memory "${VM_MEMORY:-2G}" --cpus "${VM_CPUS:-2}" \
        --rwdir "$dir" --exec "$*" </dev/null
}
