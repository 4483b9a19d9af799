#!/usr/bin/env bash
# Many files through the mount (issue 20's table): COUNT empty files (default 1,000,000)
# in COUNT/1000 directories created by one Python loop on a fresh sparse image, then:
# the daemon's RSS after creating them, the unmount, a clean mount (time and RSS before
# any file is touched), the image's allocated bytes, a `find -type f | xargs stat` walk
# (RSS after), and a kill -9 with SMALL (default COUNT/10) small creates still in the log
# followed by a mount (the replay). blobcli info / list / fsck on the image at the end.
#   bench/million-files.sh [COUNT] [SIZE] [BLOBFS]   (default 1000000, 16G, this tree's release build)
# Prints a Markdown table; run it with `| tee bench/results/million-files-DATE.md`.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-1000000} size=${2:-16G}
blobfs=${3:-}
if [ -z "$blobfs" ]; then
  swift build -c release --product blobfs --product blobcli > /dev/null
  blobfs=$PWD/.build/release/blobfs
fi
blobcli=$(dirname "$blobfs")/blobcli
small=${SMALL:-$((count / 10))}
work=$(mktemp -d /var/tmp/million-files.XXXXXX)
daemon_pid() { pgrep -f "blobfs mount .*$work/mnt" | head -1; }
cleanup() {
  mountpoint -q "$work/mnt" && { "$blobfs" unmount "$work/mnt" 2>/dev/null || fusermount3 -u -z "$work/mnt"; }
  for pid in $(pgrep -f "blobfs mount .*$work/mnt"); do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/mnt"
img=$work/m.img
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(now)"; }
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
mount_timed() {  # prints seconds; the mount returns once the file system answers
  local start; start=$(now)
  "$blobfs" mount "$img" "$work/mnt" > /dev/null
  since "$start"
}
wait_unmounted() { for _ in $(seq 300); do pgrep -f "blobfs mount .*$work/mnt" > /dev/null || return 0; sleep 0.1; done; }

"$blobfs" mkfs "$img" --size "$size" > /dev/null
"$blobfs" mount "$img" "$work/mnt" > /dev/null
start=$(now)
python3 - "$work/mnt" "$count" <<'PY'
import os, sys
root, count = sys.argv[1], int(sys.argv[2])
directories = max(1, count // 1000)
for d in range(directories):
    os.mkdir(os.path.join(root, f"d{d:04d}"))
for i in range(count):
    os.close(os.open(os.path.join(root, f"d{i % directories:04d}", f"f{i:07d}"), os.O_CREAT | os.O_WRONLY, 0o644))
PY
created=$(since "$start")
rss_created=$(rss_mb "$(daemon_pid)")
start=$(now); "$blobfs" unmount "$work/mnt"; wait_unmounted; unmounted=$(since "$start")
allocated_mb=$(du -m "$img" | cut -f1)
mounted=$(mount_timed)
rss_mounted=$(rss_mb "$(daemon_pid)")
start=$(now)
find "$work/mnt" -type f -print0 | xargs -0 stat --format=%i > /dev/null
walked=$(since "$start")
rss_walked=$(rss_mb "$(daemon_pid)")
# small creates left in the log by kill -9 (fsync'd as a whole by one directory fsync)
python3 - "$work/mnt" "$small" <<'PY'
import os, sys
root, count = sys.argv[1], int(sys.argv[2])
os.mkdir(os.path.join(root, "late"))
for i in range(count):
    os.close(os.open(os.path.join(root, "late", f"s{i:07d}"), os.O_CREAT | os.O_WRONLY, 0o644))
fd = os.open(os.path.join(root, "late"), os.O_RDONLY | os.O_DIRECTORY)
os.fsync(fd)
os.close(fd)
PY
kill -9 "$(daemon_pid)"; wait_unmounted
fusermount3 -u -z "$work/mnt" 2>/dev/null || true
recovered=$(mount_timed)
late=$(find "$work/mnt/late" -type f | wc -l)
"$blobfs" unmount "$work/mnt"; wait_unmounted
timed() { local start; start=$(now); "$@" > /dev/null 2>&1 || true; since "$start"; }
info=$(timed "$blobcli" info "$img")
list=$(timed "$blobcli" list "$img")
fsck_s=$(timed "$blobcli" fsck "$img")
fsck_result=$("$blobcli" fsck "$img" > /dev/null 2>&1 && echo clean || echo "NOT clean")

echo "| measure ($count empty files in $((count > 1000 ? count / 1000 : 1)) directories, $size sparse image) | value |"
echo "|---|---:|"
echo "| creating them (s) | $created ($(python3 -c "print(round($count / $created))") files/s) |"
echo "| daemon RSS right after creating them (MB) | $rss_created |"
echo "| unmount (s) | $unmounted |"
echo "| image space used (MB, du) | $allocated_mb |"
echo "| clean mount (s) | $mounted |"
echo "| daemon RSS after the mount, nothing touched (MB) | $rss_mounted |"
echo "| find -type f + stat of every file (s) | $walked |"
echo "| daemon RSS after that walk (MB) | $rss_walked |"
echo "| mount after kill -9 with $small small creates in the log (s) | $recovered ($late of $small files back) |"
echo "| blobcli info / list / fsck (s) | $info / $list / $fsck_s ($fsck_result) |"
echo
echo "Command: \`bench/million-files.sh $count $size\` ($(basename "$blobfs") at $(git rev-parse --short HEAD), $(nproc) CPUs)."
