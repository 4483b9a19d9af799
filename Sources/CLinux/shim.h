// Linux interfaces that Swift's Glibc module does not import: epoll, eventfd,
// block-device ioctls. Headers only.
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/fs.h>
#include <fcntl.h>
