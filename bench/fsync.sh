#!/usr/bin/env bash
# 4 KiB write + fsync(2) after each (bench/fio/fsync-write.fio, psync, qd1), buffered and
# direct, through a blobfs mount of a preallocated image file on this machine's file
# system (file:IMAGE, io_uring) and on a raw file beside it, interleaved: each BLOBFS
# binary given and the raw file take turns, ROUNDS times. Reports IOPS, fsync p50/p99,
# each blobfs row's ratio to the raw file of the same round, and the device writes and
# flushes per fsync (blobfs stats).
#   bench/fsync.sh [ROUNDS] [SECONDS] [BLOBFS...]   (default: this tree's release build)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} seconds=${2:-5}
shift $(( $# > 2 ? 2 : $# ))
if [ $# -eq 0 ]; then
  swift build -c release --product blobfs > /dev/null
  set -- "$PWD/.build/release/blobfs"
fi
work=$(mktemp -d /var/tmp/fsync-bench.XXXXXX)
trap 'mountpoint -q "$work/mnt" && fusermount3 -u -z "$work/mnt"; rm -rf "$work"' EXIT
mkdir -p "$work/mnt" "$work/raw"

# fio_fsync DIR DIRECT: "IOPS P50_US P99_US" of one run
fio_fsync() {
  FIO_FILE=$1/fio.dat FIO_SIZE=256M FIO_ENGINE=psync FIO_IODEPTH=1 FIO_NUMJOBS=1 FIO_DIRECT=$2 \
    FIO_RUNTIME=$seconds FIO_RAMP=1 fio --output-format=json bench/fio/fsync-write.fio > "$work/fio.json"
  python3 - "$work/fio.json" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
sync = job["sync"]["lat_ns"]["percentile"]
print("%.0f %.0f %.0f" % (job["write"]["iops"], sync["50.000000"] / 1000, sync["99.000000"] / 1000))
PY
}

# device writes and flushes so far, from the mount's statistics
device_counts() {
  "$1" stats "$work/mnt" --json | python3 -c 'import json, sys; d = json.load(sys.stdin)["device"]; print(d["writes"], d["flushes"])'
}

echo "| target | direct | round | IOPS | fsync p50 us | fsync p99 us | IOPS / raw | device writes / fsync | flushes / fsync |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|"
for direct in 0 1; do
  for round in $(seq "$rounds"); do
    read -r raw_iops raw_p50 raw_p99 < <(fio_fsync "$work/raw" "$direct")
    echo "| raw file | $direct | $round | $raw_iops | $raw_p50 | $raw_p99 | 1 | | |"
    for blobfs in "$@"; do
      rm -f "$work/b.img"
      "$blobfs" mkfs "$work/b.img" --size 2G --preallocate > /dev/null 2>&1
      "$blobfs" mount "file:$work/b.img" "$work/mnt" > /dev/null
      # lay the file out first so the counts cover the measured overwrites only
      FIO_FILE=$work/mnt/fio.dat FIO_SIZE=256M fio bench/fio/layout.fio > /dev/null
      read -r writes0 flushes0 < <(device_counts "$blobfs")
      read -r iops p50 p99 < <(fio_fsync "$work/mnt" "$direct")
      read -r writes1 flushes1 < <(device_counts "$blobfs")
      "$blobfs" unmount "$work/mnt"
      for _ in $(seq 50); do mountpoint -q "$work/mnt" || break; sleep 0.1; done
      fsyncs=$(python3 -c "print(max(1, round($iops * ($seconds + 1))))")
      python3 - "$blobfs" "$direct" "$round" "$iops" "$p50" "$p99" "$raw_iops" "$((writes1 - writes0))" "$((flushes1 - flushes0))" "$fsyncs" <<'PY'
import sys
b, d, r, iops, p50, p99, raw, writes, flushes, fsyncs = sys.argv[1:]
# the ramp's fsyncs are in the counts too: divide by the fsyncs of runtime + ramp
print(f"| {b} | {d} | {r} | {iops} | {p50} | {p99} | {float(iops) / float(raw):.2f} | {int(writes) / int(fsyncs):.2f} | {int(flushes) / int(fsyncs):.2f} |")
PY
    done
  done
done
