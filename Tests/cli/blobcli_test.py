#!/usr/bin/env python3
"""blobcli against images this test makes and damages on purpose (part of scripts/test).

    blobcli_test.py [--blobfs PATH] [--blobcli PATH] [--fuzz N] [--campaign N]

Each damaged image must be reported with the structure, its offset and what is wrong;
`fsck --repair` fixes it, listing every change, and a second fsck is clean (only both
super block slots damaged is refused); --dry-run writes nothing; `blobcli undo` gives the
image back byte for byte; a short damage campaign; and a fuzz run over
mutated images must never crash or hang blobcli (exit 0, 1 or 2 only).
"""
import argparse
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

PAGE = 4096
BLOBFS = BLOBCLI = None
WORK = None
results = []


def crc32c(data):
    table = crc32c.table
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


crc32c.table = []
for n in range(256):
    c = n
    for _ in range(8):
        c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    crc32c.table.append(c)


def run(*args, timeout=60):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def cli(*args, timeout=60):
    return run(BLOBCLI, *args, timeout=timeout)


def record(name, ok, detail=""):
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'} {name}" + (f"\n    {detail}" if detail and not ok else ""), flush=True)


def make_image(name, populate=True, size="256M", dirs=1, files=5):
    path = os.path.join(WORK, name)
    run(BLOBFS, "mkfs", path, "--size", size)
    if populate:
        mnt = os.path.join(WORK, "mnt")
        os.makedirs(mnt, exist_ok=True)
        assert run(BLOBFS, "mount", path, mnt).returncode == 0
        try:
            for d in range(dirs):
                directory = os.path.join(mnt, "d" if dirs == 1 else f"d{d}")
                os.mkdir(directory)
                for index in range(files):
                    with open(os.path.join(directory, f"f{index}"), "wb") as f:
                        f.write(os.urandom(20000 + index))
        finally:
            run(BLOBFS, "unmount", mnt)
    return path


def info(path):
    return json.loads(cli("info", path, "--json").stdout)


def reseal(path, page_offset, crc_at=4):
    with open(path, "r+b") as f:
        f.seek(page_offset)
        page = bytearray(f.read(PAGE))
        struct.pack_into("<I", page, crc_at, crc32c(bytes(page[8:])))
        f.seek(page_offset)
        f.write(page)


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def names_offset_in(text, page_offset):
    """Whether a message names a byte offset inside the page at page_offset."""
    import re
    return any(page_offset <= int(found) < page_offset + PAGE for found in re.findall(r"at byte (\d+)", text))


def chain_offset(path, blob):
    shown = json.loads(cli("show", path, str(blob), "--json").stdout)
    return shown["chain"][0]["offset"], shown


def test_clean_image():
    path = make_image("clean.img")
    out = cli("fsck", path)
    record("fsck of a fresh, populated image is clean (exit 0)", out.returncode == 0 and "clean" in out.stdout, out.stdout + out.stderr)
    listed = json.loads(cli("list", path, "--json").stdout)
    record("list --json parses and holds the 8 blobs (root, d, 5 files, none else)", len(listed["blobs"]) == 7, str(listed)[:300])
    tree = cli("tree", path)
    record("tree shows the files", "f4" in tree.stdout and tree.returncode == 0, tree.stdout)
    got = os.path.join(WORK, "got")
    out = cli("get", path, "/d/f3", got)
    record("get copies a file out", out.returncode == 0 and os.path.getsize(got) == 20003, out.stdout + out.stderr)
    for command in (["dump-md", path, "--json"], ["log", path, "--json"], ["replay", path, "--dry-run", "--json"],
                    ["ls", path, "/d", "--json"], ["stat", path, "/d/f0", "--json"], ["info", path, "--json"]):
        out = cli(*command)
        try:
            json.loads(out.stdout)
            ok = out.returncode == 0
        except ValueError:
            ok = False
        record(f"{command[0]} --json parses", ok, out.stdout[:200] + out.stderr)
    imported = os.path.join(WORK, "payload")
    with open(imported, "wb") as f:
        f.write(os.urandom(12345))
    out = cli("import", path, imported)
    blob = out.stdout.strip()
    dumped = os.path.join(WORK, "dumped")
    cli("dump", path, blob, dumped)
    with open(imported, "rb") as a, open(dumped, "rb") as b:
        original, back = a.read(), b.read()
    record("import then dump round-trips the bytes (dump is whole clusters, zero-padded)",
           out.returncode == 0 and back[:len(original)] == original and set(back[len(original):]) <= {0}, out.stderr)
    out = cli("xattr", path, "set", blob, "color", "blue")
    got = cli("xattr", path, "get", blob, "color")
    record("xattr set then get", out.returncode == 0 and got.stdout.strip() == '"blue"', got.stdout + got.stderr)
    record("fsck clean after the writes", cli("fsck", path).returncode == 0)


