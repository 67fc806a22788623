#!/usr/bin/env bash
# Runs as root inside ../shared/tools/vmlab, from `cargo xtask
# conformance`: bash vm.sh BRAID_BINARY LOG_DIR. Every kernel-side check
# in one boot; each script prints its own ok/FAIL rows, and the exit
# status is 1 if either failed.
here=$(dirname "$0")
bash "$here/kernel_nbd.sh" "$1" "$2"; nbd=$?
bash "$here/ublk.sh" "$1" "$2"; ublk=$?
bash "$here/rdma.sh" "$1" "$2"; rdma=$?
exit $((nbd | ublk | rdma))
