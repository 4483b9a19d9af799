#!/usr/bin/env python3
"""Turn a bench/run result directory into summary.md and plots/*.png.

    python3 bench/summarize.py DIR

DIR is what bench/run wrote: params.txt, machine.txt, targets.txt, combos.txt,
direct.txt, idle.txt, commands.txt, wall_seconds, runs/<job>/<target>.json (fio JSON;
for meta-listing the listing timings) with <target>.meta.json beside each, and
inprocess/ (bdevperf JSON, blobbench text). Only the standard library is needed for the
summary; the plots need matplotlib (Debian: python3-matplotlib) and are skipped
without it.
"""
import glob
import json
import os
import re
import sys

ALL_TARGETS = ["blobfs-image", "blobfs-nvme", "blobfs-malloc", "tmpfs", "passthrough-tmpfs",
               "passthrough-disk", "null", "raw-file"]
# (blobfs target, ceiling): like with like
RATIOS = [("blobfs-malloc", "passthrough-tmpfs"),
          ("blobfs-image", "passthrough-disk"),
          ("blobfs-image", "raw-file"),
          ("blobfs-nvme", "raw-file")]
PCTS = [("p50", "50.000000"), ("p99", "99.000000"), ("p99.9", "99.900000")]
GROUPS = [
    ("seq", "Sequential 1 MiB", "MiB/s"),
    ("randread", "Random read 4 KiB", "IOPS"),
    ("randwrite", "Random write 4 KiB", "IOPS"),
    ("randrw", "Random 70/30 read/write 4 KiB", "IOPS"),
    ("fsync", "4 KiB write + fsync after each", "fsync p99 µs"),
    ("meta", "Small-file metadata and directory listing", "ops/s"),
]
COLORS = {"blobfs-image": "#d62728", "blobfs-nvme": "#9467bd", "blobfs-malloc": "#ff7f0e", "tmpfs": "#7f7f7f",
          "passthrough-tmpfs": "#1f77b4", "passthrough-disk": "#17becf", "null": "#bcbd22",
          "raw-file": "#2ca02c"}