def test_bad_metadata_crc():
    path = make_image("badcrc.img")
    offset, _ = chain_offset(path, 2)
    patch(path, offset + 200, b"\xAA\xBB")
    out = cli("fsck", path)
    text = out.stdout + out.stderr
    record("bad CRC in a metadata page: fsck exit 1 naming the page and its offset",
           out.returncode == 1 and "metadata page" in text and names_offset_in(text, offset), text)
    out = cli("info", path)
    record("bad CRC: info still reads (a load reads no chain: the super block, table and bitmaps)",
           out.returncode == 0, out.stdout + out.stderr)
    out = cli("list", path)
    record("bad CRC: list, which reads every chain, refuses: exit 2 with the structure named",
           out.returncode == 2 and "metadata page" in out.stderr, out.stdout + out.stderr)
    out = cli("log", path, "--json")
    try:
        ok = out.returncode == 0 and json.loads(out.stdout)["pages"] != []
    except (ValueError, KeyError):
        ok = False
    record("bad CRC: log still reads (it needs only the super block and the log)", ok, out.stdout[:300] + out.stderr)
    out = cli("fsck", path, "--repair")
    text = out.stdout + out.stderr
    record("bad CRC: --repair removes the blob, naming the page and its offset, and ends clean (exit 0)",
           out.returncode == 0 and "the blob is removed" in text and names_offset_in(text, offset)
           and "repaired, now clean" in text, text)
    out = cli("fsck", path)
    record("bad CRC: a second fsck is clean", out.returncode == 0, out.stdout + out.stderr)
    listing = cli("ls", path, "/d", "--json")
    try:
        names = sorted(entry["name"] for entry in json.loads(listing.stdout)["entries"])
    except (ValueError, KeyError):
        names = None
    record("bad CRC: the file whose inode was lost is gone from its directory, the others stay",
           names == ["f1", "f2", "f3", "f4"], str(names) + listing.stderr)


def bitmap_page_offset(path, cluster):
    data = info(path)
    geometry, block = data["geometry"], data["super_block"]
    payload = PAGE - 24
    byte = cluster // 8
    page = geometry["bitmaps"]["start_page"] + block["active_copy"] * geometry["bitmaps"]["pages"] + byte // payload
    return page * PAGE, 24 + byte % payload, cluster % 8


def test_leaked_cluster():
    path = make_image("leak.img")
    cluster = 30000
    page_offset, byte, bit = bitmap_page_offset(path, cluster)
    with open(path, "r+b") as f:
        f.seek(page_offset + byte)
        value = f.read(1)[0]
        f.seek(page_offset + byte)
        f.write(bytes([value | (1 << bit)]))
    reseal(path, page_offset)
    out = cli("fsck", path)
    text = out.stdout + out.stderr
    record("leaked cluster: fsck exit 1 naming the cluster", out.returncode == 1 and str(cluster) in text, text)
    shutil.copyfile(path, path + ".json")
    out = cli("fsck", path, "--repair")
    text = out.stdout + out.stderr
    record("leaked cluster: fsck --repair fixes it and says so (exit 0)", out.returncode == 0 and "repaired" in text, text)
    record("leaked cluster: fsck --repair names the bit it cleared",
           f"freed 1 leaked cluster: {cluster}\n" in out.stdout and "changed: marked" not in out.stdout, text)
    out = cli("fsck", path)
    record("leaked cluster: a second fsck is clean", out.returncode == 0, out.stdout + out.stderr)
    out = cli("fsck", path + ".json", "--repair", "--json")
    try:
        changes = json.loads(out.stdout)["repair_changes"]
        ok = out.returncode == 0 and changes["outcome"] == "repaired" and changes["bitmaps"] == [
            {"bitmap": "clusters", "freed_count": 1, "freed": [cluster], "marked_count": 0, "marked": []}]
    except (ValueError, KeyError, TypeError):
        ok = False
    record("leaked cluster: fsck --repair --json lists the change in repair_changes", ok, out.stdout[-600:] + out.stderr)
    out = cli("fsck", path, "--json")
    record("fsck --json without --repair: repair_changes is null",
           out.returncode == 0 and json.loads(out.stdout).get("repair_changes", 0) is None, out.stdout[-300:])


