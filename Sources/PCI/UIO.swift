#if canImport(Glibc)
import Glibc
#endif
import Env
import Synchronization

/// A PCI function bound to uio_pci_generic: BAR0 mapped from sysfs' resource0, DMA by
/// physical address read from /proc/self/pagemap. Needs hugepage-backed DMA memory
/// (pinned, physically contiguous per 2 MiB); refuses ordinary pages, which the kernel
/// may move.
public final class UIOPCIDevice: PCIDevice, @unchecked Sendable {
    public let address: PCIAddress
    public let bar0: UnsafeMutableRawPointer
    public let bar0Length: Int
    private let translations = TranslationTable()
    private let pool: DMAPool
    private var observerID: Int?

    init(address: PCIAddress, pool: DMAPool) throws {
        self.address = address
        self.pool = pool
        let resource = open(address.sysfsPath + "/resource0", O_RDWR | O_CLOEXEC | O_SYNC)
        guard resource >= 0 else { throw PCIError("open \(address.sysfsPath)/resource0: errno \(errno)") }
        defer { Glibc.close(resource) }
        var info = stat()
        guard fstat(resource, &info) == 0, info.st_size > 0 else { throw PCIError("\(address): BAR0 size unknown") }
        guard let mapped = mmap(nil, Int(info.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, resource, 0),
              mapped != MAP_FAILED else {
            throw PCIError("mmap BAR0 of \(address): errno \(errno)")
        }
        bar0 = mapped
        bar0Length = Int(info.st_size)
        let config = open(address.sysfsPath + "/config", O_RDWR | O_CLOEXEC)
        guard config >= 0 else { throw PCIError("open \(address.sysfsPath)/config: errno \(errno)") }
        defer { Glibc.close(config) }
        try enableBusMastering(readConfig: { try preadAll(config, count: $1, offset: $0) },
                               writeConfig: { try pwriteAll(config, $1, offset: $0) })
        // Make the pool map a chunk now, so that its page kind is known.
        _ = try pool.allocate(bytes: 4096)
        guard pool.usesHugepages == true else {
            munmap(bar0, bar0Length)
            throw PCIError("uio_pci_generic needs hugepages for DMA: reserve some (echo 64 > /proc/sys/vm/nr_hugepages)")
        }
        let bar = bar0
        let barLength = bar0Length
        do {
            observerID = try pool.observeChunks { [translations] chunk in
                let pageBytes = DMAPool.chunkBytes
                var offset = 0
                while offset < chunk.bytes {
                    let virtual = UInt(bitPattern: chunk.base) + UInt(offset)
                    let physical = try Self.physicalAddress(of: virtual)
                    translations.add(virtual: virtual, bus: physical, bytes: pageBytes)
                    offset += pageBytes
                }
            }
        } catch {
            munmap(bar, barLength)
            throw error
        }
    }

    /// Physical address of a resident page through /proc/self/pagemap (root only).
    static func physicalAddress(of virtual: UInt) throws -> UInt64 {
        let pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        guard pagemap >= 0 else { throw PCIError("open /proc/self/pagemap: errno \(errno)") }
        defer { Glibc.close(pagemap) }
        let pageSize = UInt(sysconf(Int32(_SC_PAGESIZE)))
        var entry: UInt64 = 0
        let read = pread(pagemap, &entry, 8, off_t(virtual / pageSize * 8))
        guard read == 8, entry & (1 << 63) != 0 else { throw PCIError("page at \(virtual) not present in pagemap") }
        let frame = entry & ((1 << 55) - 1)
        guard frame != 0 else { throw PCIError("pagemap hides frame numbers (need CAP_SYS_ADMIN)") }
        return frame * UInt64(pageSize) + UInt64(virtual % pageSize)
    }

    public func busAddress(of pointer: UnsafeRawPointer) -> UInt64? {
        translations.lookup(UInt(bitPattern: pointer))
    }

    public func close() {
        if let observerID { pool.stopObserving(observerID) }
        munmap(bar0, bar0Length)
    }
}
