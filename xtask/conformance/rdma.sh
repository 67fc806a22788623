#!/usr/bin/env bash
# Runs as root inside ../shared/tools/vmlab (a 6.12 kernel with rdma_rxe),
# from `cargo xtask conformance`: bash rdma.sh BRAID_BINARY LOG_DIR
#
# braid's RDMA fabric over soft-RoCE: the server's RDMA address is on rxe
# over one end of a veth pair, its TCP address on loopback, so the RDMA
# path can fail alone. (Client and server share the VM's one network
# namespace: rxe in this kernel answers only in the initial namespace.)
#  1. braid verify over RDMA only;
#  2. one session over RDMA and TCP at once;
#  3. kill -9 of the server under verification, restarted;
#  4. the RDMA path silent (every packet dropped) under load: IO goes
#     on over TCP, and the RDMA channels come back when the path does;
#  5. a client naming forged remote buffers: only those requests fail;
#  6. the kernel's nbd-client through `braid attach` over RDMA: mkfs.ext4,
#     mount, write, fsck; and fio verify on /dev/ublkbN over RDMA;
#  7. the RDMA link down under load (ip link set down): IO goes on over TCP.
# Then, as figures (timings under TCG mean little): QD32 4k reads over RDMA
# and over TCP on the same kind of veth link, with server CPU per IO.
# Prints "ok <what>" / "FAIL <what>" / "figure <what>"; exits 1 on a FAIL.
set -uo pipefail
BRAID=$1
LOGS=$2
WORK=/tmp/braid-rdma
FAILED=0
ok() { echo "ok rdma: $*"; }
fail() { echo "FAIL rdma: $*"; FAILED=1; }
step() { echo "-- $*" >&2; }
CLI=""
TCP=127.0.0.1:7410
mkdir -p "$WORK/srv" "$LOGS" /mnt/r
if timeout 10 "$BRAID" serve --rdma 127.0.0.1:1 --data-dir "$WORK/probe" 2>&1 | grep -q "built without RDMA"; then
  echo "SKIP rdma: the RDMA fabric checks"
  exit 0
fi

setup() {
  modprobe rdma_rxe && modprobe rdma_ucm && modprobe veth || return 1
  ip link set lo up
  ip link add vA type veth peer name vB
  ip addr add 10.9.0.1/24 dev vA && ip link set vA up
  ip addr add 10.9.0.2/24 dev vB && ip link set vB up
  # A second pair for the link-down row, so whatever state soft-RoCE is
  # left in by the rows before it (row 4) cannot decide that row.
  ip link add vC type veth peer name vD
  ip addr add 10.9.1.1/24 dev vC && ip link set vC up
  ip addr add 10.9.1.2/24 dev vD && ip link set vD up
  # The kernel's ingress hook is a jump label, patched live the first
  # time any device gets an ingress qdisc and again when the last one
  # goes. Row 4 adding its drop filters under load once crashed this
  # guest: a CPU receiving an RDMA packet met the patch half done (an
  # int3 oops in __netif_receive_skb_core under TCG). A pass-all filter
  # on loopback's ingress, kept for the whole run, turns the hook on
  # once, here, before any traffic, so row 4 patches no code.
  tc qdisc add dev lo ingress && tc filter add dev lo ingress matchall action ok || return 1
  sleep 2
  rdma link add rxeA type rxe netdev vA && rdma link add rxeB type rxe netdev vB &&
    rdma link add rxeC type rxe netdev vC && rdma link add rxeD type rxe netdev vD
}
# The RDMA path: the server on vB's link-local address, the client reaching
# it through vA (the scope pins the route to the veth, not loopback, so
# taking vA down really cuts it).
link_local() { ip -6 addr show dev "$1" | awk '/inet6 fe80/{print $2}' | cut -d/ -f1; }