def test_damaged_super_block_slot():
    path = make_image("slot.img", populate=False)
    current = info(path)["super_block"]["slot"]
    other = 1 - current
    patch(path, other * PAGE + 100, b"\x5a")
    data = info(path)
    slots = data["super_block"]["slots"]
    record("damaged super block slot: info shows both slots, the damaged one with its offset",
           [s["ok"] for s in slots] == [s != other for s in (0, 1)] and slots[current]["current"]
           and names_offset_in(slots[other]["problem"], other * PAGE), str(slots))
    out = cli("fsck", path, "--repair")
    record("damaged super block slot: fsck --repair says it rewrote the slot",
           out.returncode == 0 and f"rewrote super block slot {other}" in out.stdout, out.stdout + out.stderr)
    record("damaged super block slot: both slots valid after the repair",
           all(s["ok"] for s in info(path)["super_block"]["slots"]))


def test_doubly_owned_cluster():
    path = make_image("double.img")
    listed = json.loads(cli("list", path, "--json").stdout)["blobs"]
    owners = [b for b in listed if b["allocated_clusters"] > 0][:2]
    _, first = chain_offset(path, owners[0]["id"])
    offset, _ = chain_offset(path, owners[1]["id"])
    target = first["extents"][0]["first_device_cluster"]
    with open(path, "rb") as f:
        f.seek(offset)
        page = bytearray(f.read(PAGE))
    # Walk the descriptors to the extents descriptor (type 2): u16 count, then 20-byte extents.
    position, patched = 40, False
    while position + 4 <= PAGE:
        kind, length = page[position], struct.unpack_from("<H", page, position + 2)[0]
        if kind == 0 or length == 0:
            break
        if kind == 2:
            struct.pack_into("<Q", page, position + 4 + 2 + 12, target)
            patched = True
            break
        position += 4 + length
    patch(path, offset, bytes(page))
    reseal(path, offset)
    out = cli("fsck", path)
    text = out.stdout + out.stderr
    record("doubly-owned cluster: fsck exit 1 naming the cluster", patched and out.returncode == 1 and str(target) in text, text)
    out = cli("fsck", path, "--repair", "--json")
    try:
        changes = json.loads(out.stdout)["repair_changes"]
        unmapped = {change["blob"] for change in changes["changes"] if change["kind"] == "clusters_unmapped"}
        ok = out.returncode == 0 and unmapped == {owners[0]["id"], owners[1]["id"]}
    except (ValueError, KeyError, TypeError):
        ok = False
    record("doubly-owned cluster: --repair unmaps it from both owners (neither reads the other's bytes) and lists both",
           ok, out.stdout[-800:] + out.stderr)
    out = cli("fsck", path)
    record("doubly-owned cluster: a second fsck is clean", out.returncode == 0, out.stdout + out.stderr)


