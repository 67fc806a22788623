#!/usr/bin/env bash
# Not a check: a side-by-side of the two ways a client machine gets a
# block device from braid, in one VM run (timings under TCG mean little;
# the ratio and the CPU per IO are the point):
#   vmlab run . bash xtask/conformance/compare_ublk_nbd.sh target/release/braid
# 1. braid attach --ublk          -> /dev/ublkb0
# 2. braid attach --nbd SOCK      -> nbd-client -u SOCK /dev/nbd0
# fio 4k randread QD1 and QD32, and 1 MiB sequential write, on each; the
# attach process's CPU time (user+system) per IO from /proc.
set -uo pipefail
BRAID=$(realpath "$1")
W=/tmp/braid-compare
mkdir -p "$W/srv"
ip link set lo up 2>/dev/null || true
modprobe ublk_drv; modprobe nbd nbds_max=2
"$BRAID" serve --data-dir "$W/srv" --listen 127.0.0.1:7470 \
  --export "disk0=$W/srv/disk0.img,size=256M" >"$W/serve.log" 2>&1 &
for _ in $(seq 100); do [ -e "$W/srv/keys.toml" ] && break; sleep 0.1; done
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # clock ticks
run() {  # run LABEL DEV PID
  local label=$1 dev=$2 pid=$3
  dd if=/dev/zero of="$dev" bs=1M count=64 oflag=direct status=none   # reads hit written blocks
  for job in "randread 4k 1" "randread 4k 32" "write 1m 4"; do
    set -- $job
    local t0; t0=$(cpu "$pid")
    local out; out=$(fio --name=c --filename="$dev" --direct=1 --ioengine=libaio --rw="$1" --bs="$2" \
      --iodepth="$3" --size=64M --runtime=5 --time_based --output-format=terse --terse-version=3 2>/dev/null)
    local t1; t1=$(cpu "$pid")
    # fio terse v3: field 8 is read IOPS, field 49 write IOPS.
    local riops wiops; riops=$(echo "$out" | cut -d';' -f8); wiops=$(echo "$out" | cut -d';' -f49)
    local iops=$(( ${riops%.*} + ${wiops%.*} ))
    local ios=$(( iops * 5 ))
    local tick=$(getconf CLK_TCK)
    local us_per_io=$(( ios > 0 ? (t1 - t0) * 1000000 / tick / ios : 0 ))
    printf '%-6s %-9s %-3s QD%-3s %8d IOPS   attach CPU %6d us/IO\n' "$label" "$1" "$2" "$3" "$iops" "$us_per_io"
  done
}
"$BRAID" attach --server 127.0.0.1:7470 --key-file "$W/srv/keys.toml" --ublk \
  --control "$W/u.ctl" >"$W/ublk.log" 2>&1 &
UPID=$!
for _ in $(seq 300); do grep -q '^device:' "$W/ublk.log" && break; sleep 0.1; done
run ublk "$(awk '/^device:/ {print $2}' "$W/ublk.log")" "$UPID"
"$BRAID" detach --control "$W/u.ctl" >/dev/null; wait "$UPID"
"$BRAID" attach --server 127.0.0.1:7470 --key-file "$W/srv/keys.toml" --nbd "$W/nbd.sock" \
  --control "$W/n.ctl" >"$W/nbd.log" 2>&1 &
NPID=$!
for _ in $(seq 300); do [ -e "$W/nbd.sock" ] && break; sleep 0.1; done
nbd-client -N disk0 -u "$W/nbd.sock" /dev/nbd0 >/dev/null 2>&1
run nbd /dev/nbd0 "$NPID"
nbd-client -d /dev/nbd0 >/dev/null 2>&1
"$BRAID" detach --control "$W/n.ctl" >/dev/null; wait "$NPID"
kill %1
