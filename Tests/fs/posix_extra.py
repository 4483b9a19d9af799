#!/usr/bin/env python3
"""POSIX behaviour suite, part two: the cases posix_suite.py does not cover.

    posix_extra.py DIR [--nonroot-user NAME] [--no-nonroot] [--fill [--fill-limit BYTES]] [-k PATTERN]

Runs inside DIR (each test in its own fresh subdirectory, removed afterwards); passes on
tmpfs and ext4, then runs unchanged on a blobfs mount. Covers: O_CREAT|O_DIRECTORY, the
EBADF/EINVAL family on descriptors, O_NOFOLLOW, O_CREAT through a dangling symlink,
O_APPEND from two descriptors, O_DIRECT coherence, mmap, copy_file_range, 64-bit
offsets, sparse st_blocks; UTIME_OMIT/UTIME_NOW through utimensat, pre-1970 and
post-2038 ns timestamps, which operations update mtime/ctime (file and directory);
chown clearing setuid/setgid; renameat2 details (exchange across directories fixes
link counts, replaced hard links, EINVAL for both flags), ENAMETOOLONG for every
namespace call, 4095-byte symlink targets, lchown, d_type and d_ino from readdir,
umask; xattr edge cases (empty and large values, ERANGE, trusted.*, shared by hard
links, symlinks refuse user.*); fallocate modes; syncfs; concurrent namespace changes;
and non-root rules beyond the basics (group class precedence, a write by a non-owner
clears setuid, O_TRUNC without write permission, utime NOW vs explicit times,
sticky rename, trusted.* invisible to others, chmod g+s by a non-member).
--fill adds an ENOSPC test that fills the file system (skipped when more than
--fill-limit bytes are free; default 1 GiB).

The non-root tests fork a child that does setgroups([]), setgid, setuid to NAME
(default nobody); a FUSE mount needs -o allow_other,default_permissions for them.
Prints "posix extra: N passed, M failed, K skipped"; exit status 0 when nothing failed.
"""
import argparse
import ctypes
import errno
import mmap
import os
import pickle
import pwd
import random
import stat
import sys
import threading
import time
import traceback
import unittest

ROOT = None
NONROOT = True
USER_UID = 65534
USER_GID = 65534
USER_NAME = "nobody"
FILL = False
FILL_LIMIT = 1 << 30

from fscalls import (AT_FDCWD, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, RENAME_EXCHANGE,  # noqa: E402
                     RENAME_NOREPLACE, DirTestCase, fallocate, libc, renameat2, syncfs)
from fscalls import raise_errno as _raise  # noqa: E402

AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTSUP)


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path, atime, mtime, flags=0):
    """atime/mtime: (sec, nsec) or UTIME_NOW / UTIME_OMIT."""
    def spec(value):
        return Timespec(0, value) if isinstance(value, int) else Timespec(*value)
    times = (Timespec * 2)(spec(atime), spec(mtime))
    libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(Timespec), ctypes.c_int]
    if libc.utimensat(AT_FDCWD, os.fsencode(path), times, flags) != 0:
        _raise()


def raw_getxattr(path, name, size):
    libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    libc.getxattr.restype = ctypes.c_ssize_t
    buffer = ctypes.create_string_buffer(max(size, 1))
    result = libc.getxattr(os.fsencode(path), name.encode(), buffer, size)
    if result < 0:
        _raise()
    return result


def raw_listxattr(path, size):
    libc.listxattr.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    libc.listxattr.restype = ctypes.c_ssize_t
    buffer = ctypes.create_string_buffer(max(size, 1))
    result = libc.listxattr(os.fsencode(path), buffer, size)
    if result < 0:
        _raise()
    return result