def test_torn_log_tail():
    path = make_image("torn.img", populate=False)
    mnt = os.path.join(WORK, "mnt")
    assert run(BLOBFS, "mount", path, mnt).returncode == 0
    for index in range(30):
        with open(os.path.join(mnt, f"t{index}"), "wb") as f:
            f.write(b"x" * 100)
    os.sync()
    time.sleep(1.5)
    daemon = subprocess.run(["pgrep", "-f", f"blobfs mount {path}"], capture_output=True, text=True).stdout.split()
    for pid in daemon:
        os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.3)
    run("fusermount3", "-u", "-z", mnt)
    data = info(path)
    head = data["log"]["head_sequence"]
    log = data["geometry"]["log"]
    torn = (log["start_page"] + (head - 1) % log["pages"]) * PAGE
    patch(path, torn + 2048, os.urandom(1024))
    out = cli("log", path)
    text = out.stdout + out.stderr
    record("torn log tail: log shows the transactions and where the valid log stops (the torn page, its offset)",
           out.returncode == 0 and "transaction" in text and names_offset_in(text, torn), text[-600:])
    logged = json.loads(cli("log", path, "--json").stdout)
    dry_json = json.loads(cli("replay", path, "--dry-run", "--json").stdout)
    record("torn log tail: log --json agrees with replay --dry-run (transactions, end, stop) and shows the pages",
           all(logged[k] == dry_json[k] for k in ("transactions", "uncommitted_records", "end_sequence", "stop"))
           and any(not page["ok"] and names_offset_in(page["problem"], torn) for page in logged["pages"]),
           json.dumps({k: logged[k] for k in ("end_sequence", "stop", "uncommitted_records")}))
    dry = cli("replay", path, "--dry-run")
    record("torn log tail: replay --dry-run lists what would be applied", dry.returncode == 0 and "would apply" in dry.stdout, dry.stdout[-300:])
    out = cli("fsck", path)
    record("torn log tail: the store is consistent (exit 0)", out.returncode == 0, out.stdout + out.stderr)
    out = cli("replay", path)
    record("torn log tail: replay writes a checkpoint; the store is clean after",
           out.returncode == 0 and info(path)["super_block"]["clean"], out.stdout + out.stderr)


def test_truncated_and_garbage():
    path = make_image("trunc.img")
    os.truncate(path, 64 << 20)
    out = cli("info", path)
    record("truncated image: exit 2 saying so", out.returncode == 2 and "truncated" in out.stderr, out.stdout + out.stderr)
    garbage = os.path.join(WORK, "garbage.img")
    with open(garbage, "wb") as f:
        f.write(os.urandom(8 << 20))
    out = cli("list", garbage)
    record("garbage image: exit 2 naming the super block slots", out.returncode == 2 and "super block" in out.stderr, out.stderr)
    out = cli("info", os.path.join(WORK, "missing.img"))
    record("missing image: exit 2", out.returncode == 2, out.stderr)
    out = cli("frobnicate", path)
    record("unknown command: exit 2", out.returncode == 2, out.stderr)


def test_mounted_store_refuses_writes():
    path = make_image("busy.img", populate=False)
    mnt = os.path.join(WORK, "mnt")
    assert run(BLOBFS, "mount", path, mnt).returncode == 0
    try:
        payload = os.path.join(WORK, "payload")
        out = cli("import", path, payload)
        record("import into a mounted store refuses (exit 1, says it is in use)",
               out.returncode == 1 and "in use" in out.stderr, out.stdout + out.stderr)
        out = cli("info", path)
        record("info of a mounted store still reads (read-only)", out.returncode == 0, out.stderr)
        out = cli("trim", path)
        record("trim of a mounted store refuses (exit 1, says it is in use)",
               out.returncode == 1 and "in use" in out.stderr, out.stdout + out.stderr)
    finally:
        run(BLOBFS, "unmount", mnt)


def files_of(path):
    """Every regular file of the image's tree, read through blobcli get: {path: bytes}."""
    tree = json.loads(cli("tree", path, "--json").stdout)
    found = {}

    def visit(node, prefix):
        for child in node.get("children", []):
            where = prefix + "/" + child["name"]
            if "children" in child:
                visit(child, where)
            else:
                target = os.path.join(WORK, "got")
                out = cli("get", path, where, target)
                if out.returncode == 0:
                    with open(target, "rb") as f:
                        found[where] = f.read()
    visit(tree, "")
    return found


