"""What the file-system test scripts share: Linux calls Python's os module lacks (through
libc, raising OSError with errno) and the per-test directory the unittest suites use.
The scripts import it from their own directory (Tests/fs)."""
import ctypes
import os
import unittest

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def raise_errno():
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code))


def renameat2(old, new, flags):
    function = getattr(libc, "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        result = function(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    else:  # glibc before 2.28: the system call itself
        libc.syscall.restype = ctypes.c_long
        number = {"x86_64": 316, "aarch64": 276}[os.uname().machine]
        result = libc.syscall(ctypes.c_long(number), ctypes.c_int(AT_FDCWD), os.fsencode(old),
                              ctypes.c_int(AT_FDCWD), os.fsencode(new), ctypes.c_uint(flags))
    if result != 0:
        raise_errno()


def fallocate(fd, mode, offset, length):
    if libc.fallocate(fd, mode, offset, length) != 0:
        raise_errno()


def syncfs(fd):
    if libc.syncfs(fd) != 0:
        raise_errno()


def first_difference(actual, expected):
    """Index of the first byte where two buffers differ (the shorter length if one is a
    prefix of the other); a binary search over equal prefixes, fast on big buffers."""
    limit = min(len(actual), len(expected))
    low, high = 0, limit
    while low < high:
        middle = (low + high) // 2
        if actual[low:middle + 1] == expected[low:middle + 1]:
            low = middle + 1
        else:
            high = middle
    return low


class DirTestCase(unittest.TestCase):
    """Each test in a fresh directory (mode 0777) under ROOT, removed with its contents after."""
    ROOT = None  # set by the script's main()

    def setUp(self):
        self.dir = os.path.join(DirTestCase.ROOT, f"{type(self).__name__}.{self._testMethodName}.{os.getpid()}")
        os.mkdir(self.dir)
        os.chmod(self.dir, 0o777)

    def tearDown(self):
        for top, directories, files in os.walk(self.dir, topdown=False):
            for name in files:
                os.unlink(os.path.join(top, name))
            for name in directories:
                path = os.path.join(top, name)
                if os.path.islink(path):
                    os.unlink(path)
                else:
                    os.rmdir(path)
        os.rmdir(self.dir)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def write(self, name, data, mode=0o644):
        with open(self.path(name), "wb") as f:
            f.write(data)
        os.chmod(self.path(name), mode)

    def read(self, name):
        with open(self.path(name), "rb") as f:
            return f.read()


FUSECTL = "/sys/fs/fuse/connections"


def fuse_waiting(mountpoint):
    """The number of requests the kernel has sent to the FUSE daemon of MOUNTPOINT and not
    had answered (fusectl's `waiting`), or None when fusectl is not reachable. The
    connection's directory is named after the mount's device number."""
    if not os.path.isdir(os.path.join(FUSECTL, ".")) or not os.listdir(FUSECTL):
        # fusectl not mounted yet: mount it (root only; harmless if it fails).
        os.system(f"mount -t fusectl none {FUSECTL} >/dev/null 2>&1")
    connection = os.path.join(FUSECTL, str(os.stat(mountpoint).st_dev), "waiting")
    try:
        with open(connection) as f:
            return int(f.read().strip())
    except OSError:
        return None


def check_all_answered(mountpoint, settle=5.0):
    """Returns None when every request the kernel sent to MOUNTPOINT's daemon has been
    answered (waiting drops to 0 within `settle` seconds: releases and forgets may still
    be on their way), else a message naming how many are still waiting."""
    import time
    deadline = time.monotonic() + settle
    while True:
        waiting = fuse_waiting(mountpoint)
        if waiting is None or waiting == 0:
            return None
        if time.monotonic() > deadline:
            return f"{waiting} FUSE requests still unanswered after the workload (fusectl waiting)"
        time.sleep(0.05)
