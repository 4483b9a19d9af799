#!/usr/bin/env bash
# bench/stats-overhead.sh: the request path with statistics kept (the default: per-opcode
# latency histograms, device counters) against `-o no_stats`, side by side. Two
# preallocated images are mounted at once, one each way; for each job, short fio runs
# alternate between the two mounts in ABBA order (A B B A A B ...) so that the machine's
# drift and the other users of its cores hit both alike, and each adjacent pair gives a
# ratio. Reported per job: the median of the pairs' ratios (on / off) for IOPS and for
# the daemon's CPU time per request (its threads' run time from /proc/PID/task/*/schedstat,
# over the requests fio completed), and the spread of the pairs (first and third quartiles).
# Writes bench/results/stats-overhead-DATE.md.
#
#   bench/stats-overhead.sh [--pairs N] [--runtime S] [--bin PATH/TO/blobfs]
#
# Default binary: .build-bench/release/blobfs (as bench/run builds it: swift build -c
# release --product blobfs --build-path .build-bench). Every mount is undone on exit.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PAIRS=12 RUNTIME=2 BLOBFS=$ROOT/.build-bench/release/blobfs
while [ $# -gt 0 ]; do
  case $1 in
    --pairs) PAIRS=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --bin) BLOBFS=$2; shift 2 ;;
    *) echo "usage: bench/stats-overhead.sh [--pairs N] [--runtime S] [--bin BLOBFS]" >&2; exit 2 ;;
  esac
