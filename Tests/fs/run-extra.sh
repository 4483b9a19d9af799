#!/usr/bin/env bash
# The second half of the file system tests through a real FUSE mount (the first half is
# run-mounted.sh): posix_extra.py and exerciser_extra.py.
#   1. mkfs, mount -o allow_other,default_permissions: posix_extra.py (non-root rules as
#      nobody), exerciser_extra.py (seeded, OPS operations, fsync every 1000); unmount; fsck.
#   2. the same image mounted with writeback_cache: posix_extra.py again, exerciser_extra.py.
#   3. ENOSPC on a small image: fill it, clean errors, data intact, space back; fsck.
#   4. kill -9 of the daemon during exerciser_extra.py's crash workload (fsync'd files,
#      atomic replaces, renames, links, mkdirs, unlinks, syncfs); fusermount3 -u -z;
#      remount (the log replays); every durable record checked; the file system still
#      works; unmount; fsck clean. CRASH_ROUNDS rounds on one image, one manifest.
# Builds nothing. Every mount is unmounted and every daemon this script started is gone
# when it ends, whatever happens. Exit status 0 when everything passed.
# A step that runs longer than STEP_TIMEOUT seconds counts as a hung file system: the
# daemon's threads are printed (gdb, when installed), it is killed, the mount dropped and
# the rest of that section skipped.
#   BLOBFS=path (default .build/debug/blobfs)  OPS=100000  CRASH_ROUNDS=2  STEP_TIMEOUT=900
#   SECTIONS="default writeback enospc crash" (a subset runs only those)
#   KEEP=1 (keep the work directory when something failed)
set -uo pipefail
cd "$(dirname "$0")/../.."
BLOBFS=${BLOBFS:-$PWD/.build/debug/blobfs}
OPS=${OPS:-100000}
ROUNDS=${CRASH_ROUNDS:-2}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
SECTIONS=" ${SECTIONS:-default writeback enospc crash} "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }
suites=$PWD/Tests/fs
passed=0 failed=0
daemons=()   # pids of the daemons this script started
daemon=      # the daemon serving $mnt now
mounted=no   # whether $mnt is a live blobfs mount the steps may use
writer=      # pid of a background workload

# Preflight: a clear failure when blobfs is not there yet.
preflight_fail() { echo "FAIL $*"; echo "file system through FUSE (extra): 0 passed, 1 failed"; exit 1; }
[ -x "$BLOBFS" ] || preflight_fail "no blobfs binary at $BLOBFS (build it first, or set BLOBFS=)"
if ! help=$("$BLOBFS" --help 2>&1) || grep -qi "not built yet" <<<"$help"; then
  preflight_fail "$BLOBFS is not a usable blobfs: $(head -n 2 <<<"$help" | tr '\n' ' ')"
fi
for tool in python3 fusermount3 mountpoint; do
  command -v "$tool" > /dev/null || preflight_fail "$tool is not installed"
done
[ -c /dev/fuse ] || preflight_fail "/dev/fuse is missing"
[ "$(id -u)" -eq 0 ] || echo "note: not running as root; the non-root tests will be skipped"

work=$(mktemp -d /var/tmp/blobfs-extra.XXXXXX)
chmod 755 "$work"
mnt=$work/mnt
mkdir "$mnt"

