#!/usr/bin/env bash
# Discard through a real FUSE mount (part of scripts/test). On a sparse image, the image
# file's allocated size (st_blocks, what du shows) after writing and deleting SIZE_MB
# (2 GiB) returns to within 1 % of an empty file system's, in each of the three ways:
#   1. fstrim MOUNTPOINT (FITRIM through FUSE's ioctl, FUSE over io_uring when offered):
#      fstrim reports the bytes; measured while mounted and after unmount.
#   2. blobfs mount -o discard (over /dev/fuse): after rm and sync, while still mounted,
#      everything but the log written since the last checkpoint is given back without
#      anyone asking (the log goes at the next checkpoint); after unmount (a checkpoint),
#      within 1 %. fstrim over /dev/fuse works there too.
#   3. blobcli trim IMAGE, offline after unmount; it refuses the image while mounted.
#   4. through the NVMe driver (nvme-emu:), 256 MiB on a 1 GiB image: -o discard, fstrim.
# "Empty" is a fresh image after mkfs, mount and unmount. fsck is clean after each way,
# and the daemons' request ledgers hold no unanswered or twice-answered request.
# Every mount is unmounted and every daemon this script started gone when it ends.
#   BLOBFS=path (default .build/debug/blobfs)  BLOBCLI=path  SIZE_MB=2048  IMAGE_SIZE=4G
set -uo pipefail
cd "$(dirname "$0")/../.."
BLOBFS=${BLOBFS:-$PWD/.build/debug/blobfs}
BLOBCLI=${BLOBCLI:-$PWD/.build/debug/blobcli}
SIZE_MB=${SIZE_MB:-2048}
IMAGE_SIZE=${IMAGE_SIZE:-4G}
for tool in fstrim fusermount3 mountpoint; do
  command -v "$tool" > /dev/null || { echo "FAIL $tool is not installed"; echo "discard: 0 passed, 1 failed"; exit 1; }
