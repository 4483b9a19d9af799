#!/usr/bin/env python3
"""Randomized data-integrity exerciser, part two: inodes with several names and several
open handles, checked against an in-memory model.

    exerciser_extra.py DIR --seed S --ops N [--files F] [--dirs D] [--max-size BYTES]
                       [--fsync-every K] [--verify-every V] [--no-mmap]
    exerciser_extra.py DIR --seed S --write-manifest FILE [--duration SECONDS] [--ops N]
    exerciser_extra.py DIR --verify-manifest FILE

Model mode. A pool of F names in D directories; each name refers to an inode whose
contents are a bytearray. Operations: pwrite at random offsets and unaligned lengths
(also far past EOF, making holes) through any of the inode's open handles, O_APPEND
writes, pread from a different handle than the writer, reads and writes through a
shared mmap, ftruncate and truncate by path (up and down), punch hole, fallocate
(extending and KEEP_SIZE), copy_file_range between inodes, fsync/fdatasync, dropping
the page cache of a file (POSIX_FADV_DONTNEED, so that reads go to the file system),
close, reopen (sometimes with O_TRUNC), create, hard link, unlink (open handles keep
the inode alive), rename over another name, RENAME_EXCHANGE, stat checks (size,
st_nlink, st_ino shared by all names). Every --fsync-every K operations all open handles
are fsync'd. Every --verify-every V operations (and at the end) every name is reopened
and compared whole. The sequence depends only on the seed. The first difference prints
the seed, the operation index, the file, the offset and the first differing bytes, the
last operations, and exits 1.

Crash mode (--write-manifest FILE): a namespace-heavy workload in DIR/crash.SEED whose
checked objects are each created, written, fsync'd (with their directories) and never
touched again, so that the check after a crash is exact. Kinds of records:
  F path size sha256        file written (with holes), fsync'd          -> intact
  R old new size sha256     fsync'd file renamed, both directories fsync'd -> at new only
  P path size sha256        written to a temporary name, fsync'd, renamed over an
                            existing file, directory fsync'd (atomic replace) -> intact
  L path1 path2 size sha256 hard link, fsync'd                          -> same inode
  D path                    mkdir, parent fsync'd                       -> a directory
  X path                    created, made durable, unlinked, parent fsync'd -> gone
  S ...                     the same kinds made durable by syncfs(2) and one fsync of
                            a directory instead of their own fsyncs. (syncfs alone writes
                            the kernel's dirty pages back but is no durability point on a
                            FUSE mount: the kernel sends FUSE_SYNCFS to virtiofs only, so
                            the daemon never hears of it; the directory fsync reaches it
                            and makes everything before it durable, as syncfs would.)
Stops after --duration seconds, --ops steps or --max-bytes written, whichever comes first.
Between them: unchecked churn (writes, truncates, renames, unlinks, mkdir/rmdir on
scratch names). A record is appended to FILE (one line with a CRC, fsync'd) only after
the fsyncs returned; FILE must be outside the file system under test. Exits 0 at the
end of --duration/--ops, 3 when the file system goes away (ENOTCONN/EIO/...: the
kill -9 under test), 4 on any other error.
--verify-manifest checks every complete record; a torn last line is ignored.
"""
import argparse
import collections
import errno
import hashlib
import mmap
import os
import random
import sys
import time
import zlib

from fscalls import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, RENAME_EXCHANGE,  # noqa: E402
                     fallocate, first_difference, renameat2, syncfs)

UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTSUP)


class Mismatch(Exception):
    pass


class Inode:
    __slots__ = ("number", "data", "names", "ino")

    def __init__(self, number):
        self.number = number
        self.data = bytearray()
        self.names = set()
        self.ino = None


class Handle:
    __slots__ = ("fd", "inode", "append")

    def __init__(self, fd, inode, append):
        self.fd = fd
        self.inode = inode
        self.append = append


