"""Concurrent writers driven to ENOSPC and beyond, with fdatasync: every call must return.

Usage: full_stress.py MOUNTPOINT [--workers 8] [--seconds 30] [--seed 1] [--limit 60]

Each worker process runs a random mix of namespace and data operations (create, write,
truncate, rename, link, unlink, mkdir, rmdir, fdatasync, fsync, read) in its own
subdirectory, and keeps going after the file system is full. ENOSPC (and any other errno)
is a fine answer; silence is not. Each worker reports the operation it is in and when it
started it through shared memory; the parent watches them. A call that has not returned
`--limit` seconds after it started is a hang: the parent prints the stuck operations (and
the FUSE connection's waiting count from fusectl) and exits 1 without waiting for the
stuck workers (they are in D state until the daemon answers or dies; the caller of this
script kills the daemon, which frees them). Exit 0 when every worker finished its time.
"""
import argparse
import ctypes
import errno
import multiprocessing
import os
import random
import sys
import time

from fscalls import check_all_answered, fuse_waiting

OPS = ["create", "write", "append", "truncate", "rename", "link", "unlink", "mkdir", "rmdir",
       "fdatasync", "fsync", "read", "bigwrite"]


def worker(index, root, seconds, seed, state, counts):
    rng = random.Random(seed * 1000 + index)
    base = os.path.join(root, f"w{index}")
    os.makedirs(base, exist_ok=True)
    end = time.monotonic() + seconds
    names = [f"f{i}" for i in range(24)]
    dirs = [f"d{i}" for i in range(4)]
    fds = {}
    done = errors = enospc = 0
    payload = os.urandom(1 << 20)

    def path(*parts):
        return os.path.join(base, *parts)

    def some_file():
        sub = rng.choice([""] + dirs)
        return path(sub, rng.choice(names)) if sub else path(rng.choice(names))

    while time.monotonic() < end:
        op = rng.choice(OPS)
        state[index * 2] = OPS.index(op) + 1
        state[index * 2 + 1] = time.monotonic()
        try:
            if op == "create":
                fd = os.open(some_file(), os.O_CREAT | os.O_RDWR, 0o644)
                old = fds.pop(fd, None)
                fds[fd] = True
            elif op in ("write", "append", "bigwrite"):
                p = some_file()
                flags = os.O_CREAT | os.O_WRONLY | (os.O_APPEND if op == "append" else 0)
                fd = os.open(p, flags, 0o644)
                try:
                    size = rng.choice([512, 4096, 65536, 300000]) if op != "bigwrite" else (1 << 20)
                    offset = rng.randrange(0, 8 << 20)
                    if op == "append":
                        os.write(fd, payload[:size])
                    else:
                        os.pwrite(fd, payload[:size], offset)
                    if rng.random() < 0.3:
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
            elif op == "truncate":
                os.truncate(some_file(), rng.choice([0, 4096, 1 << 20, 16 << 20]))
            elif op == "rename":
                os.rename(some_file(), some_file())
            elif op == "link":
                os.link(some_file(), some_file())
            elif op == "unlink":
                os.unlink(some_file())
            elif op == "mkdir":
                os.mkdir(path(rng.choice(dirs)))
            elif op == "rmdir":
                os.rmdir(path(rng.choice(dirs)))
            elif op in ("fdatasync", "fsync"):
                fd = os.open(some_file(), os.O_RDWR)
                try:
                    os.pwrite(fd, payload[:4096], rng.randrange(0, 4 << 20))
                    (os.fdatasync if op == "fdatasync" else os.fsync)(fd)
                finally:
                    os.close(fd)
            elif op == "read":
                fd = os.open(some_file(), os.O_RDONLY)
                try:
                    os.pread(fd, 65536, rng.randrange(0, 4 << 20))
                finally:
                    os.close(fd)
        except OSError as error:
            errors += 1
            if error.errno == errno.ENOSPC:
                enospc += 1
            elif error.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR,
                                     errno.EMLINK, errno.EXDEV, errno.EINVAL, errno.EFBIG):
                print(f"worker {index}: {op}: {error}", file=sys.stderr)
        done += 1
        state[index * 2] = 0
        # Keep a few files open: their handles stay open across the fill.
        if len(fds) > 8:
            fd = next(iter(fds))
            fds.pop(fd)
            os.close(fd)
    for fd in fds:
        os.close(fd)
    counts[index * 3] = done
    counts[index * 3 + 1] = errors
    counts[index * 3 + 2] = enospc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mountpoint")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--limit", type=float, default=60, help="seconds a call may take before it counts as hung")
    args = parser.parse_args()
    state = multiprocessing.Array(ctypes.c_double, args.workers * 2, lock=False)
    counts = multiprocessing.Array(ctypes.c_long, args.workers * 3, lock=False)
    procs = [multiprocessing.Process(target=worker, args=(i, args.mountpoint, args.seconds, args.seed, state, counts),
                                     daemon=True) for i in range(args.workers)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + args.seconds + args.limit + 30
    full_seen = False
    while any(p.is_alive() for p in procs):
        time.sleep(0.5)
        now = time.monotonic()
        try:
            st = os.statvfs(args.mountpoint)
            if st.f_bavail == 0:
                full_seen = True
        except OSError:
            pass
        stuck = [(i, OPS[int(state[i * 2]) - 1], now - state[i * 2 + 1]) for i in range(args.workers)
                 if procs[i].is_alive() and state[i * 2] and now - state[i * 2 + 1] > args.limit]
        if stuck or now > deadline:
            for i, op, age in stuck:
                print(f"HUNG: worker {i} in {op} for {age:.0f} s", file=sys.stderr)
            print(f"fusectl waiting: {fuse_waiting(args.mountpoint)}", file=sys.stderr)
            os._exit(1)
    bad = [i for i, p in enumerate(procs) if p.exitcode != 0]
    total = sum(counts[i * 3] for i in range(args.workers))
    failures = sum(counts[i * 3 + 1] for i in range(args.workers))
    nospace = sum(counts[i * 3 + 2] for i in range(args.workers))
    print(f"{args.workers} workers, {args.seconds:.0f} s: {total} calls returned ({failures} errors, {nospace} ENOSPC); "
          f"file system full seen: {full_seen}")
    if bad:
        print(f"workers {bad} failed", file=sys.stderr)
        return 1
    problem = check_all_answered(args.mountpoint)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
