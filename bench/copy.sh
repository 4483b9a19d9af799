#!/usr/bin/env bash
# Instant copies (issue 14): on a blobfs mount of a preallocated image file (file:IMAGE),
# a file of SIZE is copied with cp and with copy_file_range, and reports
#   - the time of each copy, and the clusters it took (df before and after);
#   - the time of the first 4 KiB write to a copy's shared cluster against a write to one
#     of its own (the copy-on-write cost);
#   - 4 KiB random reads (fio, io_uring, qd32, direct) of a file that shares nothing and
#     of a copy (every read goes through the shared snapshot), alternating ROUNDS times,
#     and the ratio copy / unshared.
# Beside it the same cp on the image's own file system (the raw copy a user would
# otherwise make).
#   bench/copy.sh [SIZE] [ROUNDS] [SECONDS] [BLOBFS]   (default: 1G 3 5, this tree's release build)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1G} rounds=${2:-3} seconds=${3:-5}
blobfs=${4:-}
if [ -z "$blobfs" ]; then
  swift build -c release --product blobfs > /dev/null
  blobfs=$PWD/.build/release/blobfs
fi
work=$(mktemp -d /var/tmp/copy-bench.XXXXXX)
trap 'mountpoint -q "$work/mnt" && fusermount3 -u -z "$work/mnt"; rm -rf "$work"' EXIT
mkdir -p "$work/mnt" "$work/raw"

used_kib() { df -k --output=used "$1" | tail -1 | tr -d ' '; }
now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{($2 - $1) * 1000:.1f}')" ; }

"$blobfs" mkfs "$work/b.img" --size 4G --preallocate > /dev/null 2>&1
"$blobfs" mount "file:$work/b.img" "$work/mnt" > /dev/null
FIO_FILE=$work/mnt/orig FIO_SIZE=$size fio bench/fio/layout.fio > /dev/null
FIO_FILE=$work/mnt/plain FIO_SIZE=$size fio bench/fio/layout.fio > /dev/null
sync -f "$work/mnt"

echo "| copy | ms | df used before KiB | after KiB | clusters taken |"
echo "|---|---:|---:|---:|---:|"
before=$(used_kib "$work/mnt"); t0=$(now)
cp "$work/mnt/orig" "$work/mnt/copy-cp"
sync -f "$work/mnt"; t1=$(now); after=$(used_kib "$work/mnt")
echo "| blobfs: cp (and syncfs) | $(elapsed "$t0" "$t1") | $before | $after | $(( (after - before) / 4 )) |"
before=$after; t0=$(now)
python3 -c "
import os, sys
s = os.open(sys.argv[1], os.O_RDONLY); d = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o644)
while os.copy_file_range(s, d, 1 << 30): pass
os.fsync(d)" "$work/mnt/orig" "$work/mnt/copy-cfr"
t1=$(now); after=$(used_kib "$work/mnt")
echo "| blobfs: copy_file_range + fsync | $(elapsed "$t0" "$t1") | $before | $after | $(( (after - before) / 4 )) |"
cmp "$work/mnt/orig" "$work/mnt/copy-cp"
cmp "$work/mnt/orig" "$work/mnt/copy-cfr"
FIO_FILE=$work/raw/orig FIO_SIZE=$size fio bench/fio/layout.fio > /dev/null
t0=$(now); cp "$work/raw/orig" "$work/raw/copy"; sync -f "$work/raw"; t1=$(now)
echo "| $(df --output=fstype "$work/raw" | tail -1): cp (and syncfs) | $(elapsed "$t0" "$t1") | | | |"

echo
echo "| first write (4 KiB, O_DIRECT, then fsync) | us |"
echo "|---|---:|"
python3 - "$work/mnt/copy-cp" <<'PY'
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096); buf.write(b"w" * 4096)
def timed(offset):
    start = time.perf_counter(); os.pwrite(fd, buf, offset); os.fsync(fd)
    return (time.perf_counter() - start) * 1e6
shared = [timed(off) for off in (1 << 20, 2 << 20, 3 << 20, 4 << 20, 5 << 20)]
own = [timed(off) for off in (1 << 20, 2 << 20, 3 << 20, 4 << 20, 5 << 20)]
print(f"| to a shared cluster (copied first), median of 5 | {sorted(shared)[2]:.0f} |")
print(f"| the same clusters again (its own now), median of 5 | {sorted(own)[2]:.0f} |")
PY

echo
echo "| round | target | 4 KiB randread qd32 IOPS | copy / unshared |"
echo "|---|---|---:|---:|"
randread() {
  FIO_FILE=$1 FIO_SIZE=$size FIO_ENGINE=io_uring FIO_IODEPTH=32 FIO_NUMJOBS=1 FIO_DIRECT=1 \
    FIO_RUNTIME=$seconds FIO_RAMP=1 fio --output-format=json bench/fio/rand-read.fio \
    | python3 -c 'import json, sys; print("%.0f" % json.load(sys.stdin)["jobs"][0]["read"]["iops"])'
}
for round in $(seq "$rounds"); do
  original=$(randread "$work/mnt/plain")
  echo "| $round | unshared file | $original | |"
  copy=$(randread "$work/mnt/copy-cfr")
  echo "| $round | copy (reads the snapshot) | $copy | $(python3 -c "print(f'{$copy / $original:.2f}')") |"
done
"$blobfs" unmount "$work/mnt"
for _ in $(seq 50); do mountpoint -q "$work/mnt" || break; sleep 0.1; done
"$blobfs" fsck "$work/b.img" | tail -1
