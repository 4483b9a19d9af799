#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env
import Synchronization

/// A RAM block device. Memory is reserved lazily (untouched blocks cost nothing and
/// read as zeros), so `malloc:1G` is cheap until written.
public final class MallocBdev: BdevBackend, @unchecked Sendable {
    public let name: String
    private let blockSizeBytes: Int
    private let blockCount: Atomic<UInt64>
    /// Blocks reserved: the device may grow up to them (`grow`, for tests of online grow).
    public let reservedBlockCount: UInt64
    private let memory: UnsafeMutableRawPointer
    private let bytes: Int

    public var geometry: BdevGeometry {
        BdevGeometry(blockSizeBytes: blockSizeBytes, blockCount: blockCount.load(ordering: .acquiring), isPersistent: false)
    }

    public init(name: String = "malloc", blockCount: UInt64, blockSizeBytes: Int = 4096,
                reservedBlockCount: UInt64? = nil) throws(BdevError) {
        guard BdevGeometry.supportedBlockSizes.contains(blockSizeBytes) else {
            throw .invalidConfiguration("malloc bdev: block size \(blockSizeBytes) (512 or 4096)")
        }
        guard blockCount > 0 else { throw .invalidConfiguration("malloc bdev: zero blocks") }
        let reserved = max(blockCount, reservedBlockCount ?? blockCount)
        let (bytes, overflow) = reserved.multipliedReportingOverflow(by: UInt64(blockSizeBytes))
        guard !overflow, bytes <= UInt64(Int.max) else { throw .invalidConfiguration("malloc bdev: size overflows") }
        let memory = mmap(nil, Int(bytes), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let memory, memory != MAP_FAILED else {
            throw .system(SystemError("mmap(\(bytes) bytes for malloc bdev)"))
        }
        self.name = name
        self.bytes = Int(bytes)
        self.memory = memory
        self.blockSizeBytes = blockSizeBytes
        self.blockCount = Atomic(blockCount)
        self.reservedBlockCount = reserved
    }

    /// Grows the device to `blockCount` blocks (within the reservation); the new blocks read as zeros.
    public func grow(to blockCount: UInt64) {
        precondition(blockCount >= self.blockCount.load(ordering: .acquiring) && blockCount <= reservedBlockCount,
                     "malloc bdev grown to \(blockCount) blocks (reserved \(reservedBlockCount))")
        self.blockCount.store(blockCount, ordering: .releasing)
    }

    deinit { munmap(memory, bytes) }

    public func makeChannel(reactor: Reactor) throws(BdevError) -> any BdevBackendChannel {
        MallocChannel(memory: memory, blockSizeBytes: geometry.blockSizeBytes)
    }

    public func close() {}
}

/// Serves each request by memcpy at submission; the generic layer delivers the
/// completion on the next poll.
final class MallocChannel: BdevBackendChannel {
    private let memory: UnsafeMutableRawPointer
    private let blockSizeBytes: Int

    init(memory: UnsafeMutableRawPointer, blockSizeBytes: Int) {
        self.memory = memory
        self.blockSizeBytes = blockSizeBytes
    }

    func submit(_ io: BdevIO) {
        let start = memory + Int(io.offsetBlocks) * blockSizeBytes
        switch io.type {
        case .read: io.scatter(from: start)
        case .write: io.gather(into: start)
        case .flush: break
        case .writeZeroes: memset(start, 0, Int(io.countBlocks) * blockSizeBytes)
        case .unmap: Self.release(start, Int(io.countBlocks) * blockSizeBytes)
        }
        io.complete(.success)
    }

    /// Unmapped blocks give their memory back: the whole pages inside the range are
    /// dropped (a private anonymous mapping reads them back as zeros), the edges zeroed.
    private static func release(_ start: UnsafeMutableRawPointer, _ count: Int) {
        let pageBytes = 4096
        let first = (Int(bitPattern: start) + pageBytes - 1) & ~(pageBytes - 1)
        let end = (Int(bitPattern: start) + count) & ~(pageBytes - 1)
        guard end > first, madvise(UnsafeMutableRawPointer(bitPattern: first), end - first, MADV_DONTNEED) == 0 else {
            memset(start, 0, count)
            return
        }
        memset(start, 0, first - Int(bitPattern: start))
        memset(UnsafeMutableRawPointer(bitPattern: end)!, 0, Int(bitPattern: start) + count - end)
    }

    func poll() -> PollStatus { .idle }
    func close() {}
}