def read_text(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def read_kv(path):
    kv = {}
    for line in read_text(path).splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            if k == "override":
                kv.setdefault("overrides", []).append(v)
            else:
                kv[k] = v
    return kv


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- loading

def fio_metrics(j, meta):
    """Numbers of one fio run (group_reporting: one entry in jobs)."""
    job = j["jobs"][0]
    dirs = {}
    for d in ("read", "write"):
        s = job.get(d) or {}
        if not s.get("total_ios"):
            continue
        pct = (s.get("lat_ns") or {}).get("percentile") or (s.get("clat_ns") or {}).get("percentile") or {}
        dirs[d] = {"mib": s.get("bw_bytes", 0) / 2**20, "iops": s.get("iops", 0.0),
                   "ios": s["total_ios"], "runtime_ms": s.get("runtime", 0),
                   **{k: (pct[p] / 1000.0 if p in pct else None) for k, p in PCTS}}
    m = {"dirs": dirs}
    ios = sum(d["ios"] for d in dirs.values())
    m["ios"] = ios
    m["mib"] = sum(d["mib"] for d in dirs.values())
    m["iops"] = sum(d["iops"] for d in dirs.values())
    main = dirs.get("read") or dirs.get("write") or {}
    if "write" in dirs and "read" not in dirs:
        main = dirs["write"]
    for k, _ in PCTS:
        m[k] = main.get(k)
    sync = job.get("sync") or {}
    if sync.get("total_ios"):
        pct = (sync.get("lat_ns") or {}).get("percentile") or {}
        m["fsync"] = {k: (pct[p] / 1000.0 if p in pct else None) for k, p in PCTS}
        m["fsync"]["count"] = sync["total_ios"]
    # fio's own CPU (user + system of the fio threads, kernel work done on their behalf
    # included): usr_cpu/sys_cpu are % of job_runtime (summed over numjobs)
    cpu_s = (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) / 100.0 * job.get("job_runtime", 0) / 1000.0
    m["fio_cpu_us_per_io"] = cpu_s / ios * 1e6 if ios else None
    # the FUSE daemon's CPU over the whole fio invocation, scaled to the measured phase:
    # the daemon is busy during ramp + runtime only
    dcpu = meta.get("daemon_cpu_s")
    if dcpu is not None and ios:
        runtime_s = max((d["runtime_ms"] for d in dirs.values()), default=0) / 1000.0
        ramp_s = parse_secs(meta.get("_ramp", "0"))
        busy = runtime_s + ramp_s
        frac = runtime_s / busy if busy > 0 else 1.0
        m["daemon_cpu_us_per_io"] = dcpu * frac / ios * 1e6
        m["daemon_cpu_pct"] = 100.0 * dcpu / meta["wall_s"] if meta.get("wall_s") else None
    else:
        m["daemon_cpu_us_per_io"] = None
    parts = [m["fio_cpu_us_per_io"], m["daemon_cpu_us_per_io"]]
    m["cpu_us_per_io"] = sum(p for p in parts if p is not None) if m["fio_cpu_us_per_io"] is not None else None
    machine_metrics(m, meta)
    return m


def machine_metrics(m, meta):
    """The whole machine's CPU over the job (bench/machine_cpu.py wrote it into the meta):
    busy time of all CPUs in fio's measured phase per I/O, and the busy share."""
    mc = meta.get("machine") or {}
    w = mc.get("window") or {}
    m["machine_cpu_us_per_io"] = meta.get("machine_cpu_us_per_io")
    m["machine_busy_pct"] = meta.get("machine_busy_pct")
    m["machine_busy_s"] = w.get("busy_s")
    m["machine_busy_ticks"] = w.get("busy_ticks")
    m["machine_window_s"] = w.get("seconds")
    m["machine_per_cpu_pct"] = w.get("per_cpu_busy_pct")
    m["machine_tick_ms"] = mc.get("tick_ms")


def listing_metrics(j, meta):
    m = dict(j)
    n = j.get("entries") or 0
    m["entries_per_s"] = n / j["scandir_s"] if j.get("scandir_s") else None
    m["iops"] = m["entries_per_s"]
    dcpu = meta.get("daemon_cpu_s")
    m["daemon_cpu_s"] = dcpu
    machine_metrics(m, meta)
    return m


def parse_secs(v):
    v = str(v)
    try:
        if v.endswith("ms"):
            return float(v[:-2]) / 1000.0
        if v.endswith("s"):
            return float(v[:-1])
        if v.endswith("m"):
            return float(v[:-1]) * 60
        return float(v)
    except ValueError:
        return 0.0


def load(out, params):
    """{job: {target: result}}; result has "status" ok/n/a/failed and the metrics."""
    res = {}
    for meta_path in glob.glob(os.path.join(out, "runs", "*", "*.meta.json")):
        job = os.path.basename(os.path.dirname(meta_path))
        if job.startswith("_"):
            continue
        target = os.path.basename(meta_path)[:-len(".meta.json")]
        meta = read_json(meta_path) or {}
        meta["_ramp"] = params.get("ramp", "0") if not job.startswith("meta-") else "0"
        r = {"status": meta.get("status", "failed"), "meta": meta}
        if r["status"] == "ok":
            j = read_json(meta_path[:-len(".meta.json")] + ".json")
            if j is None:
                r["status"] = "failed"
                meta["error"] = "no JSON output"
            elif job == "meta-listing":
                r.update(listing_metrics(j, meta))
            else:
                try:
                    r.update(fio_metrics(j, meta))
                except (KeyError, IndexError, TypeError) as e:
                    r["status"] = "failed"
                    meta["error"] = "unreadable fio JSON: %s" % e
        res.setdefault(job, {})[target] = r
    return res


def read_combos(out):
    combos = []
    for line in read_text(os.path.join(out, "combos.txt")).splitlines():
        f = line.split("|")
        if len(f) >= 7:
            combos.append({"id": f[0], "group": f[1], "jobfile": f[2], "engine": f[3],
                           "iodepth": f[4], "numjobs": f[5], "direct": f[6]})
    return combos


def read_targets(out):
    t = []
    for line in read_text(os.path.join(out, "targets.txt")).splitlines():
        f = line.split("|", 2)
        if len(f) == 3:
            t.append((f[0], f[1], f[2]))
    return t


def read_idle(out):
    idle = []
    for line in read_text(os.path.join(out, "idle.txt")).splitlines():
        f = line.split()
        if len(f) == 5:
            idle.append({"when": f[0], "target": f[1], "pid": f[2], "pct": float(f[3]), "secs": float(f[4])})
    return idle


# ---------------------------------------------------------------- formatting

def fmt(v, nd=None):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    a = abs(v)
    if nd is None:
        nd = 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 0.01 else 3
    return f"{v:,.{nd}f}"


def ratio(a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return None
    return a / b


def cell(r, key, sub=None):
    if r is None:
        return "–"
    if r["status"] == "n/a":
        return "n/a"
    if r["status"] != "ok":
        return "failed"
    v = r.get(key) if sub is None else (r.get(key) or {}).get(sub)
    return fmt(v)


def job_label(c):
    if c["group"] == "meta":
        return c["id"]
    d = "direct" if c["direct"] == "1" else "buffered"
    return f'{c["engine"]} qd{c["iodepth"]} nj{c["numjobs"]} {d}'


def main_value(group, job, r):
    """The value a job's ratio and plot use, and whether higher is better."""
    if not r or r.get("status") != "ok":
        return None, True
    if group == "seq":
        return r.get("mib"), True
    if group == "fsync":
        return (r.get("fsync") or {}).get("p99"), False
    return r.get("iops"), True


# ---------------------------------------------------------------- sections

def results_tables(combos, res, targets):
    md = []
    for g, title, _ in GROUPS:
        cs = [c for c in combos if c["group"] == g]
        if not cs:
            continue
        md += [f"### {title}", ""]
        if g == "meta":
            md += meta_table(cs, res, targets)
            continue
        fsync = g == "fsync"
        head = ["job", "target", "MiB/s", "IOPS", "p50 µs", "p99 µs", "p99.9 µs"]
        if fsync:
            head += ["fsync p50 µs", "fsync p99 µs", "fsync p99.9 µs"]
        head += ["CPU µs/IO fio", "CPU µs/IO daemon", "CPU µs/IO total", "CPU/IO machine µs", "machine busy %", "note"]
        md += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
        for c in cs:
            per = res.get(c["id"], {})
            for t in targets:
                r = per.get(t)
                if r is None:
                    continue
                note = ""
                if r["status"] == "n/a":
                    note = r["meta"].get("reason", "")
                elif r["status"] != "ok":
                    note = "failed: " + r["meta"].get("error", "")
                elif g == "randrw" and "write" in r.get("dirs", {}):
                    w = r["dirs"]["write"]
                    note = f"latency: read; write p50/p99/p99.9 {fmt(w['p50'])}/{fmt(w['p99'])}/{fmt(w['p99.9'])} µs"
                row = [f"`{c['id']}`", t, cell(r, "mib"), cell(r, "iops"), cell(r, "p50"), cell(r, "p99"), cell(r, "p99.9")]
                if fsync:
                    row += [cell(r, "fsync", "p50"), cell(r, "fsync", "p99"), cell(r, "fsync", "p99.9")]
                row += [cell(r, "fio_cpu_us_per_io"), cell(r, "daemon_cpu_us_per_io"), cell(r, "cpu_us_per_io"),
                        cell(r, "machine_cpu_us_per_io"), cell(r, "machine_busy_pct"), note]
                md.append("| " + " | ".join(row) + " |")
        md.append("")
    return md


def meta_table(cs, res, targets):
    md = ["| step | target | files/s | p50 µs | p99 µs | p99.9 µs | CPU µs/file fio | CPU µs/file daemon | "
          "CPU/file machine µs | machine busy % | note |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in cs:
        if c["id"] == "meta-listing":
            continue
        for t in targets:
            r = res.get(c["id"], {}).get(t)
            if r is None:
                continue
            note = r["meta"].get("reason", "") if r["status"] == "n/a" else (
                "failed: " + r["meta"].get("error", "") if r["status"] != "ok" else "")
            md.append(f"| {c['id'][5:]} | {t} | {cell(r, 'iops')} | {cell(r, 'p50')} | {cell(r, 'p99')} | "
                      f"{cell(r, 'p99.9')} | {cell(r, 'fio_cpu_us_per_io')} | {cell(r, 'daemon_cpu_us_per_io')} | "
                      f"{cell(r, 'machine_cpu_us_per_io')} | {cell(r, 'machine_busy_pct')} | {note} |")
    md.append("")
    per = res.get("meta-listing", {})
    if per:
        md += ["Directory listing of the same directory (after `filestat`, before `filedelete`):", "",
               "| target | entries | os.scandir ms | `ls -f \\| wc -l` ms | scandir + stat ms | entries/s (scandir) | daemon CPU s | "
               "machine CPU s | machine busy % | note |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for t in targets:
            r = per.get(t)
            if r is None:
                continue
            if r["status"] != "ok":
                md.append(f"| {t} | {'n/a' if r['status'] == 'n/a' else 'failed'} | | | | | | | | {r['meta'].get('reason', '')} |")
                continue
            ms = lambda k: fmt(r[k] * 1000) if r.get(k) is not None else "–"
            md.append(f"| {t} | {fmt(r.get('entries'), 0)} | {ms('scandir_s')} | {ms('ls_f_s')} | {ms('scandir_stat_s')} | "
                      f"{fmt(r.get('entries_per_s'))} | {fmt(r.get('daemon_cpu_s'))} | {fmt(r.get('machine_busy_s'))} | "
                      f"{fmt(r.get('machine_busy_pct'))} | |")
        md.append("")
    return md


def ratio_table(combos, res):
    pairs = [(a, b) for a, b in RATIOS]
    head = ["job", "metric"] + [f"{a} / {b}" for a, b in pairs]
    md = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(pairs)]
    for c in combos:
        per = res.get(c["id"], {})
        if not per:
            continue
        g = c["group"]
        metric = {"seq": "MiB/s", "fsync": "fsync p99 (lower is better)"}.get(g, "IOPS")
        if c["id"] == "meta-listing":
            metric = "entries/s"
        elif g == "meta":
            metric = "files/s"
        cells = []
        for a, b in pairs:
            ra, rb = per.get(a), per.get(b)
            if not ra or not rb:
                cells.append("–")
                continue
            if "n/a" in (ra["status"], rb["status"]):
                cells.append("n/a")
                continue
            va, _ = main_value(g, c["id"], ra)
            vb, _ = main_value(g, c["id"], rb)
            cells.append(fmt(ratio(va, vb), 2))
        if all(x == "–" for x in cells):
            continue
        md.append(f"| `{c['id']}` | {metric} | " + " | ".join(cells) + " |")
    return md + [""]


def job_metric(c):
    """(key function, unit) of a job's throughput, for the goals over every job: MiB/s for
    sequential jobs, files/s and entries/s for metadata, IOPS otherwise (the fsync job:
    writes + fsyncs per second)."""
    if c["group"] == "seq":
        return (lambda r: r.get("mib")), "MiB/s"
    if c["id"] == "meta-listing":
        return (lambda r: r.get("entries_per_s")), "entries/s"
    if c["group"] == "meta":
        return (lambda r: r.get("iops")), "files/s"
    return (lambda r: r.get("iops")), "IOPS"


def goals_section(combos, res, idle):
    """Issue 13's goals, one line per job variant of this mode: the measured ratio, the
    goal, met or missed. Returns (markdown, verdicts)."""
    lines = []   # (goal, comparison, job, value, target, higher)
    order = []

    def add(goal, cmp_, job, val, target, higher):
        if goal not in order:
            order.append(goal)
        lines.append((goal, cmp_, job, val, target, higher))

    def ok(r):
        return r is not None and r.get("status") == "ok"

    def compare(goal, c, a, b, key, unit, target, higher, required=True, show_busy=False):
        """One goal line for job c: key(a) / key(b). required: a line "not measured" when
        either did not run (else the job is left out: "every job both run")."""
        per = res.get(c["id"], {})
        ra, rb = per.get(a), per.get(b)
        job = f"`{c['id']}`"
        if not ok(ra) or not ok(rb):
            if required:
                why = [f"{t}: {'not run' if r is None else r['status']}" for t, r in ((a, ra), (b, rb)) if not ok(r)]
                add(goal, f"{a} / {b} ({', '.join(why)})", job, None, target, higher)
            return
        va, vb = key(ra), key(rb)
        busy = lambda r: f" (busy {fmt(r.get('machine_busy_pct'), 0)} %)" if show_busy and r.get("machine_busy_pct") is not None else ""
        cmp_ = f"{a} {fmt(va)}{busy(ra)} / {b} {fmt(vb)}{busy(rb)} {unit}"
        add(goal, cmp_, job, ratio(va, vb), target, higher)

    def sel(pred):
        return [c for c in combos if pred(c)]

    four_k = lambda c: c["group"] in ("randread", "randwrite", "randrw", "fsync")

    # blobfs on an image against passthrough_ll over the same file system: every job both ran
    g = "blobfs-image ≥ 1.0 × passthrough-disk, every job both run"
    for c in combos:
        key, unit = job_metric(c)
        compare(g, c, "blobfs-image", "passthrough-disk", key, unit, 1.0, True, required=False)
    if g not in order:
        add(g, "blobfs-image / passthrough-disk: no job ran on both", "–", None, 1.0, True)

    # blobfs on an image against the raw file on the same file system
    iops = lambda r: r.get("iops")
    for c in sel(lambda c: c["group"] in ("randread", "randwrite") and c["iodepth"] == "32" and c["direct"] == "1"):
        compare("4 KiB direct randread and randwrite at qd32 ≥ 0.6 × raw-file", c, "blobfs-image", "raw-file",
                iops, "IOPS", 0.6, True)
    for c in sel(lambda c: c["group"] == "seq" and c["direct"] == "1"):
        compare("1 MiB sequential direct ≥ 0.8 × raw-file", c, "blobfs-image", "raw-file",
                lambda r: r.get("mib"), "MiB/s", 0.8, True)
    for c in sel(lambda c: c["group"] == "fsync"):
        compare("4 KiB write+fsync IOPS ≥ 0.8 × raw-file", c, "blobfs-image", "raw-file", iops, "IOPS", 0.8, True)
        compare("4 KiB write+fsync: fsync p99 ≤ 1.5 × raw-file's", c, "blobfs-image", "raw-file",
                lambda r: (r.get("fsync") or {}).get("p99"), "µs", 1.5, False)
    for c in sel(lambda c: c["group"] == "randwrite" and c["direct"] == "0"):
        compare("4 KiB buffered random write ≥ 0.5 × raw-file", c, "blobfs-image", "raw-file", iops, "IOPS", 0.5, True)

    # whole-machine CPU per 4 KiB I/O (all CPUs' busy time over the job / its I/Os)
    mcpu = lambda r: r.get("machine_cpu_us_per_io")
    for c in sel(four_k):
        compare("whole-machine CPU per 4 KiB I/O: blobfs-image ≤ passthrough-disk's", c, "blobfs-image",
                "passthrough-disk", mcpu, "µs", 1.0, False, required=False, show_busy=True)
    for c in sel(four_k):
        compare("whole-machine CPU per 4 KiB I/O: blobfs-image ≤ 2 × raw-file's", c, "blobfs-image", "raw-file",
                mcpu, "µs", 2.0, False, show_busy=True)

    # blobfs on RAM against passthrough_ll over tmpfs
    g = "blobfs-malloc ≥ 1.2 × passthrough-tmpfs, every job both run"
    for c in combos:
        key, unit = job_metric(c)
        compare(g, c, "blobfs-malloc", "passthrough-tmpfs", key, unit, 1.2, True, required=False)
    if g not in order:
        add(g, "blobfs-malloc / passthrough-tmpfs: no job ran on both", "–", None, 1.2, True)
    nj4 = sel(lambda c: c["group"] == "randread" and c["direct"] == "1" and c["numjobs"] == "4")
    for c in nj4:
        compare("blobfs-malloc ≥ 2 × passthrough-tmpfs on 4 KiB direct reads at numjobs 4", c, "blobfs-malloc",
                "passthrough-tmpfs", iops, "IOPS", 2.0, True)
    if not nj4:
        add("blobfs-malloc ≥ 2 × passthrough-tmpfs on 4 KiB direct reads at numjobs 4", "no such job in this run",
            "–", None, 2.0, True)

    # an idle mount
    for i in idle:
        add("mounted idle blobfs < 1 % of a core", f"{i['target']} daemon, {i['when']} ({i['secs']:.0f} s window), CPU %",
            "–", i["pct"], 1.0, False)
    if not idle:
        add("mounted idle blobfs < 1 % of a core", "no blobfs target ran", "–", None, 1.0, False)

    verdicts = []
    detail = ["| goal | comparison | job | measured | goal | verdict |", "|---|---|---|---:|---:|---|"]
    tally = {g: [0, 0, 0] for g in order}
    for g in order:
        for goal, cmp_, job, val, target, higher in (l for l in lines if l[0] == g):
            if val is None:
                verdict = "not measured"
                tally[g][2] += 1
            elif (val >= target) if higher else (val <= target):
                verdict = "met"
                tally[g][0] += 1
            else:
                tally[g][1] += 1
                if higher:
                    verdict = f"**missed**: short by {100 * (1 - val / target):.0f} % (needs ×{target / val:.2f})" if val > 0 \
                        else "**missed**"
                else:
                    verdict = f"**missed**: over by {100 * (val / target - 1):.0f} % (needs ÷{val / target:.2f})"
            verdicts.append(verdict)
            detail.append(f"| {goal} | {cmp_} | {job} | {fmt(val, 2) if val is not None else '–'} | "
                          f"{'≥' if higher else '≤'} {target:.1f} | {verdict} |")
    summary = ["| goal | met | missed | not measured |", "|---|---:|---:|---:|"]
    summary += [f"| {g} | {t[0]} | {t[1]} | {t[2]} |" for g, t in tally.items()]
    return summary + [""] + detail + [""], verdicts


def clone_section(out, params):
    """Issue 14: 4 KiB random reads of a copy that shares the original's clusters, against
    the original right before it (runs/_clone)."""
    rows = []
    for meta_path in sorted(glob.glob(os.path.join(out, "runs", "_clone", "*-original.meta.json"))):
        target = os.path.basename(meta_path)[:-len("-original.meta.json")]
        got = {}
        for what in ("original", "copy"):
            base = os.path.join(out, "runs", "_clone", f"{target}-{what}")
            meta = read_json(base + ".meta.json") or {}
            j = read_json(base + ".json")
            if meta.get("status") == "ok" and j is not None:
                meta["_ramp"] = params.get("ramp", "0")
                try:
                    got[what] = fio_metrics(j, meta)["iops"]
                except (KeyError, IndexError, TypeError):
                    pass
        r = ratio(got.get("copy"), got.get("original"))
        verdict = "not measured" if r is None else ("met" if r >= 0.9 else "**missed**")
        rows.append(f"| {target} | {fmt(got.get('original'))} | {fmt(got.get('copy'))} | {fmt(r, 2)} | {verdict} |")
    if not rows:
        return ["No blobfs target ran the job.", ""]
    return ["4 KiB random reads, io_uring, qd32, direct, of the laid-out file and then of a copy made with "
            "copy_file_range (it shares the file's clusters: every read goes through the shared snapshot). "
            "Issue 14's goal: the copy ≥ 0.9 × the original.", "",
            "| target | original IOPS | copy IOPS | copy / original | goal ≥ 0.9 |", "|---|---:|---:|---:|---|"] + rows + [""]


def inprocess_section(out):
    md = []
    rows = []
    iops = {}
    for p in sorted(glob.glob(os.path.join(out, "inprocess", "bdevperf-*.json")),
                    key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0])):
        j = read_json(p)
        if not j:
            continue
        r = j.get("result") or {}
        lat = r.get("latencyUs") or {}
        g = lambda k, nd=None: fmt(r.get(k), nd) if isinstance(r.get(k), (int, float)) else str(r.get(k, "–"))
        iops[j.get("command", "")] = r.get("iops")
        rows.append(f"| `{j.get('command', '')}` | {g('iops')} | {g('mibPerSecond')} | {fmt(lat.get('p50'))} | "
                    f"{fmt(lat.get('p99'))} | {fmt(lat.get('p999'))} | {g('cpuSecondsPerMillionIOs')} | {g('allocationsPerIO')} |")
    if rows:
        md += ["bdevperf (the bdev layer in one process, no FUSE, no kernel file system; "
               "`--blob` runs on one blob of a blob store on the device):", "",
               "| command | IOPS | MiB/s | p50 µs | p99 µs | p99.9 µs | CPU s / M I/O | allocs / IO |",
               "|---|---:|---:|---:|---:|---:|---:|---:|"] + rows + [""]
        overhead = []
        for w in ("randread", "randwrite"):
            plain = [v for c, v in iops.items() if "malloc:1G" in c and "nvme-emu" not in c and f"-w {w} -q 32" in c
                     and "--blob" not in c and isinstance(v, (int, float))]
            blob = [v for c, v in iops.items() if "malloc:1G" in c and "nvme-emu" not in c and f"-w {w} -q 32" in c
                    and "--blob" in c and isinstance(v, (int, float))]
            if plain and blob and plain[0]:
                overhead.append(f"- 4 KiB {w} q32: blob store on malloc / raw malloc = **{blob[0] / plain[0]:.2f}**")
        if overhead:
            md += ["Blob store overhead, same run:", ""] + overhead + [""]
    allocations = read_text(os.path.join(out, "allocations.txt")).strip()
    if allocations:
        md += ["Heap allocations per FUSE request in steady state (`bench/allocations.sh`: the daemon counts "
               "every allocation of its process over 5 s windows):", "", "```", allocations, "```", ""]
    bb = read_text(os.path.join(out, "inprocess", "blobbench.txt")).strip()
    if bb:
        md += ["blobbench (blob store format and recovery time against the log tail):", "", "```", bb, "```", ""]
    if not md:
        md = ["Not measured in this run (bdevperf / blobbench not built or not runnable; see run.log).", ""]
    return md


# ---------------------------------------------------------------- plots

def plots(out, combos, res, targets):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (apt-get install python3-matplotlib): no plots"
    pdir = os.path.join(out, "plots")
    os.makedirs(pdir, exist_ok=True)
    made = []

    def bars(ax, cats, values, ylabel, log=True):
        """values: {(cat, target): value or 'n/a' or None}"""
        n = max(len(targets), 1)
        w = 0.84 / n
        top = max([v for v in values.values() if isinstance(v, (int, float))] or [1])
        for i, t in enumerate(targets):
            for k, c in enumerate(cats):
                x = k + (i - (n - 1) / 2) * w
                v = values.get((c, t))
                if isinstance(v, (int, float)) and v > 0:
                    ax.bar(x, v, w, color=COLORS.get(t, None), label=t if k == 0 or not ax.get_legend_handles_labels()[1].count(t) else None)
                    ax.text(x, v, fmt(v), ha="center", va="bottom", fontsize=5.5, rotation=90)
                elif v == "n/a":
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=5.5, rotation=90, color="#555555",
                            transform=ax.get_xaxis_transform())
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(top=top * 8)
        else:
            ax.set_ylim(top=top * 1.25)
        ax.grid(axis="y", alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        seen = {}
        for h, l in zip(handles, labels):
            seen.setdefault(l, h)
        ax.legend([seen[t] for t in targets if t in seen], [t for t in targets if t in seen], fontsize=7, ncol=4,
                  loc="upper left")

    def val(r, fn):
        if r is None:
            return None
        if r["status"] == "n/a":
            return "n/a"
        if r["status"] != "ok":
            return None
        return fn(r)

    def save(fig, name):
        p = os.path.join(pdir, name)
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(os.path.relpath(p, out))

    for g, title, unit in GROUPS:
        cs = [c for c in combos if c["group"] == g and c["id"] in res]
        if not cs:
            continue
        if g == "fsync":
            fig, axs = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(targets) + 4), 4.8))
            cats, vals = [], {}
            for c in cs:
                for k, _ in PCTS:
                    cat = f"{c['id'].replace('fsync-4k-', '')} {k}"
                    cats.append(cat)
                    for t in targets:
                        vals[(cat, t)] = val(res[c["id"]].get(t), lambda r: (r.get("fsync") or {}).get(k))
            bars(axs[0], cats, vals, "fsync latency µs (lower is better)")
            axs[0].set_title("fsync latency percentiles", fontsize=9)
            cats2, vals2 = [], {}
            for c in cs:
                cat = c["id"].replace("fsync-4k-", "")
                cats2.append(cat)
                for t in targets:
                    vals2[(cat, t)] = val(res[c["id"]].get(t), lambda r: r.get("iops"))
            bars(axs[1], cats2, vals2, "writes+fsyncs per second")
            axs[1].set_title("write + fsync IOPS", fontsize=9)
            fig.suptitle(f"{title} (log scale)")
            save(fig, "fsync.png")
            continue
        cats, vals = [], {}
        for c in cs:
            if c["id"] == "meta-listing":
                cat = "listing (entries/s)"
            elif g == "meta":
                cat = c["id"][5:] + " (files/s)"
            else:
                cat = c["id"]
            cats.append(cat)
            for t in targets:
                vals[(cat, t)] = val(res[c["id"]].get(t), lambda r: r.get("mib") if g == "seq" else r.get("iops"))
        fig, ax = plt.subplots(figsize=(max(8, 1.0 * len(cats) * max(len(targets), 3) * 0.45 + 3), 5))
        bars(ax, cats, vals, unit + " (higher is better)")
        ax.set_title(f"{title} (log scale)")
        save(fig, f"{g}.png")

    # CPU per I/O (fio + daemon) for the data jobs
    cs = [c for c in combos if c["group"] not in ("meta",) and c["id"] in res]
    if cs:
        cats, vals = [], {}
        for c in cs:
            cats.append(c["id"])
            for t in targets:
                vals[(c["id"], t)] = val(res[c["id"]].get(t), lambda r: r.get("cpu_us_per_io"))
        fig, ax = plt.subplots(figsize=(max(8, len(cats) * max(len(targets), 3) * 0.45 + 3), 5))
        bars(ax, cats, vals, "CPU µs per I/O, fio + FUSE daemon (lower is better)")
        ax.set_title("CPU per I/O (log scale)")
        save(fig, "cpu-per-io.png")
        vals = {(c["id"], t): val(res[c["id"]].get(t), lambda r: r.get("machine_cpu_us_per_io"))
                for c in cs for t in targets}
        if any(isinstance(v, (int, float)) for v in vals.values()):
            fig, ax = plt.subplots(figsize=(max(8, len(cats) * max(len(targets), 3) * 0.45 + 3), 5))
            bars(ax, cats, vals, "CPU µs per I/O, all CPUs of the machine (lower is better)")
            ax.set_title("Whole-machine CPU per I/O, /proc/stat (log scale)")
            save(fig, "cpu-per-io-machine.png")

    # blobfs / ceiling ratios with the goals
    cats, vals = [], {}
    pair_names = [f"{a} / {b}" for a, b in RATIOS]
    for c in combos:
        per = res.get(c["id"], {})
        if not per:
            continue
        row = {}
        for (a, b), name in zip(RATIOS, pair_names):
            ra, rb = per.get(a), per.get(b)
            if ra and rb and ra["status"] == "ok" and rb["status"] == "ok":
                va, higher = main_value(c["group"], c["id"], ra)
                vb, _ = main_value(c["group"], c["id"], rb)
                v = ratio(va, vb)
                if v is not None and not higher:
                    v = 1 / v   # plot "speed" ratios: > 1 is better for every bar
                row[name] = v
        if any(v for v in row.values()):
            cats.append(c["id"])
            for name in pair_names:
                vals[(c["id"], name)] = row.get(name)
    if cats:
        fig, ax = plt.subplots(figsize=(max(8, len(cats) * 0.9 + 3), 5))
        n = len(pair_names)
        w = 0.8 / n
        pal = ["#ff7f0e", "#17becf", "#2ca02c", "#9467bd"]
        for i, name in enumerate(pair_names):
            xs = [k + (i - (n - 1) / 2) * w for k in range(len(cats))]
            ys = [vals.get((c, name)) or 0 for c in cats]
            ax.bar(xs, ys, w, label=name, color=pal[i % len(pal)])
            for x, y in zip(xs, ys):
                if y:
                    ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=5.5, rotation=90)
        ax.axhline(1.0, color="black", lw=0.8, label="goal 1.0 (image / passthrough-disk)")
        ax.axhline(1.2, color="#ff7f0e", lw=0.8, ls="--", label="goal 1.2 (malloc / passthrough-tmpfs)")
        ax.axhline(0.8, color="#d62728", lw=0.8, ls=":", label="goal 0.8 (seq direct / raw)")
        ax.axhline(1 / 1.5, color="#8c564b", lw=0.8, ls="-.", label="goal 0.67 (fsync: p99 ≤ 1.5× raw)")
        ax.axhline(0.6, color="#9467bd", lw=0.8, ls=":", label="goal 0.6 (4 KiB qd32 direct / raw)")
        ax.axhline(0.5, color="#7f7f7f", lw=0.8, ls="-.", label="goal 0.5 (buffered randwrite / raw)")
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("blobfs / ceiling (fsync: ceiling p99 / blobfs p99)")
        ax.set_title("blobfs relative to its ceilings (1.0 = as fast; higher is better)")
        ax.legend(fontsize=7, ncol=3)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "ratios.png")
    return made, ""