def files_via_mount(path):
    """Every regular file of the image's tree, read through a read-only mount (one daemon
    rather than a blobcli process per file): {path: bytes}."""
    mnt = os.path.join(WORK, "mnt")
    os.makedirs(mnt, exist_ok=True)
    out = run(BLOBFS, "mount", path, mnt, "-o", "ro")
    if out.returncode != 0:
        raise RuntimeError("mount failed: " + out.stdout + out.stderr)
    found = {}
    try:
        for directory, _, names in os.walk(mnt):
            for name in names:
                full = os.path.join(directory, name)
                if os.path.islink(full) or not os.path.isfile(full):
                    continue
                with open(full, "rb") as f:
                    found[full[len(mnt):]] = f.read()
    finally:
        run(BLOBFS, "unmount", mnt)
    return found


def test_dry_run_and_undo():
    path = make_image("undo.img")
    offset, _ = chain_offset(path, 1)  # the directory /d: its files go to /lost+found
    patch(path, offset + 300, b"\x01")
    damaged = path + ".damaged"
    shutil.copyfile(path, damaged)
    out = cli("fsck", path, "--repair", "--dry-run")
    with open(path, "rb") as a, open(damaged, "rb") as b:
        same = a.read() == b.read()
    record("--dry-run lists the changes (exit 1: problems remain) and writes nothing",
           out.returncode == 1 and same and "would change:" in out.stdout and "lost+found" in out.stdout
           and "dry run: nothing written" in out.stdout, out.stdout + out.stderr)
    out = cli("fsck", path, "--dry-run")
    record("--dry-run without --repair: usage error (exit 2)", out.returncode == 2, out.stderr)
    undo = os.path.join(WORK, "undo.file")
    out = cli("fsck", path, "--repair", "--undo", undo)
    record("--repair --undo: repaired, the files of the lost directory in /lost+found, the undo file named",
           out.returncode == 0 and "linked as /lost+found/" in out.stdout and undo in out.stdout, out.stdout + out.stderr)
    files = files_of(path)
    record("after the repair every file reads back from /lost+found (5 files)",
           sorted(len(data) for data in files.values()) == [20000, 20001, 20002, 20003, 20004]
           and all(name.startswith("/lost+found/") for name in files), str({k: len(v) for k, v in files.items()}))
    out = cli("fsck", path, "--repair", "--undo", undo)
    record("an existing undo file is never overwritten (exit 2)", out.returncode == 2 and "exists" in out.stderr, out.stderr)
    out = cli("undo", undo, path)
    with open(path, "rb") as a, open(damaged, "rb") as b:
        same = a.read() == b.read()
    record("blobcli undo FILE DEVICE gives back the image byte for byte", out.returncode == 0 and same, out.stdout + out.stderr)
    out = cli("undo", undo, path)
    record("undo again: refused, the super block pages are not what the repair left (exit 2)",
           out.returncode == 2 and "changed since the repair" in out.stderr, out.stdout + out.stderr)
    other = make_image("other.img", populate=False)
    os.truncate(other, 128 << 20)
    out = cli("undo", undo, other)
    record("undo onto another device: refused (exit 2)", out.returncode == 2 and "device of" in out.stderr, out.stderr)
    out = run(BLOBFS, "fsck", path, "--repair", "--json")
    try:
        ok = out.returncode == 0 and json.loads(out.stdout)["repair_changes"]["outcome"] == "repaired"
    except (ValueError, KeyError, TypeError):
        ok = False
    record("blobfs fsck --repair: the same repair (JSON outcome repaired, exit 0)", ok, out.stdout[-400:] + out.stderr)
    out = run(BLOBFS, "fsck", path)
    record("blobfs fsck after it: clean", out.returncode == 0 and "clean" in out.stdout, out.stdout + out.stderr)


def test_both_super_blocks_destroyed():
    path = make_image("noslots.img", populate=False)
    patch(path, 100, b"\xff")
    patch(path, PAGE + 100, b"\xff")
    with open(path, "rb") as f:
        before = f.read()
    out = cli("fsck", path, "--repair")
    with open(path, "rb") as f:
        same = f.read() == before
    record("both super block slots damaged: --repair exit 2 naming both slots, nothing written",
           out.returncode == 2 and "slot 0" in out.stderr and "slot 1" in out.stderr and same, out.stdout + out.stderr)


