#!/usr/bin/env bash
# Creates through the mount (issue 20, part 4): COUNT empty files (default 100,000) in
# COUNT/1000 directories, created by the loop of bench/million-files.sh
# (os.close(os.open(path, O_CREAT | O_WRONLY, 0o644)), directories taken in turn), on a
# fresh sparse image for each BLOBFS binary given and on libfuse's passthrough_ll over
# a directory of the file system /var/tmp is on (ext4 here), ROUNDS times, alternating.
# Prints one Markdown row per run: files/s of the create loop alone (the mkdirs are not
# timed), and for blobfs the daemon's CPU time (its threads' run time, /proc/PID/task/*/schedstat) per create
# over the loop and the FUSE requests the loop sent (from `blobfs stats`: count and mean
# latency in the daemon per opcode).
#   bench/creates.sh [COUNT] [ROUNDS] [BLOBFS...]   (default: this tree's release build)
# passthrough_ll runs only when COUNT is at least 1000 below the open-file limit
# (`ulimit -n`: it holds a descriptor per inode the kernel has not forgotten).
# PIN=same runs the daemon and the loop on CPU 1, PIN=split the daemon on CPU 0 and the
# loop on CPU 1 (taskset); unset, the scheduler places them (as bench/million-files.sh).
# PASSTHROUGH=path/to/passthrough_ll (default: compiled from libfuse3-dev's examples
# into the work directory, as bench/run does); PASSTHROUGH=none skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-100000} rounds=${2:-3}
shift $(( $# > 2 ? 2 : $# ))
if [ $# -eq 0 ]; then
  swift build -c release --product blobfs > /dev/null
  set -- "$PWD/.build/release/blobfs"
fi
work=$(mktemp -d /var/tmp/creates.XXXXXX)
pt_pid=""
cleanup() {
  set +e
  if mountpoint -q "$work/mnt"; then fusermount3 -u "$work/mnt" 2>/dev/null || fusermount3 -u -z "$work/mnt"; fi
  if [ -n "$pt_pid" ]; then kill "$pt_pid" 2>/dev/null; wait "$pt_pid" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/mnt"
passthrough=${PASSTHROUGH:-}
if [ -z "$passthrough" ]; then
  ex=/usr/share/doc/libfuse3-dev/examples passthrough=$work/passthrough_ll
  gcc -O2 -Wall -DHAVE_FALLOCATE -DHAVE_POSIX_FALLOCATE -DHAVE_COPY_FILE_RANGE -I"$ex" "$ex/passthrough_ll.c" \
    -o "$passthrough" $(pkg-config --cflags --libs fuse3)
fi

case ${PIN:-} in
  same) daemon_cpu=(taskset -c 1) loop_cpu=(taskset -c 1) ;;
  split) daemon_cpu=(taskset -c 0) loop_cpu=(taskset -c 1) ;;
  "") daemon_cpu=() loop_cpu=() ;;
  *) echo "PIN=same or split" >&2; exit 2 ;;
esac

create_loop() {  # ROOT -> files/s of the create loop
  "${loop_cpu[@]}" python3 - "$1" "$count" <<'PY'
import os, sys, time
root, count = sys.argv[1], int(sys.argv[2])
directories = max(1, count // 1000)
for d in range(directories):
    os.mkdir(os.path.join(root, f"d{d:04d}"))
start = time.monotonic()
for i in range(count):
    os.close(os.open(os.path.join(root, f"d{i % directories:04d}", f"f{i:07d}"), os.O_CREAT | os.O_WRONLY, 0o644))
print(round(count / (time.monotonic() - start)))
PY
}

cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{ns += $1} END {print ns}'; }  # run time of all its threads

requests() {  # the stats JSON on stdin -> "OP count mean-us" for opcodes answered 100+ times
  python3 -c '
import json, sys
out = []
for o in json.load(sys.stdin)["operations"]:
    if o["answered"] >= 100:
        out.append("%s %d %.1f" % (o["op"], o["answered"], o["latency_us"]["mean"]))
print(", ".join(out))
'
}

echo "| target | round | files/s | daemon CPU per create (us) | requests (opcode count mean-us in daemon) |"
echo "|---|---:|---:|---:|---|"
for round in $(seq "$rounds"); do
  for blobfs in "$@"; do
    rm -f "$work/c.img"
    "$blobfs" mkfs "$work/c.img" --size 16G > /dev/null
    "${daemon_cpu[@]}" "$blobfs" mount "$work/c.img" "$work/mnt" > /dev/null
    daemon=$(pgrep -f "blobfs mount $work/c.img" | head -1)
    cpu_before=$(cpu_ns "$daemon")
    rate=$(create_loop "$work/mnt")
    cpu_us=$(python3 -c "print(f'{($(cpu_ns "$daemon") - $cpu_before) / 1000 / $count:.1f}')")
    stats=$("$blobfs" stats "$work/mnt" --json 2>/dev/null | requests 2>/dev/null || echo "?")
    "$blobfs" unmount "$work/mnt"
    for _ in $(seq 100); do mountpoint -q "$work/mnt" || break; sleep 0.1; done
    echo "| $blobfs | $round | $rate | $cpu_us | $stats |"
  done
  # passthrough_ll keeps an O_PATH descriptor per inode the kernel knows: more files
  # than the open-file limit fail (EMFILE, seen as EBADF), so it runs at that limit
  if [ "$passthrough" != none ] && [ "$count" -le $(( $(ulimit -n) - 1000 )) ]; then
    rm -rf "$work/src"; mkdir -p "$work/src"
    "${daemon_cpu[@]}" "$passthrough" -f -o "source=$work/src" "$work/mnt" & pt_pid=$!
    for _ in $(seq 100); do mountpoint -q "$work/mnt" && break; sleep 0.05; done
    rate=$(create_loop "$work/mnt")
    fusermount3 -u "$work/mnt"; wait "$pt_pid" || true; pt_pid=""
    echo "| passthrough_ll over $(findmnt -n -o FSTYPE -T "$work") | $round | $rate | | |"
  fi
done