def symlink_target(length):
    """A relative path of exactly length bytes, in components of 254 bytes."""
    target = (("t" * 254 + "/") * (length // 255 + 1))[:length]
    return target[:-1] + "t" if target.endswith("/") else target


def as_user(function):
    """Runs function() in a forked child as the non-root user (no supplementary groups).

    Returns ("ok", value) or ("errno", code); any other exception fails the test."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            try:
                os.setgroups([])
                os.setgid(USER_GID)
                os.setuid(USER_UID)
                outcome = ("ok", function())
            except OSError as error:
                outcome = ("errno", error.errno)
            except BaseException:
                outcome = ("exception", traceback.format_exc())
            try:
                payload = pickle.dumps(outcome)
            except Exception:
                payload = pickle.dumps(("ok", repr(outcome[1])))
            os.write(write_end, payload)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    if not chunks:
        raise AssertionError("the non-root child died without an answer")
    outcome = pickle.loads(b"".join(chunks))
    if outcome[0] == "exception":
        raise AssertionError("the non-root child raised:\n" + outcome[1])
    return outcome


class Base(DirTestCase):
    def assertErrno(self, codes, function, *args, **kwargs):
        codes = codes if isinstance(codes, tuple) else (codes,)
        names = "/".join(errno.errorcode[code] for code in codes)
        try:
            function(*args, **kwargs)
        except OSError as error:
            self.assertIn(error.errno, codes, f"expected {names}, got {error!r}")
            return error.errno
        self.fail(f"expected {names}, the call succeeded")

    def assertUserOk(self, function, message=""):
        outcome = as_user(function)
        if outcome[0] != "ok":
            self.fail(f"{message}: as {USER_NAME} failed with {errno.errorcode.get(outcome[1], outcome[1])}")
        return outcome[1]

    def assertUserErrno(self, code, function, message=""):
        outcome = as_user(function)
        got = "success" if outcome[0] == "ok" else errno.errorcode.get(outcome[1], outcome[1])
        self.assertEqual(outcome, ("errno", code), f"{message}: as {USER_NAME} expected "
                         f"{errno.errorcode[code]}, got {got}")

    def age(self, path, follow=True):
        """Sets atime/mtime to 1 s after the epoch, so any later update is visible
        whatever the timestamp granularity; returns the ctime afterwards."""
        os.utime(path, ns=(1_000_000_000, 1_000_000_000), follow_symlinks=follow)
        return os.stat(path, follow_symlinks=follow).st_ctime_ns


class OpenFlags(Base):
    def test_o_creat_o_directory(self):
        target = self.path("new")
        code = self.assertErrno((errno.EINVAL, errno.ENOTDIR, errno.EISDIR), os.open, target,
                                os.O_CREAT | os.O_DIRECTORY | os.O_RDWR, 0o644)
        kernel = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
        if kernel >= (6, 4):  # since 6.4 the VFS refuses the combination outright
            self.assertEqual(code, errno.EINVAL)
            self.assertFalse(os.path.lexists(target), "O_CREAT|O_DIRECTORY created something")
        os.mkdir(self.path("d"))
        self.assertErrno((errno.EINVAL, errno.EISDIR), os.open, self.path("d"), os.O_CREAT | os.O_DIRECTORY)
        self.write("f", b"")
        self.assertErrno((errno.EINVAL, errno.ENOTDIR), os.open, self.path("f"), os.O_CREAT | os.O_DIRECTORY)
        self.assertErrno(errno.EISDIR, os.open, self.path("d"), os.O_RDWR)
        self.assertErrno(errno.EISDIR, os.open, self.path("d"), os.O_CREAT | os.O_WRONLY, 0o644)

    def test_descriptor_errnos(self):
        self.write("f", b"0123456789")
        fd = os.open(self.path("f"), os.O_RDONLY)
        self.assertErrno(errno.EBADF, os.write, fd, b"x")
        self.assertErrno(errno.EBADF, os.pwrite, fd, b"x", 0)
        self.assertErrno((errno.EINVAL, errno.EBADF), os.ftruncate, fd, 0)
        self.assertErrno((errno.EBADF, errno.EINVAL), os.posix_fallocate, fd, 0, 100)
        os.close(fd)
        for function, args in ((os.read, (fd, 1)), (os.fstat, (fd,)), (os.fsync, (fd,)), (os.close, (fd,)),
                               (os.lseek, (fd, 0, 0)), (os.fdatasync, (fd,))):
            self.assertErrno(errno.EBADF, function, *args)
        fd = os.open(self.path("f"), os.O_WRONLY)
        self.assertErrno(errno.EBADF, os.read, fd, 1)
        self.assertErrno(errno.EBADF, os.pread, fd, 1, 0)
        self.assertErrno(errno.EINVAL, os.lseek, fd, -1, os.SEEK_SET)
        os.close(fd)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        self.assertErrno(errno.EISDIR, os.read, dfd, 10)
        self.assertErrno(errno.EBADF, os.write, dfd, b"x")
        os.close(dfd)
        fd = os.open(self.path("f"), os.O_RDONLY)
        self.assertErrno(errno.ENOTDIR, os.listdir, fd)
        os.close(fd)

    def test_symlink_open_rules(self):
        os.symlink("target", self.path("dangling"))
        self.assertErrno(errno.EEXIST, os.open, self.path("dangling"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        self.assertFalse(os.path.lexists(self.path("target")))
        fd = os.open(self.path("dangling"), os.O_CREAT | os.O_WRONLY, 0o640)  # creates the target
        os.write(fd, b"through")
        os.close(fd)
        self.assertEqual(self.read("target"), b"through")
        self.assertEqual(stat.S_IMODE(os.stat(self.path("target")).st_mode), 0o640 & ~CURRENT_UMASK)
        self.assertErrno(errno.ELOOP, os.open, self.path("dangling"), os.O_RDONLY | os.O_NOFOLLOW)
        fd = os.open(self.path("dangling"), os.O_PATH | os.O_NOFOLLOW)
        self.assertTrue(stat.S_ISLNK(os.fstat(fd).st_mode))
        os.close(fd)

    def test_append_from_two_descriptors(self):
        self.write("log", b"")
        first = os.open(self.path("log"), os.O_WRONLY | os.O_APPEND)
        second = os.open(self.path("log"), os.O_WRONLY | os.O_APPEND)
        plain = os.open(self.path("log"), os.O_RDWR)
        expected = b""
        for index in range(50):
            chunk = f"[{index}:{'x' * (index * 37 % 300)}]".encode()
            os.write(first if index % 2 else second, chunk)
            expected += chunk
            if index % 10 == 9:  # a plain descriptor extends the file behind their backs
                filler = b"P" * 4097
                os.pwrite(plain, filler, len(expected))
                expected += filler
        self.assertEqual(os.fstat(plain).st_size, len(expected))
        self.assertEqual(os.pread(plain, len(expected) + 1, 0), expected)
        for fd in (first, second, plain):
            os.close(fd)
        self.assertEqual(self.read("log"), expected)

    def test_o_trunc_existing_with_data_and_mtime(self):
        self.write("t", os.urandom(100_000))
        self.age(self.path("t"))
        fd = os.open(self.path("t"), os.O_RDWR | os.O_TRUNC)
        self.assertEqual(os.fstat(fd).st_size, 0)
        self.assertEqual(os.pread(fd, 10, 0), b"")
        os.pwrite(fd, b"z", 50_000)
        self.assertEqual(os.pread(fd, 50_001, 0), b"\0" * 50_000 + b"z")  # no stale data in the hole
        os.close(fd)
        self.assertGreater(os.stat(self.path("t")).st_mtime_ns, 1_000_000_000)


class Data(Base):
    def test_sixty_four_bit_offsets(self):
        fd = os.open(self.path("far"), os.O_CREAT | os.O_RDWR, 0o644)
        offset = 5 * (1 << 30) + 12345  # past 4 GiB: 64-bit offsets through every layer
        os.pwrite(fd, b"far away", offset)
        self.assertEqual(os.fstat(fd).st_size, offset + 8)
        self.assertEqual(os.pread(fd, 8, offset), b"far away")
        self.assertEqual(os.pread(fd, 16, (1 << 32) - 8), b"\0" * 16)
        os.pwrite(fd, b"low", 10)
        self.assertEqual(os.pread(fd, 3, 10), b"low")
        self.assertEqual(os.pread(fd, 8, offset), b"far away")
        self.assertLess(os.fstat(fd).st_blocks * 512, 64 << 20, "a 5 GiB hole is not allocated")
        os.ftruncate(fd, 1 << 32)
        self.assertEqual(os.fstat(fd).st_size, 1 << 32)
        self.assertEqual(os.pread(fd, 10, (1 << 32) - 5), b"\0" * 5)
        os.close(fd)

    def test_sparse_file_blocks(self):
        fd = os.open(self.path("sparse"), os.O_CREAT | os.O_RDWR, 0o644)
        os.pwrite(fd, b"x", 100 << 20)
        os.fsync(fd)
        info = os.fstat(fd)
        self.assertEqual(info.st_size, (100 << 20) + 1)
        self.assertLess(info.st_blocks * 512, 16 << 20, "a 100 MiB hole is not allocated")
        os.pwrite(fd, os.urandom(1 << 20), 0)
        os.fsync(fd)
        deadline = time.monotonic() + 3  # FUSE caches attributes (attr_timeout) under writeback_cache
        while os.stat(self.path("sparse")).st_blocks * 512 < 1 << 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertGreaterEqual(os.stat(self.path("sparse")).st_blocks * 512, 1 << 20,
                                "written data is counted in st_blocks (within 3 s of fsync)")
        os.close(fd)

    def test_two_descriptors_see_each_others_writes(self):
        self.write("c", b"")
        one = os.open(self.path("c"), os.O_RDWR)
        two = os.open(self.path("c"), os.O_RDWR)
        rng = random.Random(5)
        model = bytearray()
        for _ in range(200):
            writer, reader = (one, two) if rng.random() < 0.5 else (two, one)
            offset = rng.randrange(0, len(model) + 10_000)
            data = rng.randbytes(rng.randrange(1, 20_000))
            os.pwrite(writer, data, offset)
            if offset > len(model):
                model.extend(b"\0" * (offset - len(model)))
            model[offset:offset + len(data)] = data
            self.assertEqual(os.pread(reader, len(data), offset), data)
            if rng.random() < 0.1:
                size = rng.randrange(0, len(model) + 1)
                os.ftruncate(reader, size)
                del model[size:]
                self.assertEqual(os.fstat(writer).st_size, size)
        self.assertEqual(os.pread(one, len(model) + 1, 0), bytes(model))
        os.close(one)
        os.close(two)
        self.assertEqual(self.read("c"), bytes(model))

    def test_o_direct(self):
        try:
            direct = os.open(self.path("d"), os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        except OSError as error:
            if error.errno == errno.EINVAL:
                self.skipTest("O_DIRECT refused by this file system (EINVAL at open)")
            raise
        buffered = os.open(self.path("d"), os.O_RDWR)
        size = 1 << 20
        block = mmap.mmap(-1, size)  # page-aligned
        block.write(os.urandom(size))
        self.assertEqual(os.pwrite(direct, block, 0), size)
        self.assertEqual(os.pread(buffered, size, 0), bytes(block))  # direct write, buffered read
        os.pwrite(buffered, b"B" * 8192, 4096)  # buffered write, direct read
        os.fsync(buffered)
        readback = mmap.mmap(-1, size)
        self.assertEqual(os.preadv(direct, [readback], 0), size)
        expected = bytearray(block)
        expected[4096:4096 + 8192] = b"B" * 8192
        self.assertEqual(bytes(readback), bytes(expected))
        os.close(direct)
        os.close(buffered)
        block.close()
        readback.close()

    def test_cached_pages_survive_close_and_stay_right(self):
        # The page cache outlives an open (FOPEN_KEEP_CACHE): a file read once is read from
        # memory by the next open, and every way its bytes change without that buffered
        # descriptor (a direct write, copy_file_range, a punched hole, truncation by path)
        # reaches a reader that opens it afterwards.
        size = 1 << 20
        data = bytearray(os.urandom(size))
        self.write("kc", bytes(data))
        self.assertEqual(self.read("kc"), bytes(data))  # cached now
        self.assertEqual(self.read("kc"), bytes(data))
        try:
            direct = os.open(self.path("kc"), os.O_RDWR | os.O_DIRECT)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            direct = None
        if direct is not None:
            block = mmap.mmap(-1, 8192)
            block.write(b"Q" * 8192)
            self.assertEqual(os.pwrite(direct, block, 65536), 8192)
            os.close(direct)
            block.close()
            data[65536:65536 + 8192] = b"Q" * 8192
            self.assertEqual(self.read("kc"), bytes(data), "a direct write reaches the next open")
        self.write("kc-src", b"S" * 20_000)
        source = os.open(self.path("kc-src"), os.O_RDONLY)
        target = os.open(self.path("kc"), os.O_WRONLY)
        copied = os.copy_file_range(source, target, 20_000, 0, 300_000)
        os.close(source)
        os.close(target)
        data[300_000:300_000 + copied] = b"S" * copied
        self.assertEqual(self.read("kc"), bytes(data), "copy_file_range reaches the next open")
        fd = os.open(self.path("kc"), os.O_RDWR)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 409_600, 40_960)
        os.close(fd)
        data[409_600:409_600 + 40_960] = bytes(40_960)
        self.assertEqual(self.read("kc"), bytes(data), "a punched hole reaches the next open")
        os.truncate(self.path("kc"), 100_000)
        os.truncate(self.path("kc"), 200_000)
        del data[100_000:]
        data.extend(bytes(100_000))
        self.assertEqual(self.read("kc"), bytes(data), "truncation by path reaches the next open")

    def test_mmap_of_a_file_opened_with_o_direct(self):
        # ext4, tmpfs and passthrough_ll allow it; a FUSE file opened for direct I/O needs
        # FUSE_DIRECT_IO_ALLOW_MMAP (protocol 7.39) or mmap fails with ENODEV.
        self.write("dm", os.urandom(2 * 4096))
        fd = os.open(self.path("dm"), os.O_RDWR | os.O_DIRECT)
        try:
            mapped = mmap.mmap(fd, 0)
            mapped[10:20] = b"0123456789"
            mapped.flush()
            mapped.close()
        finally:
            os.close(fd)
        self.assertEqual(self.read("dm")[10:20], b"0123456789")

    def test_mmap(self):
        self.write("m", os.urandom(3 * 4096 + 100))
        fd = os.open(self.path("m"), os.O_RDWR)
        try:
            mapped = mmap.mmap(fd, 0)  # MAP_SHARED, read/write
        except OSError as error:
            if error.errno == errno.ENODEV:
                self.skipTest("shared writable mmap refused (ENODEV: direct_io mount?)")
            raise
        self.assertEqual(mapped[:], os.pread(fd, 1 << 20, 0))
        mapped[5000:5010] = b"0123456789"
        mapped[-5:] = b"tail!"
        mapped.flush()
        self.assertEqual(os.pread(fd, 10, 5000), b"0123456789")
        os.pwrite(fd, b"via pwrite", 100)
        self.assertEqual(mapped[100:110], b"via pwrite")
        mapped.close()
        os.fsync(fd)
        os.close(fd)
        data = self.read("m")
        self.assertEqual(data[5000:5010], b"0123456789")
        self.assertEqual(data[-5:], b"tail!")
        self.assertEqual(len(data), 3 * 4096 + 100)

    def test_copy_file_range(self):
        source_data = os.urandom(3_000_000)
        self.write("src", source_data)
        self.write("dst", b"D" * 100)
        source = os.open(self.path("src"), os.O_RDONLY)
        target = os.open(self.path("dst"), os.O_RDWR)
        copied = 0
        while copied < 2_000_000:
            count = os.copy_file_range(source, target, 2_000_000 - copied, 123_457 + copied, 50 + copied)
            self.assertGreater(count, 0)
            copied += count
        expected = b"D" * 50 + source_data[123_457:123_457 + 2_000_000]
        self.assertEqual(os.fstat(target).st_size, len(expected))
        self.assertEqual(os.pread(target, len(expected) + 1, 0), expected)
        self.assertEqual(os.copy_file_range(source, target, 100, len(source_data), 0), 0)  # at EOF
        os.close(source)
        os.close(target)

    def test_fallocate_modes(self):
        fd = os.open(self.path("fa"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fallocate(fd, 0, 0, 100_000)
        except OSError as error:
            if error.errno in UNSUPPORTED:
                os.close(fd)
                self.skipTest("fallocate not supported (EOPNOTSUPP)")
            raise
        self.assertEqual(os.fstat(fd).st_size, 100_000)
        self.assertEqual(os.pread(fd, 100_000, 0), b"\0" * 100_000)
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 100_000, 1 << 20)  # beyond EOF, size kept
        self.assertEqual(os.fstat(fd).st_size, 100_000)
        self.assertEqual(os.pread(fd, 10, 100_000), b"")
        os.pwrite(fd, b"Q" * 300_000, 0)
        fallocate(fd, 0, 0, 1000)  # inside the file: nothing changes
        self.assertEqual(os.pread(fd, 300_000, 0), b"Q" * 300_000)
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4095, 8194)  # unaligned ends
        except OSError as error:
            if error.errno in UNSUPPORTED:
                os.close(fd)
                self.skipTest("punching holes not supported (EOPNOTSUPP)")
            raise
        self.assertEqual(os.pread(fd, 300_000, 0), b"Q" * 4095 + b"\0" * 8194 + b"Q" * (300_000 - 4095 - 8194))
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 250_000, 1 << 20)  # past EOF
        self.assertEqual(os.fstat(fd).st_size, 300_000)
        self.assertEqual(os.pread(fd, 50_001, 250_000), b"\0" * 50_000)
        self.assertErrno((errno.EOPNOTSUPP,), fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, 10)  # needs KEEP_SIZE
        self.assertErrno(errno.EINVAL, fallocate, fd, 0, 0, 0)
        os.close(fd)

    def test_growth_after_shrink_reads_zeros(self):
        """Shrinking to a size inside a block leaves old bytes in the rest of that block on
        disk; whatever grows the file again (write past EOF, ftruncate, fallocate) must
        show zeros there, never the old bytes."""
        cases = (("ftruncate up", lambda fd: os.ftruncate(fd, 149_113)),
                 ("pwrite past EOF", lambda fd: os.pwrite(fd, b"\0", 149_112)),
                 ("fallocate over the old EOF", lambda fd: fallocate(fd, 0, 18_024, 131_089)),
                 ("fallocate past the old EOF", lambda fd: fallocate(fd, 0, 120_000, 29_113)))
        problems = []
        for label, grow in cases:
            fd = os.open(self.path("g"), os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
            os.pwrite(fd, b"\xAB" * 300_000, 0)
            if label.startswith("fallocate"):
                os.fsync(fd)
            os.ftruncate(fd, 100_000)  # inside a 4 KiB block, and inside a cluster
            try:
                grow(fd)
            except OSError as error:
                os.close(fd)
                if error.errno in UNSUPPORTED:
                    continue
                raise
            self.assertEqual(os.fstat(fd).st_size, 149_113, label)
            tail = os.pread(fd, 49_113, 100_000)
            os.close(fd)
            stale = len(tail) - tail.count(0)
            if stale:
                problems.append(f"{label}: {stale} old bytes after the old EOF (first at {100_000 + next(index for index, byte in enumerate(tail) if byte)})")
        if problems:
            self.fail("a grown file must read zeros past the old EOF: " + "; ".join(problems))

    def test_syncfs_and_directory_fsync(self):
        fd = os.open(self.path("s"), os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"x" * 100_000)
        syncfs(fd)
        os.fdatasync(fd)
        os.close(fd)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        syncfs(dfd)
        os.fsync(dfd)
        os.fdatasync(dfd)
        os.close(dfd)


class Times(Base):
    def test_utimensat_omit_and_now(self):
        self.write("u", b"")
        path = self.path("u")
        utimensat(path, (100, 111), (200, 222))
        info = os.stat(path)
        self.assertEqual((info.st_atime_ns, info.st_mtime_ns), (100_000_000_111, 200_000_000_222))
        utimensat(path, (300, 333), UTIME_OMIT)
        info = os.stat(path)
        self.assertEqual((info.st_atime_ns, info.st_mtime_ns), (300_000_000_333, 200_000_000_222))
        utimensat(path, UTIME_OMIT, (400, 444))
        info = os.stat(path)
        self.assertEqual((info.st_atime_ns, info.st_mtime_ns), (300_000_000_333, 400_000_000_444))
        before = time.time_ns() - 2_000_000_000
        utimensat(path, UTIME_NOW, UTIME_OMIT)
        info = os.stat(path)
        self.assertGreater(info.st_atime_ns, before)
        self.assertEqual(info.st_mtime_ns, 400_000_000_444)
        utimensat(path, UTIME_OMIT, UTIME_NOW)
        self.assertGreater(os.stat(path).st_mtime_ns, before)
        ctime = os.stat(path).st_ctime_ns
        time.sleep(0.02)
        utimensat(path, UTIME_OMIT, UTIME_OMIT)  # nothing changes (the kernel may not even ask)
        self.assertEqual(os.stat(path).st_ctime_ns, ctime)

    def test_timestamp_range(self):
        self.write("r", b"")
        path = self.path("r")
        for atime, mtime in ((-1, -10_000_000_005), (0, 1), (4_000_000_000_123_456_789, 2**31 * 10**9 + 999_999_999)):
            os.utime(path, ns=(atime, mtime))
            info = os.stat(path)
            self.assertEqual((info.st_atime_ns, info.st_mtime_ns), (atime, mtime), "ns timestamps round-trip")

    def test_what_updates_mtime_and_ctime(self):
        self.write("f", b"data")
        f = self.path("f")
        os.mkdir(self.path("d"))
        d = self.path("d")
        old = 1_000_000_000

        def changed(path, what, ctime_before, mtime=True):
            info = os.stat(path, follow_symlinks=False)
            if mtime:
                self.assertGreater(info.st_mtime_ns, old, f"{what} updates mtime of {os.path.basename(path)}")
            else:
                self.assertEqual(info.st_mtime_ns, old, f"{what} leaves mtime of {os.path.basename(path)}")
            self.assertGreater(info.st_ctime_ns, ctime_before, f"{what} updates ctime of {os.path.basename(path)}")

        def step(paths_mtime, paths_ctime_only, action, what):
            ctimes = {}
            for path in paths_mtime + paths_ctime_only:
                ctimes[path] = self.age(path)
            time.sleep(0.01)
            action()
            for path in paths_mtime:
                changed(path, what, ctimes[path])
            for path in paths_ctime_only:
                changed(path, what, ctimes[path], mtime=False)

        step([f], [], lambda: os.truncate(f, 2), "truncate")
        step([f], [], lambda: open(f, "ab").write(b"more"), "write")
        step([], [f], lambda: os.chmod(f, 0o600), "chmod")
        step([], [f], lambda: os.chown(f, 1, 1), "chown")
        step([], [f], lambda: os.setxattr(f, "user.t", b"1"), "setxattr")
        step([d], [], lambda: open(os.path.join(d, "new"), "wb").close(), "create in dir")
        step([d], [f], lambda: os.link(f, os.path.join(d, "hard")), "link")
        step([d], [f], lambda: os.unlink(os.path.join(d, "hard")), "unlink of a link")
        step([d], [], lambda: os.mkdir(os.path.join(d, "sub")), "mkdir in dir")
        step([d], [], lambda: os.rmdir(os.path.join(d, "sub")), "rmdir in dir")
        step([d], [], lambda: os.symlink("x", os.path.join(d, "sym")), "symlink in dir")
        moved = os.path.join(d, "moved")
        ctimes = {path: self.age(path) for path in (d, self.dir, f)}
        time.sleep(0.01)
        os.rename(f, moved)
        changed(d, "rename into a directory", ctimes[d])
        changed(self.dir, "rename out of a directory", ctimes[self.dir])
        changed(moved, "rename", ctimes[f], mtime=False)
        step([d], [], lambda: os.unlink(moved), "unlink")

    def test_read_does_not_change_mtime_or_ctime(self):
        self.write("r", b"abc")
        ctime = self.age(self.path("r"))
        time.sleep(0.01)
        self.assertEqual(self.read("r"), b"abc")
        info = os.stat(self.path("r"))
        self.assertEqual((info.st_mtime_ns, info.st_ctime_ns), (1_000_000_000, ctime))


class Attributes(Base):
    def test_chown_clears_setuid_and_setgid(self):
        self.write("s", b"#!/bin/sh\n", 0o6755)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("s")).st_mode), 0o6755)
        os.chown(self.path("s"), 1234, 1234)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("s")).st_mode), 0o755, "chown clears S_ISUID and S_ISGID")
        os.chmod(self.path("s"), 0o2745)  # setgid without group execute: mandatory-locking mark, kept
        os.chown(self.path("s"), 4321, 4321)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("s")).st_mode), 0o2745)
        os.mkdir(self.path("d"))
        os.chmod(self.path("d"), 0o2775)
        os.chown(self.path("d"), 1234, 1234)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("d")).st_mode), 0o2775, "directories keep S_ISGID on chown")

    def test_lchown_and_lutimes_touch_the_link(self):
        self.write("t", b"")
        os.symlink("t", self.path("l"))
        os.chown(self.path("l"), 777, 888, follow_symlinks=False)
        self.assertEqual((os.lstat(self.path("l")).st_uid, os.lstat(self.path("l")).st_gid), (777, 888))
        self.assertEqual((os.stat(self.path("t")).st_uid, os.stat(self.path("t")).st_gid), (0, 0))
        os.utime(self.path("l"), ns=(5, 6), follow_symlinks=False)
        self.assertEqual(os.lstat(self.path("l")).st_mtime_ns, 6)
        self.assertNotEqual(os.stat(self.path("t")).st_mtime_ns, 6)
        self.assertEqual(stat.S_IMODE(os.lstat(self.path("l")).st_mode), 0o777)

    def test_umask_and_create_modes(self):
        old = os.umask(0o027)
        try:
            os.close(os.open(self.path("f"), os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(self.path("d"), 0o777)
            os.close(os.open(self.path("zero"), os.O_CREAT | os.O_WRONLY, 0))
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("f")).st_mode), 0o640)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("d")).st_mode), 0o750)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("zero")).st_mode), 0)
        with open(self.path("zero"), "wb") as f:  # root writes a mode-0 file anyway
            f.write(b"root")
        self.assertEqual(self.read("zero"), b"root")

    def test_xattr_edges(self):
        self.write("x", b"")
        path = self.path("x")
        os.setxattr(path, "user.empty", b"")
        self.assertEqual(os.getxattr(path, "user.empty"), b"")
        self.assertIn("user.empty", os.listxattr(path))
        value = bytes(range(256)) * 4
        os.setxattr(path, "user.kib", value)
        self.assertEqual(os.getxattr(path, "user.kib"), value)
        os.setxattr(path, "user." + "n" * 250, b"long name")  # 255 bytes: the limit
        self.assertEqual(os.getxattr(path, "user." + "n" * 250), b"long name")
        self.assertErrno(errno.ERANGE, os.setxattr, path, "user." + "n" * 251, b"x")
        self.assertEqual(raw_getxattr(path, "user.kib", 0), len(value))  # size query
        self.assertErrno(errno.ERANGE, raw_getxattr, path, "user.kib", 10)
        needed = raw_listxattr(path, 0)
        self.assertEqual(needed, sum(len(name) + 1 for name in os.listxattr(path)))
        self.assertErrno(errno.ERANGE, raw_listxattr, path, 3)
        self.assertErrno((errno.EOPNOTSUPP, errno.ENOTSUP), os.setxattr, path, "nonsense.x", b"1")
        self.assertErrno(errno.ENOENT, os.getxattr, self.path("missing"), "user.x")
        os.setxattr(path, "user.kib", b"short", os.XATTR_REPLACE)  # shrink in place
        self.assertEqual(os.getxattr(path, "user.kib"), b"short")

    def test_large_xattr_value(self):
        self.write("x", b"")
        value = os.urandom(60_000)
        try:
            os.setxattr(self.path("x"), "user.large", value)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.E2BIG):
                self.skipTest(f"xattr values are limited here ({errno.errorcode[error.errno]} for 60,000 bytes; "
                              "the kernel allows 65,536; ext4 without ea_inode fits about one block)")
            raise
        self.assertEqual(os.getxattr(self.path("x"), "user.large"), value)
        self.assertErrno(errno.E2BIG, os.setxattr, self.path("x"), "user.huge", b"x" * 65537)

    def test_xattrs_follow_the_inode(self):
        self.write("a", b"")
        os.setxattr(self.path("a"), "user.who", b"inode")
        os.link(self.path("a"), self.path("b"))
        self.assertEqual(os.getxattr(self.path("b"), "user.who"), b"inode")
        os.setxattr(self.path("b"), "user.second", b"2")
        self.assertEqual(os.getxattr(self.path("a"), "user.second"), b"2")
        os.rename(self.path("a"), self.path("c"))
        self.assertEqual(sorted(os.listxattr(self.path("c"))), ["user.second", "user.who"])
        os.symlink("c", self.path("l"))
        self.assertEqual(os.getxattr(self.path("l"), "user.who"), b"inode")  # follows
        self.assertErrno(errno.EPERM, os.setxattr, self.path("l"), "user.x", b"1", follow_symlinks=False)
        self.assertErrno(errno.ENODATA, os.getxattr, self.path("l"), "user.who", follow_symlinks=False)
        fd = os.open(self.path("c"), os.O_RDONLY)
        os.unlink(self.path("b"))
        os.unlink(self.path("c"))
        self.assertEqual(os.getxattr(fd, "user.who"), b"inode")  # on an unlinked, open file
        os.close(fd)

    def test_trusted_xattrs_as_root(self):
        self.write("t", b"")
        try:
            os.setxattr(self.path("t"), "trusted.blob", b"root only")
        except OSError as error:
            if error.errno in UNSUPPORTED:
                self.skipTest("trusted.* xattrs not supported")
            raise
        self.assertEqual(os.getxattr(self.path("t"), "trusted.blob"), b"root only")
        self.assertIn("trusted.blob", os.listxattr(self.path("t")))
        os.removexattr(self.path("t"), "trusted.blob")
        self.assertErrno(errno.ENODATA, os.getxattr, self.path("t"), "trusted.blob")


class Namespace(Base):
    def test_enametoolong_everywhere(self):
        long = "L" * 256
        ok = "K" * 255
        self.write("f", b"")
        os.mkdir(self.path("d"))
        too_long = errno.ENAMETOOLONG
        self.assertErrno(too_long, os.mkdir, self.path(long))
        self.assertErrno(too_long, os.symlink, "f", self.path(long))
        self.assertErrno(too_long, os.link, self.path("f"), self.path(long))
        self.assertErrno(too_long, os.rename, self.path("f"), self.path(long))
        self.assertErrno(too_long, os.stat, self.path(long))
        self.assertErrno(too_long, os.unlink, self.path(long))
        self.assertErrno(too_long, os.rmdir, self.path(long))
        os.mkdir(self.path(ok))
        os.rename(self.path("f"), self.path(ok, ok))
        os.link(self.path(ok, ok), self.path("d", ok))
        os.symlink(ok, self.path(ok, "s" * 255))
        self.assertEqual(os.stat(self.path("d", ok)).st_nlink, 2)
        self.assertEqual(sorted(os.listdir(self.path(ok))), sorted([ok, "s" * 255]))

    def test_long_symlink_targets(self):
        target = symlink_target(1023)
        os.symlink(target, self.path("long"))
        self.assertEqual(os.readlink(self.path("long")), target)
        self.assertEqual(os.lstat(self.path("long")).st_size, 1023)
        self.assertErrno(errno.ENAMETOOLONG, os.symlink, "x" * 4096, self.path("toolong"))  # the VFS: PATH_MAX
        odd = bytes(range(1, 256)).replace(b"/", b"")
        os.symlink(odd, os.fsencode(self.path("bytes")))
        self.assertEqual(os.readlink(os.fsencode(self.path("bytes"))), odd)

    def test_path_errnos(self):
        self.write("f", b"")
        os.mkdir(self.path("d"))
        self.assertErrno(errno.ENOTDIR, os.stat, self.path("f", "x"))
        self.assertErrno(errno.ENOTDIR, os.mkdir, self.path("f", "x"))
        self.assertErrno(errno.ENOTDIR, os.rename, self.path("d"), self.path("f", "x"))
        self.assertErrno(errno.ENOTDIR, os.listdir, self.path("f"))
        self.assertErrno(errno.ENOENT, os.mkdir, self.path("none", "x"))
        self.assertErrno(errno.ENOENT, os.link, self.path("none"), self.path("x"))
        self.assertErrno(errno.ENOENT, os.unlink, self.path("none"))
        self.assertErrno(errno.ENOENT, os.readlink, self.path("none"))
        self.assertErrno(errno.ENOENT, os.chmod, self.path("none"), 0o644)
        self.assertErrno(errno.ENOENT, os.truncate, self.path("none"), 0)
        self.assertErrno(errno.ENOENT, os.setxattr, self.path("none"), "user.x", b"")
        self.assertErrno(errno.EEXIST, os.mkdir, self.path("f"))
        self.assertErrno(errno.EEXIST, os.link, self.path("f"), self.path("d"))
        self.assertErrno(errno.EINVAL, os.rmdir, self.path("d", "."))
        self.assertErrno((errno.ENOTEMPTY, errno.EBUSY, errno.EINVAL), os.rmdir, self.path("d", ".."))
        self.assertErrno(errno.EISDIR, os.unlink, self.path("d"))
        self.assertErrno(errno.EPERM, os.link, self.path("d"), self.path("dl"))
        os.symlink("d", self.path("dsym"))
        self.assertErrno(errno.ENOTDIR, os.rmdir, self.path("dsym"))
        os.unlink(self.path("dsym"))  # removes the link, not the directory
        self.assertTrue(os.path.isdir(self.path("d")))
        self.assertErrno(errno.EINVAL, os.rename, self.dir, self.path("d", "inside"))

    def test_symlink_target_of_path_max_minus_one(self):
        target = symlink_target(4095)
        failure = None
        try:
            os.symlink(target, self.path("long"))
        except OSError as error:
            failure = error.errno
        if failure is not None:
            low, high = 1, 4095  # the longest target this file system takes, for the message
            while low < high:
                middle = (low + high + 1) // 2
                try:
                    os.symlink("m" * middle, self.path("probe"))
                    os.unlink(self.path("probe"))
                    low = middle
                except OSError:
                    high = middle - 1
            self.fail(f"a 4095-byte symlink target (PATH_MAX - 1; ext4, tmpfs, xfs and btrfs take it) gives "
                      f"{errno.errorcode.get(failure, failure)}; the longest accepted here is {low} bytes")
        self.assertEqual(os.readlink(self.path("long")), target)
        self.assertEqual(os.lstat(self.path("long")).st_size, 4095)

    def test_readdir_types_and_inodes(self):
        self.write("file", b"")
        os.mkdir(self.path("dir"))
        os.symlink("file", self.path("link"))
        os.link(self.path("file"), self.path("hard"))
        os.mkfifo(self.path("fifo"))
        kinds = {}
        with os.scandir(self.dir) as entries:
            for entry in entries:
                kinds[entry.name] = (entry.is_file(follow_symlinks=False), entry.is_dir(follow_symlinks=False),
                                     entry.is_symlink())
                self.assertEqual(entry.inode(), os.lstat(entry.path).st_ino, f"d_ino of {entry.name} is its st_ino")
        self.assertEqual(kinds, {"file": (True, False, False), "hard": (True, False, False),
                                 "dir": (False, True, False), "link": (False, False, True),
                                 "fifo": (False, False, False)})
        self.assertTrue(stat.S_ISFIFO(os.lstat(self.path("fifo")).st_mode))
        self.assertEqual(os.stat(self.path("file")).st_ino, os.stat(self.path("hard")).st_ino)
        self.assertNotEqual(os.stat(self.path("file")).st_ino, os.stat(self.path("dir")).st_ino)
        self.assertEqual(os.stat(self.path("dir", "..")).st_ino, os.stat(self.dir).st_ino)

    def test_directory_churn(self):
        count = 5000
        for index in range(count):
            os.close(os.open(self.path(f"e{index}"), os.O_CREAT | os.O_WRONLY, 0o644))
        for index in range(0, count, 2):
            os.unlink(self.path(f"e{index}"))
        for index in range(1, count, 4):
            os.rename(self.path(f"e{index}"), self.path(f"r{index}"))
        expected = {f"r{index}" if index % 4 == 1 else f"e{index}" for index in range(1, count, 2)}
        names = os.listdir(self.dir)
        self.assertEqual(len(names), len(expected))
        self.assertEqual(set(names), expected)
        for index in random.Random(3).sample(range(count), 300):
            name = f"r{index}" if index % 4 == 1 else f"e{index}"
            self.assertEqual(os.path.exists(self.path(name)), index % 2 == 1, name)

    def test_concurrent_namespace_changes(self):
        errors = []

        def worker(number):
            try:
                rng = random.Random(number)
                mine = []
                for index in range(300):
                    name = self.path(f"w{number}-{index}")
                    with open(name, "wb") as f:
                        f.write(name.encode())
                    mine.append(name)
                    choice = rng.random()
                    if choice < 0.3:
                        victim = mine.pop(rng.randrange(len(mine)))
                        os.unlink(victim)
                    elif choice < 0.6:
                        source = mine.pop(rng.randrange(len(mine)))
                        renamed = source + ".r"
                        os.rename(source, renamed)
                        os.rename(renamed, source)
                        mine.append(source)
                    os.listdir(self.dir)
                for name in mine:
                    with open(name, "rb") as f:
                        if f.read() != name.encode():
                            errors.append(f"{name}: wrong content")
                worker.results[number] = set(os.path.basename(name) for name in mine)
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(f"worker {number}: {error!r}")

        worker.results = {}
        threads = [threading.Thread(target=worker, args=(number,)) for number in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        expected = set().union(*worker.results.values())
        self.assertEqual(set(os.listdir(self.dir)), expected)


class Rename(Base):
    def test_exchange_across_directories_fixes_link_counts(self):
        os.mkdir(self.path("p1"))
        os.mkdir(self.path("p2"))
        os.mkdir(self.path("p1", "dir"))
        self.write("p2/file", b"F")
        try:
            renameat2(self.path("p1", "dir"), self.path("p2", "file"), RENAME_EXCHANGE)
        except OSError as error:
            if error.errno in (errno.EINVAL,) + UNSUPPORTED:
                self.skipTest("RENAME_EXCHANGE not supported")
            raise
        self.assertEqual(self.read("p1/dir"), b"F")
        self.assertTrue(os.path.isdir(self.path("p2", "file")))
        self.assertEqual(os.stat(self.path("p1")).st_nlink, 2)
        self.assertEqual(os.stat(self.path("p2")).st_nlink, 3)
        self.assertEqual(os.stat(self.path("p2", "file", "..")).st_ino, os.stat(self.path("p2")).st_ino)
        os.mkdir(self.path("p1", "other"))
        renameat2(self.path("p1", "other"), self.path("p2", "file"), RENAME_EXCHANGE)  # two directories
        self.assertEqual(os.stat(self.path("p1")).st_nlink, 3)
        self.assertEqual(os.stat(self.path("p2")).st_nlink, 3)
        self.assertEqual(os.stat(self.path("p1", "other", "..")).st_ino, os.stat(self.path("p1")).st_ino)
        self.assertErrno(errno.EINVAL, renameat2, self.path("p1", "dir"), self.path("p2", "file"),
                         RENAME_EXCHANGE | RENAME_NOREPLACE)
        self.assertErrno(errno.EINVAL, renameat2, self.path("p1"), self.path("p1", "other", "x"), RENAME_NOREPLACE)
        renameat2(self.path("p1", "dir"), self.path("p2", "moved"), RENAME_NOREPLACE)
        self.assertEqual(self.read("p2/moved"), b"F")

    def test_replacing_a_hard_link(self):
        self.write("a", b"A")
        self.write("b", b"B")
        os.link(self.path("b"), self.path("b2"))
        os.rename(self.path("a"), self.path("b"))
        self.assertEqual(os.stat(self.path("b2")).st_nlink, 1)
        self.assertEqual(self.read("b2"), b"B")
        os.link(self.path("b"), self.path("same"))
        os.rename(self.path("b"), self.path("same"))  # two names of one inode: nothing happens
        self.assertTrue(os.path.exists(self.path("b")))
        self.assertEqual(os.stat(self.path("same")).st_nlink, 2)

    def test_rename_directory_over_empty_directory_elsewhere(self):
        os.mkdir(self.path("p1"))
        os.mkdir(self.path("p2"))
        os.mkdir(self.path("p1", "src"))
        self.write("p1/src/inside", b"i")
        os.mkdir(self.path("p2", "dst"))
        os.rename(self.path("p1", "src"), self.path("p2", "dst"))
        self.assertEqual(os.stat(self.path("p1")).st_nlink, 2)
        self.assertEqual(os.stat(self.path("p2")).st_nlink, 3)
        self.assertEqual(self.read("p2/dst/inside"), b"i")
        self.assertEqual(os.listdir(self.path("p1")), [])

    def test_rename_open_file_and_keep_using_it(self):
        self.write("f", b"abc")
        fd = os.open(self.path("f"), os.O_RDWR)
        os.mkdir(self.path("d"))
        os.rename(self.path("f"), self.path("d", "g"))
        os.pwrite(fd, b"XYZ", 3)
        os.close(fd)
        self.assertEqual(self.read("d/g"), b"abcXYZ")


class Space(Base):
    def test_enospc(self):
        if not FILL:
            self.skipTest("needs --fill (fills the file system)")
        info = os.statvfs(self.dir)
        free = info.f_bfree * info.f_frsize
        if free > FILL_LIMIT:
            self.skipTest(f"{free >> 20} MiB free, more than --fill-limit {FILL_LIMIT >> 20} MiB")
        keep = os.urandom(1 << 20)
        self.write("keep", keep)
        fd = os.open(self.path("keep"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        fd = os.open(self.path("fill"), os.O_CREAT | os.O_WRONLY, 0o644)
        chunk = os.urandom(1 << 20)
        written = 0
        failure = None
        while written < free + (64 << 20):
            try:
                count = os.write(fd, chunk)
            except OSError as error:
                failure = error.errno
                break
            written += count
        self.assertIn(failure, (errno.ENOSPC, errno.EDQUOT), f"a full file system says ENOSPC, got "
                      f"{errno.errorcode.get(failure, failure)} after {written >> 20} MiB")
        # What write() accepted is kept: the fsync succeeds (a writeback cache must not
        # have taken bytes it could not write back), and the file is exactly those bytes.
        os.fsync(fd)
        os.close(fd)
        self.assertEqual(os.stat(self.path("fill")).st_size, written, "the file is as long as what write() accepted")
        with open(self.path("fill"), "rb") as f:
            for index in range(written // len(chunk)):
                self.assertEqual(f.read(len(chunk)), chunk, f"MiB {index} of the filled file")
            self.assertEqual(f.read(), chunk[:written % len(chunk)], "the last, partial write")
        for action in (lambda: os.mkdir(self.path("more")),
                       lambda: open(self.path("tiny"), "wb").write(b"x" * 10_000),
                       lambda: os.setxattr(self.path("keep"), "user.full", b"v" * 500)):
            try:
                action()
            except OSError as error:
                self.assertIn(error.errno, (errno.ENOSPC, errno.EDQUOT), f"when full: {error!r}")
        self.assertEqual(self.read("keep"), keep, "data written before the disk filled is intact")
        os.unlink(self.path("fill"))
        deadline = time.monotonic() + 10
        while True:
            now = os.statvfs(self.dir)
            if now.f_bfree * now.f_frsize > free - (16 << 20) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertGreater(now.f_bfree * now.f_frsize, free - (16 << 20), "space comes back after unlink")
        self.write("after", chunk * 4)
        fd = os.open(self.path("after"), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        self.assertEqual(self.read("after"), chunk * 4)
        print(f"\n  filled {written >> 20} MiB before ENOSPC", file=sys.stderr)


class NonRoot(Base):
    def setUp(self):
        if not NONROOT:
            self.skipTest("--no-nonroot")
        if os.getuid() != 0:
            self.skipTest("needs root to switch users")
        super().setUp()

    def test_group_class_is_checked_before_other(self):
        self.write("g", b"secret", 0o604)
        os.chown(self.path("g"), 0, USER_GID)
        path = self.path("g")
        self.assertUserErrno(errno.EACCES, lambda: open(path, "rb").read(), "group class has no read bit")
        os.chmod(path, 0o640)
        self.assertEqual(self.assertUserOk(lambda: open(path, "rb").read(), "group read"), b"secret")
        os.chown(path, USER_UID, 0)
        os.chmod(path, 0o066)
        self.assertUserErrno(errno.EACCES, lambda: open(path, "rb").read(), "owner class has no read bit")

    def test_write_by_non_owner_clears_setuid(self):
        self.write("suid", b"#!/bin/sh\n", 0o6777)
        path = self.path("suid")

        def append():
            with open(path, "ab") as f:
                f.write(b"echo hi\n")
        self.assertUserOk(append, "write to a 06777 file")
        self.assertEqual(self.read("suid"), b"#!/bin/sh\necho hi\n")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o777, "a write by a non-owner clears S_ISUID/S_ISGID")
        os.chmod(path, 0o4777)
        self.assertUserOk(lambda: os.truncate(path, 3), "truncate of a 04777 file")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o777, "truncate by a non-owner clears S_ISUID")

    def test_write_permission_rules(self):
        self.write("ro", b"keep", 0o644)
        path = self.path("ro")
        self.assertUserErrno(errno.EACCES, lambda: os.open(path, os.O_RDONLY | os.O_TRUNC), "O_TRUNC")
        self.assertUserErrno(errno.EACCES, lambda: os.truncate(path, 0), "truncate")
        self.assertUserErrno(errno.EACCES, lambda: os.setxattr(path, "user.x", b"1"), "setxattr")
        self.assertUserErrno(errno.EPERM, lambda: os.utime(path, ns=(1, 1)), "explicit times, not the owner")
        self.assertUserErrno(errno.EACCES, lambda: os.utime(path), "UTIME_NOW without write permission")
        self.assertEqual(self.read("ro"), b"keep")
        os.chmod(path, 0o666)
        self.assertUserOk(lambda: os.utime(path), "UTIME_NOW with write permission")
        self.assertUserErrno(errno.EPERM, lambda: os.utime(path, ns=(1, 1)), "explicit times need ownership")
        self.assertUserOk(lambda: os.truncate(path, 2), "truncate with write permission")
        self.assertUserOk(lambda: os.setxattr(path, "user.x", b"1"), "setxattr with write permission")
        self.assertEqual(self.read("ro"), b"ke")
        os.chmod(self.dir, 0o755)
        self.assertUserErrno(errno.EACCES, lambda: os.unlink(path), "unlink in a 0755 root directory")
        self.assertUserErrno(errno.EACCES, lambda: os.rename(path, path + ".2"), "rename in a 0755 root directory")
        self.assertUserErrno(errno.EACCES, lambda: os.mkdir(path + ".d"), "mkdir in a 0755 root directory")
        self.assertUserErrno(errno.EACCES, lambda: os.symlink("x", path + ".l"), "symlink in a 0755 root directory")
        os.chmod(self.dir, 0o711)
        self.assertUserErrno(errno.EACCES, lambda: os.listdir(self.dir), "readdir without read permission")
        self.assertEqual(self.assertUserOk(lambda: open(path, "rb").read(), "lookup with search permission"), b"ke")
        os.chmod(self.dir, 0o766)
        self.assertUserErrno(errno.EACCES, lambda: os.stat(path), "lookup without search permission")
        os.chmod(self.dir, 0o777)

    def test_objects_created_by_the_user(self):
        d = self.path("ud")
        self.assertUserOk(lambda: os.mkdir(d, 0o755))
        self.assertUserOk(lambda: os.symlink("target", os.path.join(d, "l")))
        self.assertUserOk(lambda: os.close(os.open(os.path.join(d, "f"), os.O_CREAT | os.O_WRONLY, 0o644)))
        self.assertUserOk(lambda: os.link(os.path.join(d, "f"), os.path.join(d, "h")))
        for name in ("", "l", "f"):
            info = os.lstat(os.path.join(d, name))
            self.assertEqual((info.st_uid, info.st_gid), (USER_UID, USER_GID), f"owner of {name or 'the dir'}")
        self.assertEqual(os.stat(os.path.join(d, "h")).st_nlink, 2)
        self.assertUserOk(lambda: os.chmod(os.path.join(d, "f"), 0o600))
        self.assertUserErrno(errno.EPERM, lambda: os.chown(os.path.join(d, "f"), 0, 0), "give away a file")
        self.assertUserErrno(errno.EPERM, lambda: os.chown(os.path.join(d, "f"), -1, 0), "chgrp to a foreign group")
        self.assertUserOk(lambda: os.chown(os.path.join(d, "f"), -1, USER_GID), "chgrp to an own group")
        self.assertUserOk(lambda: os.rename(os.path.join(d, "f"), os.path.join(d, "g")))
        self.assertUserOk(lambda: [os.unlink(os.path.join(d, name)) for name in ("g", "h", "l")] and 0)
        self.assertUserOk(lambda: os.rmdir(d))

    def test_chmod_setgid_by_non_member_is_dropped(self):
        self.write("mine", b"", 0o644)
        os.chown(self.path("mine"), USER_UID, 0)  # owned by the user, group root (not a member)
        path = self.path("mine")
        self.assertUserOk(lambda: os.chmod(path, 0o2755))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o755, "S_ISGID dropped for a non-member")
        self.assertUserOk(lambda: os.chmod(path, 0o4755))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o4755, "the owner may set S_ISUID")

    def test_sticky_directory_rename_and_own_files(self):
        os.chmod(self.dir, 0o1777)
        self.write("rootfile", b"")
        root_file = self.path("rootfile")
        self.assertUserErrno(errno.EPERM, lambda: os.rename(root_file, root_file + ".x"), "rename in a sticky dir")
        own = self.path("own")
        self.assertUserOk(lambda: open(own, "wb").close())
        self.assertUserOk(lambda: os.rename(own, own + ".x"), "rename own file in a sticky dir")
        self.assertUserErrno(errno.EPERM, lambda: os.rename(own + ".x", root_file), "replace root's file")
        self.assertUserOk(lambda: os.unlink(own + ".x"))

    def test_trusted_xattrs_hidden_from_users(self):
        self.write("t", b"", 0o666)
        path = self.path("t")
        try:
            os.setxattr(path, "trusted.secret", b"root only")
        except OSError as error:
            if error.errno in UNSUPPORTED:
                self.skipTest("trusted.* xattrs not supported")
            raise
        os.setxattr(path, "user.public", b"p")
        self.assertEqual(self.assertUserOk(lambda: sorted(os.listxattr(path)), "listxattr"), ["user.public"],
                         "trusted.* names are not listed for unprivileged callers")
        self.assertUserErrno(errno.ENODATA, lambda: os.getxattr(path, "trusted.secret"), "getxattr trusted.*")
        self.assertUserErrno(errno.EPERM, lambda: os.setxattr(path, "trusted.mine", b"x"), "setxattr trusted.*")
        self.assertEqual(self.assertUserOk(lambda: os.getxattr(path, "user.public")), b"p")


def main():
    global ROOT, NONROOT, USER_UID, USER_GID, USER_NAME, FILL, FILL_LIMIT, CURRENT_UMASK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--nonroot-user", default="nobody", help="user for the non-root tests (default nobody)")
    parser.add_argument("--no-nonroot", action="store_true", help="skip the tests that switch users")
    parser.add_argument("--fill", action="store_true", help="run the ENOSPC test (fills the file system)")
    parser.add_argument("--fill-limit", type=int, default=1 << 30, help="skip --fill above this much free space")
    parser.add_argument("-k", dest="pattern", help="run only tests whose name contains this")
    parser.add_argument("-q", "--quiet", action="store_true", help="only failures and the summary")
    args = parser.parse_args()
    ROOT = os.path.abspath(args.dir)
    DirTestCase.ROOT = ROOT
    NONROOT = not args.no_nonroot
    FILL = args.fill
    FILL_LIMIT = args.fill_limit
    if NONROOT:
        try:
            entry = pwd.getpwnam(args.nonroot_user)
        except KeyError:
            parser.error(f"no user {args.nonroot_user!r}")
        USER_NAME, USER_UID, USER_GID = entry.pw_name, entry.pw_uid, entry.pw_gid
        if USER_UID == 0:
            parser.error("--nonroot-user must not be root")
    CURRENT_UMASK = os.umask(0o022)
    os.umask(CURRENT_UMASK)
    loader = unittest.TestLoader()
    if args.pattern:
        loader.testNamePatterns = [f"*{args.pattern}*"]
    suite = loader.loadTestsFromModule(sys.modules[__name__])
    start = time.monotonic()
    result = unittest.TextTestRunner(verbosity=1 if args.quiet else 2, stream=sys.stderr).run(suite)
    failed = len(result.failures) + len(result.errors)
    print(f"posix extra: {result.testsRun - failed - len(result.skipped)} passed, {failed} failed, "
          f"{len(result.skipped)} skipped ({time.monotonic() - start:.1f} s)")
    for test, reason in result.skipped:
        print(f"  skipped {test.id().split('.', 1)[1]}: {reason}")
    return 0 if result.wasSuccessful() else 1


CURRENT_UMASK = 0o022

if __name__ == "__main__":
    sys.exit(main())
