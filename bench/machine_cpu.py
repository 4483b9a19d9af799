#!/usr/bin/env python3
"""Whole-machine CPU of one bench/run job, from /proc/stat samples.

    python3 bench/machine_cpu.py META SAMPLES [FIO_JSON]

SAMPLES holds one /proc/stat sample a line, as bench/run's procstat_sample writes it:

    EPOCH_SECONDS|cpu  user nice system idle iowait irq softirq steal guest guest_nice|cpu0 ...|cpu1 ...

the first taken right before fio started, the last right after it exited, the others
every 50 ms in between (bench/run's procstat_sampler). The counters are the kernel's
cumulative CPU time in USER_HZ ticks (getconf CLK_TCK, 100 on Linux: 10 ms).

Busy = user + nice + system + irq + softirq + steal (guest time is already inside user),
idle = idle + iowait; a spinning thread is busy time like any other. The figures:

- invocation: busy and idle time of all CPUs from the first sample to the last (the
  whole fio process: start-up, ramp, measured runtime, tear-down);
- window: the same over fio's measured phase only, which ends when fio wrote its JSON
  (timestamp_ms) and lasts the job's runtime (the longest of its directions' runtime):
  the counters at both ends are interpolated linearly between the samples around them;
- machine_cpu_us_per_io = window busy seconds (all CPUs) / the I/Os fio counted in that
  phase (read + write total_ios), in microseconds; machine_busy_pct = the window's busy
  share of all CPUs' time.

Without FIO_JSON (a job that is not fio) the window is the invocation and there is no
per-I/O figure. META (bench/run's .meta.json) gets the keys machine_cpu_us_per_io,
machine_busy_pct and machine (the details, the samples at both ends of the invocation
and those around the window's ends, so the figure can be recomputed).
"""
import json
import os
import sys

FIELDS = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice"]
BUSY = (0, 1, 2, 5, 6, 7)
IDLE = (3, 4)


def parse_line(line):
    parts = line.rstrip("\n").split("|")
    if len(parts) < 2:
        return None
    try:
        t = float(parts[0])
        rows = [p.split() for p in parts[1:] if p.startswith("cpu")]
        vals = [[float(x) for x in r[1:]] + [0.0] * (len(FIELDS) - len(r[1:])) for r in rows]
    except ValueError:
        return None
    if not rows or rows[0][0] != "cpu":
        return None
    return {"t": t, "cpu": vals[0], "cpus": vals[1:], "raw": line.rstrip("\n")}


def read_samples(path):
    samples = []
    try:
        with open(path) as f:
            for line in f:
                s = parse_line(line)
                if s:
                    samples.append(s)
    except OSError:
        pass
    samples.sort(key=lambda s: s["t"])
    # a sample whose counters went backwards is a torn read: drop it
    out = []
    for s in samples:
        if out and sum(s["cpu"]) < sum(out[-1]["cpu"]):
            continue
        out.append(s)
    return out


def at(samples, t):
    """The counters at time t, interpolated linearly between the two samples around t."""
    if t <= samples[0]["t"]:
        return samples[0], [samples[0]]
    if t >= samples[-1]["t"]:
        return samples[-1], [samples[-1]]
    for a, b in zip(samples, samples[1:]):
        if a["t"] <= t <= b["t"]:
            f = (t - a["t"]) / (b["t"] - a["t"]) if b["t"] > a["t"] else 0.0
            mix = lambda x, y: [u + f * (v - u) for u, v in zip(x, y)]
            n = min(len(a["cpus"]), len(b["cpus"]))
            return {"t": t, "cpu": mix(a["cpu"], b["cpu"]),
                    "cpus": [mix(a["cpus"][i], b["cpus"][i]) for i in range(n)]}, [a, b]
    return samples[-1], [samples[-1]]


def busy_idle(v):
    return sum(v[i] for i in BUSY), sum(v[i] for i in IDLE)


