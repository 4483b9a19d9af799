#!/usr/bin/env bash
# The software NVMe controller through a mount (issue 19's change judged where people use
# it): 4 KiB random reads and writes (fio, io_uring, qd32, direct) on blobfs mounted on a
# preallocated image through nvme-emu: (each BLOBFS given) and through file: (the
# default path, first BLOBFS), beside passthrough_ll over the image's file system and the
# raw file, alternating ROUNDS times. Reports IOPS and whole-machine CPU per I/O (busy
# time of all CPUs from /proc/stat over the run, divided by its I/Os: spinning counts).
#   bench/nvme-emu-mount.sh ROUNDS SECONDS BLOBFS...
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=$1 seconds=$2; shift 2
pt=bench/work/build/passthrough_ll   # bench/run builds it
work=$(mktemp -d /var/tmp/nvme-emu-mount.XXXXXX)
trap 'for m in "$work"/mnt*; do mountpoint -q "$m" && fusermount3 -u -z "$m"; done; rm -rf "$work"' EXIT
mkdir -p "$work/raw" "$work/ptsrc" "$work/mntpt"

busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
# run_fio FILE RW: "IOPS CPU_US_PER_IO"
run_fio() {
  read -r b0 _ < <(busy)
  iops=$(fio --name=j --filename="$1" --size=512M --rw="$2" --bs=4k --direct=1 --ioengine=io_uring --iodepth=32 \
         --time_based --runtime="$seconds" --randrepeat=0 --norandommap --output-format=json \
         | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.0f" % (j["read"]["iops"] + j["write"]["iops"]))')
  read -r b1 _ < <(busy)
  python3 -c "print($iops, f'{($b1 - $b0) / 100 / ($iops * $seconds) * 1e6:.1f}')"
}
lay() { FIO_FILE=$1 FIO_SIZE=512M fio bench/fio/layout.fio > /dev/null; }

lay "$work/raw/f"
lay "$work/ptsrc/f"
"$pt" -o source="$work/ptsrc" "$work/mntpt" &
sleep 1
echo "| job | round | target | IOPS | machine CPU us / I/O | IOPS / raw |"
echo "|---|---|---|---:|---:|---:|"
for rw in randread randwrite; do
  for round in $(seq "$rounds"); do
    read -r raw rawcpu < <(run_fio "$work/raw/f" $rw)
    echo "| $rw | $round | raw file | $raw | $rawcpu | 1 |"
    if [ $rw = randread ]; then  # passthrough_ll refuses O_DIRECT writes (EINVAL)
      read -r v c < <(run_fio "$work/mntpt/f" $rw)
      echo "| $rw | $round | passthrough_ll | $v | $c | $(python3 -c "print(f'{$v / $raw:.2f}')") |"
    fi
    i=0
    for spec in "file:$1" $(for b in "$@"; do echo "nvme-emu:$b"; done); do
      kind=${spec%%:*} bin=${spec#*:}
      i=$((i + 1)); img=$work/b$i.img; mnt=$work/mnt$i
      mkdir -p "$mnt"
      [ -f "$img" ] || "$bin" mkfs "$img" --size 2G --preallocate > /dev/null 2>&1
      "$bin" mount "$kind:$img" "$mnt" > /dev/null
      [ -f "$mnt/f" ] || lay "$mnt/f"
      read -r v c < <(run_fio "$mnt/f" $rw)
      echo "| $rw | $round | $bin $kind: | $v | $c | $(python3 -c "print(f'{$v / $raw:.2f}')") |"
      "$bin" unmount "$mnt"
      for _ in $(seq 50); do mountpoint -q "$mnt" || break; sleep 0.1; done
    done
  done
done
fusermount3 -u "$work/mntpt"
