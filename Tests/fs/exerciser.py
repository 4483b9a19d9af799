#!/usr/bin/env python3
"""Randomized data-integrity exerciser: random writes, truncates, reads, holes, punches,
renames, unlinks and fsyncs on a few files, checked against an in-memory model.

    exerciser.py DIR --seed S --ops N [--files F] [--max-size BYTES]
    exerciser.py DIR --seed S --ops N --manifest FILE      (crash mode: see below)
    exerciser.py DIR --verify-manifest FILE

Any difference prints the seed, the operation index, the file, the offset and the first
differing bytes, and exits 1.

Crash mode (--manifest FILE, FILE outside the file system under test): files are
written whole, fsync'd, and never touched again; after each fsync the file's name, size
and SHA-256 are appended to FILE (itself fsync'd). --verify-manifest checks, after a crash
and remount, that every file in the manifest is intact.
"""
import argparse
import ctypes
import errno
import hashlib
import os
import random
import sys

from fscalls import check_all_answered, first_difference, libc  # noqa: E402
PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def fail(message):
    print(f"exerciser: MISMATCH {message}", flush=True)
    sys.exit(1)


def exercise(directory, seed, ops, files, max_size):
    rng = random.Random(seed)
    work = os.path.join(directory, f"exerciser.{seed}.{os.getpid()}")
    os.mkdir(work)
    names = [f"f{index}" for index in range(files)]
    model = {}
    fds = {}
    can_punch = True

    def path(name):
        return os.path.join(work, name)

    def fd_of(name):
        if name not in fds:
            fds[name] = os.open(path(name), os.O_RDWR | os.O_CREAT, 0o644)
            model.setdefault(name, bytearray())
        return fds[name]

    def verify(name, where):
        fd = fd_of(name)
        expected = model[name]
        size = os.fstat(fd).st_size
        if size != len(expected):
            fail(f"seed {seed} op {where} file {name}: size {size}, model {len(expected)}")
        actual = os.pread(fd, len(expected) + 10, 0)
        if actual != bytes(expected):
            at = first_difference(actual, expected)
            fail(f"seed {seed} op {where} file {name} offset {at}: read {actual[at:at + 8].hex()} "
                 f"model {bytes(expected[at:at + 8]).hex()}")

    for index in range(ops):
        name = rng.choice(names)
        choice = rng.random()
        if choice < 0.40:  # write, any alignment, maybe past EOF (a hole)
            fd = fd_of(name)
            current = model[name]
            offset = rng.randrange(0, max(1, min(max_size, len(current) + 65536)))
            length = rng.choice([1, 7, 512, 4095, 4096, 4097, 8192, 65536, rng.randrange(1, 200_000)])
            length = max(1, min(length, max_size - offset))
            data = rng.randbytes(length)
            if os.pwrite(fd, data, offset) != length:
                fail(f"seed {seed} op {index}: short write")
            if offset > len(current):
                current.extend(b"\0" * (offset - len(current)))
            current[offset:offset + length] = data
        elif choice < 0.58:  # read a random range and compare
            fd = fd_of(name)
            current = model[name]
            offset = rng.randrange(0, len(current) + 100)
            length = rng.randrange(1, 150_000)
            actual = os.pread(fd, length, offset)
            expected = bytes(current[offset:offset + length])
            if actual != expected:
                at = first_difference(actual, expected)
                fail(f"seed {seed} op {index} file {name} read at {offset}+{at}: got {actual[at:at + 8].hex()} "
                     f"(len {len(actual)}) model {expected[at:at + 8].hex()} (len {len(expected)})")
        elif choice < 0.68:  # truncate up or down
            fd = fd_of(name)
            current = model[name]
            size = rng.randrange(0, max_size // 2)
            os.ftruncate(fd, size)
            if size < len(current):
                del current[size:]
            else:
                current.extend(b"\0" * (size - len(current)))
        elif choice < 0.74:  # punch a hole
            fd = fd_of(name)
            current = model[name]
            if can_punch and len(current) > 0:
                offset = rng.randrange(0, len(current))
                length = rng.randrange(1, 100_000)
                if libc.fallocate(fd, PUNCH, offset, length) != 0:
                    if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS):
                        can_punch = False
                        continue
                    fail(f"seed {seed} op {index}: fallocate punch: {os.strerror(ctypes.get_errno())}")
                end = min(len(current), offset + length)
                current[offset:end] = b"\0" * (end - offset)
        elif choice < 0.80:  # fsync or fdatasync
            fd = fd_of(name)
            (os.fsync if rng.random() < 0.5 else os.fdatasync)(fd)
        elif choice < 0.86:  # close and reopen later, verifying
            if name in fds:
                os.close(fds.pop(name))
                verify(name, index)
        elif choice < 0.92:  # rename over another working file
            other = rng.choice(names)
            if other != name and name in model:
                for each in (name, other):
                    if each in fds:
                        os.close(fds.pop(each))
                os.rename(path(name), path(other))
                model[other] = model.pop(name)
        elif choice < 0.96:  # unlink (and later recreate)
            if name in model:
                if name in fds:
                    os.close(fds.pop(name))
                os.unlink(path(name))
                del model[name]
        else:  # full verification of every file
            for each in list(model):
                verify(each, index)
    for each in list(model):
        verify(each, ops)
    for fd in fds.values():
        os.close(fd)
    for each in list(model):
        os.unlink(path(each))
    os.rmdir(work)
    print(f"exerciser: seed {seed}: {ops} operations on {files} files, no difference", flush=True)


def crash_mode(directory, seed, ops, manifest):
    """Writes files whole, fsyncs each, then records it in the manifest (fsync'd)."""
    rng = random.Random(seed)
    work = os.path.join(directory, "crash")
    os.makedirs(work, exist_ok=True)
    with open(manifest, "a") as log:
        for index in range(ops):
            name = f"c{seed}-{index}"
            data = rng.randbytes(rng.choice([100, 4096, 10_000, 300_000, 1 << 20]))
            fd = os.open(os.path.join(work, name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            dfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
            log.write(f"{name} {len(data)} {hashlib.sha256(data).hexdigest()}\n")
            log.flush()
            os.fsync(log.fileno())


def verify_manifest(directory, manifest):
    work = os.path.join(directory, "crash")
    count = 0
    with open(manifest) as log:
        for line in log:
            parts = line.split()
            if len(parts) != 3:
                continue  # a torn last line: that file's fsync may not have returned
            name, size, digest = parts[0], int(parts[1]), parts[2]
            try:
                with open(os.path.join(work, name), "rb") as f:
                    data = f.read()
            except OSError as error:
                fail(f"fsync'd file {name} is gone after the crash: {error}")
            if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
                fail(f"fsync'd file {name}: {len(data)} bytes, expected {size}, content differs")
            count += 1
    print(f"exerciser: {count} fsync'd files intact after the crash", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--max-size", type=int, default=4 << 20)
    parser.add_argument("--manifest")
    parser.add_argument("--verify-manifest")
    args = parser.parse_args()
    if args.verify_manifest:
        verify_manifest(args.dir, args.verify_manifest)
    elif args.manifest:
        crash_mode(args.dir, args.seed, args.ops, args.manifest)
    else:
        exercise(args.dir, args.seed, args.ops, args.files, args.max_size)
    # Every call returned; the daemon must also hold nothing the kernel still waits for.
    problem = check_all_answered(args.dir)
    if problem:
        print(f"exerciser: {problem}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
