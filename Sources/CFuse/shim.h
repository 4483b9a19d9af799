// libfuse3 low-level API (used by the FUSE front end).
#define FUSE_USE_VERSION 35
#include <fuse3/fuse_lowlevel.h>
