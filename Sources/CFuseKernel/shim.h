// The kernel's FUSE protocol as the daemon speaks it on /dev/fuse and over io_uring.
//
// <linux/fuse.h> from Debian 12's linux-libc-dev is protocol 7.38; this kernel (6.18)
// speaks 7.45. What the front end uses from later minors is declared here, each with the
// minor that introduced it, as include/uapi/linux/fuse.h has it.
#include <stdint.h>
#include <linux/fuse.h>

// 7.39: mmap allowed on files opened with FOPEN_DIRECT_IO (flags2 bit 4).
#define BLOBFS_FUSE_DIRECT_IO_ALLOW_MMAP (1ULL << 36)
// 7.42: FUSE over io_uring (flags2 bit 9). The kernel offers it only when the fuse
// module's enable_uring parameter is set when the connection is made.
#define BLOBFS_FUSE_OVER_IO_URING (1ULL << 41)

static const uint64_t blobfs_FUSE_DIRECT_IO_ALLOW_MMAP = BLOBFS_FUSE_DIRECT_IO_ALLOW_MMAP;
static const uint64_t blobfs_FUSE_OVER_IO_URING = BLOBFS_FUSE_OVER_IO_URING;

// 7.42: the commands of IORING_OP_URING_CMD on the /dev/fuse fd (enum fuse_uring_cmd).
enum {
    BLOBFS_FUSE_IO_URING_CMD_REGISTER = 1,
    BLOBFS_FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2,
};

// 7.42: struct fuse_uring_ent_in_out. commit_id is the request's unique; payload_sz the
// bytes of the reply's payload (or of the request's, in the other direction).
struct blobfs_fuse_uring_ent_in_out {
    uint64_t flags;
    uint64_t commit_id;
    uint32_t payload_sz;
    uint32_t padding;
    uint64_t reserved;
};

// 7.42: struct fuse_uring_req_header, the first buffer of a ring entry. in_out holds the
// request's fuse_in_header, then the reply's fuse_out_header; op_in the request's
// fixed argument struct (in_args[0]); the rest of the request, and the reply's
// payload, are in the second buffer.
#define BLOBFS_FUSE_URING_IN_OUT_HEADER_SZ 128
#define BLOBFS_FUSE_URING_OP_IN_OUT_SZ 128
struct blobfs_fuse_uring_req_header {
    char in_out[BLOBFS_FUSE_URING_IN_OUT_HEADER_SZ];
    char op_in[BLOBFS_FUSE_URING_OP_IN_OUT_SZ];
    struct blobfs_fuse_uring_ent_in_out ring_ent_in_out;
};

// 7.42: struct fuse_uring_cmd_req, in the SQE's 80-byte command area (SQE128 rings).
struct blobfs_fuse_uring_cmd_req {
    uint64_t flags;
    uint64_t commit_id;
    uint16_t qid;
    uint8_t padding[6];
};

_Static_assert(sizeof(struct blobfs_fuse_uring_ent_in_out) == 32, "fuse_uring_ent_in_out");
_Static_assert(sizeof(struct blobfs_fuse_uring_req_header) == 288, "fuse_uring_req_header");
_Static_assert(sizeof(struct blobfs_fuse_uring_cmd_req) == 24, "fuse_uring_cmd_req");
_Static_assert(sizeof(struct fuse_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct fuse_out_header) == 16, "fuse_out_header");
_Static_assert(sizeof(struct fuse_init_out) == 64, "fuse_init_out");
_Static_assert(sizeof(struct fuse_entry_out) == 128, "fuse_entry_out");
_Static_assert(sizeof(struct fuse_attr_out) == 104, "fuse_attr_out");
_Static_assert(sizeof(struct fuse_write_in) == 40, "fuse_write_in");
_Static_assert(sizeof(struct fuse_read_in) == 40, "fuse_read_in");

// Constants Swift cannot see through feature-test guards: O_DIRECT is declared only
// under _GNU_SOURCE (glibc's __O_DIRECT always is); the xattr flags of setxattr(2).
#include <fcntl.h>
#include <sys/xattr.h>
static const int blobfs_fuse_kernel_O_DIRECT = __O_DIRECT;
static const int blobfs_kernel_XATTR_CREATE = XATTR_CREATE;
static const int blobfs_kernel_XATTR_REPLACE = XATTR_REPLACE;

// FITRIM (<linux/fs.h>, the ioctl fstrim(8) sends to the mount's root directory) and its
// argument, declared here rather than by including <linux/fs.h>, whose mount flags clash
// with glibc's. FUSE passes it through as a restricted ioctl: the kernel copies in and out
// the struct's 24 bytes, the size and direction encoded in the number.
#include <linux/ioctl.h>
struct blobfs_fstrim_range {
    uint64_t start;
    uint64_t len;
    uint64_t minlen;
};
#define BLOBFS_FITRIM _IOWR('X', 121, struct blobfs_fstrim_range)
_Static_assert(BLOBFS_FITRIM == 0xC0185879u, "FITRIM");
_Static_assert(sizeof(struct blobfs_fstrim_range) == 24, "fstrim_range");
_Static_assert(sizeof(struct fuse_ioctl_in) == 32, "fuse_ioctl_in");
_Static_assert(sizeof(struct fuse_ioctl_out) == 16, "fuse_ioctl_out");
static const uint32_t blobfs_FITRIM = BLOBFS_FITRIM;
