#!/usr/bin/env bash
# Small files through the mount: COUNT (default 20,000) files of 4 KiB in 20 directories
# created by one Python process on a fresh image (sparse, then preallocated), the
# unmount after, and fsck. Each BLOBFS binary given is run in turn, ROUNDS times
# (alternating), for a side by side in one run.
#   bench/small-files.sh [COUNT] [ROUNDS] [BLOBFS...]   (default: this tree's release build)
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-20000} rounds=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
if [ $# -eq 0 ]; then
  swift build -c release --product blobfs > /dev/null
  set -- "$PWD/.build/release/blobfs"
fi
work=$(mktemp -d /var/tmp/small-files.XXXXXX)
trap 'mountpoint -q "$work/mnt" && fusermount3 -u -z "$work/mnt"; rm -rf "$work"' EXIT
mkdir -p "$work/mnt"
echo "| blobfs | image | round | create (s) | unmount (s) | fsck |"
echo "|---|---|---|---:|---:|---|"
for image in sparse preallocated; do
  extra=""; [ $image = preallocated ] && extra=--preallocate
  for round in $(seq "$rounds"); do
    for blobfs in "$@"; do
      rm -f "$work/p.img"
      "$blobfs" mkfs "$work/p.img" --size 16G $extra > /dev/null 2>&1
      "$blobfs" mount "$work/p.img" "$work/mnt" > /dev/null
      created=$(python3 - "$work/mnt" "$count" <<'PY'
import os, sys, time
root, count = sys.argv[1], int(sys.argv[2])
block = b"x" * 4096
start = time.monotonic()
for d in range(20):
    os.mkdir(os.path.join(root, f"d{d:02d}"))
for i in range(count):
    with open(os.path.join(root, f"d{i % 20:02d}", f"f{i:06d}"), "wb") as f:
        f.write(block)
print(f"{time.monotonic() - start:.2f}")
PY
)
      start=$(date +%s.%N)
      "$blobfs" unmount "$work/mnt"
      unmounted=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
      if "$blobfs" fsck "$work/p.img" > /dev/null 2>&1; then fsck=clean; else fsck="NOT clean"; fi
      echo "| $blobfs | $image | $round | $created | $unmounted | $fsck |"
    done
  done
done