def test_repair_campaign(seeds, size="256M", dirs=1, files=5, anywhere=False):
    """A few seeds of the damage campaign through the command line (the in-process one,
    RepairCampaignTests, runs many more): bit flips and zeroed pages in the metadata
    regions, then fsck --repair, fsck clean, and every file of the tree read back.
    `anywhere`: as issue 21 was found — 1 to 8 bit flips at random offsets anywhere before
    the data clusters (most land in unused bytes)."""
    base = make_image(f"campaign-base-{size}.img", size=size, dirs=dirs, files=files)
    data = info(base)
    geometry = data["geometry"]
    regions = [(0, 2)] + [(geometry[name]["start_page"], geometry[name]["pages"] * (1 if name in ("log", "metadata_pages") else 2))
                          for name in ("log", "table", "bitmaps", "metadata_pages")]
    data_start = geometry["data_start_page"]
    originals = files_via_mount(base)
    rng = random.Random(2121)
    target = os.path.join(WORK, "campaign.img")
    failures = []
    damaged = 0
    started = time.time()
    for seed in range(seeds):
        shutil.copyfile(base, target)
        start, count = regions[seed % len(regions)]
        if seed % len(regions) == 0:
            count = 1  # one slot: both is the one damage a repair refuses
            start = rng.randrange(2)
        with open(target, "r+b") as f:
            # Mostly the first pages of a region, where a small image's metadata is.
            page = start + rng.randrange(min(count, 8) if rng.random() < 0.75 else count)
            if anywhere:
                for _ in range(rng.randrange(1, 9)):
                    at = rng.randrange(data_start * PAGE)
                    if at < 2 * PAGE and at // PAGE != seed % 2:
                        at = (seed % 2) * PAGE + at % PAGE  # never both super block slots
                    f.seek(at)
                    byte = f.read(1)[0]
                    f.seek(at)
                    f.write(bytes([byte ^ (1 << rng.randrange(8))]))
            elif rng.random() < 0.5:
                f.seek(page * PAGE)
                f.write(bytes(PAGE))
            else:
                for _ in range(rng.randrange(1, 9)):
                    at = page * PAGE + rng.randrange(PAGE)
                    f.seek(at)
                    byte = f.read(1)[0]
                    f.seek(at)
                    f.write(bytes([byte ^ (1 << rng.randrange(8))]))
        if cli("fsck", target, timeout=120).returncode != 0:
            damaged += 1
        repaired = cli("fsck", target, "--repair", timeout=120)
        checked = cli("fsck", target, timeout=120)
        if repaired.returncode != 0 or checked.returncode != 0:
            failures.append((seed, page, repaired.stdout[-300:] + repaired.stderr[-300:], checked.stdout[-200:]))
            continue
        try:
            now = files_via_mount(target)
        except RuntimeError as error:
            failures.append((seed, page, f"the repaired image does not mount: {error}", ""))
            continue
        for name, content in now.items():
            original = originals.get(name)
            if original is not None and content != original and not name.startswith("/lost+found"):
                # A file at its old path whose inode the repair touched may differ; never
                # may it hold another file's bytes.
                if any(content[i:i + 4096] in other and other is not original
                       for other in originals.values() for i in range(0, len(content), 4096) if any(content[i:i + 4096])):
                    failures.append((seed, page, f"{name} reads another file's bytes", ""))
    record(f"repair campaign through blobcli ({size}, {dirs}x{files} files{', flips anywhere' if anywhere else ''}): "
           f"{seeds} images, {damaged} found damaged by fsck, every one clean after fsck --repair, every file readable "
           f"({time.time() - started:.0f} s)", not failures, str(failures[:3]))


