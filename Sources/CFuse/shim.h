// libfuse3 low-level API (used by the FUSE front end).
// No _GNU_SOURCE here: it would change how glibc declares fd_set and clash with
// SwiftGlibc's view of the same headers (see CURing/shim.h).
#include <sys/select.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <fcntl.h>
#include <sys/xattr.h>
#define FUSE_USE_VERSION 35
#include <fuse3/fuse_lowlevel.h>

// Constants Swift cannot see through macros or feature-test guards.
// O_DIRECT is declared only under _GNU_SOURCE; glibc's __O_DIRECT is always there.
static const int blobfs_fuse_O_DIRECT = __O_DIRECT;
static const int blobfs_XATTR_CREATE = XATTR_CREATE;
static const int blobfs_XATTR_REPLACE = XATTR_REPLACE;
