#!/usr/bin/env bash
# The NVMe/TCP initiator against the Linux kernel's target (nvmet + nvmet-tcp), which
# nobody here wrote. A QEMU guest (TCG) boots a Debian kernel whose init loads nvmet,
# serves a 256 MiB ramdisk (brd) as namespace 1 of a subsystem through configfs, and
# listens on TCP port 4420; QEMU's user network (restrict=on: the guest reaches nothing)
# forwards 127.0.0.1:$port on the host to it. Everything else runs on the host:
#   1. nvme-qemu-check: identify, the bdev conformance suite, 2 s of random I/O (q32),
#      once plain and once with header and data digests
#   2. bdevperf --identify and a short randrw run with 0 allocations per I/O
#   3. blobfs mkfs + mount on nvme-tcp:, the exerciser through the mount, unmount, fsck
#   4. a connection cut mid-workload: the exerciser writes and fsyncs files (--manifest)
#      while the guest takes its nvmet port down for 3 s and up again; every fsync'd file
#      is intact afterwards, unmount and fsck clean
# The guest takes commands ("down", "up", "off") on its second serial port (a pipe).
# QEMU exits 0 whatever the guest did; verdicts come from the host's checks.
#   Tests/qemu/nvme-tcp-qemu.sh     BIN=.build/debug (binaries)  OPS=3000  CUT_OPS=300
#   Tests/qemu/nvme-tcp-qemu.sh --serve FILE: boots the guest, writes the device spec
#     (nvme-tcp:127.0.0.1:PORT/NQN) into FILE and keeps the target up until FILE is
#     removed (bench/nvme-tcp.sh uses it)
set -euo pipefail
serve=""
if [ "${1:-}" = --serve ]; then serve=${2:?--serve FILE}; fi
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
work=${QEMU_WORK:-$top/.build/qemu-tcp}
bin=${BIN:-$top/.build/debug}
OPS=${OPS:-3000}
CUT_OPS=${CUT_OPS:-300}  # files written whole and fsync'd (about 280 KB each) across the cut
nqn=nqn.2026-12.io.blobfs:tcp-test
mkdir -p "$work"

need=()
for p in qemu-system-x86 busybox-static cpio; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ -z "$serve" ]; then
  for tool in nvme-qemu-check blobfs blobcli; do
    [ -x "$bin/$tool" ] || { echo "FAIL nvme-tcp-qemu: $bin/$tool missing (swift build first)"; exit 1; }
  done
fi
# Allocations per I/O are counted on the release build (scripts/bdevperf-smoke builds it
# too; after it this is a no-op).
if [ -z "${BDEVPERF:-}" ] && [ -z "$serve" ]; then
  (cd "$top" && swift build -c release --product bdevperf 2>&1 | tail -n 1)
  BDEVPERF="$(cd "$top" && swift build -c release --show-bin-path)/bdevperf"
fi

