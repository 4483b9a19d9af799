// ISA-L: CRC32C (crc32_iscsi), as SPDK uses it.
#include <isa-l/crc.h>