def test_trim():
    """blobcli trim gives an image back the space of deleted files; the store stays clean."""
    path = make_image("trim.img")
    mnt = os.path.join(WORK, "mnt")
    assert run(BLOBFS, "mount", path, mnt).returncode == 0
    try:
        for index in range(5):
            os.unlink(os.path.join(mnt, "d", f"f{index}"))
    finally:
        run(BLOBFS, "unmount", mnt)
    before = os.stat(path).st_blocks * 512
    out = cli("trim", path, "--json")
    after = os.stat(path).st_blocks * 512
    trimmed = json.loads(out.stdout)["trimmed_bytes"] if out.returncode == 0 else 0
    record(f"trim: exit 0, {trimmed} bytes trimmed, allocated {before} -> {after} bytes",
           out.returncode == 0 and trimmed > 0 and after + 100_000 <= before, out.stdout + out.stderr)
    out = cli("fsck", path)
    record("fsck after trim: clean", out.returncode == 0, out.stdout + out.stderr)
    out = cli("trim", path, "--offset", str(1 << 40))
    record("trim --offset past the device: exit 2", out.returncode == 2, out.stdout + out.stderr)


def test_fuzz(iterations):
    base = make_image("fuzz-base.img")
    data = info(base)
    metadata_end = data["geometry"]["data_start_page"] * PAGE
    rng = random.Random(1234)
    crashes, hangs = [], []
    target = os.path.join(WORK, "fuzz.img")
    for iteration in range(iterations):
        shutil.copyfile(base, target)
        with open(target, "r+b") as f:
            for _ in range(rng.choice([1, 2, 8, 64])):
                offset = rng.randrange(0, metadata_end) if rng.random() < 0.5 else rng.randrange(0, 40 * PAGE)
                f.seek(offset)
                f.write(bytes([rng.randrange(256)]))
        for command in (["info", target, "--json"], ["list", target], ["fsck", target], ["tree", target], ["log", target]):
            try:
                out = cli(*command, timeout=20)
                if out.returncode not in (0, 1, 2):
                    crashes.append((iteration, command[0], out.returncode, out.stderr[-200:]))
            except subprocess.TimeoutExpired:
                hangs.append((iteration, command[0]))
    record(f"fuzz: {iterations} mutated images × 5 commands, no crash (exit 0/1/2 only) and no hang",
           not crashes and not hangs, f"crashes {crashes[:5]} hangs {hangs[:5]}")


def main():
    global BLOBFS, BLOBCLI, WORK
    parser = argparse.ArgumentParser()
    parser.add_argument("--blobfs", default=".build/debug/blobfs")
    parser.add_argument("--blobcli", default=".build/debug/blobcli")
    parser.add_argument("--fuzz", type=int, default=150)
    parser.add_argument("--campaign", type=int, default=15)
    parser.add_argument("--only-campaign", metavar="SIZE:DIRSxFILES", help="run only the command-line campaign, "
                        "on an image of SIZE with DIRS directories of FILES files, flips anywhere in the metadata "
                        "(issue 21's reproduction: 1G:10x50)")
    args = parser.parse_args()
    BLOBFS, BLOBCLI = os.path.abspath(args.blobfs), os.path.abspath(args.blobcli)
    WORK = tempfile.mkdtemp(prefix="blobcli-test.", dir="/var/tmp")
    try:
        if args.only_campaign:
            size, shape = args.only_campaign.split(":")
            dirs, files = (int(part) for part in shape.split("x"))
            test_repair_campaign(args.campaign, size=size, dirs=dirs, files=files, anywhere=True)
            return 1 if results.count(False) else 0
        test_clean_image()
        test_bad_metadata_crc()
        test_leaked_cluster()
        test_damaged_super_block_slot()
        test_doubly_owned_cluster()
        test_torn_log_tail()
        test_truncated_and_garbage()
        test_dry_run_and_undo()
        test_both_super_blocks_destroyed()
        test_repair_campaign(args.campaign)
        test_mounted_store_refuses_writes()
        test_trim()
        test_fuzz(args.fuzz)
    finally:
        mnt = os.path.join(WORK, "mnt")
        if os.path.ismount(mnt):
            run("fusermount3", "-u", "-z", mnt)
        subprocess.run(["pkill", "-9", "-f", f"blobfs mount {WORK}"], capture_output=True)
        shutil.rmtree(WORK, ignore_errors=True)
    failed = results.count(False)
    print(f"blobcli: {results.count(True)} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
