#!/usr/bin/env bash
# blobcli on a big store: a 1 TiB sparse image holding FILES small files (default
# 100,000, 4 KiB each, in 100 directories), then the time of `blobcli info`, `list` and
# `fsck` (release build). Writes bench/results/blobcli-DATE.md.
#   bench/blobcli.sh [FILES]
set -euo pipefail
cd "$(dirname "$0")/.."
files=${1:-100000}
swift build -c release --product blobfs > /dev/null
swift build -c release --product blobcli > /dev/null
blobfs=$PWD/.build/release/blobfs blobcli=$PWD/.build/release/blobcli
work=$(mktemp -d /var/tmp/blobcli-bench.XXXXXX)
trap 'mountpoint -q "$work/mnt" && fusermount3 -u -z "$work/mnt"; rm -rf "$work"' EXIT
mkdir -p "$work/mnt"
"$blobfs" mkfs "$work/big.img" --size 1T > /dev/null
"$blobfs" mount "$work/big.img" "$work/mnt" > /dev/null
start=$(date +%s.%N)
python3 - "$work/mnt" "$files" <<'PY'
import os, sys
root, count = sys.argv[1], int(sys.argv[2])
block = b"x" * 4096
for d in range(100):
    os.mkdir(os.path.join(root, f"d{d:02d}"))
for i in range(count):
    with open(os.path.join(root, f"d{i % 100:02d}", f"f{i:06d}"), "wb") as f:
        f.write(block)
PY
filled=$(date +%s.%N)
"$blobfs" unmount "$work/mnt"
# t COMMAND...: "<seconds> <exit status> <progress updates>": run on a pseudo-terminal
# (script(1)), as a person would, stdout to $work/out; stderr (the progress) to
# $work/err, whose carriage-return updates are counted
t() { python3 -c 'import os, pty, shlex, subprocess, sys, time
out, err = sys.argv[1], sys.argv[2]
cmd = shlex.join(sys.argv[3:]) + " > " + shlex.quote(out)
s = time.monotonic()
r = subprocess.run(["script", "-qefc", cmd, err], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
elapsed = time.monotonic() - s
updates = open(err, "rb").read().count(b"\r")
print(f"{elapsed:.3f} {r.returncode} {updates}")' "$work/out" "$work/err" "$@"; }
read info_s info_rc info_p < <(t "$blobcli" info "$work/big.img")
read list_s list_rc list_p < <(t "$blobcli" list "$work/big.img")
list_lines=$(wc -l < "$work/out")
read fsck_s fsck_rc fsck_p < <(t "$blobcli" fsck "$work/big.img")
fsck_line=$(tail -n 1 "$work/out")
out=bench/results/blobcli-$(date +%Y-%m-%d).md
cat > "$out" <<MD
# blobcli on a 1 TiB image with $files files

Command: \`bench/blobcli.sh $files\` (release build; $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB, $(uname -r)).
A 1 TiB sparse image (\`blobfs mkfs --size 1T\`), $files files of 4 KiB in 100
directories written through the mount ($(python3 -c "print(round($filled - $start))") s), unmounted, then:

| command | seconds | exit | progress updates on the terminal |
|---|---|---|---|
| \`blobcli info\` | $(printf %.2f "$info_s") | $info_rc | $info_p |
| \`blobcli list\` ($list_lines lines) | $(printf %.2f "$list_s") | $list_rc | $list_p |
| \`blobcli fsck\` | $(printf %.2f "$fsck_s") | $fsck_rc | $fsck_p |

fsck said: \`$fsck_line\`

Each command ran on a pseudo-terminal (\`script -qefc\`), as from a shell; the last column
counts the progress redraws on stderr (carriage returns): phases without a count (loading
the store, verifying, the file-system walk) show their name and the seconds so far
(\`Ticker\`), \`list\` a percentage of the blobs done (\`Progress\`; Sources/blobcli/main.swift).
MD
cat "$out"