done
work=$ROOT/bench/work/stats-overhead
mkdir -p "$work/on" "$work/off"
cleanup() {
  for mode in on off; do
    mountpoint -q "$work/$mode" && { "$BLOBFS" unmount "$work/$mode" 2>/dev/null || fusermount3 -u -z "$work/$mode"; }
  done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
[ -w /sys/module/fuse/parameters/enable_uring ] && echo Y > /sys/module/fuse/parameters/enable_uring
declare -A pid
for mode in on off; do
  options=allow_other
  [ $mode = off ] && options+=,no_stats
  "$BLOBFS" mkfs "$work/$mode.img" --size 2G --preallocate --force > /dev/null || exit 1
  "$BLOBFS" mount "$work/$mode.img" "$work/$mode" -o "$options" --log "$work/daemon-$mode.log" > /dev/null || exit 1
  pid[$mode]=$(pgrep -f "blobfs mount $work/$mode.img" | head -n 1)
  fio --name=layout --filename="$work/$mode/fio.dat" --size=1G --rw=write --bs=1M --direct=1 --ioengine=psync \
    --output=/dev/null || exit 1
done
cpu_ns() {  # CPU time of every thread of a process, in ns (schedstat: the scheduler's own count)
  cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ sum += $1 } END { printf "%.0f\n", sum }'
}
# The per-request cost shows most where requests are small and many.
JOBS=("randread 4k io_uring 16" "randwrite 4k io_uring 16" "randread 4k psync 1")
results=$work/results.txt
: > "$results"
for job in "${JOBS[@]}"; do
  set -- $job
  name=$1-$2-$3-qd$4
  for index in $(seq 0 $((2 * PAIRS - 1))); do
    # ABBA: pair p is runs 2p and 2p+1; which mount goes first alternates per pair.
    pair=$((index / 2))
    if [ $(((index + pair) % 2)) -eq 0 ]; then mode=on; else mode=off; fi
    before=$(cpu_ns "${pid[$mode]}")
    fio --name=j --filename="$work/$mode/fio.dat" --size=1G --rw="$1" --bs="$2" --ioengine="$3" --iodepth="$4" --direct=1 \
      --time_based --runtime="$RUNTIME" --output-format=json --output="$work/fio.json" || exit 1
    after=$(cpu_ns "${pid[$mode]}")
    read -r iops ios < <(python3 -c "
import json; j = json.load(open('$work/fio.json'))['jobs'][0]
print(round(j['read']['iops'] + j['write']['iops']), j['read']['total_ios'] + j['write']['total_ios'])")
    echo "$name $pair $mode $iops $(( (after - before) / (ios > 0 ? ios : 1) ))" | tee -a "$results"
  done
done
# Both at once: the same job on both mounts in the same seconds, so both see the same
# machine; with the cores shared evenly, the cheaper path completes more requests.
concurrent=$work/concurrent.txt
: > "$concurrent"
for job in "${JOBS[@]}"; do
  set -- $job
  for index in $(seq 0 $((PAIRS / 2 - 1))); do
    for mode in on off; do
      fio --name=j --filename="$work/$mode/fio.dat" --size=1G --rw="$1" --bs="$2" --ioengine="$3" --iodepth="$4" --direct=1 \
        --time_based --runtime=$((2 * RUNTIME)) --output-format=json --output="$work/fio-$mode.json" &
    done
    wait
    echo "$1-$2-$3-qd$4 $index $(python3 -c "
import json
def iops(mode):
    j = json.load(open('$work/fio-' + mode + '.json'))['jobs'][0]
    return j['read']['iops'] + j['write']['iops']
print(round(iops('on')), round(iops('off')))")" | tee -a "$concurrent"
  done
done
out=$ROOT/bench/results/stats-overhead-$(date +%Y-%m-%d).md
python3 - "$results" "$out" "$PAIRS" "$RUNTIME" "$(git -C "$ROOT" rev-parse --short HEAD)" "$(uptime)" "$concurrent" <<'EOF'
import statistics, sys
results, out, pairs, runtime, commit, load, concurrent = sys.argv[1:]
rows = [line.split() for line in open(results)]
jobs = []
for row in rows:
    if row[0] not in jobs: jobs.append(row[0])
def quartiles(values):
    values = sorted(values)
    return values[len(values) // 4], statistics.median(values), values[(3 * len(values)) // 4]
lines = [f"# Statistics kept against -o no_stats (commit {commit})", "",
         f"`bench/stats-overhead.sh --pairs {pairs} --runtime {runtime}`: two preallocated 2 GiB images mounted at once, "
         "one with statistics (the default), one with `-o no_stats`; per job, fio runs of "
         f"{runtime} s (direct I/O on a 1 GiB file) alternate between the mounts in ABBA order; each adjacent pair gives "
         "a ratio on / off. IOPS ratio above 1 and CPU ratio below 1 favour statistics kept. Daemon CPU per request: "
         "its threads' run time (/proc/PID/task/*/schedstat) over fio's completed requests.", "",
         f"Machine load when it ended: `{load.strip()}` (2 cores shared with other users: single runs swing by tens of per cent).", "",
         "| job | median IOPS on | median IOPS off | IOPS ratio on/off: median (quartiles) | daemon CPU µs/request on | off | CPU ratio: median (quartiles) |",
         "|---|---|---|---|---|---|---|"]
for job in jobs:
    on = {int(r[1]): (int(r[3]), int(r[4])) for r in rows if r[0] == job and r[2] == "on"}
    off = {int(r[1]): (int(r[3]), int(r[4])) for r in rows if r[0] == job and r[2] == "off"}
    pairs_seen = sorted(set(on) & set(off))
    iops_ratios = [on[p][0] / off[p][0] for p in pairs_seen if off[p][0] > 0]
    cpu_ratios = [on[p][1] / off[p][1] for p in pairs_seen if off[p][1] > 0]
    q1, med, q3 = quartiles(iops_ratios)
    c1, cmed, c3 = quartiles(cpu_ratios) if cpu_ratios else (0, 0, 0)
    lines.append(f"| {job} | {statistics.median(v[0] for v in on.values()):.0f} | {statistics.median(v[0] for v in off.values()):.0f} "
                 f"| {med:.3f} ({q1:.3f} – {q3:.3f}) | {statistics.median(v[1] for v in on.values()) / 1000:.1f} "
                 f"| {statistics.median(v[1] for v in off.values()) / 1000:.1f} | {cmed:.3f} ({c1:.3f} – {c3:.3f}) |")
lines += ["", f"Both mounts at once (the same job on each, {2 * int(runtime)} s, {int(pairs) // 2} times): IOPS on / off of each run.", "",
          "| job | median IOPS on | median IOPS off | ratio on/off: median (quartiles) |", "|---|---|---|---|"]
both = [line.split() for line in open(concurrent)]
for job in jobs:
    runs = [(int(r[2]), int(r[3])) for r in both if r[0] == job]
    if not runs: continue
    q1, med, q3 = quartiles([a / b for a, b in runs if b > 0])
    lines.append(f"| {job} | {statistics.median(a for a, _ in runs):.0f} | {statistics.median(b for _, b in runs):.0f} "
                 f"| {med:.3f} ({q1:.3f} – {q3:.3f}) |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
