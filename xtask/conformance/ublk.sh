#!/usr/bin/env bash
# Runs as root inside ../shared/tools/vmlab (a 6.12 kernel with ublk_drv),
# from `cargo xtask conformance`: bash ublk.sh BRAID_BINARY LOG_DIR
#
# `braid attach --ublk` as a user runs it: the volume is /dev/ublkbN; fio
# verifies through it (engines, depths, sizes, direct and buffered);
# filesystems hold a tree; FLUSH, FUA, discard and write-zeroes reach the
# server; the braid server and the attach daemon are each killed -9 under
# fio, and fio finishes with every block verified; detach under load
# loses nothing. Prints "ok ublk: <what>" / "FAIL ublk: <what>"; exits 1
# on any failure.
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
  "$BRAID" serve --data-dir "$WORK/srv" --listen 127.0.0.1:7460 --metrics 127.0.0.1:9460 \
    --export "disk0=$WORK/srv/disk0.img,size=512M" >>"$LOGS/ublk-serve.log" 2>&1 &
  SERVER=$!
  wait_for 60 test -e "$WORK/srv/keys.toml" && wait_for 60 metrics_up
}
kill_server() {
  kill -9 "$SERVER"; wait "$SERVER" 2>/dev/null
}
metrics() {
  exec 3<>/dev/tcp/127.0.0.1/9460 || return 1
  printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
  cat <&3
  exec 3<&-
}
metrics_up() { metrics >/dev/null 2>&1; }
# op_count OP: the server's count of OP on disk0 (its latency histogram).
op_count() {
  metrics | awk -v want="braid_server_op_latency_seconds_count{export=\"disk0\",op=\"$1\"}" \
    '$1 == want {print $2; found=1} END {if (!found) print 0}'
}
fua_count() { metrics | awk '$1 == "braid_server_fua_requests_total" {print $2}'; }
attach() {  # attach LOGNAME EXTRA-FLAGS...: starts braid attach --ublk, sets DEV
  local log=$LOGS/$1.log; shift
  "$BRAID" attach --server 127.0.0.1:7460 --key-file "$WORK/srv/keys.toml" \
    --ublk --queues 2 --depth 64 --control "$WORK/attach.ctl" "$@" >"$log" 2>&1 &
  ATTACH=$!
  wait_for 60 grep -q '^device:' "$log" || return 1
  DEV=$(awk '/^device:/ {print $2}' "$log")
}
same() { cmp -s "$1" "$2"; }
# fio_verify NAME ARGS...: writes and verifies every block it wrote.
fio_verify() {
  local name=$1; shift
  fio --name="$name" --filename="$DEV" --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --output="$LOGS/ublk-fio-$name.log" "$@" >/dev/null 2>&1
}

start_server || { fail "braid serve did not start"; exit 1; }
step "braid attach --ublk"
if ! attach ublk-attach; then
  fail "attach --ublk announced no device: $(tail -5 "$LOGS/ublk-attach.log")"
  exit 1
fi
if [ -b "$DEV" ] && [ "$(blockdev --getsize64 "$DEV")" = $((512 << 20)) ]; then
  ok "attach --ublk creates $DEV with the export's size"
else
  fail "$DEV: not a block device of 512 MiB"
fi
sys=/sys/block/$(basename "$DEV")/queue
if [ "$(cat "$sys/write_cache")" = "write back" ] && [ "$(cat "$sys/fua")" = 1 ]; then
  ok "volatile write cache and FUA: the kernel sends FLUSH and FUA"
else
  fail "write_cache=$(cat "$sys/write_cache") fua=$(cat "$sys/fua")"
fi
"$BRAID" status --json --control "$WORK/attach.ctl" | grep -q "\"ublk\":\"$DEV\"" &&
  ok "braid status names the device" || fail "braid status does not name $DEV"

step "FLUSH, FUA, discard and write-zeroes"
head -c $((8 << 20)) /dev/urandom >"$WORK/pattern"
dd if="$WORK/pattern" of="$DEV" bs=1M oflag=direct status=none
before=$(op_count flush)
if sync "$DEV" && [ "$(op_count flush)" -gt "$before" ] &&
   same <(head -c $((8 << 20)) "$WORK/srv/disk0.img") "$WORK/pattern"; then
  ok "FLUSH reaches the server, and its file holds the data"
else
  fail "FLUSH: count $before -> $(op_count flush), or the server's file differs"
fi
before=$(fua_count)
dd if="$WORK/pattern" of="$DEV" bs=4k count=16 oflag=direct,dsync status=none
[ "$(fua_count)" -gt "$before" ] && ok "O_DSYNC writes reach the server with FUA" ||
  fail "no FUA request reached the server ($before -> $(fua_count))"
before=$(op_count trim)
if blkdiscard -o $((1 << 20)) -l $((1 << 20)) "$DEV" && [ "$(op_count trim)" -gt "$before" ] &&
   same <(dd if="$DEV" bs=1M skip=1 count=1 iflag=direct status=none) <(head -c $((1 << 20)) /dev/zero); then
  ok "blkdiscard: TRIM reaches the server and reads back as zeroes"
