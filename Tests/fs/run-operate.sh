#!/usr/bin/env bash
# Operating a mount, through real mounts (part of scripts/test; issue 17):
#   0. mkfs's inode default scales with the device.
#   1. the control socket: `blobfs status` and `stats` (text and JSON, checked field by
#      field), `stats --interval`, `sync`, `checkpoint`; status and stats answer in under
#      50 ms while fio runs on the mount; root only (another user is refused); a socket
#      left by kill -9 is replaced by the next mount; -o no_stats.
#   2. online grow: a 4 GiB image grown to 64 GiB under the running exerciser (no error),
#      fsck and blobcli fsck clean, blobcli info shows the grown layout, the data intact.
#   3. daemon conventions: READY=1 and STOPPING=1 to $NOTIFY_SOCKET around a foreground
#      mount, SIGTERM unmounts cleanly (exit 0); SIGHUP reopens the log file; without
#      --log the daemon logs to syslog.
#   4. a device error (the image's file system full) turns the store read-only: logged
#      once, shown by status, every later write EROFS, nothing hangs.
#   5. -o metadata_cache=1024: a walk of 3,000 files keeps at most 1,024 blobs in memory.
# Every mount is unmounted and every daemon gone when this script ends, whatever happens.
#   BLOBFS=path/to/blobfs (default .build/debug/blobfs)  GROW_OPS=20000
set -uo pipefail
cd "$(dirname "$0")/../.."
BLOBFS=${BLOBFS:-$PWD/.build/debug/blobfs}
BLOBCLI=${BLOBCLI:-${BLOBFS%blobfs}blobcli}
GROW_OPS=${GROW_OPS:-20000}
work=$(mktemp -d /var/tmp/blobfs-operate.XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt"
chmod 755 "$work"
passed=0 failed=0
listeners=()

daemons() { pgrep -f "blobfs mount .*$work" || true; }
cleanup() {
  local point pid
  for pid in "${listeners[@]}"; do kill "$pid" 2>/dev/null; done
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
show() { sed 's/^/    /' "$work/log"; }
unmount() { mountpoint -q "$mnt" || return 0; "$BLOBFS" unmount "$mnt"; }
json() {  # json PYTHON-EXPRESSION over `status` as s (or stdin's JSON as s): exit 0 when true
  python3 -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if ($1) else 1)"
}
socket_of() { python3 -c "import json,sys; print(json.load(sys.stdin)['control_socket'])"; }

# A datagram listener (for $NOTIFY_SOCKET and syslog): appends what it receives to FILE.
listen() {  # listen SOCKET FILE
  python3 -c '
import os, socket, sys
path, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
os.chmod(path, 0o666)
with open(out, "a") as f:
    while True:
        f.write(s.recv(65536).decode() + "\n"); f.flush()
' "$1" "$2" &
  listeners+=($!)
  for _ in $(seq 50); do [ -S "$1" ] && return 0; sleep 0.1; done
}
wait_for() {  # wait_for SECONDS COMMAND...: until it succeeds
  local limit=$(($1 * 10)); shift
  for _ in $(seq "$limit"); do "$@" 2>/dev/null && return 0; sleep 0.1; done
  return 1
}

# mkfs: inodes scale with the device (one per 8 KiB with 4 KiB clusters, up to 16 Mi).
inodes_scale() {
  "$BLOBFS" mkfs "$work/big.img" --size 64G | tee /dev/stderr | grep -q "up to 8388608 inodes" || return 1
  "$BLOBFS" mkfs "$work/huge.img" --size 1T | tee /dev/stderr | grep -q "up to 16777216 inodes"
}
check "mkfs: 8 Mi inodes on 64 GiB, 16 Mi (the default's limit) on 1 TiB" inodes_scale
show
rm -f "$work/big.img" "$work/huge.img"

# 1. The control socket.
"$BLOBFS" mkfs "$work/a.img" --size 4G > /dev/null
if "$BLOBFS" mount "$work/a.img" "$mnt" --log "$work/daemon.log" > "$work/mount.out"; then
  sed 's/^/    /' "$work/mount.out"
  check "blobfs mount prints the control socket" grep -q "control socket /run/blobfs/" "$work/mount.out"
  dd if=/dev/urandom of="$mnt/data" bs=64k count=64 conv=fsync status=none
  cat "$mnt/data" > /dev/null
  check "blobfs status" "$BLOBFS" status "$mnt"
  show
  status_fields() {
    "$BLOBFS" status "$mnt" --json | json "s['version'] == 1 and s['mountpoint'] == '$mnt' and s['device']['kind'] == 'io_uring'
      and s['device']['store_bytes'] == 4 << 30 and s['transport']['kind'] in ('io_uring', 'dev_fuse') and s['transport']['queues'] >= 1
      and any(r['name'] == 'blob-md' and 0 <= r['busy_share_recent'] <= 1 for r in s['reactors'])
      and s['space']['inodes']['used'] == 2 and s['space']['used_data_bytes'] >= 4 << 20 and s['space']['log']['pages'] > 0
      and s['read_only'] is False and s['errors']['read_only_reason'] is None and s['errors']['requests_held'] >= 0
      and s['last_checkpoint']['sequence'] > 0"
  }
  check "status --json: device, transport, reactors, space, inodes, state" status_fields
  stats_fields() {
    "$BLOBFS" stats "$mnt" --json | json "s['statistics'] and s['device']['writes'] > 0 and s['device']['flushes'] > 0
      and any(o['op'] == 'WRITE' and o['answered'] > 0 and o['bytes'] >= 4 << 20 and 0 < o['latency_us']['p50'] <= o['latency_us']['max'] for o in s['operations'])
      and any(o['op'] == 'CREATE' and o['answered'] == 1 for o in s['operations'])"
  }
  check "stats --json: WRITE count, bytes and latency, the device's writes and flushes" stats_fields
  check "blobfs stats (text)" "$BLOBFS" stats "$mnt"
  show
  interval() {
    ( sleep 0.3; dd if=/dev/zero of="$mnt/tick" bs=4k count=100 oflag=direct status=none ) &
    "$BLOBFS" stats "$mnt" --json --interval 0.5 --count 3 > "$work/interval.json" || return 1
    wait
    [ "$(wc -l < "$work/interval.json")" -eq 3 ] || return 1
    python3 -c "
import json, sys
reports = [json.loads(line) for line in open('$work/interval.json')]
assert all(r['interval'] and 0.4 < r['seconds'] < 2 for r in reports), reports
assert sum(o['answered'] for r in reports for o in r['operations'] if o['op'] == 'WRITE') >= 100, reports"
  }
  check "stats --interval 0.5 --count 3 --json: three interval reports with the writes of that time" interval
  xattr_lookups() {
    "$BLOBFS" stats "$mnt" --json | python3 -c "import json,sys; print(sum(o['answered'] for o in json.load(sys.stdin)['operations'] if o['op'] == 'GETXATTR'))"
  }
  no_xattr_per_write() {  # FUSE_HANDLE_KILLPRIV_V2: the mount is SB_NOSEC, so write(2) asks no security.capability
    local before after
    before=$(xattr_lookups)
    dd if=/dev/zero of="$mnt/cached" bs=4k count=2000 status=none || return 1
    after=$(xattr_lookups)
    echo "GETXATTR during 2,000 buffered writes: $((after - before))"
    [ $((after - before)) -lt 20 ]
  }
  check "2,000 buffered write(2)s ask for no xattr each (FUSE_HANDLE_KILLPRIV_V2)" no_xattr_per_write
  sync_and_checkpoint() {
    local before
    before=$("$BLOBFS" status "$mnt" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['last_checkpoint']['since_mount'])")
    touch "$mnt/dirty"
    "$BLOBFS" sync "$mnt" && "$BLOBFS" checkpoint "$mnt" || return 1
    "$BLOBFS" status "$mnt" --json | json "s['last_checkpoint']['since_mount'] >= $before + 2 and s['space']['log']['pages_in_use'] == 0
      and s['dirty_inodes'] == 0 and not s['unflushed_commits']"
  }
  check "sync and checkpoint: two more checkpoints, the log empty, nothing dirty" sync_and_checkpoint
  socket=$("$BLOBFS" status "$mnt" --json | socket_of)
  under_fio() {
    fio --name=load --directory="$mnt" --filename=fio.dat --size=256M --rw=randrw --bs=4k --ioengine=io_uring --iodepth=16 \
      --direct=1 --runtime=8 --time_based --output="$work/fio.out" > /dev/null 2>&1 &
    local fio=$!
    sleep 2
    python3 Tests/fs/control_client.py "$socket" latency --samples 40 --limit-ms 50
    local status=$?
    local start end
    start=$(date +%s%N); "$BLOBFS" status "$mnt" > /dev/null; end=$(date +%s%N)
    echo "blobfs status (the command, process start included): $(( (end - start) / 1000000 )) ms"
    wait $fio || { echo "fio failed"; cat "$work/fio.out"; return 1; }
    return $status
  }
  check "status and stats answer in under 50 ms while fio runs (4k randrw, depth 16, direct)" under_fio
  show
  refused() {
    runuser -u nobody -- "$BLOBFS" status "$mnt" --socket "$socket" > "$work/out" 2>&1
    local got=$?
    cat "$work/out"
    [ "$got" -eq 2 ] && grep -q "permission denied" "$work/out" && [ "$(stat -c %a "$socket")" = 600 ]
  }
  check "the control socket is root's: another user is refused (status 2), mode 0600" refused
  check "unknown mountpoint: status 2" bash -c "\"$BLOBFS\" status /nonexistent-mountpoint; [ \$? -eq 2 ]"
  check "unmount" unmount
  check "the socket is gone after unmount" test ! -e "$socket"
  check "fsck" "$BLOBFS" fsck "$work/a.img"
else
  echo "FAIL mount"; failed=$((failed + 1))
fi

# A socket left by kill -9 is replaced by the next mount; -o no_stats.
stale_socket() {
  "$BLOBFS" mount "$work/a.img" "$mnt" --log "$work/daemon.log" > /dev/null || return 1
  local pid socket
  pid=$(daemons | head -n 1)
  socket=$("$BLOBFS" status "$mnt" --json | socket_of)
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fusermount3 -u -z "$mnt"
  [ -S "$socket" ] || { echo "no leftover socket to replace"; return 1; }
  "$BLOBFS" mount "$work/a.img" "$mnt" -o no_stats --log "$work/daemon.log" > /dev/null || return 1
  "$BLOBFS" status "$mnt" > /dev/null || return 1
  "$BLOBFS" stats "$mnt" | grep -q "not kept: mounted with no_stats" || return 1
  "$BLOBFS" stats "$mnt" --json | json "not s['statistics'] and s['device'] is None"
}
check "after kill -9 the next mount serves the socket again; -o no_stats keeps no statistics" stale_socket
check "unmount" unmount

# 2. Online grow: 4 GiB to 64 GiB under the exerciser.
grow_under_load() {
  "$BLOBFS" mount "$work/a.img" "$mnt" --log "$work/daemon.log" > /dev/null || return 1
  python3 Tests/fs/exerciser.py "$mnt" --seed 17 --ops "$GROW_OPS" > "$work/exerciser.out" 2>&1 &
  local exerciser=$!
  sleep 3
  kill -0 $exerciser || { echo "the exerciser ended before the grow"; cat "$work/exerciser.out"; return 1; }
  "$BLOBFS" grow "$mnt" --size 64G || return 1
  "$BLOBFS" status "$mnt" --json | json "s['device']['store_bytes'] == 64 << 30 and s['space']['inodes']['limit'] > 1 << 20" || return 1
  wait $exerciser || { echo "the exerciser failed during the grow"; cat "$work/exerciser.out"; return 1; }
  tail -n 2 "$work/exerciser.out"
  df -h "$mnt" | tail -n 1
  # The new clusters take data.
  dd if=/dev/urandom of="$mnt/after-grow" bs=1M count=64 conv=fsync status=none || return 1
  sha256sum "$mnt/after-grow" "$mnt/data" > "$work/sums"
}
check "grow 4 GiB to 64 GiB under the exerciser ($GROW_OPS operations): no error" grow_under_load
show
check "unmount" unmount
check "fsck after the grow" "$BLOBFS" fsck "$work/a.img"
check "blobcli fsck after the grow" "$BLOBCLI" fsck "$work/a.img"
check "blobcli info: the grown layout" bash -c "\"$BLOBCLI\" info '$work/a.img' | grep -q 'grown: table and bitmaps after the data'"
remount_intact() {
  "$BLOBFS" mount "$work/a.img" "$mnt" --log "$work/daemon.log" > /dev/null || return 1
  (cd / && sha256sum -c "$work/sums") || return 1
  df -B1 "$mnt" | awk 'NR == 2 && $2 > 63 * 2^30 { ok = 1 } END { exit !ok }'
}
check "remounted: 64 GiB, the files intact" remount_intact
check "unmount" unmount

# 3. Daemon conventions: sd_notify, SIGTERM, SIGHUP, syslog.
notify() {
  listen "$work/notify.sock" "$work/notify.txt"
  NOTIFY_SOCKET=$work/notify.sock "$BLOBFS" mount --foreground "$work/a.img" "$mnt" --log "$work/daemon.log" &
  local pid=$!
  wait_for 30 grep -q "READY=1" "$work/notify.txt" || { echo "no READY=1"; kill $pid; return 1; }
  mountpoint -q "$mnt" || { echo "READY=1 before the mount was live"; return 1; }
  grep -q "MAINPID=$pid" "$work/notify.txt" || { echo "MAINPID is not the daemon's"; return 1; }
  kill -TERM $pid
  wait $pid
  local status=$?
  cat "$work/notify.txt"
  [ "$status" -eq 0 ] && grep -q "STOPPING=1" "$work/notify.txt" && ! mountpoint -q "$mnt"
}
check "foreground mount under systemd's protocol: READY=1 once live, SIGTERM unmounts (exit 0), STOPPING=1" notify
show
check "fsck after SIGTERM" "$BLOBFS" fsck "$work/a.img"
hangup() {
  "$BLOBFS" mount "$work/a.img" "$mnt" --log "$work/rotated.log" > /dev/null || return 1
  mv "$work/rotated.log" "$work/rotated.log.1"
  kill -HUP "$(daemons | head -n 1)"
  wait_for 5 grep -q "SIGHUP: log file reopened" "$work/rotated.log" || return 1
  "$BLOBFS" sync "$mnt" > /dev/null
  mountpoint -q "$mnt" && grep -q "sync asked on the control socket" "$work/rotated.log" \
    && ! grep -q "sync asked" "$work/rotated.log.1"
}
check "SIGHUP reopens the log file (the mount stays)" hangup
check "unmount" unmount
syslog() {
  listen "$work/syslog.sock" "$work/syslog.txt"
  BLOBFS_SYSLOG_SOCKET=$work/syslog.sock "$BLOBFS" mount "$work/a.img" "$mnt" --log-level debug > /dev/null || return 1
  "$BLOBFS" unmount "$mnt" || return 1
  cat "$work/syslog.txt"
  grep -qE "^<29>[A-Z][a-z]{2} [ 0-9]{2} [0-9:]{8} blobfs\[[0-9]+\]: notice blobfs.mount: .* mounted on $mnt" "$work/syslog.txt" \
    && grep -q "unmounted" "$work/syslog.txt"
}
check "in the background without --log: syslog datagrams (facility daemon, levels)" syslog
show

# 4. A device error: the image's own file system fills up under a sparse image.
read_only() {
  mkdir -p "$work/small" && mount -t tmpfs -o size=48m tmpfs "$work/small" || return 1
  "$BLOBFS" mkfs "$work/small/r.img" --size 256M > /dev/null || return 1
  "$BLOBFS" mount "$work/small/r.img" "$mnt" -o no_writeback_cache --log "$work/ro.log" > /dev/null || return 1
  echo before > "$mnt/before"
  timeout 60 dd if=/dev/urandom of="$mnt/fill" bs=1M count=100 oflag=direct status=none && { echo "the device never failed"; return 1; }
  "$BLOBFS" status "$mnt" --json | json "s['read_only'] and s['errors']['read_only_reason'] and s['errors']['device_errors'] > 0" || return 1
  "$BLOBFS" status "$mnt" | grep -E "^state|^errors"
  local out
  out=$(timeout 30 touch "$mnt/after" 2>&1); echo "touch: $out"
  [[ $out == *"Read-only file system"* ]] || return 1
  out=$(timeout 30 dd if=/dev/zero of="$mnt/before" bs=4k count=1 conv=notrunc oflag=direct status=none 2>&1); echo "overwrite: $out"
  [[ $out == *"Read-only file system"* ]] || return 1
  out=$(timeout 30 mkdir "$mnt/d" 2>&1); echo "mkdir: $out"
  [[ $out == *"Read-only file system"* ]] || return 1
  [ "$(timeout 30 cat "$mnt/before")" = before ] || return 1
  timeout 60 "$BLOBFS" unmount "$mnt"
  [ "$(grep -c "the store takes no more writes" "$work/ro.log")" -eq 1 ] || { echo "logged $(grep -c "the store takes no more writes" "$work/ro.log") times"; return 1; }
  umount "$work/small"
}
check "a device error: read-only, logged once, shown by status, every write EROFS, nothing hangs" read_only
show
mountpoint -q "$work/small" && umount -l "$work/small"

metadata_cache() {  # 3,000 files, 1,024 blobs' metadata at most: a walk reads, lets go, reads again
  "$BLOBFS" mkfs "$work/c.img" --size 1G > /dev/null || return 1
  "$BLOBFS" mount "$work/c.img" "$mnt" -o metadata_cache=1024 --log "$work/cache.log" > /dev/null || return 1
  python3 -c "
import os
for d in range(3):
    os.mkdir('$mnt/d%d' % d)
    for i in range(1000):
        with open('$mnt/d%d/f%d' % (d, i), 'w') as f: f.write(str(i))" || return 1
  "$BLOBFS" unmount "$mnt" && "$BLOBFS" mount "$work/c.img" "$mnt" -o metadata_cache=1024 --log "$work/cache.log" > /dev/null || return 1
  "$BLOBFS" status "$mnt" --json | json "s['metadata_cache']['blobs'] < 10 and s['metadata_cache']['limit'] == 1024" || return 1
  for d in 0 1 2; do for i in 0 500 999; do [ "$(cat "$mnt/d$d/f$i")" = "$i" ] || { echo "d$d/f$i wrong"; return 1; }; done; done
  [ "$(find "$mnt" -type f | xargs stat --format=%s | wc -l)" -eq 3000 ] || return 1
  "$BLOBFS" status "$mnt" | grep "metadata cache"
  "$BLOBFS" status "$mnt" --json | json "s['metadata_cache']['blobs'] <= 1024 and s['metadata_cache']['evictions'] > 0" || return 1
  "$BLOBFS" unmount "$mnt" && "$BLOBCLI" fsck "$work/c.img"
}
check "-o metadata_cache=1024: a mount reads no file's metadata, a walk of 3,000 files keeps at most 1,024 in memory, data intact, fsck clean" metadata_cache
show

mountpoint -q "$mnt" && { echo "FAIL something is still mounted"; failed=$((failed + 1)); }
[ -z "$(daemons)" ] || { echo "FAIL daemons left: $(daemons)"; failed=$((failed + 1)); }
ledger_clean() { ! grep -E "unanswered for|never answered|answered twice" "$work/daemon.log"; }
check "every request answered exactly once (daemon logs)" ledger_clean
echo "operating a mount: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
