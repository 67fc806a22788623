#!/usr/bin/env bash
# Runs as root inside ../shared/tools/vmlab (a 6.12 kernel with nbd), from
# `cargo xtask conformance`: bash kernel_nbd.sh BRAID_BINARY LOG_DIR
#
# The kernel's own NBD client against braid, as a user would set it up:
#  1. nbd-client straight to `braid serve --nbd` over TCP;
#  2. nbd-client -u on the unix socket of `braid attach`, with the braid
#     server killed (-9) and restarted while a file is being written.
# Each: mkfs.ext4, mount, write, unmount, fsck clean, remount, checksums.
# Prints "ok <what>" / "FAIL <what>" lines; exits 1 if anything failed.
set -uo pipefail
BRAID=$1
LOGS=$2
# Sockets and images live in the guest's own tmpfs (the shared 9p
# directory cannot hold unix sockets).
WORK=/tmp/braid-vm
FAILED=0
ok() { echo "ok $*"; }
fail() { echo "FAIL $*"; FAILED=1; }
step() { echo "-- $*" >&2; }

ip link set lo up 2>/dev/null || true
mkdir -p "$WORK/srv" /mnt/a /mnt/b "$LOGS"
if ! modprobe nbd nbds_max=4; then
  fail "modprobe nbd"
  exit 1
fi

wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
wait_path() {
  for _ in $(seq 1 600); do
    [ -e "$1" ] && return 0
    sleep 0.1
  done
  return 1
}

start_server() {
  "$BRAID" serve --data-dir "$WORK/srv" --listen 127.0.0.1:7450 \
    --export "disk0=$WORK/srv/disk0.img,size=256M" \
    --export "disk1=$WORK/srv/disk1.img,size=256M" \
    --nbd 127.0.0.1:10809 >>"$LOGS/serve.log" 2>&1 &
  SERVER=$!
  wait_port 10809
}

# mkfs, mount, write, fsck, verify on $1 (a /dev/nbdN); $2 runs mid-write.
filesystem_round_trip() {
  local dev=$1 label=$2 during=${3:-}
  mkfs.ext4 -q -F "$dev" || { fail "$label: mkfs.ext4"; return; }
  mount "$dev" /mnt/a || { fail "$label: mount"; return; }
  dd if=/dev/urandom of=/mnt/a/one bs=1M count=8 status=none
  sync
  if [ -n "$during" ]; then
    dd if=/dev/urandom of=/mnt/a/two bs=1M count=24 oflag=direct status=none &
    local writer=$!
    sleep 1
    $during
    wait "$writer" || fail "$label: write during the fault"
  else
    dd if=/dev/urandom of=/mnt/a/two bs=1M count=24 status=none
  fi
  (cd /mnt/a && sha256sum one two >/tmp/sums)
  sync
  umount /mnt/a || { fail "$label: umount"; return; }
  if fsck.ext4 -fn "$dev" >"$LOGS/fsck-$label.log" 2>&1; then
    ok "$label: mkfs.ext4, mount, 32 MiB written, fsck.ext4 -fn clean"
  else
    fail "$label: fsck.ext4 found errors (see fsck-$label.log)"
  fi
  mount "$dev" /mnt/b || { fail "$label: remount"; return; }
  if (cd /mnt/b && sha256sum -c --quiet /tmp/sums); then
    ok "$label: files read back intact after remount"
  else
    fail "$label: checksums differ after remount"
  fi
  umount /mnt/b
}

step "braid serve --nbd, kernel nbd-client over TCP"
start_server || { fail "braid serve did not start"; exit 1; }
if nbd-client -N disk0 127.0.0.1 10809 /dev/nbd0 >"$LOGS/nbd-client-0.log" 2>&1; then
  ok "serve/tcp: nbd-client connects (fixed newstyle, NBD_OPT_GO)"
  filesystem_round_trip /dev/nbd0 serve-tcp
  nbd-client -d /dev/nbd0 >/dev/null 2>&1 || fail "serve/tcp: nbd-client -d"
else
  fail "serve/tcp: nbd-client could not connect: $(cat "$LOGS/nbd-client-0.log")"
fi

step "braid attach, kernel nbd-client over the unix socket, server kill -9 mid-write"
"$BRAID" attach --server 127.0.0.1:7450 --key-file "$WORK/srv/keys.toml" \
  --export disk1 --nbd "$WORK/attach.sock" --control "$WORK/attach.ctl" \
  >"$LOGS/attach.log" 2>&1 &
ATTACH=$!
wait_path "$WORK/attach.sock" || fail "braid attach did not start"
restart_server() {
  step "kill -9 braid serve and start it again"
  kill -9 "$SERVER"
  wait "$SERVER" 2>/dev/null
  start_server || fail "braid serve did not restart"
}
if nbd-client -N disk1 -u "$WORK/attach.sock" /dev/nbd1 >"$LOGS/nbd-client-1.log" 2>&1; then
  ok "attach/unix: nbd-client -u connects"
  filesystem_round_trip /dev/nbd1 attach-unix restart_server
  "$BRAID" status --control "$WORK/attach.ctl" >"$LOGS/attach-status.txt" 2>&1
  if grep -q "server sessions replaced *[1-9]" "$LOGS/attach-status.txt" &&
     grep -q "IOs failed *0$" "$LOGS/attach-status.txt"; then
    ok "attach/unix: the server restart was absorbed (session replaced, 0 IOs failed)"
  else
    fail "attach/unix: status after the restart: $(cat "$LOGS/attach-status.txt")"
  fi
  nbd-client -d /dev/nbd1 >/dev/null 2>&1 || fail "attach/unix: nbd-client -d"
else
  fail "attach/unix: nbd-client -u could not connect: $(cat "$LOGS/nbd-client-1.log")"
fi
"$BRAID" detach --control "$WORK/attach.ctl" >/dev/null 2>&1
wait "$ATTACH" && ok "attach/unix: braid detach exits cleanly" || fail "braid attach exit status"
kill "$SERVER" 2>/dev/null
wait "$SERVER" 2>/dev/null
exit $FAILED