else
  fail "blkdiscard"
fi
before=$(op_count write_zeroes)
if blkdiscard -z -o $((2 << 20)) -l $((1 << 20)) "$DEV" && [ "$(op_count write_zeroes)" -gt "$before" ] &&
   same <(dd if="$DEV" bs=1M skip=2 count=1 iflag=direct status=none) <(head -c $((1 << 20)) /dev/zero); then
  ok "blkdiscard -z: WRITE_ZEROES reaches the server and reads back as zeroes"
else
  fail "blkdiscard -z"
fi

step "fio verify: engines, depths, 4k-1M, direct and buffered"
for engine in libaio io_uring; do
  for rw in randwrite randrw; do
    for qd in 1 64; do
      if fio_verify "$engine-$rw-qd$qd" --ioengine="$engine" --iodepth="$qd" --rw="$rw" \
           --bsrange=4k-1m --direct=1 --size=8M --offset=16M; then
        ok "fio $rw $engine QD$qd 4k-1M O_DIRECT: every block verifies"
      else
        fail "fio $rw $engine QD$qd O_DIRECT (see ublk-fio-$engine-$rw-qd$qd.log)"
      fi
    done
  done
  if fio_verify "$engine-buffered" --ioengine="$engine" --iodepth=16 --rw=randwrite \
       --bsrange=4k-1m --direct=0 --size=8M --offset=32M --fsync_on_close=1; then
    ok "fio randwrite $engine buffered: every block verifies"
  else
    fail "fio $engine buffered (see ublk-fio-$engine-buffered.log)"
  fi
done

# filesystem MKFS FSCK: a tree in, unmounted, checked, back, compared.
filesystem() {
  local fs=$1 mkfs=$2 check=$3
  # The type named: this VM's mount does not load filesystem modules.
  modprobe "$fs" 2>/dev/null
  if ! $mkfs "$DEV" >"$LOGS/ublk-mkfs-$fs.log" 2>&1 || ! mount -t "$fs" "$DEV" "$WORK/mnt"; then
    fail "$fs: mkfs or mount"; return
  fi
  cp -a /usr/include/linux "$WORK/mnt/tree"
  (cd "$WORK/mnt" && find tree -type f -print0 | sort -z | xargs -0 sha256sum) >"$WORK/sums-$fs"
  sync
  umount "$WORK/mnt"
  if $check "$DEV" >"$LOGS/ublk-fsck-$fs.log" 2>&1 && mount -t "$fs" "$DEV" "$WORK/mnt" &&
     (cd "$WORK/mnt" && sha256sum -c --quiet "$WORK/sums-$fs"); then
    ok "$fs: a tree of $(wc -l <"$WORK/sums-$fs") files written, fsck clean, checksums intact"
  else
    fail "$fs: fsck or checksums (see ublk-fsck-$fs.log)"
  fi
  umount "$WORK/mnt" 2>/dev/null
}
step "filesystems"
filesystem ext4 "mkfs.ext4 -q -F" "fsck.ext4 -fn"
if command -v mkfs.xfs >/dev/null; then
  filesystem xfs "mkfs.xfs -q -f" "xfs_repair -n"
else
  echo "-- mkfs.xfs not installed: xfs skipped" >&2
fi

step "kill -9 of the braid server under fio"
fio_verify server-kill --ioengine=libaio --iodepth=16 --rw=randwrite --bs=64k --direct=1 \
  --size=48M --offset=64M &
FIO=$!
sleep 2
kill_server
start_server || fail "braid serve did not restart"
if wait "$FIO"; then
  ok "server kill -9 and restart under fio: 0 errors, every block verifies"
else
  fail "fio across the server restart (see ublk-fio-server-kill.log)"
fi

step "kill -9 of the attach daemon under fio, the server power-cycled meanwhile, then --recover"
fio_verify attach-kill --ioengine=libaio --iodepth=16 --rw=randwrite --bs=64k --direct=1 \
  --size=48M --offset=128M &
FIO=$!
sleep 2
kill -9 "$ATTACH"; wait "$ATTACH" 2>/dev/null
kill_server
start_server || fail "braid serve did not restart"
sleep 1
if kill -0 "$FIO" 2>/dev/null && [ -b "$DEV" ]; then
  ok "the daemon killed: $DEV stays and fio waits (no error)"
else
  fail "after kill -9 of attach: fio ended, or $DEV was removed"
