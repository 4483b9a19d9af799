// libfuse3 low-level API (used by the FUSE front end).
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <sys/xattr.h>
#define FUSE_USE_VERSION 35
#include <fuse3/fuse_lowlevel.h>

// Constants Swift cannot see through macros or feature-test guards.
static const int blobfs_fuse_O_DIRECT = O_DIRECT;
static const int blobfs_XATTR_CREATE = XATTR_CREATE;
static const int blobfs_XATTR_REPLACE = XATTR_REPLACE;
