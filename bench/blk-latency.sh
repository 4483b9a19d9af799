#!/usr/bin/env bash
# Where a 4 KiB random read (or write, -w randwrite) waits below the daemon: runs fio
# (io_uring, direct, QD deep) on each FILE given and records the block layer's events on DEVICE for
# one second in the middle of the run (perf: block_rq_insert, block_rq_issue,
# block_rq_complete). Prints per FILE: fio's IOPS and mean latency, the mean time from
# insert to issue (the I/O scheduler) and from issue to complete (the device: for a
# virtio disk, the hypervisor's service and its interrupt), and how many requests each
# plug/unplug carried (1 = submitted one by one; 20+ = one batch per reactor pass).
#   bench/blk-latency.sh [-d DEVICE] [-q QD] [-t SECONDS] [-w randread|randwrite] FILE...
#   (root; FILE >= 1 GiB; with -w randwrite its bytes are overwritten)
# e.g. a blobfs mount's file beside the raw file on the same ext4:
#   bench/blk-latency.sh /mnt/blobfs/fio.dat /var/tmp/raw/fio.dat
set -euo pipefail
device=vda depth=32 seconds=5 workload=randread
while getopts d:q:t:w: opt; do
  case $opt in d) device=$OPTARG ;; q) depth=$OPTARG ;; t) seconds=$OPTARG ;; w) workload=$OPTARG ;; *) exit 2 ;; esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [-d DEVICE] [-q QD] [-t SECONDS] [-w randread|randwrite] FILE..." >&2; exit 2; }
case $workload in
  randread) access=(--readonly); direction=read ;;
  randwrite) access=(); direction=write ;;
  *) echo "$0: -w takes randread or randwrite, not $workload" >&2; exit 2 ;;
esac
major_minor=$(cat "/sys/block/$device/dev") || { echo "$0: no block device $device" >&2; exit 1; }
work=$(mktemp -d /tmp/blk-latency.XXXXXX)
trap 'rm -rf "$work"' EXIT
for file in "$@"; do
  fio --name=blk --filename="$file" --rw="$workload" --bs=4k --ioengine=io_uring --iodepth="$depth" \
      --direct=1 --time_based --runtime="$seconds" --norandommap --randrepeat=0 "${access[@]}" \
      --output-format=json > "$work/fio.json" &
  fio_pid=$!
  sleep $(( seconds / 2 ))
  perf record -q -o "$work/perf.data" -a -e block:block_rq_insert,block:block_rq_issue,block:block_rq_complete \
      -e block:block_unplug sleep 1 2> /dev/null
  wait $fio_pid
  perf script -i "$work/perf.data" -F time,event,trace 2> /dev/null |
  python3 -c '
import json, re, sys
device = sys.argv[1].replace(":", ",")
inserted, issued, queueing, service, plugs, plugged = {}, {}, [], [], 0, 0
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+):\s+block:(\w+):\s+(.*)", line)
    if not m:
        continue
    t, event, rest = float(m.group(1)), m.group(2), m.group(3)
    if event == "block_unplug":
        u = re.search(r"\] (\d+)", rest)
        if u:
            plugs += 1; plugged += int(u.group(1))
        continue
    if not rest.startswith(device + " "):
        continue
    s = re.search(r"\) (\d+) \+ (\d+)", rest)
    if not s:
        continue
    sector = s.group(1)
    if event == "block_rq_insert":
        inserted[sector] = t
    elif event == "block_rq_issue":
        issued[sector] = t
        if sector in inserted:
            queueing.append(t - inserted.pop(sector))
    elif sector in issued:
        service.append(t - issued.pop(sector))
job = json.load(open(sys.argv[2]))["jobs"][0][sys.argv[4]]
mean = lambda xs: 1e6 * sum(xs) / max(1, len(xs))
iops, fio_mean = job["iops"], job["lat_ns"]["mean"] / 1000
print(f"{sys.argv[3]}: {iops:.0f} IOPS, fio mean {fio_mean:.0f} us; "
      f"scheduler {mean(queueing):.0f} us, device {mean(service):.0f} us per request "
      f"({len(service)} requests); {plugged / max(1, plugs):.1f} requests per unplug")
' "$major_minor" "$work/fio.json" "$file" "$direction"
done
