#!/usr/bin/env bash
# bench/allocations.sh [BLOBFS]: heap allocations per FUSE request in steady state.
#
# Mounts blobfs (release build by default) on a preallocated image with
# BLOBFS_COUNT_ALLOCATIONS=1 (the daemon preloads the malloc interposer and logs, every
# 5 s, the allocations and the requests by kind of that window) and
# entry_timeout=0,attr_timeout=0 (so every stat reaches the daemon), then runs, one at a
# time, 11 s each: fio 4 KiB random reads and random writes (io_uring, qd32, direct), and
# a loop of stat() calls on one file (LOOKUP + GETATTR). Prints, for each, the windows
# that saw only that workload's requests. Every mount is undone on exit.
set -uo pipefail
cd "$(dirname "$0")/.."
BLOBFS=${1:-$PWD/.build/release/blobfs}
work=$(mktemp -d /var/tmp/blobfs-alloc.XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt"
cleanup() {
  mountpoint -q "$mnt" && { "$BLOBFS" unmount "$mnt" >/dev/null 2>&1 || fusermount3 -u -z "$mnt"; }
  pkill -9 -f "blobfs mount $work" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

"$BLOBFS" mkfs "$work/a.img" --size 2G --preallocate > /dev/null
BLOBFS_COUNT_ALLOCATIONS=1 "$BLOBFS" mount "$work/a.img" "$mnt" -o entry_timeout=0,attr_timeout=0 \
  --log "$work/daemon.log" | sed 's/^/  /'
fio --name=prep --filename="$mnt/fio.dat" --size=256M --rw=write --bs=1M --direct=1 --ioengine=psync --output=/dev/null
sleep 6  # the window that saw the layout passes

run() {  # run NAME COMMAND...: the workload, then the windows it alone filled
  local name=$1; shift
  local before; before=$(grep -c "allocations:" "$work/daemon.log")
  "$@" > /dev/null
  sleep 6
  echo "$name:"
  grep "allocations:" "$work/daemon.log" | tail -n +$((before + 1)) | sed 's/.*allocations: /  /'
}
run "4 KiB randread, io_uring qd32, direct" fio --name=r --filename="$mnt/fio.dat" --size=256M --rw=randread \
  --bs=4k --direct=1 --ioengine=io_uring --iodepth=32 --runtime=11 --time_based
run "4 KiB randwrite, io_uring qd32, direct" fio --name=w --filename="$mnt/fio.dat" --size=256M --rw=randwrite \
  --bs=4k --direct=1 --ioengine=io_uring --iodepth=32 --runtime=11 --time_based
run "stat() of one file (LOOKUP + GETATTR)" python3 -c "
import os, time
end = time.monotonic() + 11
while time.monotonic() < end:
    for _ in range(1000):
        os.stat('$mnt/fio.dat')
"