# A Debian kernel: the newest linux-image-6.1.0-N-amd64 the archive offers, in the same
# place as Tests/qemu/nvme-qemu.sh keeps it (scripts/test runs that first: no second download).
kernel=${QEMU_KERNEL_DIR:-$top/.build/qemu/kernel}
if [ ! -f "$kernel/vmlinuz" ]; then
  [ -n "$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | head -1)" ] || apt-get update -qq
  pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -1)
  rm -rf "$kernel" "$work/deb" && mkdir -p "$kernel" "$work/deb"
  (cd "$work/deb" && apt-get download "$pkg" >/dev/null 2>&1)
  dpkg -x "$work"/deb/*.deb "$kernel/root"
  cp "$kernel"/root/boot/vmlinuz-* "$kernel/vmlinuz"
  rm -rf "$work/deb"
fi
kver=$(ls "$kernel/root/lib/modules")
moddir="$kernel/root/lib/modules/$kver/kernel"

# The initramfs: busybox and the modules, in load order (dependencies first).
initrd="$work/initrd-tcp.cpio.gz"
root="$work/initramfs"
rm -rf "$root" && mkdir -p "$root"/{bin,proc,sys,dev,tmp,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for tool in sh mount insmod echo cat ls sleep poweroff mkdir grep ln rm ip stty cut; do ln -s busybox "$root/bin/$tool"; done
modules="fs/configfs/configfs.ko crypto/crct10dif_common.ko crypto/crct10dif_generic.ko lib/crc-t10dif.ko
  lib/crc64.ko crypto/crc64_rocksoft_generic.ko lib/crc64-rocksoft.ko block/t10-pi.ko crypto/crc32c_generic.ko
  drivers/nvme/target/nvmet.ko drivers/nvme/target/nvmet-tcp.ko drivers/block/brd.ko
  drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko drivers/virtio/virtio_pci_modern_dev.ko
  drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci.ko net/core/failover.ko
  drivers/net/net_failover.ko drivers/net/virtio_net.ko"
order=""
for m in $modules; do
  cp "$moddir/$m" "$root/lib/modules/"
  order="$order $(basename "$m" .ko)"
done
echo "$order" > "$root/lib/modules/order"
cat > "$root/init" <<INIT
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in \$(cat /lib/modules/order); do
  case \$m in brd) insmod /lib/modules/brd.ko rd_nr=1 rd_size=262144 ;; *) insmod /lib/modules/\$m.ko ;; esac
done
mount -t configfs none /sys/kernel/config
ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0
cfg=/sys/kernel/config/nvmet
mkdir \$cfg/subsystems/$nqn
echo 1 > \$cfg/subsystems/$nqn/attr_allow_any_host
mkdir \$cfg/subsystems/$nqn/namespaces/1
echo -n /dev/ram0 > \$cfg/subsystems/$nqn/namespaces/1/device_path
echo 1 > \$cfg/subsystems/$nqn/namespaces/1/enable
mkdir \$cfg/ports/1
echo ipv4 > \$cfg/ports/1/addr_adrfam; echo tcp > \$cfg/ports/1/addr_trtype
echo 0.0.0.0 > \$cfg/ports/1/addr_traddr; echo 4420 > \$cfg/ports/1/addr_trsvcid
ln -s \$cfg/subsystems/$nqn \$cfg/ports/1/subsystems/$nqn
echo "BLOBFS-NVMET-READY \$(cat \$cfg/subsystems/$nqn/namespaces/1/device_path)"
stty -F /dev/ttyS1 raw -echo
exec 3< /dev/ttyS1
while read -r command <&3; do
  case \$command in
    down) rm \$cfg/ports/1/subsystems/$nqn && echo "BLOBFS-NVMET-DOWN" ;;
    up) ln -s \$cfg/subsystems/$nqn \$cfg/ports/1/subsystems/$nqn && echo "BLOBFS-NVMET-UP" ;;
    off) break ;;
  esac
done
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$initrd")

# A free port on 127.0.0.1 for the forward.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
serial="$work/serial-tcp.log"
control="$work/control"
rm -f "$serial" "$control.in" "$control.out"
mkfifo "$control.in" "$control.out"
started=$SECONDS
qemu-system-x86_64 -accel tcg -M q35 -cpu max -m 768M -smp 1 -display none -no-reboot \
  -kernel "$kernel/vmlinuz" -initrd "$initrd" \
  -append "console=ttyS0 panic=-1 loglevel=4" \
  -serial "file:$serial" -serial "pipe:$control" \
  -netdev "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:$port-:4420" -device virtio-net-pci,netdev=net0 \
  > "$work/qemu.log" 2>&1 &
qemu=$!
# Keep the control pipe's reading end drained (the guest's tty may echo) and its writer open.
cat "$control.out" > /dev/null &
drain=$!
exec 7> "$control.in"
mnt="$work/mnt"
cleanup() {
  if mountpoint -q "$mnt" 2>/dev/null; then fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -u -z "$mnt" 2>/dev/null || true; fi
  echo off >&7 2>/dev/null || true
  sleep 1
  kill "$qemu" 2>/dev/null || true
  kill "$drain" 2>/dev/null || true
  wait "$qemu" 2>/dev/null || true
}
trap cleanup EXIT
guest() {  # guest COMMAND: sends it and waits for the guest's acknowledgement
  local mark=$2 count
  count=$(grep -c "$mark" "$serial" 2>/dev/null || true)
  echo "$1" >&7
  for _ in $(seq 1 100); do
    [ "$(grep -c "$mark" "$serial" 2>/dev/null || true)" -gt "$count" ] && return 0
    sleep 0.1
  done
  echo "guest did not acknowledge '$1'"; return 1
}
for _ in $(seq 1 600); do
  grep -q "BLOBFS-NVMET-READY" "$serial" 2>/dev/null && break
  kill -0 "$qemu" 2>/dev/null || break
  sleep 0.2
done
if ! grep -q "BLOBFS-NVMET-READY" "$serial" 2>/dev/null; then
  echo "FAIL nvme-tcp-qemu: the guest's nvmet did not come up (serial log: $serial)"
  tail -n 30 "$serial" 2>/dev/null || true
  exit 1
fi
echo "guest up with nvmet on 127.0.0.1:$port in $((SECONDS - started)) s"

device="nvme-tcp:127.0.0.1:$port/$nqn"
if [ -n "$serve" ]; then
  echo "$device" > "$serve"
  while [ -f "$serve" ] && kill -0 "$qemu" 2>/dev/null; do sleep 0.5; done
  exit 0
fi
passed=0; failed=0
check() {  # check NAME COMMAND...
  local name=$1; shift
  local start=$SECONDS
  if "$@" > "$work/step.log" 2>&1; then
    echo "PASS $name ($((SECONDS - start)) s)"; passed=$((passed + 1))
    grep -E "^check|IOPS,|MiB/s of|files fsync|connection lost|reconnected|device is lost|Error|unmount reported" "$work/step.log" | cut -c1-200 | sed 's/^/    /' || true
  else
    echo "FAIL $name ($((SECONDS - start)) s)"; tail -n 30 "$work/step.log" | sed 's/^/    /'; failed=$((failed + 1))
  fi
}

# 1. identify, conformance, random I/O: plain, then with both digests.
check "nvme-qemu-check $device" "$bin/nvme-qemu-check" --mode tcp --device "$device"
check "nvme-qemu-check with header and data digests" "$bin/nvme-qemu-check" --mode tcp-digests \
  --device "$device?hdgst=1&ddgst=1" --seconds 1

# 2. bdevperf: identify, and a measured run with no allocation per I/O.
check "bdevperf --identify" "$BDEVPERF" --device "$device" --identify
bdevperf_zero_allocations() {
  local out
  # --no-prefill: the device was written by the checks before; a prefill would take 8 s here.
  out=$("$BDEVPERF" --device "$device" -w randrw -q 16 -o 4096 -t 2 --warmup 0.5 --no-prefill --json) || return 1
  echo "$out"
  python3 - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1].strip().splitlines()[-1])
print(f'{r["iops"]:.0f} IOPS, allocations per I/O {r.get("allocationsPerIO")}, errors {r["errors"]}')
sys.exit(0 if r["errors"] == 0 and r["ios"] > 0 and r.get("allocationsPerIO") == 0 else 1)
PY
}
check "bdevperf randrw q16 over nvme-tcp: 0 allocations per I/O" bdevperf_zero_allocations
# 1 MiB writes at depth 8 with digests: 64 R2Ts outstanding, each answered by one
# H2CData PDU (nvmet 6.1 checks a data digest against the whole transfer).
bdevperf_big_writes_with_digests() {
  local out
  out=$("$BDEVPERF" --device "$device?hdgst=1&ddgst=1" -w write -q 8 -o 1M -t 2 --warmup 0 --json) || return 1
  echo "$out"
  python3 - "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1].strip().splitlines()[-1])
print(f'{r["mibPerSecond"]:.1f} MiB/s of 1 MiB writes with digests, errors {r["errors"]}')
sys.exit(0 if r["errors"] == 0 and r["ios"] > 0 else 1)
PY
}
check "bdevperf 1 MiB writes q8 with header and data digests" bdevperf_big_writes_with_digests

# 3. The file system on the remote namespace.
mkdir -p "$mnt"
rm -f "$work/daemon.log"
check "blobfs mkfs $device" "$bin/blobfs" mkfs "$device"
if "$bin/blobfs" mount "$device" "$mnt" --log "$work/daemon.log" > /dev/null 2>&1; then
  check "exerciser, $OPS operations through the mount" python3 "$top/Tests/fs/exerciser.py" "$mnt" --seed 5 --ops "$OPS"
  check "unmount" "$bin/blobfs" unmount "$mnt"
  check "fsck" "$bin/blobfs" fsck "$device"
  check "blobcli info and fsck $device" bash -c "'$bin/blobcli' info '$device' && '$bin/blobcli' fsck '$device'"
else
  echo "FAIL mount $device"; tail -n 20 "$work/daemon.log" 2>/dev/null | sed 's/^/    /'; failed=$((failed + 1))
fi

# 4. The target's port goes down in the middle of a workload that fsyncs files:
#    cut_mid_workload SECONDS_DOWN QUERY OUTCOME
#    - for 3 s (within ctrl_loss_tmo): the workload goes on across the reconnect;
#    - for 8 s with ctrl_loss_tmo=3: the device is lost, the workload's writes fail, and
#      after the port is back and a remount every file fsync'd before the loss is intact.
cut_mid_workload() {
  local down=$1 query=$2 outcome=$3
  rm -f "$work/daemon-cut.log" "$work/manifest"
  "$bin/blobfs" mount "$device$query" "$mnt" --log "$work/daemon-cut.log" > /dev/null || return 1
  python3 "$top/Tests/fs/exerciser.py" "$mnt" --seed 6 --ops "$CUT_OPS" --manifest "$work/manifest" > "$work/cut-writer.log" 2>&1 &
  local writer=$!
  # The cut comes once 40 files are in: the workload is surely in flight (while the
  # port is down its fsyncs cannot complete, so it cannot end before the port is back).
  for _ in $(seq 1 600); do
    [ "$(wc -l < "$work/manifest" 2>/dev/null || echo 0)" -ge 40 ] && break
    kill -0 "$writer" 2>/dev/null || break
    sleep 0.1
  done
  guest down BLOBFS-NVMET-DOWN || return 1
  local before; before=$(wc -l < "$work/manifest")
  sleep "$down"
  if [ "$outcome" = continues ] && ! kill -0 "$writer" 2>/dev/null; then
    echo "the workload ended before the port came back: no cut mid-workload"; tail -n 5 "$work/cut-writer.log"; return 1
  fi
  guest up BLOBFS-NVMET-UP || return 1
  local status=0
  wait "$writer" || status=$?
  echo "files fsync'd: $before before the cut, $(wc -l < "$work/manifest") at the end; workload exit status $status"
  grep -E "connection lost|reconnected|device is lost" "$work/daemon-cut.log" | head -n 4
  if [ "$outcome" = continues ]; then
    [ "$status" -eq 0 ] || { echo "the workload failed across the cut"; tail -n 5 "$work/cut-writer.log"; return 1; }
    grep -q "reconnected" "$work/daemon-cut.log" || { echo "the daemon never reconnected"; return 1; }
  else
    [ "$status" -ne 0 ] || { echo "the workload saw no error although the device was lost"; return 1; }
    grep -E "OSError|Error" "$work/cut-writer.log" | tail -n 1
    grep -q "device is lost" "$work/daemon-cut.log" || { echo "the daemon never declared the device lost"; return 1; }
    # The file system goes read-only, says so once, and refuses changes with EROFS.
    grep -q "the file system is read-only" "$work/daemon-cut.log" || { echo "the daemon never said the file system is read-only"; return 1; }
    if touch "$mnt/after-the-loss" 2> "$work/touch.err"; then echo "a create after the loss succeeded"; return 1; fi
    grep -q "Read-only file system" "$work/touch.err" || { echo "a create after the loss: $(cat "$work/touch.err") (expected EROFS)"; return 1; }
  fi
  if ! "$bin/blobfs" unmount "$mnt"; then
    echo "unmount reported a failure (the store refuses changes after the loss)"
    if mountpoint -q "$mnt"; then fusermount3 -u "$mnt" || return 1; fi
  fi
  for _ in $(seq 1 100); do pgrep -f "blobfs mount $device.* $mnt" > /dev/null || break; sleep 0.1; done
  "$bin/blobfs" mount "$device" "$mnt" --log "$work/daemon-cut.log" > /dev/null || return 1
  python3 "$top/Tests/fs/exerciser.py" "$mnt" --verify-manifest "$work/manifest" || return 1
  rm -rf "$mnt/crash"
  "$bin/blobfs" unmount "$mnt" || return 1
  "$bin/blobfs" fsck "$device"
}
check "port down 3 s mid-workload: the workload goes on, every fsync'd file intact, fsck clean" \
  cut_mid_workload 3 "" continues
check "port down 8 s, ctrl_loss_tmo=3: writes fail, every file fsync'd before intact, fsck clean" \
  cut_mid_workload 8 "?ctrl_loss_tmo=3" fails

echo "nvme-tcp-qemu: $((SECONDS - started)) s from boot to the last check"
echo "nvme-tcp-qemu: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
