#!/usr/bin/env bash
# What a 4 KiB direct random read costs the daemon, per read: its CPU time (task-clock),
# context switches and system calls (perf stat on the daemon for 4 s in the middle of a
# 7 s fio run, psync qd1 and io_uring qd32), and the image device's average queue depth
# (/sys/block/$DISK/stat's weighted time in queue; the whole disk, other users included).
# Each BLOBFS binary (mount options after a colon) is mounted on its own preallocated
# image; two rounds, the binaries in turn. Prints markdown rows:
#   | job | round | target | IOPS | daemon CPU us/read | switches/read | io_uring_enter/read |
#     epoll_wait/read | read/read | writev/read | device queue depth |
#   bench/reqpath-profile.sh BLOBFS[:OPTIONS]...   (root; DISK=vda by default)
set -uo pipefail
cd "$(dirname "$0")/.."
DISK=${DISK:-vda}
W=$(mktemp -d /var/tmp/reqpath-profile.XXXXXX); O=$W
i=0
cleanup() { for j in $(seq $i); do mountpoint -q $W/pm$j && fusermount3 -u $W/pm$j; done; rm -rf "$W"; }
trap cleanup EXIT
for spec in "$@"; do
  i=$((i+1)); B=${spec%%:*}; opts=""; [ "$spec" != "$B" ] && opts="-o ${spec#*:}"
  mkdir -p $W/pm$i; rm -f $W/pimg$i
  $B mkfs $W/pimg$i --size 2G --preallocate >/dev/null
  $B mount file:$W/pimg$i $W/pm$i $opts >/dev/null || continue
  mountpoint -q $W/pm$i || continue
  FIO_FILE=$W/pm$i/fio.dat FIO_SIZE=1G fio bench/fio/layout.fio >/dev/null
done
for round in 1 2; do
for job in "psync 1" "io_uring 32"; do
  read -r engine depth <<< "$job"
  for j in $(seq $i); do
    PID=$(pgrep -n -f "blobfs mount file:$W/pimg$j ")
    FIO_FILE=$W/pm$j/fio.dat FIO_SIZE=1G FIO_ENGINE=$engine FIO_IODEPTH=$depth FIO_NUMJOBS=1 FIO_DIRECT=1 FIO_RUNTIME=7 FIO_RAMP=0 fio --output-format=json bench/fio/rand-read.fio > $O/fio.json &
    FPID=$!
    sleep 1.5
    read -r -a q0 < /sys/block/$DISK/stat
    perf stat -x, -e 'task-clock,context-switches,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_read,syscalls:sys_enter_writev' -p $PID -- sleep 4 2> $O/stat.txt
    read -r -a q1 < /sys/block/$DISK/stat
    aqu=$(python3 -c "print('%.1f' % ((${q1[10]} - ${q0[10]}) / 4000.0))")
    wait $FPID
    python3 - $O/fio.json $O/stat.txt "$j" "$engine qd$depth" "$round" "$aqu" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["jobs"][0]["read"]
iops = r["iops"]; reads = iops * 4.0
vals = {}
for line in open(sys.argv[2]):
    p = line.strip().split(",")
    if len(p) > 3 and p[0] and p[0][0].isdigit():
        vals[p[2]] = float(p[0])
tc = vals.get("task-clock", 0) * 1000  # ms -> us
f = lambda k: vals.get(k, 0) / reads
print("| %s | %s | b%s | %.0f | %.1f | %.2f | %.2f | %.2f | %.2f | %.2f | %s |" % (sys.argv[4], sys.argv[5], sys.argv[3], iops, tc / reads,
      f("context-switches"), f("syscalls:sys_enter_io_uring_enter"), f("syscalls:sys_enter_epoll_wait"),
      f("syscalls:sys_enter_read"), f("syscalls:sys_enter_writev"), sys.argv[6]))
PY
  done
done
done
