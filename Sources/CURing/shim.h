// liburing: io_uring set-up, SQE preparation and CQE reaping.
// The prep/peek helpers are static inline in liburing.h; Swift imports them directly.
#include <liburing.h>
#include <linux/falloc.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <linux/fs.h>

// Block-device ioctls are function-like macros, which Swift cannot import.
static const unsigned long blobfs_BLKGETSIZE64 = BLKGETSIZE64;
static const unsigned long blobfs_BLKSSZGET = BLKSSZGET;
