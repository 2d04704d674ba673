# scripts/bench-sshd.sh — sourced by the benchmarks: a real OpenSSH
# server on 127.0.0.1 with throwaway keys. Needs WORK_DIR, die and log
# from the script that sources it; sets SSH_PATH (a PATH whose `ssh`
# reaches the host `snapsync-bench`) and SSHD_PID.
# shellcheck shell=bash

# A real OpenSSH server on 127.0.0.1 with throwaway host and user keys, as
# tests/ssh.rs starts one. Both contenders reach it with their *default*
# ssh command: a wrapper named `ssh` first in PATH adds only `-F CONFIG`
# (port, key, no host-key checks), so snapsync's default --rsh (and any
# cipher it asks for) and rsync's plain `ssh` are what runs.
# CPU: the client side (snapsync or rsync, plus the ssh client) is in
# /usr/bin/time's figure; the server side (sshd's session processes and the
# remote end) is the growth of sshd's reaped-children CPU time.
start_sshd() {
    SSH_DIR=$WORK_DIR/sshd
    rm -rf "$SSH_DIR"
    mkdir -p "$SSH_DIR/bin" /run/sshd
    chmod 700 "$SSH_DIR"
    ssh-keygen -q -t ed25519 -N '' -C snapsync-bench -f "$SSH_DIR/host_key" </dev/null
    ssh-keygen -q -t ed25519 -N '' -C snapsync-bench -f "$SSH_DIR/user_key" </dev/null
    cp "$SSH_DIR/user_key.pub" "$SSH_DIR/authorized_keys"
    local port try i
    for try in 1 2 3; do
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        cat >"$SSH_DIR/sshd_config" <<EOF
Port $port
ListenAddress 127.0.0.1
HostKey $SSH_DIR/host_key
AuthorizedKeysFile $SSH_DIR/authorized_keys
PidFile $SSH_DIR/sshd.pid
UsePAM no
StrictModes no
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AllowTcpForwarding no
X11Forwarding no
LogLevel ERROR
EOF
        /usr/sbin/sshd -t -f "$SSH_DIR/sshd_config" || die "sshd rejects the bench config"
        /usr/sbin/sshd -D -f "$SSH_DIR/sshd_config" -E "$SSH_DIR/sshd.log" </dev/null >/dev/null 2>&1 &
        SSHD_PID=$!
        for ((i = 0; i < 100; i++)); do
            if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" 2>/dev/null; then
                break
            fi
            kill -0 "$SSHD_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$SSHD_PID" 2>/dev/null && ((i < 100)); then break; fi
        log "sshd on port $port did not start (try $try): $(cat "$SSH_DIR/sshd.log" 2>/dev/null)"
        kill "$SSHD_PID" 2>/dev/null || true
        wait "$SSHD_PID" 2>/dev/null || true
        SSHD_PID=""
    done
    [[ -n ${SSHD_PID:-} ]] || die "sshd would not start"
    trap stop_sshd EXIT
    cat >"$SSH_DIR/ssh_config" <<EOF
Host snapsync-bench
    HostName 127.0.0.1
    Port $port
    User $(id -un)
    IdentityFile $SSH_DIR/user_key
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
EOF
    printf '#!/bin/sh\nexec %s -F %s "$@"\n' "$(command -v ssh)" "$SSH_DIR/ssh_config" >"$SSH_DIR/bin/ssh"
    chmod +x "$SSH_DIR/bin/ssh"
    SSH_PATH=$SSH_DIR/bin:$PATH
    # Fail early, with sshd's words, if a login does not work.
    PATH=$SSH_PATH ssh -o BatchMode=yes snapsync-bench true ||
        die "cannot log in to the bench sshd: $(cat "$SSH_DIR/sshd.log")"
    log "sshd on 127.0.0.1:$port (pid $SSHD_PID)"
}

stop_sshd() {
    if [[ -n ${SSHD_PID:-} ]]; then
        kill "$SSHD_PID" 2>/dev/null || true
        wait "$SSHD_PID" 2>/dev/null || true
        SSHD_PID=""
    fi
}

# CPU seconds sshd has collected from its reaped session processes (and,
# through them, from the remote ends they ran).
sshd_child_cpu() {
    local i
    # A session process may still be winding down after the client exited.
    for ((i = 0; i < 250; i++)); do
        pgrep -P "$SSHD_PID" >/dev/null || break
        sleep 0.02
    done
    python3 - "$SSHD_PID" <<'EOF'
import os, sys
stat = open(f"/proc/{sys.argv[1]}/stat").read()
fields = stat[stat.rindex(")") + 2:].split()
# fields[0] is the state (field 3 of proc(5)): cutime, cstime are 16, 17
print((int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK"))
EOF
}