# ---------------------------------------------------------------- main

def profiles_section(out):
    """The perf profiles bench/run took of each blobfs daemon (profiles/*.txt): the share
    of samples per thread and the hottest functions, as recorded."""
    d = os.path.join(out, "profiles")
    files = sorted(f for f in os.listdir(d) if f.endswith(".txt")) if os.path.isdir(d) else []
    md = ["## Where the time goes", ""]
    if not files:
        return md + ["No profile in this run (perf missing, or no blobfs target ran).", ""]
    md += ["`perf record -e cpu-clock -F 999 -g -p <daemon>` for a few seconds while fio ran the named job "
           "on that target (bench/run, section \"profiles\"); self time per thread, then per function "
           "(Swift symbols demangled). Thread names: `blob-md` the metadata reactor (file system, blob "
           "store, replies), `nvme-emu` the software NVMe controller, `blobfs` the main thread and, with "
           "`--reactors N`, libfuse's worker threads (by default the `blob-md` reactor reads /dev/fuse itself), "
           "`iou-wrk-*` io_uring's workers. The whole files are "
           "in `profiles/`.", ""]
    for f in files:
        text = read_text(os.path.join(d, f))
        lines = text.splitlines()
        md += [f"### {f[:-4]}", "", "```"] + lines[:32] + ["```", ""]
    return md