cleanup() {
  if [ -n "$writer" ]; then kill -9 "$writer" 2>/dev/null; fi
  if mountpoint -q "$mnt"; then
    fusermount3 -u "$mnt" 2>/dev/null || fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
  fi
  local pid _
  for pid in "${daemons[@]}"; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done  # time to exit cleanly
    if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q blobfs; then
      echo "    killing leftover daemon $pid"
      kill -9 "$pid" 2>/dev/null
    fi
  done
  if mountpoint -q "$mnt"; then
    echo "WARNING: $mnt is still mounted; $work left in place"
  elif [ "$failed" -gt 0 ] && [ -n "${KEEP:-}" ]; then
    echo "work directory kept: $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

record() {  # record PASS|FAIL NAME SECONDS
  echo "$1 $2 ($3 s)"
  if [ "$1" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

abandon_mount() {  # the file system stopped answering: show where the daemon is, kill it, drop the mount
  if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then
    if command -v gdb > /dev/null; then
      echo "    threads of the daemon $daemon:"
      timeout 60 gdb -p "$daemon" -batch -ex "thread apply all bt 12" 2>/dev/null | grep -E "^(Thread|#)" | cut -c1-220 | head -n 80 | sed 's/^/    | /'
    fi
    kill -9 "$daemon" 2>/dev/null
  fi
  fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
  mounted=no
  local _
  for _ in $(seq 100); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.1; done
}

check() {  # check NAME COMMAND...: runs it under STEP_TIMEOUT; PASS/FAIL/SKIP; the suites' summary lines shown
  check_within "$STEP_TIMEOUT" "$@"
}

check_within() {  # check_within SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  local start=$SECONDS status
  if [ "$mounted" = no ] && [ "$1" = python3 ]; then
    echo "SKIP $name (no usable mount)"; return 1
  fi
  timeout -k 10 "$limit" "$@" > "$work/log" 2>&1
  status=$?
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    record FAIL "$name: no answer within $limit s (the file system hangs?)" $((SECONDS - start))
    tail -n 5 "$work/log" | sed 's/^/    | /'
    [ "$mounted" = yes ] && abandon_mount
    return 1
  fi
  if [ "$status" -eq 0 ]; then
    record PASS "$name" $((SECONDS - start))
    grep -E "^(posix extra|exerciser-extra|  skipped|  filled|blobfs fsck)" "$work/log" | sed 's/^ */    /'
  else
    record FAIL "$name" $((SECONDS - start))
    grep -E "^(FAIL|ERROR):|Error:|MISMATCH|UNEXPECTED" "$work/log" | head -n 20 | sed 's/^/    /'
    tail -n 25 "$work/log" | sed 's/^/    | /'
    return 1
  fi
}

mount_fs() {  # mount_fs IMAGE OPTIONS: mounts on $mnt, remembers the daemon's pid in $daemon
  local out
  daemon=
  if ! out=$("$BLOBFS" mount "$1" "$mnt" -o "$2" --log "$work/daemon.log" 2>&1); then
    echo "FAIL mount $1 -o $2"; echo "$out" | sed 's/^/    /'; failed=$((failed + 1)); return 1
  fi
  daemon=$(sed -n 's/.*daemon pid \([0-9][0-9]*\).*/\1/p' <<<"$out" | head -n 1)
  [ -n "$daemon" ] || daemon=$(pgrep -f -- "mount $1 $mnt" | head -n 1)
  [ -n "$daemon" ] && daemons+=("$daemon")
  if ! mountpoint -q "$mnt"; then
    echo "FAIL mount $1: blobfs mount returned but $mnt is not a mountpoint"; failed=$((failed + 1)); return 1
  fi
  chmod 755 "$mnt"
  mounted=yes
}

unmount_fs() {  # unmount_fs: blobfs unmount, then the daemon must be gone
  local start=$SECONDS
  mountpoint -q "$mnt" || { mounted=no; return 0; }  # dropped after a hang
  mounted=no
  if ! timeout -k 10 120 "$BLOBFS" unmount "$mnt" > "$work/log" 2>&1; then
    record FAIL "unmount" $((SECONDS - start)); sed 's/^/    /' "$work/log"
    abandon_mount
    return 1
  fi
  if [ -n "$daemon" ]; then
    local _
    for _ in $(seq 100); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$daemon" 2>/dev/null; then record FAIL "unmount: daemon $daemon still running" $((SECONDS - start)); return 1; fi
  fi
  if mountpoint -q "$mnt"; then record FAIL "unmount: $mnt still mounted" $((SECONDS - start)); return 1; fi
  record PASS "unmount" $((SECONDS - start))
}

# 1. Default mount.
img=$work/a.img
if ! want default && ! want writeback; then
  :
elif "$BLOBFS" mkfs "$img" --size 4G > "$work/log" 2>&1 || { echo "FAIL mkfs"; sed 's/^/    /' "$work/log"; false; }; then
  if want default && mount_fs "$img" allow_other,default_permissions; then
    check "posix_extra.py (non-root rules as nobody)" python3 "$suites/posix_extra.py" "$mnt" -q
    check "exerciser_extra.py seed 1, $OPS operations, fsync every 1000" \
      python3 "$suites/exerciser_extra.py" "$mnt" --seed 1 --ops "$OPS" --fsync-every 1000 --stats
    unmount_fs
    check "fsck after the suites" "$BLOBFS" fsck "$img"
  fi

  # 2. The kernel's writeback cache changes who keeps size and mtime: the same suites again,
  #    over /dev/fuse (section 1 uses FUSE over io_uring when the kernel offers it).
  if want writeback && mount_fs "$img" allow_other,default_permissions,writeback_cache,fuse_transport=dev_fuse; then
    check "posix_extra.py with writeback_cache over /dev/fuse" python3 "$suites/posix_extra.py" "$mnt" -q
    check "exerciser_extra.py seed 2, $((OPS / 4)) operations, writeback_cache" \
      python3 "$suites/exerciser_extra.py" "$mnt" --seed 2 --ops $((OPS / 4))
    unmount_fs
    check "fsck after writeback_cache" "$BLOBFS" fsck "$img"
  fi
  rm -f "$img"
else
  failed=$((failed + 1))
fi

# 3. ENOSPC on a small image.
img=$work/e.img
if ! want enospc; then
  :
elif "$BLOBFS" mkfs "$img" --size 256M > "$work/log" 2>&1 || { echo "FAIL mkfs 256M"; sed 's/^/    /' "$work/log"; false; }; then
  if mount_fs "$img" allow_other,default_permissions; then
    check_within 180 "ENOSPC: a full file system fails cleanly and recovers" \
      python3 "$suites/posix_extra.py" "$mnt" -k enospc --fill --fill-limit $((512 << 20))
    check_within 300 "exerciser_extra.py after ENOSPC (seed 3, 5000 operations)" \
      python3 "$suites/exerciser_extra.py" "$mnt" --seed 3 --ops 5000 --max-size $((8 << 20))
    unmount_fs
    check "fsck after ENOSPC" "$BLOBFS" fsck "$img"
  fi
  rm -f "$img"
else
  failed=$((failed + 1))
fi

# 4. kill -9 during the crash workload; every durable record intact after replay.
img=$work/c.img
manifest=$work/manifest   # outside the file system under test
if ! want crash; then
  :
elif "$BLOBFS" mkfs "$img" --size 4G > "$work/log" 2>&1 || { echo "FAIL mkfs"; sed 's/^/    /' "$work/log"; false; }; then
  for round in $(seq "$ROUNDS"); do
    mount_fs "$img" allow_other,default_permissions || break
    if [ -z "$daemon" ]; then echo "FAIL kill -9 round $round: no daemon pid"; failed=$((failed + 1)); break; fi
    start=$SECONDS
    timeout 300 python3 "$suites/exerciser_extra.py" "$mnt" --seed $((20 + round)) --write-manifest "$manifest" \
      --duration 120 > "$work/writer.log" 2>&1 &
    writer=$!
    sleep $((3 + round))
    running=yes; kill -0 "$writer" 2>/dev/null || running=no
    killed=yes; kill -9 "$daemon" 2>/dev/null || killed=no
    timeout 60 tail --pid="$writer" -f /dev/null  # the workload ends once its file system is gone
    kill -9 "$writer" 2>/dev/null
    wait "$writer"; status=$?
    writer=
    fusermount3 -u -z "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
    mounted=no
    for _ in $(seq 100); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.1; done
    sed 's/^/    /' "$work/writer.log"
    if [ "$killed" = no ]; then
      record FAIL "kill -9 round $round: the daemon had exited before the kill" $((SECONDS - start))
    elif [ "$running" = no ] || { [ "$status" -ne 3 ] && [ "$status" -ne 0 ]; }; then
      record FAIL "kill -9 round $round: the workload (status $status, running at the kill: $running)" $((SECONDS - start))
    else
      record PASS "kill -9 round $round: daemon killed during the workload; $(grep -c . "$manifest") durable records so far" $((SECONDS - start))
    fi
    if mount_fs "$img" allow_other,default_permissions; then
      check_within 300 "kill -9 round $round: every durable record intact after replay" \
        python3 "$suites/exerciser_extra.py" "$mnt" --verify-manifest "$manifest"
      check_within 300 "kill -9 round $round: the replayed file system works (seed $((30 + round)), 3000 operations)" \
        python3 "$suites/exerciser_extra.py" "$mnt" --seed $((30 + round)) --ops 3000
      unmount_fs
    fi
    check "fsck after kill -9 round $round" "$BLOBFS" fsck "$img"
  done
else
  failed=$((failed + 1))
fi

if mountpoint -q "$mnt"; then echo "FAIL $mnt is still mounted at the end"; failed=$((failed + 1)); fi
for pid in "${daemons[@]}"; do
  if kill -0 "$pid" 2>/dev/null; then echo "FAIL daemon $pid still running at the end"; failed=$((failed + 1)); fi
done
if grep -E "unanswered for|never answered|answered twice" "$work/daemon.log" 2>/dev/null; then
  echo "FAIL a request was left unanswered or answered twice (daemon logs above)"; failed=$((failed + 1))
else
  echo "PASS every request answered exactly once (daemon logs)"; passed=$((passed + 1))
fi
echo "file system through FUSE (extra): $passed passed, $failed failed"
[ "$failed" -eq 0 ]
