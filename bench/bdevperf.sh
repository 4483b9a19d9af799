#!/usr/bin/env bash
# The bdev-layer benchmark matrix: malloc and uring (an image file on the filesystem
# that holds bench/work), 4 KiB randread/randwrite at q1 and q32, 128 KiB sequential
# read and write, one reactor; each malloc line also measures memcpy of the same size
# in the same run. Writes bench/results/bdevperf-DATE.md with every command.
#   bench/bdevperf.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
scripts/install-deps
swift build -c release --product bdevperf 2>&1 | tail -n 1
bin=$(swift build -c release --show-bin-path)/bdevperf
mkdir -p bench/work bench/results
# DMA buffers come from 2 MiB hugepages when some are reserved (as SPDK runs).
if [ "$(id -u)" -eq 0 ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 512 ]; then echo 512 > /proc/sys/vm/nr_hugepages; fi
image=bench/work/bdevperf.img
rm -f "$image"
out=bench/results/bdevperf-$(date +%Y-%m-%d).md
jobs=("randread 1 4096" "randread 32 4096" "randwrite 1 4096" "randwrite 32 4096" "read 32 131072" "write 32 131072")
{
  echo "# bdevperf results, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/Mem:/{print $2}') GiB,"
  echo "kernel $(uname -r), hugepages reserved: $(cat /proc/sys/vm/nr_hugepages). Image file on: $(df -T bench/work | awk 'NR==2{print $2}')."
  echo "Produced by \`bench/bdevperf.sh $seconds\`; each row is one command below, run in this order in one session."
  echo
  echo "| device | workload | q | io | IOPS | MiB/s | p50 us | p99 us | p99.9 us | CPU s / M I/O | allocs/IO | memcpy limit (copies/s) | IOPS / memcpy |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
} > "$out.tmp"
commands=()
for device in malloc:1G "file:$image"; do
  for job in "${jobs[@]}"; do
    set -- $job
    extra=""; [ "${device%%:*}" = malloc ] && extra="--memcpy-baseline"
    cmd="$bin --device $device --size 1G -w $1 -q $2 -o $3 -t $seconds --warmup 1 $extra --json"
    commands+=("${cmd/#$bin/bdevperf}")
    json=$($cmd | tail -n 1)
    python3 - "$json" >> "$out.tmp" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
m = r.get("memcpy")
l = r["latencyUs"]
limit = "%.0f" % m["copiesPerSecond"] if m else "-"
ratio = "%.3f" % r["iopsOverMemcpyLimit"] if m else "-"
cells = [r["device"].split(":")[0], r["workload"], r["queueDepth"], "%d KiB" % (r["ioBytes"] // 1024),
         "%.0f" % r["iops"], "%.0f" % r["mibPerSecond"], "%.1f" % l["p50"], "%.1f" % l["p99"], "%.1f" % l["p999"],
         "%.2f" % r["cpuSecondsPerMillionIOs"], r.get("allocationsPerIO"), limit, ratio]
print("| " + " | ".join(str(c) for c in cells) + " |")
PY
  done
done
# The blob store's data path against the raw device, alternating, same jobs.
{
  echo
  echo "Blob store overhead: the same jobs on one blob spanning a blob store on malloc:1G (\`--blob\`), run alternately with the raw device."
  echo
  echo "| workload | q | raw IOPS | blob IOPS | blob / raw | raw p99 us | blob p99 us | blob allocs/IO |"
  echo "|---|---|---|---|---|---|---|---|"
} >> "$out.tmp"
for job in "randread 1" "randread 32" "randwrite 1" "randwrite 32"; do
  set -- $job
  raw="$bin --device malloc:1G -w $1 -q $2 -o 4096 -t $seconds --warmup 1 --json"
  blob="$raw --blob"
  commands+=("${raw/#$bin/bdevperf}" "${blob/#$bin/bdevperf}")
  python3 - "$($raw | tail -n 1)" "$($blob | tail -n 1)" >> "$out.tmp" <<'PY'
import json, sys
r, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print("| %s | %d | %.0f | %.0f | %.2f | %.1f | %.1f | %s |" % (r["workload"], r["queueDepth"], r["iops"], b["iops"],
      b["iops"] / r["iops"], r["latencyUs"]["p99"], b["latencyUs"]["p99"], b.get("allocationsPerIO")))
PY
done
# The NVMe protocol path: the driver over the in-process software controller, whose
# namespace is a malloc bdev, against the malloc bdev itself, alternating.
{
  echo
  echo "NVMe protocol path: \`nvme-emu:malloc:1G\` (driver, queues and PRPs, software controller on its own reactor thread) against \`malloc:1G\`, run alternately."
  echo
  echo "| workload | q | malloc IOPS | nvme-emu IOPS | nvme-emu / malloc | malloc p99 us | nvme-emu p99 us | nvme-emu allocs/IO | nvme-emu CPU s / M I/O |"
  echo "|---|---|---|---|---|---|---|---|---|"
} >> "$out.tmp"
for job in "randread 1" "randread 32" "randwrite 32"; do
  set -- $job
  raw="$bin --device malloc:1G -w $1 -q $2 -o 4096 -t $seconds --warmup 1 --json"
  nvme="$bin --device nvme-emu:malloc:1G -w $1 -q $2 -o 4096 -t $seconds --warmup 1 --json"
  commands+=("${raw/#$bin/bdevperf}" "${nvme/#$bin/bdevperf}")
  python3 - "$($raw | tail -n 1)" "$($nvme | tail -n 1)" >> "$out.tmp" <<'PY'
import json, sys
r, n = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print("| %s | %d | %.0f | %.0f | %.2f | %.1f | %.1f | %s | %.2f |" % (r["workload"], r["queueDepth"], r["iops"], n["iops"],
      n["iops"] / r["iops"], r["latencyUs"]["p99"], n["latencyUs"]["p99"], n.get("allocationsPerIO"), n["cpuSecondsPerMillionIOs"]))
PY
done
{
  echo
  echo "Commands (bdevperf = \`$(realpath --relative-to=. "$bin")\`):"
  echo
  echo '```'
  printf '%s\n' "${commands[@]}"
  echo '```'
} >> "$out.tmp"
mv "$out.tmp" "$out"
rm -f "$image"
cat "$out"