fi
ID=${DEV#/dev/ublkb}
if attach ublk-recover --recover "$ID" && [ "$DEV" = "/dev/ublkb$ID" ]; then
  ok "attach --recover $ID takes $DEV over"
else
  fail "attach --recover $ID: $(tail -5 "$LOGS/ublk-recover.log")"
fi
if wait "$FIO"; then
  ok "after the takeover fio finishes: 0 errors, every block verifies"
else
  fail "fio across the daemon's death (see ublk-fio-attach-kill.log)"
fi
failed=$("$BRAID" status --json --control "$WORK/attach.ctl" | grep -o '"failed":[0-9]*')
[ "$failed" = '"failed":0' ] && ok "no IO failed" || fail "IO failed: $failed"

step "detach under load"
head -c $((32 << 20)) /dev/urandom >"$WORK/load"
dd if="$WORK/load" of="$DEV" bs=64k oflag=direct 2>"$WORK/dd.err" &
WRITER=$!
sleep 1
"$BRAID" detach --control "$WORK/attach.ctl" >/dev/null 2>&1
wait "$WRITER"
records=$(awk -F+ '/records out/ {print $1; exit}' "$WORK/dd.err")
if wait_for 60 test ! -e "$DEV" && wait "$ATTACH"; then
  ok "braid detach under load removes $DEV and exits cleanly"
else
  fail "$DEV after detach: still there, or attach exited with an error"
fi
bytes=$((${records:-0} * 65536))
if [ "$bytes" -gt 0 ] && same <(head -c "$bytes" "$WORK/srv/disk0.img") <(head -c "$bytes" "$WORK/load"); then
  ok "every write completed before the detach ($bytes bytes) is on the server"
else
  fail "detach under load: $bytes bytes acknowledged, the server's file differs"
fi
kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null

step "a failing backend: media errors on some blocks (device-mapper error target)"
if modprobe dm-mod 2>/dev/null && modprobe loop 2>/dev/null && command -v dmsetup >/dev/null; then
  truncate -s 16M "$WORK/base.img"
  LOOP=$(losetup -f --show "$WORK/base.img")
  # Sectors 8192..10239 (4 MiB to 5 MiB) fail; the rest is the loop device.
  printf '0 8192 linear %s 0\n8192 2048 error\n10240 22528 linear %s 10240\n' "$LOOP" "$LOOP" |
    dmsetup create --noudevsync braidbad
  # No udev here: the kernel's own node, /dev/dm-MINOR.
  BAD=/dev/dm-$(dmsetup info -c --noheadings -o minor braidbad | tr -d ' ')
  "$BRAID" serve --data-dir "$WORK/srv2" --listen 127.0.0.1:7461 \
    --export "bad=$BAD" >>"$LOGS/ublk-serve2.log" 2>&1 &
  SERVER=$!
  wait_for 60 test -e "$WORK/srv2/keys.toml"
  "$BRAID" attach --server 127.0.0.1:7461 --key-file "$WORK/srv2/keys.toml" --export bad \
    --ublk --io-timeout 3 --control "$WORK/bad.ctl" >"$LOGS/ublk-attach-bad.log" 2>&1 &
  ATTACH=$!
  if wait_for 60 grep -q '^device:' "$LOGS/ublk-attach-bad.log"; then
    DEV=$(awk '/^device:/ {print $2}' "$LOGS/ublk-attach-bad.log")
    if ! dd if="$DEV" of=/dev/null bs=64k skip=64 count=1 iflag=direct status=none 2>"$WORK/bad.err" &&
       grep -q "Input/output error" "$WORK/bad.err"; then
      ok "a read of failing blocks gets EIO"
    else
      fail "a read of failing blocks: $(cat "$WORK/bad.err")"
    fi
    if dd if="$WORK/pattern" of="$DEV" bs=64k count=16 oflag=direct status=none &&
       same <(dd if="$DEV" bs=64k count=16 iflag=direct status=none) <(head -c $((1 << 20)) "$WORK/pattern"); then
      ok "the rest of the device works on after the error"
    else
      fail "IO outside the failing blocks after the error"
    fi
    # A server that never answers: with --io-timeout 3 the read fails
    # (EIO) instead of waiting, and the device works once it answers.
    kill -STOP "$SERVER"
    timeout 30 dd if="$DEV" of=/dev/null bs=4k skip=300 count=1 iflag=direct status=none 2>"$WORK/to.err"
    rc=$?
    kill -CONT "$SERVER"
    if [ "$rc" != 0 ] && [ "$rc" != 124 ] && grep -q "Input/output error" "$WORK/to.err" &&
       dd if="$DEV" of=/dev/null bs=4k skip=300 count=1 iflag=direct status=none; then
      ok "--io-timeout: a stopped server's read fails with EIO, and IO works when it answers again"
    else
      fail "--io-timeout with a stopped server: dd status $rc, $(cat "$WORK/to.err")"
    fi
  else
    fail "attach --ublk of an export on device-mapper: $(tail -3 "$LOGS/ublk-attach-bad.log")"
  fi
  "$BRAID" detach --control "$WORK/bad.ctl" >/dev/null 2>&1
  wait "$ATTACH" 2>/dev/null
  kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null
  dmsetup remove braidbad; losetup -d "$LOOP"
else
  echo "-- device-mapper not available: failing-backend rows skipped" >&2
fi
exit $FAILED
