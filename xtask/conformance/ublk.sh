#!/usr/bin/env bash
# Runs as root inside ../shared/tools/vmlab (a 6.12 kernel with ublk_drv),
# from `cargo xtask conformance`: bash ublk.sh BRAID_BINARY LOG_DIR
#
# `braid attach --ublk` as a user runs it: the volume is /dev/ublkbN; raw
# IO, discard, fio verify and ext4 read back; the braid server is killed
# (-9) and restarted under a writer with no error; detach removes the
# device. Prints "ok ublk: <what>" / "FAIL ublk: <what>"; exits 1 on any
# failure.
set -uo pipefail
BRAID=$1
LOGS=$2
WORK=/tmp/braid-ublk
FAILED=0
ok() { echo "ok ublk: $*"; }
fail() { echo "FAIL ublk: $*"; FAILED=1; }
step() { echo "-- $*" >&2; }

ip link set lo up 2>/dev/null || true
mkdir -p "$WORK/srv" "$WORK/mnt" "$LOGS"
modprobe ublk_drv || { fail "modprobe ublk_drv"; exit 1; }

wait_for() {  # wait_for SECONDS COMMAND...
  local n=$(($1 * 10)); shift
  for _ in $(seq 1 "$n"); do "$@" && return 0; sleep 0.1; done
  return 1
}
start_server() {
  "$BRAID" serve --data-dir "$WORK/srv" --listen 127.0.0.1:7460 \
    --export "disk0=$WORK/srv/disk0.img,size=128M" >>"$LOGS/ublk-serve.log" 2>&1 &
  SERVER=$!
  wait_for 60 test -e "$WORK/srv/keys.toml"
}
attach() {  # attach LOGNAME EXTRA-FLAGS...: starts braid attach --ublk, sets DEV
  local log=$LOGS/$1.log; shift
  "$BRAID" attach --server 127.0.0.1:7460 --key-file "$WORK/srv/keys.toml" \
    --ublk --queues 2 --depth 32 --control "$WORK/attach.ctl" "$@" >"$log" 2>&1 &
  ATTACH=$!
  wait_for 60 grep -q '^device:' "$log" || return 1
  DEV=$(awk '/^device:/ {print $2}' "$log")
}
same() { cmp -s "$1" "$2"; }

start_server || { fail "braid serve did not start"; exit 1; }
step "braid attach --ublk"
if ! attach ublk-attach; then
  fail "attach --ublk announced no device: $(tail -5 "$LOGS/ublk-attach.log")"
  exit 1
fi
if [ -b "$DEV" ] && [ "$(blockdev --getsize64 "$DEV")" = $((128 << 20)) ]; then
  ok "attach --ublk creates $DEV with the export's size"
else
  fail "$DEV: not a block device of 128 MiB"
fi
sys=/sys/block/$(basename "$DEV")/queue
if [ "$(cat "$sys/write_cache")" = "write back" ] && [ "$(cat "$sys/fua")" = 1 ]; then
  ok "volatile write cache and FUA: the kernel sends FLUSH and FUA"
else
  fail "write_cache=$(cat "$sys/write_cache") fua=$(cat "$sys/fua")"
fi
"$BRAID" status --json --control "$WORK/attach.ctl" | grep -q "\"ublk\":\"$DEV\"" &&
  ok "braid status names the device" || fail "braid status does not name $DEV"

step "raw IO"
head -c $((8 << 20)) /dev/urandom >"$WORK/pattern"
dd if="$WORK/pattern" of="$DEV" bs=1M oflag=direct status=none
dd if="$WORK/pattern" of="$DEV" bs=4k seek=4096 count=512 oflag=direct status=none
if same <(dd if="$DEV" bs=1M count=8 iflag=direct status=none) "$WORK/pattern" &&
   same <(dd if="$DEV" bs=4k skip=4096 count=512 iflag=direct status=none) <(head -c $((2 << 20)) "$WORK/pattern"); then
  ok "direct writes of 1 MiB and 4 KiB read back"
else
  fail "direct reads differ from what was written"
