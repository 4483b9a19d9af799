// liburing: io_uring set-up, SQE preparation and CQE reaping.
// The prep/peek helpers are static inline in liburing.h; Swift imports them directly.
#include <liburing.h>
#include <linux/falloc.h>
