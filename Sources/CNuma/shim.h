// libnuma: node discovery, memory placement and CPU affinity for reactors.
#include <numa.h>
#include <numaif.h>
