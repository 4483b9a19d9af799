#if canImport(Glibc)
import Glibc
#endif
import CVFIO
import Env
import Synchronization

/// A PCI function bound to vfio-pci: BAR0 mapped through the device fd, DMA memory
/// mapped into the IOMMU (type1) with IOVA = virtual address.
public final class VFIOPCIDevice: PCIDevice, @unchecked Sendable {
    public let address: PCIAddress
    public let bar0: UnsafeMutableRawPointer
    public let bar0Length: Int
    private let container: Int32
    private let group: Int32
    private let device: Int32
    private let pool: DMAPool
    private var observerID: Int?
    /// DMA chunks mapped into the IOMMU: IOVAs are handed out from a bump allocator low
    /// in the address space (an emulated IOMMU may offer only 39 bits; user virtual
    /// addresses do not fit).
    private let mappings = TranslationTable()

    init(address: PCIAddress, pool: DMAPool) throws {
        self.address = address
        self.pool = pool
        var opened: [Int32] = []
        var mappedBar: UnsafeMutableRawPointer?
        var mappedLength = 0
        var ready = false
        defer {
            if !ready {
                if let mappedBar { munmap(mappedBar, mappedLength) }
                opened.reversed().forEach { _ = Glibc.close($0) }
            }
        }
        container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC)
        if container >= 0 { opened.append(container) }
        guard container >= 0 else { throw PCIError("open /dev/vfio/vfio: errno \(errno) (is the vfio module loaded?)") }
        guard ioctl(container, blobfs_VFIO_GET_API_VERSION) == VFIO_API_VERSION else {
            throw PCIError("VFIO API version mismatch")
        }
        let iommuType: Int32 = ioctl(container, blobfs_VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) == 1
            ? VFIO_TYPE1v2_IOMMU : VFIO_TYPE1_IOMMU
        guard ioctl(container, blobfs_VFIO_CHECK_EXTENSION, iommuType) == 1 else {
            throw PCIError("VFIO: no type1 IOMMU support")
        }
        var link = [CChar](repeating: 0, count: 4096)
        let length = readlink(address.sysfsPath + "/iommu_group", &link, link.count - 1)
        guard length > 0 else { throw PCIError("\(address): no IOMMU group (is the IOMMU on?)") }
        let groupNumber = String(decoding: link[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            .split(separator: "/").last!
        group = open("/dev/vfio/\(groupNumber)", O_RDWR | O_CLOEXEC)
        if group >= 0 { opened.append(group) }
        guard group >= 0 else { throw PCIError("open /dev/vfio/\(groupNumber): errno \(errno)") }
        var status = vfio_group_status()
        status.argsz = UInt32(MemoryLayout<vfio_group_status>.size)
        guard ioctl(group, blobfs_VFIO_GROUP_GET_STATUS, &status) == 0,
              status.flags & UInt32(VFIO_GROUP_FLAGS_VIABLE) != 0 else {
            throw PCIError("VFIO group \(groupNumber) not viable: bind every device of the group to vfio-pci")
        }
        var containerFD = container
        guard ioctl(group, blobfs_VFIO_GROUP_SET_CONTAINER, &containerFD) == 0 else {
            throw PCIError("VFIO_GROUP_SET_CONTAINER: errno \(errno)")
        }
        guard ioctl(container, blobfs_VFIO_SET_IOMMU, iommuType) == 0 else {
            throw PCIError("VFIO_SET_IOMMU: errno \(errno)")
        }
        let groupFD = group
        device = address.text.withCString { ioctl(groupFD, blobfs_VFIO_GROUP_GET_DEVICE_FD, UnsafeMutableRawPointer(mutating: $0)) }
        guard device >= 0 else { throw PCIError("VFIO_GROUP_GET_DEVICE_FD \(address): errno \(errno)") }
        opened.append(device)

        let barInfo = try Self.regionInfo(device, index: UInt32(VFIO_PCI_BAR0_REGION_INDEX))
        guard barInfo.size > 0 else { throw PCIError("\(address): BAR0 is empty") }
        guard let mapped = mmap(nil, Int(barInfo.size), PROT_READ | PROT_WRITE, MAP_SHARED, device,
                                off_t(barInfo.offset)), mapped != MAP_FAILED else {
            throw PCIError("mmap BAR0 of \(address): errno \(errno)")
        }
        bar0 = mapped
        bar0Length = Int(barInfo.size)
        mappedLength = bar0Length
        mappedBar = bar0
        let config = try Self.regionInfo(device, index: UInt32(VFIO_PCI_CONFIG_REGION_INDEX))
        let deviceFD = device
        try enableBusMastering(
            readConfig: { try preadAll(deviceFD, count: $1, offset: Int(config.offset) + $0) },
            writeConfig: { try pwriteAll(deviceFD, $1, offset: Int(config.offset) + $0) })
        let containerForMaps = container
        let table = mappings
        observerID = try pool.observeChunks { chunk in
            var map = vfio_iommu_type1_dma_map()
            map.argsz = UInt32(MemoryLayout<vfio_iommu_type1_dma_map>.size)
            map.flags = UInt32(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE)
            map.vaddr = UInt64(UInt(bitPattern: chunk.base))
            map.iova = table.reserve(bytes: chunk.bytes)
            map.size = UInt64(chunk.bytes)
            guard ioctl(containerForMaps, blobfs_VFIO_IOMMU_MAP_DMA, &map) == 0 else {
                throw PCIError("VFIO_IOMMU_MAP_DMA of \(chunk.bytes) bytes at IOVA 0x\(String(map.iova, radix: 16)): errno \(errno)")
            }
            table.add(virtual: UInt(bitPattern: chunk.base), bus: map.iova, bytes: chunk.bytes)
        }
        ready = true
    }

    private static func regionInfo(_ device: Int32, index: UInt32) throws -> vfio_region_info {
        var info = vfio_region_info()
        info.argsz = UInt32(MemoryLayout<vfio_region_info>.size)
        info.index = index
        guard ioctl(device, blobfs_VFIO_DEVICE_GET_REGION_INFO, &info) == 0 else {
            throw PCIError("VFIO_DEVICE_GET_REGION_INFO(\(index)): errno \(errno)")
        }
        return info
    }

    public func busAddress(of pointer: UnsafeRawPointer) -> UInt64? {
        mappings.lookup(UInt(bitPattern: pointer))
    }

    public func close() {
        if let observerID { pool.stopObserving(observerID) }
        munmap(bar0, bar0Length)
        Glibc.close(device)
        Glibc.close(group)
        Glibc.close(container)
    }
}