done
work=$(mktemp -d /var/tmp/blobfs-discard.XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt"
passed=0 failed=0

daemons() { pgrep -f "blobfs mount .*$work" || true; }
cleanup() {
  if mountpoint -q "$mnt"; then
    fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
  fi
  local pid _
  for _ in $(seq 50); do [ -z "$(daemons)" ] && break; sleep 0.1; done
  for pid in $(daemons); do kill -9 "$pid" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

record() {  # record PASS|FAIL TEXT
  echo "$1 $2"
  if [ "$1" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}
check() {  # check NAME COMMAND...
  local name=$1; shift
  if "$@" > "$work/log" 2>&1; then record PASS "$name"; else record FAIL "$name"; tail -n 20 "$work/log" | sed 's/^/    /'; fi
}

allocated() { echo $(($(stat -c %b "$1") * $(stat -c %B "$1"))); }
kib() { echo "$(($1 / 1024)) KiB"; }
# Log pages written since the last checkpoint (read-only inspection works on a mounted image).
live_log_bytes() {
  "$BLOBCLI" info "$1" --json 2>/dev/null | python3 -c 'import json,sys; l=json.load(sys.stdin)["log"]; print((l["head_sequence"]-l["tail_sequence"])*4096)'
}
within_one_percent() {  # within_one_percent NAME ALLOCATED [SLACK]: ALLOCATED <= 1.01 x empty (+ SLACK)
  local name=$1 bytes=$2 slack=${3:-0}
  local ratio
  ratio=$(python3 -c "print(f'{$bytes / $empty:.4f}')")
  if [ $((bytes * 100)) -le $((empty * 101 + slack * 100)) ]; then
    record PASS "$name: $(kib "$bytes") allocated, ${ratio}x empty$([ "$slack" -gt 0 ] && echo " (live log $(kib "$slack") allowed)")"
  else
    record FAIL "$name: $(kib "$bytes") allocated, ${ratio}x empty ($(kib "$empty")), over 1.01x$([ "$slack" -gt 0 ] && echo " + live log $(kib "$slack")")"
  fi
}
mount_image() {  # mount_image IMAGE [OPTIONS]
  "$BLOBFS" mount "$1" "$mnt" ${2:+-o "$2"} --log "$work/daemon.log" > /dev/null 2>> "$work/tools.log"
}
fill_and_delete() {  # writes SIZE_MB through the mount, syncs, deletes it
  dd if=/dev/zero of="$mnt/big" bs=1M count="$SIZE_MB" conv=fsync status=none || return 1
  echo "    wrote $SIZE_MB MiB: $(kib "$(allocated "$1")") allocated"
  rm "$mnt/big" && sync -f "$mnt"
}

# Empty: mkfs, mount, unmount.
"$BLOBFS" mkfs "$work/empty.img" --size "$IMAGE_SIZE" > /dev/null 2>> "$work/tools.log"
mount_image "$work/empty.img" && "$BLOBFS" unmount "$mnt"
empty=$(allocated "$work/empty.img")
echo "    empty $IMAGE_SIZE file system: $(kib "$empty") allocated"

# 1. fstrim.
start=$SECONDS
"$BLOBFS" mkfs "$work/a.img" --size "$IMAGE_SIZE" > /dev/null 2>> "$work/tools.log"
if mount_image "$work/a.img"; then
  if fill_and_delete "$work/a.img"; then
    echo "    deleted and synced: $(kib "$(allocated "$work/a.img")") allocated"
    if out=$(fstrim -v "$mnt" 2>&1); then
      bytes=$(sed -n 's/.*(\([0-9]*\) bytes) trimmed.*/\1/p' <<<"$out")
      if [ -n "$bytes" ] && [ "$bytes" -ge $((SIZE_MB << 20)) ]; then record PASS "fstrim reports the bytes trimmed: $out"; else record FAIL "fstrim: $out"; fi
    else
      record FAIL "fstrim: $out"
    fi
    within_one_percent "fstrim, mounted" "$(allocated "$work/a.img")" "$(live_log_bytes "$work/a.img")"
  else
    record FAIL "writing $SIZE_MB MiB through the mount"
  fi
  check "unmount" "$BLOBFS" unmount "$mnt"
  within_one_percent "fstrim, after unmount" "$(allocated "$work/a.img")"
  check "fsck after fstrim" "$BLOBFS" fsck "$work/a.img"
else
  record FAIL "mount for fstrim"
fi
echo "    fstrim: $((SECONDS - start)) s"

# 2. mount -o discard (and /dev/fuse).
start=$SECONDS
"$BLOBFS" mkfs "$work/b.img" --size "$IMAGE_SIZE" > /dev/null 2>> "$work/tools.log"
if mount_image "$work/b.img" discard,fuse_transport=dev_fuse; then
  if fill_and_delete "$work/b.img"; then
    # Online: the unlink is durable at the sync (or the next one-second write-back, if
    # the kernel releases the file after it), then the unmaps go out.
    for _ in $(seq 100); do
      [ $(($(allocated "$work/b.img") * 100)) -le $((empty * 101 + $(live_log_bytes "$work/b.img") * 100)) ] && break
      sleep 0.2
    done
    within_one_percent "-o discard, mounted, no fstrim" "$(allocated "$work/b.img")" "$(live_log_bytes "$work/b.img")"
    out=$(fstrim -v "$mnt" 2>&1)
    if [[ "$out" == *"bytes) trimmed"* ]]; then record PASS "fstrim over /dev/fuse: $out"; else record FAIL "fstrim over /dev/fuse: $out"; fi
  else
    record FAIL "writing $SIZE_MB MiB through the mount"
  fi
  check "unmount" "$BLOBFS" unmount "$mnt"
  within_one_percent "-o discard, after unmount" "$(allocated "$work/b.img")"
  check "fsck after -o discard" "$BLOBFS" fsck "$work/b.img"
else
  record FAIL "mount -o discard"
fi
echo "    -o discard: $((SECONDS - start)) s"

# 3. blobcli trim, offline.
start=$SECONDS
"$BLOBFS" mkfs "$work/c.img" --size "$IMAGE_SIZE" > /dev/null 2>> "$work/tools.log"
if mount_image "$work/c.img"; then
  fill_and_delete "$work/c.img" || record FAIL "writing $SIZE_MB MiB through the mount"
  if "$BLOBCLI" trim "$work/c.img" > "$work/refusal" 2>&1; then
    record FAIL "blobcli trim of a mounted image must refuse"
  else
    check "blobcli trim refuses the mounted image (in use)" grep -q "in use" "$work/refusal"
  fi
  check "unmount" "$BLOBFS" unmount "$mnt"
  echo "    unmounted without trimming: $(kib "$(allocated "$work/c.img")") allocated"
  check "blobcli trim" "$BLOBCLI" trim "$work/c.img"
  grep -v " info " "$work/log" | sed 's/^/    /'
  within_one_percent "blobcli trim" "$(allocated "$work/c.img")"
  check "fsck after blobcli trim" "$BLOBFS" fsck "$work/c.img"
else
  record FAIL "mount for blobcli trim"
fi
echo "    blobcli trim: $((SECONDS - start)) s"

# 4. The same through the NVMe driver (nvme-emu:, unmap = Write Zeroes with deallocate),
#    smaller: 256 MiB on a 1 GiB image, -o discard then fstrim.
start=$SECONDS
"$BLOBFS" mkfs "$work/d.img" --size 1G > /dev/null 2>> "$work/tools.log"
mount_image "nvme-emu:$work/d.img" && "$BLOBFS" unmount "$mnt"
empty=$(allocated "$work/d.img")
echo "    empty 1G file system: $(kib "$empty") allocated"
if mount_image "nvme-emu:$work/d.img" discard; then
  SIZE_MB=256 fill_and_delete "$work/d.img" || record FAIL "writing 256 MiB through the mount"
  for _ in $(seq 100); do
    [ $(($(allocated "$work/d.img") * 100)) -le $((empty * 101 + $(live_log_bytes "$work/d.img") * 100)) ] && break
    sleep 0.2
  done
  within_one_percent "nvme-emu: -o discard, mounted" "$(allocated "$work/d.img")" "$(live_log_bytes "$work/d.img")"
  check "nvme-emu: fstrim" fstrim "$mnt"
  check "unmount" "$BLOBFS" unmount "$mnt"
  within_one_percent "nvme-emu: after fstrim and unmount" "$(allocated "$work/d.img")"
  check "fsck after nvme-emu:" "$BLOBFS" fsck "nvme-emu:$work/d.img"
else
  record FAIL "mount nvme-emu: -o discard"
fi
echo "    nvme-emu: $((SECONDS - start)) s"

ledger_clean() { ! grep -E "unanswered for|never answered|answered twice" "$work/daemon.log"; }
check "every request answered exactly once (daemon logs)" ledger_clean
echo "discard through FUSE: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
