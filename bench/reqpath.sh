#!/usr/bin/env bash
# 4 KiB request-path jobs through blobfs mounts of image files and on the raw file
# beside them, interleaved: the raw file and each BLOBFS binary given (each mounted on
# its own preallocated image, file:IMAGE, all mounted for the whole run) take turns on
# every job, in a rotating order, ROUNDS times. Jobs: random reads io_uring qd32 direct,
# psync qd1 buffered and direct, random writes io_uring qd32 direct (bench/fio). Prints a
# markdown table: IOPS, p50/p99, the ratio to the raw file of the same round, and
# whole-machine CPU per I/O (bench/machine_cpu.py over /proc/stat samples every 50 ms).
#   bench/reqpath.sh [ROUNDS] [SECONDS] [BLOBFS[:OPTIONS]...]   (root; default: .build-bench's)
# A binary may carry mount options after a colon (old:no_reactor_ring).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} seconds=${2:-8}
shift $(( $# > 2 ? 2 : $# ))
[ $# -gt 0 ] || set -- "$PWD/.build-bench/release/blobfs"
size=${REQPATH_SIZE:-1G}
work=$(mktemp -d /var/tmp/reqpath-bench.XXXXXX)
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do mountpoint -q "$m" && { fusermount3 -u "$m" 2>/dev/null || fusermount3 -u -z "$m"; }; done
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/raw"
FIO_FILE=$work/raw/fio.dat FIO_SIZE=$size fio bench/fio/layout.fio > /dev/null

names=(raw) dirs=("$work/raw") bins=("")
index=0
for spec in "$@"; do
  index=$((index + 1))
  blobfs=${spec%%:*} options=""
  [ "$spec" != "$blobfs" ] && options=${spec#*:}
  mkdir -p "$work/m$index"
  "$blobfs" mkfs "$work/b$index.img" --size 2G --preallocate > /dev/null
  "$blobfs" mount "file:$work/b$index.img" "$work/m$index" ${options:+-o "$options"} > "$work/mount$index.txt"
  mounts+=("$work/m$index")
  FIO_FILE=$work/m$index/fio.dat FIO_SIZE=$size fio bench/fio/layout.fio > /dev/null
  names+=("b$index") dirs+=("$work/m$index") bins+=("$blobfs")
  echo "b$index = $spec: $(cat "$work/mount$index.txt")" >&2
done

sample() {  # one /proc/stat sample line, as bench/run's procstat_sample
  local l s=$EPOCHREALTIME
  while read -r l; do [[ $l == cpu* ]] || break; s+="|$l"; done < /proc/stat
  printf '%s\n' "$s"
}
sampler() { local fd; exec {fd}<> <(:); while :; do sample; read -r -t 0.05 -u "$fd" _ || true; done; }

# daemon_op BLOBFS DIR: "ANSWERED MEAN_US" of READ and WRITE together (blobfs stats)
daemon_op() {
  [ -n "$1" ] || { echo "0 0"; return; }
  "$1" stats "$2" --json | python3 -c '
import json, sys
ops = [o for o in json.load(sys.stdin)["operations"] if o["op"] in ("READ", "WRITE")]
n = sum(o["answered"] for o in ops)
print(n, sum(o["answered"] * o["latency_us"]["mean"] for o in ops) / max(1, n))'
}

# run BLOBFS DIR JOB ENGINE DEPTH DIRECT:
#   "IOPS P50_US P99_US MACHINE_US_PER_IO FIO_MEAN_US DAEMON_MEAN_US"
run() {
  local bin=$1; shift
  local fio=$2.fio n0 m0 n1 m1
  read -r n0 m0 < <(daemon_op "$bin" "$1")
  : > "$work/samples"; echo '{}' > "$work/meta.json"
  sample >> "$work/samples"
  sampler >> "$work/samples" & local sampler_pid=$!
  FIO_FILE=$1/fio.dat FIO_SIZE=$size FIO_ENGINE=$3 FIO_IODEPTH=$4 FIO_NUMJOBS=1 FIO_DIRECT=$5 \
    FIO_RUNTIME=$seconds FIO_RAMP=2 fio --output-format=json "bench/fio/$fio" > "$work/fio.json"
  kill "$sampler_pid"; wait "$sampler_pid" 2>/dev/null || true
  sample >> "$work/samples"
  read -r n1 m1 < <(daemon_op "$bin" "$1")
  python3 bench/machine_cpu.py "$work/meta.json" "$work/samples" "$work/fio.json"
  python3 - "$work/fio.json" "$work/meta.json" "$n0" "$m0" "$n1" "$m1" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
side = job["read"] if job["read"]["total_ios"] > 0 else job["write"]
pct = side["clat_ns"]["percentile"] if "clat_ns" in side else side["lat_ns"]["percentile"]
cpu = json.load(open(sys.argv[2])).get("machine_cpu_us_per_io")
n0, m0, n1, m1 = (float(x) for x in sys.argv[3:7])
# the daemon's mean time from a request's receipt to its answer, over this job (ramp included)
daemon = (n1 * m1 - n0 * m0) / (n1 - n0) if n1 > n0 else None
print("%.0f %.0f %.0f %s %.0f %s" % (side["iops"], pct["50.000000"] / 1000, pct["99.000000"] / 1000,
                                     "%.1f" % cpu if cpu is not None else "-", side["lat_ns"]["mean"] / 1000,
                                     "%.0f" % daemon if daemon is not None else "-"))
PY
}

jobs=("rand-read io_uring 32 1" "rand-read psync 1 0" "rand-read psync 1 1" "rand-write io_uring 32 1")
if [ -n "${REQPATH_JOBS:-}" ]; then IFS=, read -r -a jobs <<< "$REQPATH_JOBS"; fi  # e.g. "rand-read psync 1 1"
echo "| job | round | target | IOPS | p50 us | p99 us | IOPS / raw | machine CPU us / I/O | fio mean us | daemon mean us |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
count=${#names[@]}
for job in "${jobs[@]}"; do
  read -r name engine depth direct <<< "$job"
  label="$name $engine qd$depth $([ "$direct" = 1 ] && echo direct || echo buffered)"
  for round in $(seq "$rounds"); do
    declare -A result=()
    for step in $(seq 0 $((count - 1))); do
      t=$(( (step + round - 1) % count ))
      result[$t]=$(run "${bins[$t]}" "${dirs[$t]}" "$name" "$engine" "$depth" "$direct")
    done
    read -r raw_iops _ <<< "${result[0]}"
    for t in $(seq 0 $((count - 1))); do
      read -r iops p50 p99 cpu mean daemon <<< "${result[$t]}"
      ratio=$(python3 -c "print('%.2f' % ($iops / max(1, $raw_iops)))")
      [ "$t" = 0 ] && daemon=""
      echo "| $label | $round | ${names[$t]} | $iops | $p50 | $p99 | $ratio | $cpu | $mean | $daemon |"
    done
    unset result
  done
done
