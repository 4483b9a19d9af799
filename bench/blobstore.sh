#!/usr/bin/env bash
# Blob-store measurements: format time and recovery time (against the length of log
# since the checkpoint) on a 1 TiB sparse image file, and how many 4 KiB blobs a 1 GiB
# store holds. Writes bench/results/blobstore-DATE.md with every command.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps
swift build -c release --product blobbench 2>&1 | tail -n 1
bin=$(swift build -c release --show-bin-path)/blobbench
mkdir -p bench/work bench/results
image=bench/work/blobstore-1t.img
small=bench/work/blobstore-small.img
out=bench/results/blobstore-$(date +%Y-%m-%d).md
run() { echo "\$ blobbench ${*}" >> "$out.tmp"; echo '```' >> "$out.tmp"; "$bin" "$@" 2>/dev/null >> "$out.tmp"; echo '```' >> "$out.tmp"; echo >> "$out.tmp"; }
{
  echo "# Blob store measurements, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r); image files on $(df -T bench/work | awk 'NR==2{print $2}') (virtio disk)."
  echo "Produced by \`bench/blobstore.sh\`. The store is driven synchronously from one thread (the metadata engine). Recovery: load after an unclean stop with that much log since the checkpoint (the default log of a 1 TiB store is 64 MiB, and 60 MiB is the longest tail that does not force a checkpoint; the second run formats a 128 MiB log, \`blobfs mkfs --log-size 128M\`, to replay 64 MiB). Small objects: a default-formatted store (metadata pages past the region go to data clusters), then one formatted with a region for all of them, then the default on an image file (io_uring; each create and write is a flushed commit, so this is fdatasync-bound) and the time to load it read-only (what a mount reads: the table, every chain)."
  echo
} > "$out.tmp"
run format-time --device "file:$image" --size 1T
run recovery-time --device "file:$image" --size 1T --log-mib 1,16,60
run recovery-time --device "file:$image" --size 1T --log-size-mib 128 --log-mib 1,16,64
run small-objects --device malloc:1G --count 100000
run small-objects --device malloc:1G --count 100000 --metadata-pages 110000 --blob-ids 100000
# Mount-time cost of many blobs: the same 100,000 on an image file, then loads of it.
run small-objects --device "file:$small" --size 1G --count 100000
run load-time --device "file:$small" --rounds 3
rm -f "$image" "$small"
mv "$out.tmp" "$out"
cat "$out"