def background_warning(idle_json, limit=10.0):
    """A warning when the machine was busy with no job running: then the whole-machine CPU
    figures carry other load (on a saturated machine they measure wall time, not cost)."""
    w = (idle_json or {}).get("machine", {}).get("window") or {}
    if not idle_json:
        return ["The machine's busy share with no job running was not measured in this run (no after-load "
                "window): whether other load is inside the whole-machine CPU figures is unknown.", ""]
    bg = w.get("busy_pct")
    if bg is None or bg <= limit:
        return []
    return [f"**The whole-machine CPU figures of this run carry other load: with no job running the machine "
            f"was {bg:.0f} % busy.** Busy time then fills much of every job's window whatever the job costs "
            "(when it is near 100 %, CPU/IO machine ≈ CPUs × runtime / I/Os, the inverse of throughput), so the "
            "whole-machine CPU lines below do not judge cost. Judge them on a machine that is otherwise idle.", ""]


def machine_note(res, machine, idle_json):
    """How the whole-machine columns are computed, their resolution in this run, and the
    machine's busy share while no job ran (the background inside every figure)."""
    tick = None
    busy_ticks, windows, intervals = [], [], []
    for per in res.values():
        for r in per.values():
            if r.get("status") != "ok":
                continue
            tick = tick or r.get("machine_tick_ms")
            mc = r["meta"].get("machine") or {}
            if r.get("machine_busy_ticks") is not None and r.get("machine_cpu_us_per_io") is not None:
                busy_ticks.append(r["machine_busy_ticks"])
                windows.append(r.get("machine_window_s") or 0)
            if mc.get("sample_interval_s"):
                intervals.append(mc["sample_interval_s"])
    if tick is None:
        hz = machine.get("clk_tck")
        tick = 1000.0 / float(hz) if hz else None
    md = ["`CPU/IO machine µs` is the whole machine's: the busy time of all "
          f"{machine.get('cores', '?')} CPUs (/proc/stat's `cpu` line: user + nice + system + irq + softirq "
          "+ steal; idle + iowait is idle) over fio's measured phase, divided by the job's I/Os (read + write "
          "total_ios), in µs. It counts everything that ran: fio, the FUSE daemon and its spinning threads, "
          "the kernel's FUSE, block and interrupt work, io_uring and kernel workers — and any other load on "
          "the machine. `machine busy %` is that busy time's share of all CPUs' time over the same phase "
          "(100 % = every CPU busy all along). bench/run samples /proc/stat (aggregate and per-CPU lines) "
          "right before fio starts, every 50 ms while it runs and right after it exits; the measured phase is "
          "fio's runtime ending at its JSON's timestamp (after the ramp), its two ends interpolated between "
          "the samples around them (bench/machine_cpu.py; the samples and per-CPU shares are in each "
          "`.meta.json` under `machine`)."]
    if tick:
        res_txt = (f" /proc/stat counts in USER_HZ ticks of {tick:g} ms, so each figure is good to about ± 2 "
                   f"ticks ({2 * tick:g} ms of CPU) over its window")
        if busy_ticks:
            i = min(range(len(busy_ticks)), key=lambda k: busy_ticks[k])
            res_txt += (f"; the smallest here held {busy_ticks[i]:.0f} busy ticks over {windows[i]:.2f} s "
                        f"(± {200.0 / busy_ticks[i] if busy_ticks[i] else 100:.0f} %), the median "
                        f"{sorted(busy_ticks)[len(busy_ticks) // 2]:.0f}")
        if intervals:
            res_txt += f"; samples every {sorted(intervals)[len(intervals) // 2] * 1000:.0f} ms (median)"
        md[0] += res_txt + "."
    w = (idle_json or {}).get("machine", {}).get("window") or {}
    if w.get("busy_pct") is not None:
        per = ", ".join(f"{p:g} %" for p in (w.get("per_cpu_busy_pct") or []) if p is not None)
        md[0] += (f" With no job running (after the last job, {w.get('seconds', 0):.1f} s; the blobfs daemons "
                  f"mounted and idle) the machine was **{w['busy_pct']:.1f} % busy** (per CPU: {per}): "
                  "load of that kind is inside every whole-machine figure of this run.")
    return md + [""]


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    out = sys.argv[1]
    params = read_kv(os.path.join(out, "params.txt"))
    machine = read_kv(os.path.join(out, "machine.txt"))
    tstat = read_targets(out)
    combos = read_combos(out)
    idle = read_idle(out)
    res = load(out, params)
    ran = [t for t, s, _ in tstat if s == "ok"]
    targets = [t for t in ALL_TARGETS if t in ran] + [t for t in ran if t not in ALL_TARGETS]
    wall = read_text(os.path.join(out, "wall_seconds")).strip()
    cmds = read_text(os.path.join(out, "commands.txt")).splitlines()

    md = [f"# blobfs under fio, beside its ceilings ({params.get('mode', '?')} mode)", ""]
    mem = int(machine.get("memory_kib", "0") or 0) / 2**20
    md += ["## Machine", "",
           f"- {machine.get('cores', '?')} cores ({machine.get('cpu', '?')}), {mem:.1f} GiB memory",
           f"- kernel {machine.get('kernel', '?')}, {machine.get('os', '?')}",
           f"- {machine.get('fio', 'fio ?')}, libfuse {machine.get('libfuse', '?')}, {machine.get('swift', 'swift ?')}",
           f"- bench/work (image, raw file, passthrough_ll's disk directory): {machine.get('work_fs', '?')}",
           f"- load average at start {machine.get('loadavg_start', '?')}, at end {machine.get('loadavg_end', '?')} "
           "(the machine may be shared: compare targets within this run, not across runs)",
           f"- source: git {machine.get('git', '?')}", ""]
    md += ["## Command", "", "```", params.get("command", "bench/run"), "```", "",
           f"Mode {params.get('mode')}: data file {params.get('size')} per target, runtime {params.get('runtime')} s "
           f"after a {params.get('ramp')} ramp per fio run, {params.get('nrfiles')} files for the metadata jobs, "
           f"blobfs image {params.get('image_size')} (preallocated), malloc {params.get('malloc_size')}, "
           f"tmpfs size {params.get('tmpfs_size')}. blobfs binary: `{params.get('blobfs', '?')}`."
           + (f" Wall time {float(wall):.0f} s." if wall else ""), ""]
    if params.get("overrides"):
        md += ["Development overrides in effect (not for published numbers): " +
               ", ".join(f"`{o}`" for o in params["overrides"]), ""]
    md += ["Every job ran on every target before the next job started (the starting target "
           "rotates from job to job), so drift over the run hits all targets alike. Every command "
           "is in `commands.txt` (paths relative to the repository root). The fio job files are "
           "`bench/fio/*.fio`, parameterised by environment variables.", "",
           "Set-up:", "", "```"]
    md += [c for c in cmds if "fio --output" not in c and "LIST_PY" not in c]
    md += ["```", "", "fio, one command per job (as run on its first target; the others differ in "
           "FIO_FILE / FIO_DIR and --output):", "", "```"]
    seen = set()
    for c in cmds:
        m = re.search(r"--output=\S*/runs/([^/]+)/", c)
        if m and not m.group(1).startswith("_") and m.group(1) not in seen:
            seen.add(m.group(1))
            md.append(c)
    listing = [c for c in cmds if "LIST_PY" in c]
    if listing:
        md += ["# directory listing (the script is LIST_PY in bench/run):", listing[0]]
    md += ["```", ""]

    md += ["## Targets", "", "| target | status | what |", "|---|---|---|"]
    for t, s, info in tstat:
        md.append(f"| {t} | {'ran' if s == 'ok' else '**skipped**'} | {info} |")
    direct = read_text(os.path.join(out, "direct.txt")).splitlines()
    nod = [l.split(" ", 3) for l in direct if len(l.split(" ", 3)) >= 3 and (l.split()[1] == "0" or l.split()[2] == "0")]
    md += [""]
    if nod:
        md += ["O_DIRECT: " + "; ".join(f"`{f[0]}`: {f[3] if len(f) > 3 else 'refused'} → its direct=1 "
                                        f"{'jobs' if f[1] == '0' else 'write jobs'} are n/a" for f in nod) + ".", ""]
    md += ["Ceilings, like with like: **blobfs-malloc vs passthrough-tmpfs** (both in memory, both "
           "through FUSE), **blobfs-image vs passthrough-disk** (both through FUSE onto the same "
           "file system) and **blobfs-image vs raw-file** (the device limit); blobfs-nvme (the same kind of "
           "image through the NVMe driver and the software NVMe controller) vs raw-file too, and beside "
           "blobfs-image. tmpfs is the memory limit without FUSE; null is the bare FUSE protocol limit (no "
           "storage).", ""]

    goals_md, verdicts = goals_section(combos, res, idle)
    bg_warning = background_warning(read_json(os.path.join(out, "machine-idle.json")))
    md += ["## Goals", "",
           "Issue 13's goals, as ratios within this run: blobfs-image ≥ 1.0 × passthrough-disk on every job "
           "both ran (throughput: MiB/s, IOPS — for the fsync job writes+fsyncs per second —, files/s, "
           "entries/s); blobfs-image against raw-file: 4 KiB direct random read and write at qd32 ≥ 0.6, "
           "1 MiB sequential direct ≥ 0.8, 4 KiB write+fsync IOPS ≥ 0.8 with fsync p99 ≤ 1.5 × raw-file's, "
           "4 KiB buffered random write ≥ 0.5; whole-machine CPU per 4 KiB I/O on blobfs-image ≤ "
           "passthrough-disk's and ≤ 2 × raw-file's; blobfs-malloc ≥ 1.2 × passthrough-tmpfs on every job "
           "both ran and ≥ 2 × on 4 KiB direct reads at numjobs 4; a mounted idle blobfs under 1 % of a "
           "core. One line per job variant of this mode; a job a target could not do (n/a) is left out of "
           "the \"every job both run\" goals and \"not measured\" in the others. The issue judges full-mode "
           "runs.", ""]
    md += bg_warning + goals_md
    short = [v for v in verdicts if v.startswith("**")]
    if short:
        md += [f"{len(short)} of {len(verdicts)} goal lines are missed by the amounts above; where the "
               "blobfs daemons' time goes is in \"Where the time goes\" below (perf profiles taken in this run).", ""]

    md += ["## blobfs / ceiling ratios", "",
           "The main metric of each job (MiB/s, IOPS, files/s, entries/s: > 1 means blobfs is faster; "
           "fsync p99: > 1 means blobfs is slower).", ""]
    md += ratio_table(combos, res)

    plot_list, plot_note = plots(out, combos, res, targets)
    md += ["## Plots", ""]
    md += [f"![{os.path.basename(p)}]({p})" for p in plot_list] + ([plot_note] if plot_note else []) + [""]

    md += ["## Results", "",
           "Bandwidth and IOPS over the measured runtime; latencies are fio's total latency "
           "(submission to completion) percentiles. CPU per I/O: `fio` is fio's usr+sys CPU "
           "(which includes the kernel's work on its behalf, e.g. the FUSE request path) times its "
           "runtime, divided by the I/Os; `daemon` is the FUSE daemon's utime+stime (from "
           "/proc/PID/stat, 10 ms ticks) over the fio run scaled to the measured phase, divided "
           "by the same I/Os; `total` is the two. tmpfs and raw-file have no daemon. n/a: the target "
           "cannot do the job (reason in the note).", ""]
    md += machine_note(res, machine, read_json(os.path.join(out, "machine-idle.json"))) + bg_warning
    md += results_tables(combos, res, targets)

    md += ["## Idle CPU of the blobfs daemons", ""]
    if idle:
        md += ["| daemon | when | window s | CPU % of one core |", "|---|---|---:|---:|"]
        md += [f"| {i['target']} (pid {i['pid']}) | {i['when']} | {i['secs']:.1f} | {i['pct']:.3f} |" for i in idle]
        md += ["", "after-mount: right after the mount, while the other targets are set up; after-load: "
               "a second after the last job. CPU from /proc/PID/task/*/schedstat (ns).", ""]
    mi = (read_json(os.path.join(out, "machine-idle.json")) or {}).get("machine", {}).get("window") or {}
    if mi.get("busy_pct") is not None:
        md += [f"The whole machine over the after-load window ({mi.get('seconds', 0):.1f} s, from /proc/stat): "
               f"{mi['busy_pct']:.1f} % of all CPUs busy, {mi.get('busy_s', 0):.2f} CPU s.", ""]
    else:
        md += ["No blobfs target ran.", ""]

    md += profiles_section(out)

    md += ["## Reads through a copy", ""]
    md += clone_section(out, params)

    md += ["## In-process numbers (below FUSE)", ""]
    md += inprocess_section(out)

    fails = [(j, t, r["meta"].get("error", "")) for j, per in sorted(res.items()) for t, r in per.items()
             if r["status"] == "failed"]
    if fails:
        md += ["## Failures", ""] + [f"- `{j}` on {t}: {e}" for j, t, e in fails] + [""]

    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(md))
    print(os.path.join(out, "summary.md"))


if __name__ == "__main__":
    main()