def span(a, b, hz):
    ba, ia = busy_idle(a["cpu"])
    bb, ib = busy_idle(b["cpu"])
    db, di = bb - ba, ib - ia
    per = []
    for ca, cb in zip(a["cpus"], b["cpus"]):
        x, y = busy_idle(ca), busy_idle(cb)
        d = (y[0] - x[0]) + (y[1] - x[1])
        per.append(round(100.0 * (y[0] - x[0]) / d, 1) if d > 0 else None)
    return {"start": a["t"], "end": b["t"], "seconds": round(b["t"] - a["t"], 4),
            "busy_s": round(db / hz, 4), "idle_s": round(di / hz, 4),
            "busy_ticks": round(db, 2), "total_ticks": round(db + di, 2),
            "busy_pct": round(100.0 * db / (db + di), 2) if db + di > 0 else None,
            "per_cpu_busy_pct": per}


def fio_phase(j):
    """(I/Os, measured seconds, end time) of a fio JSON (group_reporting: one job entry)."""
    job = j["jobs"][0]
    ios, runtime_ms = 0, 0
    for d in ("read", "write"):
        s = job.get(d) or {}
        if s.get("total_ios"):
            ios += s["total_ios"]
            runtime_ms = max(runtime_ms, s.get("runtime", 0))
    end = j.get("timestamp_ms", 0) / 1000.0
    return ios, runtime_ms / 1000.0, end


def compute(samples, fio_json, hz):
    if len(samples) < 2:
        return {"error": "fewer than two /proc/stat samples"}
    first, last = samples[0], samples[-1]
    m = {"clk_tck": hz, "tick_ms": 1000.0 / hz, "ncpu": len(first["cpus"]),
         "samples": len(samples),
         "busy": "user+nice+system+irq+softirq+steal", "idle": "idle+iowait",
         "invocation": span(first, last, hz),
         "before": first["raw"], "after": last["raw"]}
    if len(samples) > 2:
        gaps = [b["t"] - a["t"] for a, b in zip(samples, samples[1:])]
        m["sample_interval_s"] = round(sorted(gaps)[len(gaps) // 2], 4)
    if fio_json is None:
        m["window"] = dict(m["invocation"], source="invocation (not a fio job)")
        return m
    ios, runtime_s, end = fio_phase(fio_json)
    m["ios"] = ios
    if not ios or runtime_s <= 0 or not end:
        m["window"] = None
        m["error"] = "fio reported no I/O or no runtime"
        return m
    end = min(end, last["t"])
    start = max(end - runtime_s, first["t"])
    a, around_a = at(samples, start)
    b, around_b = at(samples, end)
    w = span(a, b, hz)
    w["source"] = "fio timestamp_ms - runtime .. timestamp_ms, interpolated between samples"
    w["fio_runtime_s"] = runtime_s
    w["samples_around"] = [s["raw"] for s in around_a + around_b]
    m["window"] = w
    m["cpu_us_per_io"] = round(w["busy_s"] / ios * 1e6, 3)
    return m


def main():
    if len(sys.argv) not in (3, 4) or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    meta_path, samples_path = sys.argv[1], sys.argv[2]
    fio_json = None
    if len(sys.argv) == 4 and sys.argv[3] != "-":
        try:
            with open(sys.argv[3]) as f:
                fio_json = json.load(f)
        except (OSError, ValueError):
            fio_json = None
    hz = os.sysconf("SC_CLK_TCK")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = {}
    try:
        m = compute(read_samples(samples_path), fio_json, hz)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        m = {"error": "unreadable: %s" % e}
    meta["machine"] = m
    meta["machine_cpu_us_per_io"] = m.get("cpu_us_per_io")
    meta["machine_busy_pct"] = (m.get("window") or {}).get("busy_pct")
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f)
        f.write("\n")
    os.replace(tmp, meta_path)


if __name__ == "__main__":
    main()
