#!/usr/bin/env python3
"""POSIX behaviour suite, run inside a directory of the file system under test.

    posix_suite.py DIR [--no-nonroot] [--big-dir N]

Each test works in its own fresh subdirectory of DIR. The non-root tests fork a child
that drops to uid/gid 65534 (nobody); they need the mount to allow other users
(blobfs: -o allow_other). Exit status 0 when every test passed.
"""
import argparse
import errno
import os
import random
import stat
import sys
import time
import unittest

ROOT = None
BIG_DIR = 100_000
NONROOT = True
NOBODY = 65534

from fscalls import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, RENAME_EXCHANGE, RENAME_NOREPLACE,  # noqa: E402
                     DirTestCase, fallocate, renameat2)


def as_nobody(function):
    """Runs function() in a child as uid/gid nobody; returns its result (an int) or raises."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code = 0
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = function()
            code = 0 if result is None else result
        except OSError as error:
            code = 1000 + error.errno
        except BaseException:
            code = 999
        os.write(write_end, str(code).encode())
        os._exit(0)
    os.close(write_end)
    data = b""
    while True:
        chunk = os.read(read_end, 64)
        if not chunk:
            break
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    return int(data or b"998")


class Base(DirTestCase):
    def assertErrno(self, code, function, *args, **kwargs):
        with self.assertRaises(OSError) as caught:
            function(*args, **kwargs)
        self.assertEqual(caught.exception.errno, code, f"expected {errno.errorcode[code]}, got {caught.exception}")


class Files(Base):
    def test_create_and_read_back(self):
        self.write("a", b"hello")
        self.assertEqual(self.read("a"), b"hello")
        self.assertEqual(os.stat(self.path("a")).st_size, 5)
        self.assertTrue(stat.S_ISREG(os.stat(self.path("a")).st_mode))

    def test_o_excl(self):
        fd = os.open(self.path("x"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        self.assertErrno(errno.EEXIST, os.open, self.path("x"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("x")).st_mode), 0o600)

    def test_o_trunc(self):
        self.write("t", b"0123456789")
        fd = os.open(self.path("t"), os.O_WRONLY | os.O_TRUNC)
        self.assertEqual(os.fstat(fd).st_size, 0)
        os.write(fd, b"ab")
        os.close(fd)
        self.assertEqual(self.read("t"), b"ab")

    def test_o_append(self):
        self.write("ap", b"abc")
        fd = os.open(self.path("ap"), os.O_WRONLY | os.O_APPEND)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"def")
        os.pwrite(fd, b"ghi", 0)  # Linux: pwrite on O_APPEND appends too
        os.close(fd)
        self.assertEqual(self.read("ap"), b"abcdefghi")

    def test_open_missing_and_wrong_types(self):
        self.assertErrno(errno.ENOENT, os.open, self.path("missing"), os.O_RDONLY)
        self.assertErrno(errno.ENOENT, os.open, self.path("nodir", "x"), os.O_CREAT | os.O_WRONLY)
        self.write("f", b"")
        self.assertErrno(errno.ENOTDIR, os.open, self.path("f", "x"), os.O_CREAT | os.O_WRONLY)
        os.mkdir(self.path("d"))
        self.assertErrno(errno.EISDIR, os.open, self.path("d"), os.O_WRONLY)
        self.assertErrno(errno.ENOTDIR, os.open, self.path("f"), os.O_RDONLY | os.O_DIRECTORY)

    def test_offsets_holes_and_past_eof(self):
        fd = os.open(self.path("h"), os.O_CREAT | os.O_RDWR, 0o644)
        os.pwrite(fd, b"X" * 100, 1_000_000)
        self.assertEqual(os.fstat(fd).st_size, 1_000_100)
        self.assertEqual(os.pread(fd, 10, 500_000), b"\0" * 10)
        self.assertEqual(os.pread(fd, 200, 1_000_050), b"X" * 50)
        self.assertEqual(os.pread(fd, 10, 2_000_000), b"")
        os.pwrite(fd, b"abc", 4093)  # across a 4 KiB boundary
        self.assertEqual(os.pread(fd, 5, 4092), b"\0abc\0")
        os.close(fd)

    def test_large_unaligned_writes(self):
        data = os.urandom(3 * 1024 * 1024 + 123)
        fd = os.open(self.path("big"), os.O_CREAT | os.O_RDWR, 0o644)
        os.pwrite(fd, data, 777)
        os.fsync(fd)
        self.assertEqual(os.pread(fd, len(data), 777), data)
        self.assertEqual(os.pread(fd, 777, 0), b"\0" * 777)
        os.close(fd)

    def test_unlink_open_file(self):
        self.write("u", b"still here")
        fd = os.open(self.path("u"), os.O_RDWR)
        os.unlink(self.path("u"))
        self.assertFalse(os.path.exists(self.path("u")))
        self.assertNotIn("u", os.listdir(self.dir))
        self.assertEqual(os.pread(fd, 100, 0), b"still here")
        os.pwrite(fd, b"more", 10)
        self.assertEqual(os.pread(fd, 100, 0), b"still heremore")
        self.assertEqual(os.fstat(fd).st_nlink, 0)
        os.close(fd)

    def test_truncate_both_ways(self):
        self.write("tr", b"a" * 10_000)
        os.truncate(self.path("tr"), 100)
        self.assertEqual(self.read("tr"), b"a" * 100)
        os.truncate(self.path("tr"), 20_000)
        self.assertEqual(self.read("tr"), b"a" * 100 + b"\0" * 19_900)
        fd = os.open(self.path("tr"), os.O_RDWR)
        os.ftruncate(fd, 50)
        self.assertEqual(os.fstat(fd).st_size, 50)
        os.ftruncate(fd, 5000)
        self.assertEqual(os.pread(fd, 5000, 0), b"a" * 50 + b"\0" * 4950)
        os.close(fd)
        self.assertErrno(errno.EISDIR, os.truncate, self.dir, 0)

    def test_fallocate(self):
        fd = os.open(self.path("fa"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.posix_fallocate(fd, 0, 1 << 20)
        except OSError as error:
            if error.errno == errno.EOPNOTSUPP:
                self.skipTest("fallocate not supported")
            raise
        self.assertEqual(os.fstat(fd).st_size, 1 << 20)
        self.assertGreaterEqual(os.fstat(fd).st_blocks * 512, 1 << 20)
        os.pwrite(fd, b"Z" * 100_000, 0)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10_000, 50_000)
        self.assertEqual(os.fstat(fd).st_size, 1 << 20)
        self.assertEqual(os.pread(fd, 100_000, 0), b"Z" * 10_000 + b"\0" * 50_000 + b"Z" * 40_000)
        os.close(fd)

    def test_fsync_fdatasync_sync(self):
        fd = os.open(self.path("s"), os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
        os.close(fd)
        os.sync()
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)


class Rename(Base):
    def test_replace_file_atomically(self):
        self.write("a", b"new")
        self.write("b", b"old")
        fd = os.open(self.path("b"), os.O_RDONLY)
        os.rename(self.path("a"), self.path("b"))
        self.assertEqual(self.read("b"), b"new")
        self.assertFalse(os.path.exists(self.path("a")))
        self.assertEqual(os.pread(fd, 10, 0), b"old")  # the replaced inode lives while open
        os.close(fd)

    def test_directory_cases(self):
        os.mkdir(self.path("d1"))
        os.mkdir(self.path("d2"))
        os.mkdir(self.path("full"))
        self.write("full/x", b"")
        self.write("f", b"")
        os.rename(self.path("d1"), self.path("d2"))  # over an empty directory
        self.assertFalse(os.path.exists(self.path("d1")))
        self.assertErrno(errno.ENOTEMPTY, os.rename, self.path("d2"), self.path("full"))
        self.assertErrno(errno.EISDIR, os.rename, self.path("f"), self.path("d2"))
        self.assertErrno(errno.ENOTDIR, os.rename, self.path("d2"), self.path("f"))
        self.assertErrno(errno.EINVAL, os.rename, self.path("d2"), self.path("d2", "inside"))
        os.rename(self.path("f"), self.path("f"))  # same name: nothing happens
        self.assertTrue(os.path.exists(self.path("f")))
        self.assertErrno(errno.ENOENT, os.rename, self.path("nothing"), self.path("x"))

    def test_move_directory_fixes_link_counts(self):
        os.mkdir(self.path("p1"))
        os.mkdir(self.path("p2"))
        os.mkdir(self.path("p1", "child"))
        self.assertEqual(os.stat(self.path("p1")).st_nlink, 3)
        os.rename(self.path("p1", "child"), self.path("p2", "child"))
        self.assertEqual(os.stat(self.path("p1")).st_nlink, 2)
        self.assertEqual(os.stat(self.path("p2")).st_nlink, 3)
        self.assertEqual(os.stat(self.path("p2", "child", "..")).st_ino, os.stat(self.path("p2")).st_ino)

    def test_noreplace_and_exchange(self):
        self.write("a", b"A")
        self.write("b", b"B")
        self.assertErrno(errno.EEXIST, renameat2, self.path("a"), self.path("b"), RENAME_NOREPLACE)
        renameat2(self.path("a"), self.path("c"), RENAME_NOREPLACE)
        renameat2(self.path("c"), self.path("b"), RENAME_EXCHANGE)
        self.assertEqual(self.read("b"), b"A")
        self.assertEqual(self.read("c"), b"B")
        os.mkdir(self.path("dir"))
        renameat2(self.path("dir"), self.path("c"), RENAME_EXCHANGE)
        self.assertTrue(os.path.isdir(self.path("c")))
        self.assertEqual(self.read("dir"), b"B")
        self.assertErrno(errno.ENOENT, renameat2, self.path("b"), self.path("none"), RENAME_EXCHANGE)


class Links(Base):
    def test_hard_links(self):
        self.write("a", b"data")
        os.link(self.path("a"), self.path("b"))
        self.assertEqual(os.stat(self.path("a")).st_nlink, 2)
        self.assertEqual(os.stat(self.path("a")).st_ino, os.stat(self.path("b")).st_ino)
        os.unlink(self.path("a"))
        self.assertEqual(os.stat(self.path("b")).st_nlink, 1)
        self.assertEqual(self.read("b"), b"data")
        os.mkdir(self.path("d"))
        self.assertErrno(errno.EPERM, os.link, self.path("d"), self.path("d2"))
        self.assertErrno(errno.EEXIST, os.link, self.path("b"), self.path("d"))

    def test_symlinks(self):
        self.write("target", b"t")
        os.symlink("target", self.path("rel"))
        os.symlink(self.path("target"), self.path("abs"))
        os.symlink("nowhere", self.path("dangling"))
        self.assertEqual(os.readlink(self.path("rel")), "target")
        self.assertEqual(os.readlink(self.path("abs")), self.path("target"))
        self.assertEqual(self.read("rel"), b"t")
        self.assertTrue(stat.S_ISLNK(os.lstat(self.path("rel")).st_mode))
        self.assertTrue(stat.S_ISREG(os.stat(self.path("rel")).st_mode))
        self.assertEqual(os.lstat(self.path("rel")).st_size, len("target"))
        self.assertErrno(errno.ENOENT, os.stat, self.path("dangling"))
        os.symlink("loop2", self.path("loop1"))
        os.symlink("loop1", self.path("loop2"))
        self.assertErrno(errno.ELOOP, os.stat, self.path("loop1"))
        self.assertErrno(errno.EINVAL, os.readlink, self.path("target"))
        self.assertErrno(errno.EEXIST, os.symlink, "x", self.path("rel"))


class Directories(Base):
    def test_mkdir_rmdir(self):
        os.mkdir(self.path("d"))
        self.assertEqual(os.stat(self.path("d")).st_nlink, 2)
        os.mkdir(self.path("d", "e"))
        self.assertEqual(os.stat(self.path("d")).st_nlink, 3)
        self.assertErrno(errno.EEXIST, os.mkdir, self.path("d"))
        self.assertErrno(errno.ENOTEMPTY, os.rmdir, self.path("d"))
        self.write("f", b"")
        self.assertErrno(errno.ENOTDIR, os.rmdir, self.path("f"))
        self.assertErrno(errno.EISDIR, os.unlink, self.path("d"))
        os.rmdir(self.path("d", "e"))
        os.rmdir(self.path("d"))
        self.assertErrno(errno.ENOENT, os.rmdir, self.path("d"))

    def test_name_lengths(self):
        name = "n" * 255
        self.write(name, b"x")
        self.assertIn(name, os.listdir(self.dir))
        self.assertErrno(errno.ENAMETOOLONG, os.open, self.path("n" * 256), os.O_CREAT | os.O_WRONLY)
        odd = os.fsencode(self.dir) + b"/" + bytes([0xFF, 0xFE]) + "é".encode()
        with open(odd, "wb") as f:
            f.write(b"bytes")
        self.assertIn(bytes([0xFF, 0xFE]) + "é".encode(), os.listdir(os.fsencode(self.dir)))
        os.unlink(odd)

    def test_readdir_sees_each_entry_once_while_removing(self):
        names = {f"e{index}" for index in range(500)}
        for name in names:
            self.write(name, b"")
        seen = []
        with os.scandir(self.dir) as entries:
            for entry in entries:
                seen.append(entry.name)
                os.unlink(entry.path)
        self.assertEqual(sorted(seen), sorted(names))
        self.assertEqual(os.listdir(self.dir), [])

    def test_big_directory(self):
        count = BIG_DIR
        big = self.path("big")
        os.mkdir(big)
        start = time.monotonic()
        for index in range(count):
            os.close(os.open(os.path.join(big, f"file-{index:07d}"), os.O_CREAT | os.O_WRONLY, 0o644))
        created = time.monotonic()
        names = os.listdir(big)
        listed = time.monotonic()
        self.assertEqual(len(names), count)
        self.assertEqual(len(set(names)), count)
        self.assertEqual(set(names), {f"file-{index:07d}" for index in range(count)})
        probes = random.Random(1).sample(range(count), 2000)
        for index in probes:
            os.stat(os.path.join(big, f"file-{index:07d}"))
        looked = time.monotonic()
        for index in probes[:200]:
            self.assertErrno(errno.ENOENT, os.stat, os.path.join(big, f"absent-{index}"))
        print(f"\n  big directory: {count} creates {created - start:.1f} s, listing {listed - created:.2f} s, "
              f"2000 random stats {looked - listed:.3f} s", file=sys.stderr)
        self.assertLess((looked - listed) / 2000, 0.01, "lookups in a big directory stay fast")
        for name in names:
            os.unlink(os.path.join(big, name))
        os.rmdir(big)


class Attributes(Base):
    def test_chmod_chown_times(self):
        self.write("a", b"")
        before = os.stat(self.path("a"))
        time.sleep(0.01)
        os.chmod(self.path("a"), 0o4751)
        after = os.stat(self.path("a"))
        self.assertEqual(stat.S_IMODE(after.st_mode), 0o4751)
        self.assertGreater(after.st_ctime_ns, before.st_ctime_ns)
        os.chown(self.path("a"), 1234, 5678)
        self.assertEqual((os.stat(self.path("a")).st_uid, os.stat(self.path("a")).st_gid), (1234, 5678))
        os.utime(self.path("a"), ns=(1_000_000_123, 2_000_000_456))
        times = os.stat(self.path("a"))
        self.assertEqual((times.st_atime_ns, times.st_mtime_ns), (1_000_000_123, 2_000_000_456))
        os.utime(self.path("a"))  # UTIME_NOW
        self.assertGreater(os.stat(self.path("a")).st_mtime_ns, 2_000_000_456)

    def test_write_updates_mtime_and_size(self):
        self.write("m", b"")
        os.utime(self.path("m"), ns=(0, 0))
        with open(self.path("m"), "ab") as f:
            f.write(b"x" * 10)
        info = os.stat(self.path("m"))
        self.assertEqual(info.st_size, 10)
        self.assertGreater(info.st_mtime_ns, 0)

    def test_xattrs(self):
        self.write("x", b"")
        path = self.path("x")
        os.setxattr(path, "user.one", b"1")
        os.setxattr(path, "user.two", b"\0binary\xff")
        self.assertEqual(os.getxattr(path, "user.two"), b"\0binary\xff")
        self.assertEqual(sorted(os.listxattr(path)), ["user.one", "user.two"])
        self.assertErrno(errno.EEXIST, os.setxattr, path, "user.one", b"x", os.XATTR_CREATE)
        self.assertErrno(errno.ENODATA, os.setxattr, path, "user.none", b"x", os.XATTR_REPLACE)
        os.setxattr(path, "user.one", b"replaced", os.XATTR_REPLACE)
        self.assertEqual(os.getxattr(path, "user.one"), b"replaced")
        os.removexattr(path, "user.one")
        self.assertErrno(errno.ENODATA, os.getxattr, path, "user.one")
        self.assertErrno(errno.ENODATA, os.removexattr, path, "user.one")
        os.mkdir(self.path("xd"))
        os.setxattr(self.path("xd"), "user.dir", b"d")
        self.assertEqual(os.getxattr(self.path("xd"), "user.dir"), b"d")

    def test_statfs(self):
        before = os.statvfs(self.dir)
        self.assertGreater(before.f_bsize, 0)
        self.assertGreater(before.f_blocks, 0)
        self.assertGreaterEqual(before.f_namemax, 255)
        with open(self.path("space"), "wb") as f:
            f.write(os.urandom(8 << 20))
            f.flush()
            os.fsync(f.fileno())
        during = os.statvfs(self.dir)
        used = (before.f_bfree - during.f_bfree) * during.f_frsize
        self.assertGreaterEqual(used, 7 << 20, f"8 MiB written, free space fell by {used}")
        os.unlink(self.path("space"))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            after = os.statvfs(self.dir)
            if (before.f_bfree - after.f_bfree) * after.f_frsize < 1 << 20:
                break
            time.sleep(0.1)
        self.assertLess((before.f_bfree - after.f_bfree) * after.f_frsize, 1 << 20, "space comes back after unlink")


class NonRoot(Base):
    def setUp(self):
        if not NONROOT:
            self.skipTest("--no-nonroot")
        if os.getuid() != 0:
            self.skipTest("needs root to switch users")
        super().setUp()

    def test_permission_rules(self):
        self.write("rootfile", b"r", 0o644)
        root_file = self.path("rootfile")
        self.assertEqual(as_nobody(lambda: os.chmod(root_file, 0o777)), 1000 + errno.EPERM)
        self.assertEqual(as_nobody(lambda: os.chown(root_file, NOBODY, NOBODY)), 1000 + errno.EPERM)
        self.assertEqual(as_nobody(lambda: os.close(os.open(root_file, os.O_WRONLY))), 1000 + errno.EACCES)
        self.assertEqual(as_nobody(lambda: os.utime(root_file, ns=(1, 1))), 1000 + errno.EPERM)
        mine = self.path("mine")
        self.assertEqual(as_nobody(lambda: os.close(os.open(mine, os.O_CREAT | os.O_WRONLY, 0o600))), 0)
        info = os.stat(mine)
        self.assertEqual((info.st_uid, info.st_gid), (NOBODY, NOBODY))
        self.assertEqual(as_nobody(lambda: os.chmod(mine, 0o640)), 0)
        self.assertEqual(as_nobody(lambda: os.chown(mine, 0, -1)), 1000 + errno.EPERM)
        self.assertEqual(as_nobody(lambda: os.utime(mine)), 0)
        os.mkdir(self.path("closed"), 0o755)
        closed = self.path("closed", "x")
        self.assertEqual(as_nobody(lambda: os.close(os.open(closed, os.O_CREAT | os.O_WRONLY))), 1000 + errno.EACCES)
        os.mkdir(self.path("secret"), 0o700)
        secret = self.path("secret")
        self.assertEqual(as_nobody(lambda: os.listdir(secret) and 0), 1000 + errno.EACCES)

    def test_sticky_directory(self):
        os.mkdir(self.path("tmp"))
        os.chmod(self.path("tmp"), 0o1777)
        self.write("tmp/rootowned", b"")
        target = self.path("tmp", "rootowned")
        self.assertEqual(as_nobody(lambda: os.unlink(target)), 1000 + errno.EPERM)

    def test_setgid_directory(self):
        os.mkdir(self.path("sg"))
        os.chown(self.path("sg"), 0, 4242)
        os.chmod(self.path("sg"), 0o2777)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("sg")).st_mode), 0o2777)
        child_file = self.path("sg", "f")
        child_dir = self.path("sg", "d")
        self.assertEqual(as_nobody(lambda: os.close(os.open(child_file, os.O_CREAT | os.O_WRONLY, 0o644))), 0)
        self.assertEqual(as_nobody(lambda: os.mkdir(child_dir)), 0)
        self.assertEqual(os.stat(child_file).st_gid, 4242)
        self.assertEqual(os.stat(child_dir).st_gid, 4242)
        self.assertTrue(os.stat(child_dir).st_mode & stat.S_ISGID)


def main():
    global ROOT, BIG_DIR, NONROOT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--no-nonroot", action="store_true", help="skip the tests that switch to uid nobody")
    parser.add_argument("--big-dir", type=int, default=100_000, help="entries of the big-directory test")
    parser.add_argument("-k", dest="pattern", help="run only tests whose name contains this")
    args = parser.parse_args()
    ROOT = os.path.abspath(args.dir)
    DirTestCase.ROOT = ROOT
    BIG_DIR = args.big_dir
    NONROOT = not args.no_nonroot
    loader = unittest.TestLoader()
    if args.pattern:
        loader.testNamePatterns = [f"*{args.pattern}*"]
    suite = loader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stderr).run(suite)
    failed = len(result.failures) + len(result.errors)
    print(f"posix suite: {result.testsRun - failed - len(result.skipped)} passed, {failed} failed, "
          f"{len(result.skipped)} skipped")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