fi
if sync "$DEV" && same <(head -c $((8 << 20)) "$WORK/srv/disk0.img") "$WORK/pattern"; then
  ok "after FLUSH the server's file holds the data"
else
  fail "FLUSH failed, or the server's file differs"
fi
if blkdiscard -o $((1 << 20)) -l $((1 << 20)) "$DEV" &&
   same <(dd if="$DEV" bs=1M skip=1 count=1 iflag=direct status=none) <(head -c $((1 << 20)) /dev/zero); then
  ok "discard reads back as zeroes"
else
  fail "discard"
fi
if fio --name=v --filename="$DEV" --direct=1 --ioengine=libaio --iodepth=32 --rw=randwrite \
     --bs=4k --size=16M --offset=32M --verify=crc32c --verify_fatal=1 --do_verify=1 \
     --output="$LOGS/ublk-fio.log" >/dev/null 2>&1; then
  ok "fio randwrite+verify at queue depth 32"
else
  fail "fio verify (see ublk-fio.log)"
fi

step "ext4, with the server killed -9 and restarted mid-write"
mkfs.ext4 -q -F "$DEV" && mount "$DEV" "$WORK/mnt" || { fail "mkfs.ext4/mount"; exit 1; }
dd if=/dev/urandom of="$WORK/big" bs=1M count=24 status=none
cp "$WORK/big" "$WORK/mnt/big" &
COPY=$!
sleep 1
kill -9 "$SERVER"; wait "$SERVER" 2>/dev/null
start_server || fail "braid serve did not restart"
wait "$COPY" && sync || fail "the copy failed across the server restart"
umount "$WORK/mnt"
if fsck.ext4 -fn "$DEV" >"$LOGS/ublk-fsck.log" 2>&1 && mount "$DEV" "$WORK/mnt" &&
   same "$WORK/mnt/big" "$WORK/big"; then
  ok "ext4 across a server kill -9: fsck clean, file intact"
else
  fail "ext4 after the server restart (see ublk-fsck.log)"
fi
umount "$WORK/mnt" 2>/dev/null
failed=$("$BRAID" status --json --control "$WORK/attach.ctl" | grep -o '"failed":[0-9]*')
[ "$failed" = '"failed":0' ] && ok "no IO failed" || fail "IO failed: $failed"

step "kill -9 braid attach under a writer; attach --recover takes the device over"
head -c $((16 << 20)) /dev/urandom >"$WORK/rec"
dd if="$WORK/rec" of="$DEV" bs=64k oflag=direct status=none 2>"$LOGS/ublk-writer.err" &
WRITER=$!
sleep 1
kill -9 "$ATTACH"; wait "$ATTACH" 2>/dev/null
sleep 2
if kill -0 "$WRITER" 2>/dev/null && [ -b "$DEV" ]; then
  ok "the daemon killed: $DEV stays and its writer waits (no error)"
else
  fail "after kill -9 of attach: writer gone ($(cat "$LOGS/ublk-writer.err")) or $DEV removed"
fi
ID=${DEV#/dev/ublkb}
if attach ublk-recover --recover "$ID" && [ "$DEV" = "/dev/ublkb$ID" ]; then
  ok "attach --recover $ID takes $DEV over"
else
  fail "attach --recover $ID: $(tail -5 "$LOGS/ublk-recover.log")"
fi
if wait "$WRITER"; then
  ok "the writer finished with no error after the takeover"
else
  fail "the writer failed: $(cat "$LOGS/ublk-writer.err")"
fi
if same <(dd if="$DEV" bs=1M count=16 iflag=direct status=none) "$WORK/rec"; then
  ok "every write, before and after the kill, reads back"
else
  fail "data differs after recovery"
fi

step "detach"
"$BRAID" detach --control "$WORK/attach.ctl" >/dev/null 2>&1
if wait_for 60 test ! -e "$DEV" && wait "$ATTACH"; then
  ok "braid detach removes $DEV and exits cleanly"
else
  fail "$DEV after detach: still there, or attach exited with an error"
fi
kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null
exit $FAILED