class Model:
    def __init__(self, directory, args):
        self.args = args
        self.seed = args.seed
        self.rng = random.Random(args.seed)
        self.work = os.path.join(directory, f"exerciser-extra.{args.seed}.{os.getpid()}")
        os.mkdir(self.work)
        self.dirs = [f"d{index}" for index in range(args.dirs)]
        for name in self.dirs:
            os.mkdir(os.path.join(self.work, name))
        self.pool = [f"{self.dirs[index % args.dirs]}/n{index}" for index in range(args.files)]
        self.names = {}  # name -> Inode
        self.handles = []
        self.next_inode = 0
        self.index = 0
        self.history = collections.deque(maxlen=25)
        self.can = {"punch": True, "fallocate": True, "exchange": True, "mmap": not args.no_mmap,
                    "copy": True}
        self.counts = collections.Counter()

    # Helpers -----------------------------------------------------------------------
    def path(self, name):
        return os.path.join(self.work, name)

    def note(self, text):
        self.history.append(f"{self.index}: {text}")

    def fail(self, message):
        raise Mismatch(message)

    def inode_label(self, inode):
        names = ",".join(sorted(inode.names)) or "(unlinked)"
        return f"inode #{inode.number} [{names}]"

    def compare(self, actual, expected, inode, base, what):
        if actual == expected:
            return
        at = first_difference(actual, expected)
        self.fail(f"{what}: {self.inode_label(inode)} offset {base + at}: read {bytes(actual[at:at + 16]).hex()} "
                  f"(len {len(actual)}), model {bytes(expected[at:at + 16]).hex()} (len {len(expected)})")

    def handles_of(self, inode):
        return [handle for handle in self.handles if handle.inode is inode]

    def open_handle(self, name, truncate=False):
        inode = self.names[name]
        append = self.rng.random() < 0.15
        flags = os.O_RDWR | (os.O_APPEND if append else 0) | (os.O_TRUNC if truncate else 0)
        if truncate:
            self.check_range(inode, 0, len(inode.data), f"O_TRUNC of {name}")
        fd = os.open(self.path(name), flags)
        handle = Handle(fd, inode, append)
        self.handles.append(handle)
        if truncate:
            del inode.data[:]
        self.note(f"open {name} ({self.inode_label(inode)}){' append' if append else ''}"
                  f"{' O_TRUNC' if truncate else ''} -> fd {fd}")
        return handle

    def check_range(self, inode, start, end, why):
        """Compares [start, end) of the inode with the model before an operation destroys it, so
        that data damaged earlier is caught even when it is about to be overwritten or dropped."""
        end = min(end, len(inode.data))
        if end <= start:
            return
        handles = self.handles_of(inode)
        if handles:
            fd, opened = handles[0].fd, False
        elif inode.names:
            fd, opened = os.open(self.path(min(inode.names)), os.O_RDONLY), True
        else:
            return
        try:
            actual = os.pread(fd, end - start, start)
        finally:
            if opened:
                os.close(fd)
        self.counts["bytes checked before being destroyed"] += end - start
        self.compare(actual, bytes(inode.data[start:end]), inode, start, f"check before {why}")

    def close_handle(self, handle):
        if not handle.inode.names and len(self.handles_of(handle.inode)) == 1:
            self.check_range(handle.inode, 0, len(handle.inode.data), f"the last close of unlinked fd {handle.fd}")
        os.close(handle.fd)
        self.handles.remove(handle)
        self.note(f"close fd {handle.fd}")

    def some_handle(self, writable_at_offset=False):
        """A random open handle, opening one on a random existing name if needed."""
        candidates = [handle for handle in self.handles if not (writable_at_offset and handle.append)]
        if candidates and (self.rng.random() < 0.8 or len(self.handles) >= 12):
            return self.rng.choice(candidates)
        if not self.names:
            self.create(self.rng.choice(self.pool))
        name = self.rng.choice(sorted(self.names))
        handle = self.open_handle(name)
        if writable_at_offset and handle.append:
            return self.some_handle(writable_at_offset)
        return handle

    def create(self, name):
        self.next_inode += 1
        inode = Inode(self.next_inode)
        fd = os.open(self.path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        inode.ino = os.fstat(fd).st_ino
        inode.names.add(name)
        self.names[name] = inode
        self.handles.append(Handle(fd, inode, False))
        self.note(f"create {name} -> {self.inode_label(inode)} fd {fd}")

    def drop_name(self, name):
        inode = self.names.pop(name)
        inode.names.discard(name)
        if not inode.names:  # now an orphan: keep a few handles of orphans, not most
            for handle in self.handles_of(inode):
                if self.rng.random() < 0.75:
                    self.close_handle(handle)

    def random_range(self, size):
        rng = self.rng
        choice = rng.random()
        if choice < 0.1:
            offset = rng.randrange(0, self.args.max_size)  # anywhere, maybe far past EOF
        elif choice < 0.2:
            offset = size  # append at EOF
        else:
            offset = rng.randrange(0, min(self.args.max_size, size + 65536) or 1)
        length = rng.choice([1, 3, 511, 512, 513, 4095, 4096, 4097, 65536, 131072 + 17,
                             rng.randrange(1, 8192), rng.randrange(1, 300_000)])
        length = max(1, min(length, self.args.max_size - offset))
        return offset, length

    # Operations --------------------------------------------------------------------
    def op_write(self):
        handle = self.some_handle()
        inode = handle.inode
        offset, length = self.random_range(len(inode.data))
        data = self.rng.randbytes(length)
        if handle.append:
            if len(inode.data) + length > self.args.max_size:
                return
            written = os.write(handle.fd, data)
            offset = len(inode.data)
        else:
            self.check_range(inode, offset, offset + length, f"a write at {offset}+{length}")
            written = os.pwrite(handle.fd, data, offset)
        self.note(f"write fd {handle.fd} {self.inode_label(inode)} {offset}+{length}{' (append)' if handle.append else ''}")
        if written != length:
            self.fail(f"short write: {written} of {length} at {offset} on {self.inode_label(inode)}")
        self.counts["bytes written"] += length
        if offset > len(inode.data):
            inode.data.extend(bytes(offset - len(inode.data)))
        inode.data[offset:offset + length] = data
        if self.rng.random() < 0.5:  # read it back at once, through another handle when there is one
            others = [other for other in self.handles_of(inode) if other is not handle] or [handle]
            reader = self.rng.choice(others)
            start = max(0, offset - self.rng.randrange(0, 5000))
            end = offset + length + self.rng.randrange(0, 5000)
            self.note(f"read back fd {reader.fd} {start}+{end - start}")
            self.compare(os.pread(reader.fd, end - start, start), bytes(inode.data[start:end]), inode, start,
                         "read back after write")

    def op_read(self):
        handle = self.some_handle()
        inode = handle.inode
        size = len(inode.data)
        offset = self.rng.randrange(0, size + 100)
        length = self.rng.choice([1, 4096, self.rng.randrange(1, 300_000)])
        self.note(f"read fd {handle.fd} {self.inode_label(inode)} {offset}+{length}")
        actual = os.pread(handle.fd, length, offset)
        self.compare(actual, bytes(inode.data[offset:offset + length]), inode, offset, "pread")

    def op_mmap(self):
        if not self.can["mmap"]:
            return self.op_read()
        handle = self.some_handle(writable_at_offset=True)  # no shared writable maps of O_APPEND files
        inode = handle.inode
        size = len(inode.data)
        if size == 0:
            return
        actual = os.fstat(handle.fd).st_size
        if actual != size:  # a map past EOF would end in SIGBUS
            self.fail(f"fstat fd {handle.fd}: size {actual}, model {size} ({self.inode_label(inode)})")
        try:
            mapped = mmap.mmap(handle.fd, size)
        except OSError as error:
            if error.errno in (errno.ENODEV, errno.EINVAL, errno.EACCES):
                self.can["mmap"] = False
                print(f"exerciser-extra: mmap disabled ({error})", file=sys.stderr)
                return
            raise
        try:
            offset = self.rng.randrange(0, size)
            length = min(size - offset, self.rng.randrange(1, 100_000))
            if self.rng.random() < 0.5:
                self.note(f"mmap read fd {handle.fd} {self.inode_label(inode)} {offset}+{length}")
                self.compare(mapped[offset:offset + length], bytes(inode.data[offset:offset + length]),
                             inode, offset, "mmap read")
            else:
                data = self.rng.randbytes(length)
                self.note(f"mmap write fd {handle.fd} {self.inode_label(inode)} {offset}+{length}")
                self.compare(mapped[offset:offset + length], bytes(inode.data[offset:offset + length]),
                             inode, offset, "mmap read before an mmap write")
                mapped[offset:offset + length] = data
                inode.data[offset:offset + length] = data
                if self.rng.random() < 0.5:
                    mapped.flush()
        finally:
            mapped.close()

    def op_truncate(self):
        rng = self.rng
        if self.names and rng.random() < 0.4:
            name = rng.choice(sorted(self.names))
            inode = self.names[name]
            size = self.truncate_size(len(inode.data))
            self.note(f"truncate {name} ({self.inode_label(inode)}) to {size}")
            self.check_range(inode, size, len(inode.data), f"truncate to {size}")
            os.truncate(self.path(name), size)
        else:
            handle = self.some_handle()
            inode = handle.inode
            size = self.truncate_size(len(inode.data))
            self.note(f"ftruncate fd {handle.fd} {self.inode_label(inode)} to {size}")
            self.check_range(inode, size, len(inode.data), f"ftruncate to {size}")
            os.ftruncate(handle.fd, size)
        if size < len(inode.data):
            del inode.data[size:]
        else:
            inode.data.extend(bytes(size - len(inode.data)))

    def truncate_size(self, current):
        rng = self.rng
        choice = rng.random()
        if choice < 0.05:
            return 0
        if choice < 0.3:
            return rng.randrange(0, self.args.max_size)
        if choice < 0.45:
            return rng.randrange(0, 70_000)
        return max(0, min(self.args.max_size, current + rng.randrange(-70_000, 70_000)))  # near the end

    def op_punch(self):
        if not self.can["punch"]:
            return
        handle = self.some_handle()
        inode = handle.inode
        offset, length = self.random_range(len(inode.data))
        self.note(f"punch fd {handle.fd} {self.inode_label(inode)} {offset}+{length}")
        self.check_range(inode, offset, offset + length, f"punching {offset}+{length}")
        try:
            fallocate(handle.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as error:
            if error.errno in UNSUPPORTED:
                self.can["punch"] = False
                print("exerciser-extra: punching holes not supported; disabled", file=sys.stderr)
                return
            raise
        end = min(len(inode.data), offset + length)
        if end > offset:
            inode.data[offset:end] = bytes(end - offset)

    def op_fallocate(self):
        if not self.can["fallocate"]:
            return
        handle = self.some_handle()
        inode = handle.inode
        offset, length = self.random_range(len(inode.data))
        keep = self.rng.random() < 0.5
        self.note(f"fallocate fd {handle.fd} {self.inode_label(inode)} {offset}+{length}{' KEEP_SIZE' if keep else ''}")
        try:
            fallocate(handle.fd, FALLOC_FL_KEEP_SIZE if keep else 0, offset, length)
        except OSError as error:
            if error.errno in UNSUPPORTED:
                self.can["fallocate"] = False
                print("exerciser-extra: fallocate not supported; disabled", file=sys.stderr)
                return
            raise
        if not keep and offset + length > len(inode.data):
            inode.data.extend(bytes(offset + length - len(inode.data)))

    def op_copy(self):
        if not self.can["copy"]:
            return
        source = self.some_handle()
        target = self.some_handle(writable_at_offset=True)
        if source.inode is target.inode:
            return
        size = len(source.inode.data)
        source_offset = self.rng.randrange(0, size + 10)
        length = self.rng.randrange(1, 400_000)
        target_offset = self.rng.randrange(0, min(self.args.max_size, len(target.inode.data) + 65536))
        length = max(0, min(length, self.args.max_size - target_offset))
        self.note(f"copy_file_range fd {source.fd} {self.inode_label(source.inode)} {source_offset}+{length} -> "
                  f"fd {target.fd} {self.inode_label(target.inode)} at {target_offset}")
        expected = bytes(source.inode.data[source_offset:source_offset + length])
        self.check_range(target.inode, target_offset, target_offset + len(expected), "copy_file_range over it")
        done = 0
        while done < len(expected):
            try:
                count = os.copy_file_range(source.fd, target.fd, length - done, source_offset + done,
                                           target_offset + done)
            except OSError as error:
                if error.errno in UNSUPPORTED + (errno.EXDEV,):
                    self.can["copy"] = False
                    return
                raise
            if count == 0:
                self.fail(f"copy_file_range returned 0 with {len(expected) - done} bytes left of "
                          f"{self.inode_label(source.inode)}")
            done += count
        if done:
            data = target.inode.data
            if target_offset > len(data):
                data.extend(bytes(target_offset - len(data)))
            data[target_offset:target_offset + done] = expected

    def op_sync(self):
        handle = self.some_handle()
        which = self.rng.random()
        self.note(f"{'fsync' if which < 0.5 else 'fdatasync'} fd {handle.fd}")
        (os.fsync if which < 0.5 else os.fdatasync)(handle.fd)

    def op_drop_cache(self):
        handle = self.some_handle()
        self.note(f"fadvise DONTNEED fd {handle.fd}")
        if self.rng.random() < 0.5:
            os.fdatasync(handle.fd)
        os.posix_fadvise(handle.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def op_close(self):
        if self.handles:
            self.close_handle(self.rng.choice(self.handles))

    def op_reopen(self):
        if not self.names:
            return
        name = self.rng.choice(sorted(self.names))
        self.open_handle(name, truncate=self.rng.random() < 0.05)

    def op_create(self):
        free = [name for name in self.pool if name not in self.names]
        if free:
            self.create(self.rng.choice(free))

    def op_link(self):
        free = [name for name in self.pool if name not in self.names]
        if not free or not self.names:
            return
        source = self.rng.choice(sorted(self.names))
        target = self.rng.choice(free)
        self.note(f"link {source} -> {target}")
        os.link(self.path(source), self.path(target))
        inode = self.names[source]
        inode.names.add(target)
        self.names[target] = inode

    def op_unlink(self):
        if not self.names:
            return
        name = self.rng.choice(sorted(self.names))
        inode = self.names[name]
        if len(inode.names) == 1 and not self.handles_of(inode):
            self.check_range(inode, 0, len(inode.data), f"unlinking {name}")
        self.note(f"unlink {name} ({self.inode_label(inode)})")
        os.unlink(self.path(name))
        self.drop_name(name)

    def op_rename(self):
        if not self.names:
            return
        source = self.rng.choice(sorted(self.names))
        target = self.rng.choice(self.pool)
        inode = self.names[source]
        victim = self.names.get(target)
        if victim is not None and victim is not inode and len(victim.names) == 1 and not self.handles_of(victim):
            self.check_range(victim, 0, len(victim.data), f"renaming over {target}")
        self.note(f"rename {source} -> {target}")
        os.rename(self.path(source), self.path(target))
        if target == source or self.names.get(target) is inode:
            return  # the same inode: POSIX says nothing happens
        if target in self.names:
            self.drop_name(target)
        self.drop_name(source)
        inode.names.add(target)
        self.names[target] = inode

    def op_exchange(self):
        if not self.can["exchange"] or len(self.names) < 2:
            return
        first, second = self.rng.sample(sorted(self.names), 2)
        self.note(f"exchange {first} <-> {second}")
        try:
            renameat2(self.path(first), self.path(second), RENAME_EXCHANGE)
        except OSError as error:
            if error.errno in UNSUPPORTED + (errno.EINVAL,):
                self.can["exchange"] = False
                print(f"exerciser-extra: RENAME_EXCHANGE disabled ({error})", file=sys.stderr)
                return
            raise
        a, b = self.names[first], self.names[second]
        if a is b:
            return
        a.names.discard(first)
        b.names.discard(second)
        a.names.add(second)
        b.names.add(first)
        self.names[first], self.names[second] = b, a

    def op_stat(self):
        if not self.names:
            return
        name = self.rng.choice(sorted(self.names))
        inode = self.names[name]
        self.note(f"stat {name}")
        self.check_stat(name, inode, os.stat(self.path(name)))

    def check_stat(self, name, inode, info):
        if info.st_size != len(inode.data):
            self.fail(f"stat {name}: size {info.st_size}, model {len(inode.data)} ({self.inode_label(inode)})")
        if info.st_nlink != len(inode.names):
            self.fail(f"stat {name}: st_nlink {info.st_nlink}, model {len(inode.names)} ({self.inode_label(inode)})")
        if info.st_ino != inode.ino:
            self.fail(f"stat {name}: st_ino {info.st_ino}, model {inode.ino} ({self.inode_label(inode)})")

    def verify_all(self, why):
        self.note(f"verify all ({why})")
        on_disk = set()
        for directory in self.dirs:
            on_disk.update(f"{directory}/{name}" for name in os.listdir(self.path(directory)))
        if on_disk != set(self.names):
            self.fail(f"directory listing {sorted(on_disk ^ set(self.names))} differs from the model "
                      f"(listed {len(on_disk)}, model {len(self.names)})")
        for name, inode in sorted(self.names.items()):
            with open(self.path(name), "rb", buffering=0) as f:
                self.check_stat(name, inode, os.fstat(f.fileno()))
                actual = f.read(len(inode.data) + 1)
            self.compare(actual, bytes(inode.data), inode, 0, f"whole-file read of {name}")
            self.counts["bytes verified"] += len(actual)
        for handle in self.handles:  # orphans and every other open handle
            info = os.fstat(handle.fd)
            if info.st_size != len(handle.inode.data) or info.st_nlink != len(handle.inode.names):
                self.fail(f"fstat fd {handle.fd}: size {info.st_size} nlink {info.st_nlink}, model "
                          f"{len(handle.inode.data)} {len(handle.inode.names)} ({self.inode_label(handle.inode)})")
            if not handle.inode.names:
                actual = os.pread(handle.fd, len(handle.inode.data) + 1, 0)
                self.compare(actual, bytes(handle.inode.data), handle.inode, 0, f"read of unlinked fd {handle.fd}")

    OPS = [("write", 30), ("read", 16), ("mmap", 3), ("truncate", 4), ("punch", 3), ("fallocate", 2),
           ("copy", 3), ("sync", 3), ("drop_cache", 3), ("close", 5), ("reopen", 5), ("create", 3),
           ("link", 2), ("unlink", 2), ("rename", 4), ("exchange", 2), ("stat", 4)]

    def run(self):
        skipped = set(filter(None, self.args.skip_ops.split(",")))
        unknown = skipped - {name for name, _ in self.OPS}
        if unknown:
            raise SystemExit(f"exerciser-extra: unknown --skip-ops {','.join(sorted(unknown))}; "
                             f"known: {','.join(name for name, _ in self.OPS)}")
        names = [name for name, _ in self.OPS if name not in skipped]
        weights = [weight for name, weight in self.OPS if name not in skipped]
        functions = {name: getattr(self, "op_" + name) for name in names}
        for name in self.pool[: max(1, len(self.pool) // 2)]:
            self.create(name)
        start = time.monotonic()
        for self.index in range(self.args.ops):
            op = self.rng.choices(names, weights)[0]
            self.counts[op] += 1
            functions[op]()
            while len(self.handles) > 16:
                self.close_handle(self.handles[0])
            if self.args.fsync_every and (self.index + 1) % self.args.fsync_every == 0:
                self.note("fsync every open handle")
                for handle in self.handles:
                    os.fsync(handle.fd)
            if self.args.verify_every and (self.index + 1) % self.args.verify_every == 0:
                self.verify_all("periodic")
        self.index = self.args.ops
        self.verify_all("final")
        for handle in list(self.handles):
            self.close_handle(handle)
        self.verify_all("after closing everything")
        elapsed = time.monotonic() - start
        for name in list(self.names):
            os.unlink(self.path(name))
        for directory in self.dirs:
            os.rmdir(self.path(directory))
        os.rmdir(self.work)
        disabled = [name for name, enabled in self.can.items() if not enabled]
        print(f"exerciser-extra: seed {self.seed}: {self.args.ops} operations on {self.args.files} names in "
              f"{self.args.dirs} directories, no difference ({elapsed:.1f} s)"
              + (f"; not supported here: {', '.join(disabled)}" if disabled else ""), flush=True)
        if self.args.stats:
            print("  " + ", ".join(f"{name} {count}" for name, count in sorted(self.counts.items())), flush=True)


# Crash mode ---------------------------------------------------------------------------
class Manifest:
    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.count = 0

    def record(self, *fields):
        body = " ".join(str(field) for field in fields)
        line = f"{zlib.crc32(body.encode()):08x} {body}\n".encode()
        if os.write(self.fd, line) != len(line):
            raise OSError(errno.EIO, "short write to the manifest")
        os.fsync(self.fd)
        self.count += 1


def fsync_path(path, directory=False):
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITTEN = [0]


def write_file(path, rng, flags=os.O_CREAT | os.O_EXCL | os.O_WRONLY):
    """Writes random content with holes; returns (size, sha256). Does not fsync."""
    size = rng.choice([0, 1, 100, 4095, 4096, 65537, 300_000, 1 << 20, rng.randrange(1, 2 << 20)])
    content = bytearray(size)
    fd = os.open(path, flags, 0o644)
    try:
        position = 0
        while position < size:
            length = min(size - position, rng.randrange(1, 200_000))
            if rng.random() < 0.25:  # leave a hole
                position += length
                continue
            chunk = rng.randbytes(length)
            os.pwrite(fd, chunk, position)
            WRITTEN[0] += length
            content[position:position + length] = chunk
            position += length
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return size, hashlib.sha256(content).hexdigest()


def crash_workload(directory, args):
    rng = random.Random(args.seed)
    top = f"crash.{args.seed}.{os.getpid()}"
    work = os.path.join(directory, top)
    manifest_dir = os.path.dirname(os.path.abspath(args.write_manifest))
    if os.stat(manifest_dir).st_dev == os.stat(directory).st_dev:
        sys.exit(f"exerciser-extra: the manifest {args.write_manifest} must be outside the file system under test")
    os.makedirs(work, exist_ok=True)
    dirs = [f"{top}/k{index}" for index in range(4)]
    for each in dirs:
        os.makedirs(os.path.join(directory, each), exist_ok=True)
        fsync_path(os.path.join(directory, each), directory=True)
    fsync_path(work, directory=True)
    fsync_path(directory, directory=True)
    manifest = Manifest(args.write_manifest)
    scratch = set()  # relative paths of unchecked files
    scratch_dirs = []
    pending = []  # records made durable by the next syncfs
    deadline = time.monotonic() + args.duration if args.duration else None
    budget = args.max_bytes
    written = 0
    full = lambda relative: os.path.join(directory, relative)  # noqa: E731
    index = 0
    try:
        while (args.ops == 0 or index < args.ops) and (deadline is None or time.monotonic() < deadline):
            written = WRITTEN[0]
            if written > budget:
                print(f"exerciser-extra: crash mode: --max-bytes {budget} written, stopping", flush=True)
                break
            index += 1
            here = rng.choice(dirs)
            there = rng.choice(dirs)
            unique = f"{args.seed}-{index}"
            choice = rng.random()
            via_syncfs = rng.random() < 0.2  # made durable by syncfs instead of fsyncs
            if choice < 0.22:  # F: write, fsync file and directory
                path = f"{here}/f{unique}"
                size, digest = write_file(full(path), rng)
                record = ("F", path, size, digest)
                if not via_syncfs:
                    fsync_path(full(path))
                    fsync_path(full(here), directory=True)
            elif choice < 0.34:  # R: durable file renamed across directories
                old = f"{here}/r{unique}"
                new = f"{there}/R{unique}"
                size, digest = write_file(full(old), rng)
                fsync_path(full(old))
                fsync_path(full(here), directory=True)
                os.rename(full(old), full(new))
                record = ("R", old, new, size, digest)
                if not via_syncfs:
                    fsync_path(full(here), directory=True)
                    fsync_path(full(there), directory=True)
            elif choice < 0.46:  # P: atomic replace of an existing (scratch) file
                victims = sorted(path for path in scratch if path.startswith(here + "/"))
                if not victims:
                    continue
                target = rng.choice(victims)
                scratch.discard(target)
                temporary = f"{here}/t{unique}"
                size, digest = write_file(full(temporary), rng)
                fsync_path(full(temporary))
                os.rename(full(temporary), full(target))
                record = ("P", target, size, digest)
                if not via_syncfs:
                    fsync_path(full(here), directory=True)
            elif choice < 0.52:  # L: hard link
                first = f"{here}/l{unique}"
                second = f"{there}/L{unique}"
                size, digest = write_file(full(first), rng)
                os.link(full(first), full(second))
                record = ("L", first, second, size, digest)
                if not via_syncfs:
                    fsync_path(full(first))
                    fsync_path(full(here), directory=True)
                    fsync_path(full(there), directory=True)
            elif choice < 0.58:  # D: mkdir
                path = f"{here}/D{unique}"
                os.mkdir(full(path))
                record = ("D", path)
                if not via_syncfs:
                    fsync_path(full(here), directory=True)
            elif choice < 0.64:  # X: durable file, then unlinked durably
                path = f"{here}/x{unique}"
                write_file(full(path), rng)
                fsync_path(full(path))
                fsync_path(full(here), directory=True)
                os.unlink(full(path))
                record = ("X", path)
                if not via_syncfs:
                    fsync_path(full(here), directory=True)
            else:  # unchecked churn on scratch names, never fsync'd
                record = None
                churn = rng.random()
                if churn < 0.35 or not scratch:
                    path = f"{here}/s{unique}"
                    write_file(full(path), rng)
                    scratch.add(path)
                elif churn < 0.55:
                    path = rng.choice(sorted(scratch))
                    fd = os.open(full(path), os.O_WRONLY)
                    os.pwrite(fd, rng.randbytes(rng.randrange(1, 100_000)), rng.randrange(0, 1 << 20))
                    if rng.random() < 0.3:
                        os.ftruncate(fd, rng.randrange(0, 1 << 20))
                    os.close(fd)
                elif churn < 0.7:
                    path = rng.choice(sorted(scratch))
                    new = f"{there}/s{unique}"
                    os.rename(full(path), full(new))
                    scratch.discard(path)
                    scratch.add(new)
                elif churn < 0.85:
                    path = rng.choice(sorted(scratch))
                    os.unlink(full(path))
                    scratch.discard(path)
                elif churn < 0.93 or not scratch_dirs:
                    path = f"{here}/sd{unique}"
                    os.mkdir(full(path))
                    os.mkdir(full(path + "/inner"))
                    scratch_dirs.append(path)
                else:
                    path = scratch_dirs.pop(rng.randrange(len(scratch_dirs)))
                    os.rmdir(full(path + "/inner"))
                    os.rmdir(full(path))
            if record is not None:
                if via_syncfs:
                    pending.append(record)
                else:
                    manifest.record(*record)
            if pending and (rng.random() < 0.15 or len(pending) > 8):
                fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    syncfs(fd)
                    os.fsync(fd)  # the durability point the daemon sees (see S above)
                finally:
                    os.close(fd)
                for each in pending:
                    manifest.record("S", *each)
                pending.clear()
    except OSError as error:
        # ECANCELED: requests on a FUSE io_uring queue when the daemon died.
        gone = error.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENODEV, errno.ESHUTDOWN, errno.ECANCELED)
        print(f"exerciser-extra: crash mode stopped at step {index} ({manifest.count} records): "
              f"{'the file system went away' if gone else 'UNEXPECTED ERROR'}: {error}", flush=True)
        return 3 if gone else 4
    print(f"exerciser-extra: crash mode: {index} steps, {manifest.count} records", flush=True)
    return 0


def verify_manifest(directory, manifest_path):
    with open(manifest_path, "rb") as f:
        lines = f.read().split(b"\n")
    torn = lines.pop()  # after the last newline: empty unless torn
    checked = collections.Counter()
    problems = []

    def content(path):
        with open(os.path.join(directory, path), "rb") as f:
            data = f.read()
        return len(data), hashlib.sha256(data).hexdigest()

    for number, raw in enumerate(lines, 1):
        try:
            crc, body = raw.decode().split(" ", 1)
        except ValueError:
            problems.append(f"line {number}: unreadable manifest line {raw[:80]!r}")
            continue
        if int(crc, 16) != zlib.crc32(body.encode()):
            problems.append(f"line {number}: manifest CRC mismatch (the manifest itself is damaged)")
            continue
        fields = body.split()
        if fields[0] == "S":
            fields = fields[1:]
        kind = fields[0]
        try:
            if kind in ("F", "P"):
                path, size, digest = fields[1], int(fields[2]), fields[3]
                if content(path) != (size, digest):
                    problems.append(f"line {number}: {kind} {path}: {content(path)[0]} bytes, expected {size}; "
                                    f"content differs from the fsync'd state")
            elif kind == "R":
                old, new, size, digest = fields[1], fields[2], int(fields[3]), fields[4]
                if os.path.lexists(os.path.join(directory, old)):
                    problems.append(f"line {number}: R {old} still exists after a durable rename to {new}")
                if content(new) != (size, digest):
                    problems.append(f"line {number}: R {new}: content differs from the fsync'd state")
            elif kind == "L":
                first, second, size, digest = fields[1], fields[2], int(fields[3]), fields[4]
                one, two = os.stat(os.path.join(directory, first)), os.stat(os.path.join(directory, second))
                if one.st_ino != two.st_ino or one.st_nlink != 2:
                    problems.append(f"line {number}: L {first} {second}: inodes {one.st_ino}/{two.st_ino}, "
                                    f"nlink {one.st_nlink} (expected one inode, nlink 2)")
                if content(first) != (size, digest):
                    problems.append(f"line {number}: L {first}: content differs from the fsync'd state")
            elif kind == "D":
                if not os.path.isdir(os.path.join(directory, fields[1])):
                    problems.append(f"line {number}: D {fields[1]} is not a directory after the crash")
            elif kind == "X":
                if os.path.lexists(os.path.join(directory, fields[1])):
                    problems.append(f"line {number}: X {fields[1]} exists after a durable unlink")
            else:
                problems.append(f"line {number}: unknown record kind {kind}")
                continue
        except OSError as error:
            problems.append(f"line {number}: {' '.join(fields[:3])}: {error}")
            continue
        checked[kind] += 1
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(checked.items()))
    for problem in problems[:30]:
        print(f"exerciser-extra: MISMATCH {problem}", flush=True)
    if problems:
        print(f"exerciser-extra: {len(problems)} of {len(lines)} records wrong after the crash", flush=True)
        return 1
    print(f"exerciser-extra: {len(lines)} durable records intact after the crash ({summary})"
          + (" (torn last line ignored)" if torn else ""), flush=True)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ops", type=int, default=None, help="operations (model mode, default 100000; "
                        "crash mode, default unlimited)")
    parser.add_argument("--files", type=int, default=10, help="names in the pool")
    parser.add_argument("--dirs", type=int, default=2, help="directories the names are spread over")
    parser.add_argument("--max-size", type=int, default=4 << 20)
    parser.add_argument("--fsync-every", type=int, default=0, metavar="K", help="fsync every open handle every K ops")
    parser.add_argument("--verify-every", type=int, default=1000, metavar="V")
    parser.add_argument("--no-mmap", action="store_true")
    parser.add_argument("--skip-ops", default="", metavar="OP,OP", help="leave these operations out (triage: "
                        "does the difference go away without them?); names as in Model.OPS")
    parser.add_argument("--stats", action="store_true", help="print operation counts at the end")
    parser.add_argument("--write-manifest", metavar="FILE", help="crash mode: record durable states in FILE")
    parser.add_argument("--verify-manifest", metavar="FILE", help="check every record of FILE")
    parser.add_argument("--duration", type=float, default=0, help="crash mode: stop after this many seconds")
    parser.add_argument("--max-bytes", type=int, default=1 << 30, help="crash mode: stop after writing this much "
                        "(recorded files are never deleted; default 1 GiB)")
    args = parser.parse_args()
    directory = os.path.abspath(args.dir)
    if args.verify_manifest:
        return verify_manifest(directory, args.verify_manifest)
    if args.write_manifest:
        if not args.duration and not args.ops:
            parser.error("crash mode needs --duration or --ops")
        args.ops = args.ops or 0
        return crash_workload(directory, args)
    args.ops = 100_000 if args.ops is None else args.ops
    if args.files < 2 or args.dirs < 1 or args.max_size < 4096:
        parser.error("--files >= 2, --dirs >= 1, --max-size >= 4096")
    model = Model(directory, args)
    try:
        model.run()
    except (Mismatch, OSError) as error:
        kind = "MISMATCH" if isinstance(error, Mismatch) else "UNEXPECTED ERROR"
        print(f"exerciser-extra: {kind} seed {args.seed} op {model.index}: {error}", flush=True)
        print("  last operations:\n    " + "\n    ".join(model.history), flush=True)
        print(f"  reproduce: {sys.argv[0]} DIR --seed {args.seed} --ops {args.ops} --files {args.files} "
              f"--dirs {args.dirs} --max-size {args.max_size} --fsync-every {args.fsync_every}"
              f" --verify-every {args.verify_every}{' --no-mmap' if args.no_mmap else ''}"
              f"{' --skip-ops ' + args.skip_ops if args.skip_ops else ''}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
