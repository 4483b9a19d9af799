// Linux interfaces that Swift's Glibc module does not import: epoll, eventfd,
// block-device ioctls. Headers only.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/fs.h>
#include <fcntl.h>
#include <sys/prctl.h>

// prctl is variadic, which Swift cannot call: names the calling thread (15 bytes).
static inline int clinux_set_thread_name(const char *name) {
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0);
}