start_server() {
  # Where this server's log starts, for rows that read only its part.
  serve_log_from=$(($(wc -l <"$LOGS/rdma-serve.log" 2>/dev/null || echo 0) + 1))
  "$BRAID" serve --data-dir "$WORK/srv" --listen "$TCP" --rdma "[$LL%vB]:7411" --rdma "[$LL2%vD]:7411" \
    --export "disk0=$WORK/srv/disk0.img,size=128M" \
    --export "disk1=$WORK/srv/disk1.img,size=256M" \
    >>"$LOGS/rdma-serve.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 300); do
    grep -q "accepting braid channels over RDMA" "$LOGS/rdma-serve.log" 2>/dev/null &&
      (exec 3<>/dev/tcp/127.0.0.1/7410) 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# verify LABEL LOGNAME ARGS...: runs braid verify from the client side.
verify() {
  local log=$LOGS/rdma-$1.log
  shift
  # Bounded: a verify whose server never comes back would wait forever,
  # as a disk does.
  timeout 120 $CLI "$BRAID" verify --key-file "$WORK/srv/keys.toml" "$@" >"$log" 2>&1
}
clean() { grep -q "0 verification failures, 0 IO errors" "$1"; }
# table_up LOG PATH: the channel table a run ends with has a channel up on
# PATH (not the "channel up" lines logged on the way).
table_up() { grep -Eq "^ +ch[0-9]+\.[0-9]+ up +$2" "$1"; }
# rdma_up_now LOG: how many channels the verify logging to LOG has up on
# RDMA at this moment (each channel's last "channel up"/"channel down").
rdma_up_now() {
  sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | awk '
    /channel (up|down)/ && match($0, /ch=[^ ]+/) {
      c = substr($0, RSTART, RLENGTH)
      up[c] = ($0 ~ /channel up/ && $0 ~ /rdma:\/\//)
    }
    END { n = 0; for (c in up) n += up[c]; print n }'
}
# under_fault LOGNAME RDMA-ADDRESS CUT HEAL: a 40 s verify of a mixed
# session, with CUT run once an RDMA channel has been up for 2 s without
# a break, and HEAL 10 s later. A fixed 5 s wait was not enough: under
# TCG a fresh soft-RoCE device's first RDMA handshake can time out, and
# then no IO is on RDMA when the link goes down (0 resent). Waiting for
# the first "channel up" on RDMA was not enough either: a CI run's RDMA
# channel came up, went down again, and kept timing out on its
# reconnects, so the cut 2 s later found none on RDMA. If no RDMA channel
# stays up 2 s within 25 s, the cut is not made and rdma_never_up says so
# in the row's message, with the QP table.
under_fault() {
  local log=$LOGS/rdma-$1.log
  verify "$1" --server "$2,$TCP" --channels 4 --time 40 &
  local v=$!
  rdma_never_up=""
  local waited=0 steady=0
  while [ "$steady" -lt 20 ]; do
    if [ "$waited" -ge 250 ]; then
      rdma_never_up="no RDMA channel stayed up 2 s within 25 s, so the path was never cut; QP table: $(rdma res show qp 2>&1 | tr '\n' ' ')"
      break
    fi
    if [ "$(rdma_up_now "$log")" -gt 0 ]; then
      steady=$((steady + 1))
    else
      steady=0
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  if [ -z "$rdma_never_up" ]; then
    eval "$3"
    sleep 10
    eval "$4"
  fi
  wait "$v"
}

server_cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER/stat"; }

step "soft-RoCE on a veth pair"
if ! setup >"$LOGS/rdma-setup.log" 2>&1; then
  fail "soft-RoCE setup: $(tail -5 "$LOGS/rdma-setup.log")"
  exit 1
fi
: >"$LOGS/rdma-serve.log"
LL=$(link_local vB)
RDMA="rdma://[$LL%vA]:7411"
# The neighbours of the RDMA pair are pinned, as on a fabric with static
# neighbour tables: otherwise, when row 4 drops every packet, neighbour
# discovery fails, soft-RoCE's next CM datagram fails to send, and that
# moves rxeA's CM queue pair (GSI) to error for good, so no RDMA channel
# can connect again (seen in about one CI run in five; with pinned
# neighbours, 18 cuts in a row all came back on RDMA).
pin_neighbours() {
  local a b
  a=$(cat /sys/class/net/vA/address); b=$(cat /sys/class/net/vB/address)
  ip -6 neigh replace "$LL" lladdr "$b" dev vA nud permanent &&
    ip -6 neigh replace "$(link_local vA)" lladdr "$a" dev vB nud permanent &&
    ip neigh replace 10.9.0.2 lladdr "$b" dev vA nud permanent &&
    ip neigh replace 10.9.0.1 lladdr "$a" dev vB nud permanent
}
pin_neighbours || { fail "pinning the RDMA pair's neighbours"; exit 1; }
LL2=$(link_local vD)
RDMA2="rdma://[$LL2%vC]:7411"
start_server || { fail "braid serve --rdma did not start: $(tail -5 "$LOGS/rdma-serve.log")"; exit 1; }

if "$BRAID" serve --data-dir "$WORK/small" --listen 127.0.0.1:7499 --rdma "[$LL%vB]:7412" \
     --rdma-memory 16 >"$LOGS/rdma-small.log" 2>&1; then
  fail "a server with 16 MiB of registered memory started"
elif grep -q "cannot hold one largest payload: at least 33 MiB" "$LOGS/rdma-small.log"; then
  ok "registered memory too small for one payload (--rdma-memory 16) is refused with the least that works"
else
  fail "--rdma-memory 16: $(cat "$LOGS/rdma-small.log")"
fi

# The attach's frontends receive WRITE data into the client's registered
# memory (verify and bench make theirs there), and the server fetches it
# from there: no copy on the client (one copied first means that memory
# was full at that moment).
writes_zero_copy() {
  local in_place copied
  in_place=$(grep -o "WRITE data fetched where it was put (no copy): [0-9]*" "$1" | grep -o "[0-9]*$")
  copied=$(grep -o "WRITE data fetched where .* copied into registered memory first: [0-9]*" "$1" | grep -o "[0-9]*$")
  if [ "${in_place:-0}" -gt 0 ] && [ "${copied:-1}" -lt "${in_place:-0}" ]; then
    ok "$2 over RDMA: WRITE data fetched where it was put, no copy: $in_place writes, $copied copied first"
  else
    fail "zero-copy writes through $2: $(cat "$1")"
  fi
}

step "1. verify over RDMA only"
verify only --server "$RDMA" --channels 2 --time 8
if clean "$LOGS/rdma-only.log" && table_up "$LOGS/rdma-only.log" "rdma://"; then
  ok "braid verify over RDMA only (2 RC queue pairs): 0 verification failures, 0 IO errors"
else
  fail "verify over RDMA only: $(tail -8 "$LOGS/rdma-only.log")"
fi
writes_zero_copy "$LOGS/rdma-only.log" "braid verify"

step "2. one session over RDMA and TCP"
verify mixed --server "$RDMA" --server "$TCP" --channels 4 --time 8
if clean "$LOGS/rdma-mixed.log" && table_up "$LOGS/rdma-mixed.log" "rdma://" &&
   table_up "$LOGS/rdma-mixed.log" "127.0.0.1:7410"; then
  ok "one session with 2 RDMA and 2 TCP channels: 0 verification failures, 0 IO errors"
else
  fail "mixed RDMA+TCP session: $(tail -8 "$LOGS/rdma-mixed.log")"
fi

step "2b. a server of two engines: a session over RDMA and TCP, another over RDMA only"
# Each connection goes to the engine its first frame names: an adopted
# RDMA channel and a TCP channel of one session must meet on one engine.
mkdir -p "$WORK/eng"
"$BRAID" serve --data-dir "$WORK/eng" --key-file "$WORK/srv/keys.toml" --engines 2 \
  --listen 127.0.0.1:7420 --rdma "[$LL%vB]:7413" \
  --export "disk0=$WORK/eng/disk0.img,size=64M" --export "disk1=$WORK/eng/disk1.img,size=64M" \
  >"$LOGS/rdma-engines-serve.log" 2>&1 &
ENGINES_SERVER=$!
engines_up=""
for _ in $(seq 1 300); do
  if grep -q "accepting braid channels over RDMA" "$LOGS/rdma-engines-serve.log" 2>/dev/null &&
     (exec 3<>/dev/tcp/127.0.0.1/7420) 2>/dev/null; then
    engines_up=1
    break
  fi
  sleep 0.1
done
if [ -z "$engines_up" ]; then
  fail "braid serve --engines 2 --rdma did not start: $(tail -5 "$LOGS/rdma-engines-serve.log")"
else
  verify engines-mixed --server "rdma://[$LL%vA]:7413" --server 127.0.0.1:7420 --channels 4 --time 8 &
  M=$!
  verify engines-rdma --server "rdma://[$LL%vA]:7413" --export disk1 --channels 2 --time 8
  wait "$M"
  engines=$("$BRAID" status --json --control "$WORK/eng/control.sock" 2>/dev/null |
    grep -o '"busy_us"' | wc -l)
  if clean "$LOGS/rdma-engines-mixed.log" && table_up "$LOGS/rdma-engines-mixed.log" "rdma://" &&
     table_up "$LOGS/rdma-engines-mixed.log" "127.0.0.1:7420" &&
     clean "$LOGS/rdma-engines-rdma.log" && table_up "$LOGS/rdma-engines-rdma.log" "rdma://" &&
     [ "$engines" = 2 ]; then
    ok "two engines (--engines 2): a session of 2 RDMA and 2 TCP channels and one of 2 RDMA channels, 0 verification failures, 0 IO errors"
  else
    fail "--engines 2 over RDMA ($engines engines in status): $(tail -4 "$LOGS/rdma-engines-mixed.log") / $(tail -4 "$LOGS/rdma-engines-rdma.log")"
  fi
fi
kill "$ENGINES_SERVER" 2>/dev/null
wait "$ENGINES_SERVER" 2>/dev/null

step "3. kill -9 of the server under verification over RDMA"
verify restart --server "$RDMA" --channels 2 --time 20 &
V=$!
sleep 5
kill -9 "$SERVER"
wait "$SERVER" 2>/dev/null
sleep 1
start_server || fail "braid serve did not restart"
wait "$V"
if clean "$LOGS/rdma-restart.log" && grep -q "session resets [1-9]\|[1-9][0-9]* session resets" "$LOGS/rdma-restart.log"; then
  ok "kill -9 and restart of the server under verify over RDMA: session replaced, 0 verification failures, 0 IO errors"
else
  fail "server restart under RDMA: $(tail -8 "$LOGS/rdma-restart.log")"
fi

step "5. a client naming forged remote buffers"
verify honest --server "$RDMA" --export disk0 --channels 2 --time 12 &
V=$!
sleep 2
BRAID_TEST_RDMA_FORGE=1 timeout 60 $CLI "$BRAID" verify --key-file "$WORK/srv/keys.toml" \
  --server "$RDMA" --export disk1 --channels 2 --time 3 --io-timeout 3 >"$LOGS/rdma-forge.log" 2>&1
forged=$?
wait "$V"
# The forger names every second buffer outside its window: those requests
# fail INVALID, the rest verify, and no channel goes down for it (a first
# handshake that timed out under TCG is not the forging's doing: a VM
# run on a busy host once took longer than the handshake allows).
dropped=$(grep "channel down" "$LOGS/rdma-forge.log" | grep -vc "handshake timed out")
if [ "$forged" != 0 ] && grep -q "verified [1-9][0-9]* reads .*: 0 verification failures, [1-9][0-9]* IO errors" "$LOGS/rdma-forge.log" &&
   [ "$dropped" -eq 0 ] &&
   clean "$LOGS/rdma-honest.log" && kill -0 "$SERVER" 2>/dev/null; then
  ok "forged remote buffers fail only their own requests (INVALID; the forger's other requests verified, no channel dropped); another session verified 0 failures, 0 errors meanwhile"
else
  fail "forged remote buffer (forger rc $forged, $dropped channels dropped): $(grep -v "failed: Invalid" "$LOGS/rdma-forge.log" | tail -12); honest: $(tail -4 "$LOGS/rdma-honest.log")"
fi

step "5a. a server at its limit of RDMA channels"
# Each channel pins a ring of message buffers from the moment a peer asks
# to connect, before it says who it is: past --rdma-channels the server
# rejects the request, and the client is told why. A client asking for 4
# channels of a server that allows 2 gets 2, and its IO runs on them.
mkdir -p "$WORK/capped"
"$BRAID" serve --data-dir "$WORK/capped" --listen 127.0.0.1:7420 --rdma "[$LL%vB]:7412" \
  --rdma-channels 2 --export "disk0=$WORK/capped/disk0.img,size=64M" >"$LOGS/rdma-capped-serve.log" 2>&1 &
CAPPED=$!
for _ in $(seq 1 300); do
  grep -q "accepting braid channels over RDMA" "$LOGS/rdma-capped-serve.log" 2>/dev/null && break
  sleep 0.1
done
timeout 120 $CLI "$BRAID" verify --key-file "$WORK/capped/keys.toml" --server "rdma://[$LL%vA]:7412" \
  --export disk0 --channels 4 --time 8 >"$LOGS/rdma-capped.log" 2>&1 &
V=$!
sleep 5
"$BRAID" status --control "$WORK/capped/control.sock" >"$LOGS/rdma-capped-status.txt" 2>&1
wait "$V"
kill "$CAPPED"; wait "$CAPPED" 2>/dev/null
if clean "$LOGS/rdma-capped.log" &&
   grep -q "refused the RDMA channel" "$LOGS/rdma-capped.log" &&
   grep -q "at the server's limit of 2 RDMA channels" "$LOGS/rdma-capped-serve.log" &&
   grep -q "RDMA channels: 2 open of at most 2" "$LOGS/rdma-capped-status.txt"; then
  ok "a server at its limit of RDMA channels (--rdma-channels 2) rejects a client's third and fourth, which says why; braid status shows 2 open of at most 2, and the client's IO verified on the two it got (0 failures, 0 errors)"
else
  fail "RDMA channel limit: client: $(grep -m2 -E "refused|verification failures" "$LOGS/rdma-capped.log") server: $(grep -m1 "refused" "$LOGS/rdma-capped-serve.log") status: $(grep "RDMA channels" "$LOGS/rdma-capped-status.txt")"
fi

step "5b. damaged one-sided payloads"
# Soft-RoCE's ICRC drops what the wire damages, so the damage is made
# where braid's CRC is the only guard: in the client's memory, after the
# server's RDMA WRITE placed a READ's data there (every 5th payload).
BRAID_TEST_RDMA_CORRUPT=5 verify damaged --server "$RDMA" --channels 2 --time 6
damaged=$(grep -o "[0-9]* corrupt frames" "$LOGS/rdma-damaged.log" | grep -o "^[0-9]*")
if clean "$LOGS/rdma-damaged.log" && [ "${damaged:-0}" -gt 0 ]; then
  ok "one-sided payloads damaged in memory (every 5th): braid's CRC caught $damaged and the reads were asked again: 0 verification failures, 0 IO errors"
else
  fail "damaged one-sided payloads: $(tail -8 "$LOGS/rdma-damaged.log")"
fi

step "6. kernel nbd-client through braid attach over RDMA"
if modprobe nbd nbds_max=4; then
  $CLI "$BRAID" attach --server "$RDMA" --key-file "$WORK/srv/keys.toml" --export disk1 \
    --nbd "$WORK/attach.sock" --control "$WORK/attach.ctl" >"$LOGS/rdma-attach.log" 2>&1 &
  A=$!
  for _ in $(seq 1 300); do [ -e "$WORK/attach.sock" ] && break; sleep 0.1; done
  if nbd-client -N disk1 -u "$WORK/attach.sock" /dev/nbd2 >"$LOGS/rdma-nbd-client.log" 2>&1 &&
     mkfs.ext4 -q -F /dev/nbd2 && mount /dev/nbd2 /mnt/r &&
     dd if=/dev/urandom of=/mnt/r/f bs=1M count=16 status=none && sync &&
     sha=$(sha256sum </mnt/r/f) && umount /mnt/r &&
     fsck.ext4 -fn /dev/nbd2 >"$LOGS/rdma-fsck.log" 2>&1 &&
     mount /dev/nbd2 /mnt/r && [ "$(sha256sum </mnt/r/f)" = "$sha" ]; then
    ok "kernel nbd-client over braid attach over RDMA: mkfs.ext4, mount, 16 MiB written, fsck clean, read back intact"
    "$BRAID" status --control "$WORK/attach.ctl" >"$LOGS/rdma-attach-status.txt" 2>&1
    if grep -q "RDMA registered memory (client): .* of 64.0 MiB per device" "$LOGS/rdma-attach-status.txt" &&
       grep -q "up .*rdma://" "$LOGS/rdma-attach-status.txt"; then
      ok "braid status of the attach shows its channels' RDMA path and its registered memory"
    else
      fail "attach status: $(cat "$LOGS/rdma-attach-status.txt")"
    fi
    writes_zero_copy "$LOGS/rdma-attach-status.txt" "the NBD face"
  else
    fail "nbd over RDMA: $(tail -5 "$LOGS/rdma-attach.log") $(cat "$LOGS/rdma-nbd-client.log")"
  fi
  umount /mnt/r 2>/dev/null
  nbd-client -d /dev/nbd2 >/dev/null 2>&1
  $CLI "$BRAID" detach --control "$WORK/attach.ctl" >/dev/null 2>&1
  wait "$A"
else
  fail "modprobe nbd"
fi

step "6b. ublk through braid attach over RDMA"
if modprobe ublk_drv; then
  "$BRAID" attach --server "$RDMA" --key-file "$WORK/srv/keys.toml" --export disk1 \
    --ublk --queues 2 --depth 64 --control "$WORK/ublk.ctl" >"$LOGS/rdma-ublk.log" 2>&1 &
  U=$!
  for _ in $(seq 1 600); do grep -q '^device:' "$LOGS/rdma-ublk.log" && break; sleep 0.1; done
  DEV=$(awk '/^device:/ {print $2}' "$LOGS/rdma-ublk.log")
  if [ -b "${DEV:-/nonexistent}" ] &&
     fio --name=rdma-ublk --filename="$DEV" --rw=randrw --bsrange=4k-256k --size=64M \
       --ioengine=io_uring --iodepth=32 --direct=1 --verify=crc32c --verify_fatal=1 \
       --do_verify=1 --output="$LOGS/rdma-ublk-fio.log" >/dev/null 2>&1; then
    ok "ublk through braid attach over RDMA: fio randrw io_uring QD32 4k-256k O_DIRECT, every block verifies"
    "$BRAID" status --control "$WORK/ublk.ctl" >"$LOGS/rdma-ublk-status.txt" 2>&1
    writes_zero_copy "$LOGS/rdma-ublk-status.txt" "the ublk face"
  else
    fail "ublk over RDMA: $(tail -5 "$LOGS/rdma-ublk.log") $(tail -5 "$LOGS/rdma-ublk-fio.log" 2>/dev/null)"
  fi
  "$BRAID" detach --control "$WORK/ublk.ctl" >/dev/null 2>&1
  wait "$U"
else
  fail "modprobe ublk_drv"
fi

step "figures: QD32 4k random reads, RDMA and TCP"
for path in "$RDMA" "$TCP"; do
  before=$(server_cpu_ticks)
  $CLI "$BRAID" bench --key-file "$WORK/srv/keys.toml" --server "$path" --channels 2 \
    --rw randread --bs 4096 --qd 32 --time 5 >"$LOGS/rdma-bench.log" 2>&1
  after=$(server_cpu_ticks)
  summary=$(grep " IOs in " "$LOGS/rdma-bench.log" | head -1)
  iops=$(echo "$summary" | grep -o "[0-9]* IOPS")
  ios=$(echo "$summary" | grep -o "^[0-9]*")
  cpu_us=$(( (after - before) * 10000 ))
  echo "figure rdma: $path QD32 4k randread: ${iops:-?}, server CPU $((cpu_us / ${ios:-1})) µs per IO (${ios:-?} IOs, VM under TCG)"
done
# The backend reads into the server's registered memory, so READ data is
# placed with no copy (a full staging area falls back to copying).
"$BRAID" status --control "$WORK/srv/control.sock" >"$LOGS/rdma-serve-status.txt" 2>&1
# One line per listener: summed.
sum_of() { grep -o "$1 [0-9]*" "$LOGS/rdma-serve-status.txt" | grep -o "[0-9]*$" | awk '{s += $1} END {print s + 0}'; }
placed=$(sum_of "placed from the backend's buffer:")
copied=$(sum_of "copied into registered memory first:")
if [ "${placed:-0}" -gt 0 ] && [ "${copied:-1}" -lt "${placed:-0}" ]; then
  ok "READ data placed straight from the backend's buffer: $placed replies, $copied copied first"
else
  fail "zero-copy reads: $(cat "$LOGS/rdma-serve-status.txt")"
fi

# Rows 4 and 7 run last, 7 on its own veth pair: soft-RoCE sometimes
# leaves rdma_cm on a device unable to connect again after its path was
# dead (seen after row 4 in about one run in eight, after row 7 always).
step "4. the RDMA path drops every packet for 10 s under load, TCP on its own path"
# Dropped where they arrive, as a dead switch would: a loss qdisc on the
# sending side (netem, used before) made soft-RoCE's send path fail, and
# in about a third of runs that left rxeA's CM queue pair (GSI) in error
# for good, so no RDMA connection worked after the heal (the neighbours
# are pinned above for the same reason).
under_fault blackhole "$RDMA" \
  "for d in vA vB; do tc qdisc add dev \$d ingress && tc filter add dev \$d ingress matchall action drop; done" \
  "tc qdisc del dev vA ingress; tc qdisc del dev vB ingress"
# The return to RDMA: at the end of that run, or else within three short
# RDMA-only runs after it (the QP table says, when it must wait, whether
# soft-RoCE broke its CM queue pair or was only slow).
returned=""
if table_up "$LOGS/rdma-blackhole.log" "rdma://"; then
  returned="at the end of the run"
else
  rdma res show qp >"$LOGS/rdma-blackhole-qp.txt" 2>&1
  for try in 1 2 3; do
    verify blackhole-after --server "$RDMA" --channels 2 --time 5
    if clean "$LOGS/rdma-blackhole-after.log" && table_up "$LOGS/rdma-blackhole-after.log" "rdma://"; then
      returned="in RDMA-only run $try after it"
      break
    fi
  done
fi
# Soft-RoCE in this kernel sometimes moves a device's CM queue pair (GSI)
# to error while packets are dropped, even with pinned neighbours (seen in
# VM loops of many short cuts); after that no program can open an RDMA
# connection on that device, so the return cannot be observed: the row
# then says so instead of failing on the kernel's fault.
cm_broken=""
if [ -z "$returned" ] && grep -q "type GSI state ERR" "$LOGS/rdma-blackhole-qp.txt" 2>/dev/null; then
  cm_broken=$(grep "type GSI state ERR" "$LOGS/rdma-blackhole-qp.txt" | awk '{print $2}' | tr '\n' ' ')
  returned="(return not observable: soft-RoCE's CM queue pair on ${cm_broken}went to error, a kernel fault, see CONFORMANCE.md)"
fi
back="RDMA channels up again $returned"
[ -n "$cm_broken" ] && back=$returned
if clean "$LOGS/rdma-blackhole.log" && [ -n "$returned" ] &&
   grep -Eq "[1-9][0-9]* (resent|failed over)" "$LOGS/rdma-blackhole.log"; then
  ok "RDMA path silent 10 s under load: its IO was resent over TCP (0 verification failures, 0 IO errors), $back"
else
  fail "RDMA path blackholed: $rdma_never_up $(tail -10 "$LOGS/rdma-blackhole.log") qp: $(cat "$LOGS/rdma-blackhole-qp.txt" 2>/dev/null)"
fi

step "7. the RDMA link down under load (last: soft-RoCE in this kernel leaves its CM queue pair in error after a port flap with MADs in flight, so no RDMA connection works after it)"
under_fault linkdown "$RDMA2" "ip link set vC down" "ip link set vC up"
if clean "$LOGS/rdma-linkdown.log" && grep -Eq "[1-9][0-9]* (resent|failed over)" "$LOGS/rdma-linkdown.log"; then
  ok "ip link set down of the RDMA link for 10 s under load: its IO failed over to TCP, 0 verification failures, 0 IO errors"
else
  fail "RDMA link down: $rdma_never_up $(tail -10 "$LOGS/rdma-linkdown.log")"
fi

# Soft-RoCE under loss was seen to complete an RDMA READ as a success,
# with its byte count, while no data reached the destination (the server
# marks each fetch's memory in builds with debug assertions, as here, and
# logs any fetch that leaves the marks). The payload CRC must refuse every
# such fetch, and the client send it again: what the verify runs above
# proved stored. A run where the kernel lost none shows it as a figure.
lost=$(tail -n +"$serve_log_from" "$LOGS/rdma-serve.log" | grep -c "RDMA READ reported success but its data did not land")
"$BRAID" status --control "$WORK/srv/control.sock" >"$LOGS/rdma-serve-status-end.txt" 2>&1
refused=$(grep -o "corrupt payloads refused *[0-9]*" "$LOGS/rdma-serve-status-end.txt" | grep -o "[0-9]*$")
if [ "$lost" -eq 0 ]; then
  echo "figure rdma: no RDMA READ completed without its data in this run (corrupt payloads refused: ${refused:-?})"
elif [ "${refused:-0}" -ge "$lost" ]; then
  ok "soft-RoCE completed $lost RDMA READ(s) whose data never landed; braid's payload CRC refused them ($refused corrupt payloads refused) and the writes were sent again: 0 verification failures"
else
  fail "$lost RDMA READ(s) completed without their data but only ${refused:-0} payloads were refused: $(cat "$LOGS/rdma-serve-status-end.txt")"
fi

kill "$SERVER" 2>/dev/null
wait "$SERVER" 2>/dev/null
rdma link delete rxeA; rdma link delete rxeB; ip link del vA
exit $FAILED
