// liburing: io_uring set-up, SQE preparation and CQE reaping.
// The prep/peek helpers are static inline in liburing.h; Swift imports them directly.
//
// liburing.h defines _XOPEN_SOURCE and _GNU_SOURCE before its system includes, which
// changes how glibc declares some types (fd_set's field is fds_bits instead of
// __fds_bits). Including those headers first, as Glibc's module sees them, keeps this
// module's declarations identical to SwiftGlibc's.
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <inttypes.h>
#include <time.h>
#include <fcntl.h>
#include <sched.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <liburing.h>

// Block-device ioctls are function-like macros, which Swift cannot import.
static const unsigned long blobfs_BLKGETSIZE64 = BLKGETSIZE64;
static const unsigned long blobfs_BLKSSZGET = BLKSSZGET;
// O_DIRECT is declared only under _GNU_SOURCE; glibc's __O_DIRECT is always there.
static const int blobfs_O_DIRECT = __O_DIRECT;
