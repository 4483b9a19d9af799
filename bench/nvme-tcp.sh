#!/usr/bin/env bash
# bdevperf over NVMe/TCP against the Linux kernel's target (nvmet-tcp, a 256 MiB brd
# namespace) running in a QEMU guest under TCG (no KVM here): the guest's CPU is
# emulated, so the numbers measure this initiator against a slow target, not the
# initiator's limit. 4 KiB random read/write at q1 and q16, 128 KiB sequential at q8,
# without and with header+data digests; every row must show 0 allocations per I/O.
# Writes bench/results/nvme-tcp-DATE.md with every command.
#   bench/nvme-tcp.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
swift build -c release --product bdevperf 2>&1 | tail -n 1
bin=$(swift build -c release --show-bin-path)/bdevperf
mkdir -p bench/work bench/results
spec=bench/work/nvme-tcp.device
rm -f "$spec"
Tests/qemu/nvme-tcp-qemu.sh --serve "$spec" > bench/work/nvme-tcp-guest.log 2>&1 &
guest=$!
trap 'rm -f "$spec"; wait "$guest" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do [ -s "$spec" ] && break; sleep 0.5; done
[ -s "$spec" ] || { echo "the guest's target did not come up (bench/work/nvme-tcp-guest.log)"; exit 1; }
device=$(cat "$spec")
out=bench/results/nvme-tcp-$(date +%Y-%m-%d).md
{
  echo "# bdevperf over NVMe/TCP, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "Initiator: this project's NVMe/TCP driver, release build, one reactor, on the host"
  echo "($(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), kernel $(uname -r))."
  echo "Target: Linux $(ls .build/qemu/kernel/root/lib/modules 2>/dev/null) nvmet + nvmet-tcp serving a brd ramdisk,"
  echo "**inside a QEMU guest under TCG (emulated CPU, no KVM), one vCPU**, reached over QEMU user"
  echo "networking (hostfwd on 127.0.0.1). The target's emulated CPU is the bottleneck: these rows"
  echo "show the initiator works at depth without allocating, not what it does against real hardware."
  echo "Produced by \`bench/nvme-tcp.sh $seconds\`; each row is one command below, in this order."
  echo
  echo "| digests | workload | q | io | IOPS | MiB/s | p50 us | p99 us | p99.9 us | initiator CPU s / M I/O | allocs/IO | errors |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
} > "$out.tmp"
commands=()
for digests in "" "?hdgst=1&ddgst=1"; do
  for job in "randread 1 4096" "randread 16 4096" "randwrite 1 4096" "randwrite 16 4096" "read 8 131072" "write 8 131072"; do
    set -- $job
    cmd=("$bin" --device "$device$digests" -w "$1" -q "$2" -o "$3" -t "$seconds" --warmup 1 --json)
    commands+=("bdevperf --device '$device$digests' -w $1 -q $2 -o $3 -t $seconds --warmup 1 --json")
    json=$("${cmd[@]}" 2>/dev/null | tail -n 1)
    python3 - "$json" "${digests:+header+data}" >> "$out.tmp" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
l = r["latencyUs"]
cells = [sys.argv[2] or "none", r["workload"], r["queueDepth"], "%d KiB" % (r["ioBytes"] // 1024),
         "%.0f" % r["iops"], "%.1f" % r["mibPerSecond"], "%.0f" % l["p50"], "%.0f" % l["p99"], "%.0f" % l["p999"],
         "%.1f" % r["cpuSecondsPerMillionIOs"], r.get("allocationsPerIO"), r["errors"]]
print("| " + " | ".join(str(c) for c in cells) + " |")
PY
  done
done
{
  echo
  echo "Initiator CPU per I/O counts the reactor's 200 us of polling before each sleep (bdevperf's default"
  echo "\`--idle-us\`) and a wake-up per segment the emulated network delivers: against this slow target it"
  echo "is mostly waiting, not work."
  echo
  echo "Commands (bdevperf = \`$(swift build -c release --show-bin-path | sed "s|^$PWD/||")/bdevperf\`; the port is the one the run's hostfwd chose):"
  echo
  echo '```'
  printf '%s\n' "${commands[@]}"
  echo '```'
} >> "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
