#!/usr/bin/env bash
# The file system through a real FUSE mount (part of scripts/test):
#   1. mkfs, mount with allow_other,default_permissions; the POSIX behaviour suite
#      (non-root rules included, a 100,000-entry directory); the randomized exerciser
#      (100,000 operations against an in-memory model); unmount; fsck clean.
#   2. the POSIX suite and the exerciser on 512-byte blocks, 64 KiB clusters, a 1 MiB log
#      (checkpoints every few hundred operations) and the writeback cache, over /dev/fuse
#      (section 1 uses FUSE over io_uring when the kernel offers it).
#   3. kill -9 of the daemon in the middle of a workload that fsyncs files; remount
#      (the replayer runs); every fsync'd file intact; unmount; fsck clean. Twice: on the
#      default path (io_uring) and through the NVMe driver (nvme-emu:).
#   4. fio: every job of the benchmark set runs without error against the mount.
#   5. a full file system under concurrent load: 8 writers with fdatasync past ENOSPC on a
#      256 MiB image (io_uring, the default path, and nvme-emu:); every call returns in time.
#   6. bad input: a garbage image, a missing device, an unknown option, a busy image.
# Every daemon logs to $work/daemon.log; at the end no request may have been left
# unanswered or answered twice (the daemon's request ledger), and the exerciser checks
# fusectl's waiting count after its run.
# Every mount is unmounted and every daemon gone when this script ends, whatever happens.
#   BLOBFS=path/to/blobfs (default .build/debug/blobfs)  OPS=100000  BIG_DIR=100000
set -uo pipefail
cd "$(dirname "$0")/../.."
BLOBFS=${BLOBFS:-$PWD/.build/debug/blobfs}
OPS=${OPS:-100000}
BIG_DIR=${BIG_DIR:-100000}
work=$(mktemp -d /var/tmp/blobfs-fs-test.XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt"
chmod 755 "$work"
passed=0 failed=0

daemons() { pgrep -f "blobfs mount .*$work" || true; }
cleanup() {
  # every mount under $work (deepest first; a step that went wrong may have mounted
  # elsewhere than $mnt), then every daemon this script started
  local point
  for point in $(awk -v w="$work" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
    fusermount3 -u "$point" 2>/dev/null || fusermount3 -u -z "$point" 2>/dev/null || umount -l "$point" 2>/dev/null
  done
  for pid in $(daemons); do kill -9 "$pid" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

check() {  # check NAME COMMAND...: runs, records PASS/FAIL
  local name=$1; shift
  local start=$SECONDS
  if "$@" > "$work/log" 2>&1; then
    echo "PASS $name ($((SECONDS - start)) s)"; passed=$((passed + 1))
  else
    echo "FAIL $name ($((SECONDS - start)) s)"; tail -n 30 "$work/log" | sed 's/^/    /'; failed=$((failed + 1))
  fi
}

unmount() {
  mountpoint -q "$mnt" || return 0
  "$BLOBFS" unmount "$mnt"
}

# 1. POSIX suite and exerciser on the default geometry.
"$BLOBFS" mkfs "$work/a.img" --size 8G --preallocate > /dev/null
if "$BLOBFS" mount "$work/a.img" "$mnt" -o allow_other,default_permissions --log "$work/daemon.log" > "$work/mount.out"; then
  chmod 755 "$mnt"
  sed 's/^/    /' "$work/mount.out"
  if [ "$(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null)" = Y ]; then
    check "FUSE over io_uring is in use (enable_uring is on)" grep -q "io_uring" "$work/mount.out"
  fi
  check "posix suite (non-root rules, $BIG_DIR-entry directory)" python3 Tests/fs/posix_suite.py "$mnt" --big-dir "$BIG_DIR"
  grep -E "big directory|posix suite" "$work/log" | sed 's/^ */    /'
  check "exerciser seed 1, $OPS operations" python3 Tests/fs/exerciser.py "$mnt" --seed 1 --ops "$OPS"
  check "unmount" unmount
  check "fsck after the suites" "$BLOBFS" fsck "$work/a.img"
else
  echo "FAIL mount"; failed=$((failed + 1))
fi

# 2. Small blocks, big clusters, a small log, the kernel's writeback cache, /dev/fuse.
"$BLOBFS" mkfs "$work/b.img" --size 2G --block-size 512 --cluster-size 65536 --log-size 1M --preallocate > /dev/null
check "mkfs --log-size 1M: a 256-page log" bash -c "${BLOBFS%blobfs}blobcli info '$work/b.img' | grep -q 'log 2+256,'"
if "$BLOBFS" mount "$work/b.img" "$mnt" -o writeback_cache,fuse_transport=dev_fuse,allow_other --log "$work/daemon.log" > "$work/mount.out"; then
  chmod 755 "$mnt"
  check "mount over /dev/fuse says so" grep -q "/dev/fuse" "$work/mount.out"
  check "posix suite over /dev/fuse (writeback cache, 512-byte blocks)" python3 Tests/fs/posix_suite.py "$mnt" --big-dir 2000
  check "exerciser seed 2 (512-byte blocks, 64 KiB clusters, 1 MiB log, writeback cache, /dev/fuse)" \
    python3 Tests/fs/exerciser.py "$mnt" --seed 2 --ops $((OPS / 4))
  check "unmount" unmount
  check "fsck" "$BLOBFS" fsck "$work/b.img"
else
  echo "FAIL mount (512-byte blocks)"; failed=$((failed + 1))
fi

# 3. kill -9 during a workload; the replayer brings back every fsync'd file.
"$BLOBFS" mkfs "$work/c.img" --size 4G > /dev/null  # sparse, as users make them
for round in 1 2; do
  device=$work/c.img; [ "$round" -eq 2 ] && device=nvme-emu:$work/c.img
  if ! "$BLOBFS" mount "$device" "$mnt" > /dev/null; then echo "FAIL mount for kill -9 round $round"; failed=$((failed + 1)); continue; fi
  pid=$(daemons | head -n 1)
  python3 Tests/fs/exerciser.py "$mnt" --seed $((10 + round)) --ops 100000 --manifest "$work/manifest" > /dev/null 2>&1 &
  writer=$!
  sleep $((2 + round))
  kill -9 "$pid"
  wait "$writer" 2>/dev/null
  fusermount3 -u -z "$mnt" 2>/dev/null
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  echo "    kill -9 round $round ($device): $(wc -l < "$work/manifest") files fsync'd before the kill"
  if "$BLOBFS" mount "$device" "$mnt" --log "$work/daemon.log" > /dev/null; then
    check "kill -9 round $round: every fsync'd file intact after replay" \
      python3 Tests/fs/exerciser.py "$mnt" --verify-manifest "$work/manifest"
    check "unmount" unmount
  else
    echo "FAIL remount after kill -9 (round $round)"; failed=$((failed + 1))
  fi
  check "fsck after kill -9 round $round" "$BLOBFS" fsck "$device"
done

# 4. fio against the mount: every job of the benchmark set runs without error (short runs).
fio_jobs() {
  local status=0
  for engine in psync io_uring; do
    for direct in 0 1; do
      for job in "write 1M" "read 1M" "randread 4k" "randwrite 4k" "randrw 4k"; do
        set -- $job
        fio --name="$1-$engine-d$direct" --directory="$mnt" --filename=fio.dat --size=64M --rw="$1" --bs="$2" \
          --ioengine="$engine" --iodepth=8 --direct="$direct" --runtime=1 --time_based --output-format=terse \
          > "$work/fio.out" 2>&1 || { echo "fio $1 $2 $engine direct=$direct failed"; cat "$work/fio.out"; status=1; }
        awk -F';' -v job="$1 $2 $engine direct=$direct" '$1 == "3" { printf "    fio %-28s read %6.0f IOPS  write %6.0f IOPS\n", job, $8, $49 }' "$work/fio.out"
      done
    done
  done
  return $status
}
"$BLOBFS" mkfs "$work/f.img" --size 2G --preallocate > /dev/null
if "$BLOBFS" mount "$work/f.img" "$mnt" --log "$work/daemon.log" > /dev/null; then
  check "fio seq 1M read/write, 4k randread/randwrite/randrw; psync and io_uring; direct=0 and 1" fio_jobs
  grep "^    fio" "$work/log"
  check "unmount" unmount
  check "fsck after fio" "$BLOBFS" fsck "$work/f.img"
else
  echo "FAIL mount for fio"; failed=$((failed + 1))
fi

# 5. A full file system under concurrent load: every call returns (ENOSPC is an answer).
full_load() {  # full_load DEVICE: mkfs 256M, mount, 8 writers past ENOSPC, unmount, fsck
  local device=$1 image=${1#*:} status=0
  "$BLOBFS" mkfs "$image" --size 256M --force > /dev/null || return 1
  "$BLOBFS" mount "$device" "$mnt" --log "$work/daemon.log" > /dev/null || return 1
  if ! python3 Tests/fs/full_stress.py "$mnt" --workers 8 --seconds "${FULL_SECONDS:-20}" --limit 60; then
    status=1
    # A hung request: its callers wait until the daemon dies.
    for pid in $(daemons); do kill -9 "$pid"; done
    fusermount3 -u -z "$mnt" 2>/dev/null
    sleep 1
    return 1
  fi
  unmount || status=1
  "$BLOBFS" fsck "$device" || status=1
  return $status
}
check "a full file system under 8 concurrent writers with fdatasync: every call returns" full_load "$work/h.img"
grep -E "calls returned" "$work/log" | sed 's/^/    /'
check "the same through the NVMe driver (nvme-emu:)" full_load "nvme-emu:$work/h.img"
grep -E "calls returned" "$work/log" | sed 's/^/    /'
rm -f "$work/h.img"

# 6. Bad input: clear errors, the right exit status, nothing mounted, nothing left running.
expect_status() {  # expect_status STATUS COMMAND...
  local want=$1; shift
  "$@" > "$work/out" 2>&1
  local got=$?
  [ "$got" -eq "$want" ] || { echo "status $got, expected $want: $*"; cat "$work/out"; return 1; }
  grep -q . "$work/out" || { echo "no message from: $*"; return 1; }
}
head -c $((64 << 20)) /dev/urandom > "$work/garbage.img"
check "mount of a garbage image fails with a message" expect_status 1 "$BLOBFS" mount "$work/garbage.img" "$mnt"
check "fsck of a garbage image: status 2" expect_status 2 "$BLOBFS" fsck "$work/garbage.img"
check "mount of a missing image: status 2" expect_status 2 "$BLOBFS" mount "$work/missing.img" "$mnt"
check "unknown mount option: status 2" expect_status 2 "$BLOBFS" mount "$work/a.img" "$mnt" -o frobnicate
mkfs_refused() {  # mkfs_refused IMAGE ARGS...: status 2 with a message, and no IMAGE made
  expect_status 2 "$BLOBFS" mkfs "$@" && [ ! -e "$1" ]
}
check "mkfs --log-size below 256K: status 2" mkfs_refused "$work/g.img" --size 1G --log-size 128K
check "mkfs --log-size not in 4 KiB pages: status 2" mkfs_refused "$work/g.img" --size 1G --log-size 1000000
check "mkfs --log-size larger than the device: status 2, no image left" mkfs_refused "$work/g.img" --size 1G --log-size 2G
check "mkfs --inodes more than the device holds: status 2, no image left" mkfs_refused "$work/g.img" --size 64M --inodes 60000000
check "mkfs over an existing store without --force refuses" expect_status 1 "$BLOBFS" mkfs "$work/a.img"
"$BLOBFS" mount "$work/a.img" "$mnt" > /dev/null
mkdir -p "$work/mnt2"
check "second mount of a mounted image refuses" expect_status 1 "$BLOBFS" mount "$work/a.img" "$work/mnt2"
check "fsck of a mounted image refuses" expect_status 1 "$BLOBFS" fsck "$work/a.img"
check "unmount" unmount
mountpoint -q "$mnt" && { echo "FAIL something is still mounted"; failed=$((failed + 1)); }
ledger_clean() {  # the daemons' request ledgers: nothing overdue, unanswered or answered twice
  ! grep -E "unanswered for|never answered|answered twice" "$work/daemon.log"
}
check "every request answered exactly once (daemon logs)" ledger_clean

echo "file system through FUSE: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
