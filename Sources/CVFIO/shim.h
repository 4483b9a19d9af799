// VFIO's ioctl numbers are function-like macros (_IO(...)), which Swift cannot import;
// this header turns them into constants. Headers only.
#include <linux/vfio.h>
#include <sys/ioctl.h>

static const unsigned long blobfs_VFIO_GET_API_VERSION = VFIO_GET_API_VERSION;
static const unsigned long blobfs_VFIO_CHECK_EXTENSION = VFIO_CHECK_EXTENSION;
static const unsigned long blobfs_VFIO_SET_IOMMU = VFIO_SET_IOMMU;
static const unsigned long blobfs_VFIO_GROUP_GET_STATUS = VFIO_GROUP_GET_STATUS;
static const unsigned long blobfs_VFIO_GROUP_SET_CONTAINER = VFIO_GROUP_SET_CONTAINER;
static const unsigned long blobfs_VFIO_GROUP_GET_DEVICE_FD = VFIO_GROUP_GET_DEVICE_FD;
static const unsigned long blobfs_VFIO_DEVICE_GET_INFO = VFIO_DEVICE_GET_INFO;
static const unsigned long blobfs_VFIO_DEVICE_GET_REGION_INFO = VFIO_DEVICE_GET_REGION_INFO;
static const unsigned long blobfs_VFIO_DEVICE_RESET = VFIO_DEVICE_RESET;
static const unsigned long blobfs_VFIO_IOMMU_MAP_DMA = VFIO_IOMMU_MAP_DMA;
static const unsigned long blobfs_VFIO_IOMMU_UNMAP_DMA = VFIO_IOMMU_UNMAP_DMA;

// Device register access (MMIO): volatile loads and stores with the fences that order
// them against ordinary memory (queue entries written before a doorbell; completion
// entries read after their phase bit).
#include <stdint.h>
#include <stdatomic.h>
static inline uint32_t blobfs_mmio_read32(const void *address) {
    uint32_t value = *(const volatile uint32_t *)address;
    atomic_thread_fence(memory_order_acquire);
    return value;
}
static inline void blobfs_mmio_write32(void *address, uint32_t value) {
    atomic_thread_fence(memory_order_release);
    *(volatile uint32_t *)address = value;
}
static inline uint64_t blobfs_mmio_read64(const void *address) {
    uint64_t value = *(const volatile uint64_t *)address;
    atomic_thread_fence(memory_order_acquire);
    return value;
}
static inline void blobfs_mmio_write64(void *address, uint64_t value) {
    atomic_thread_fence(memory_order_release);
    *(volatile uint64_t *)address = value;
}
