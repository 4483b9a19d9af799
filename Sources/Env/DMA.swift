#if canImport(Glibc)
import Glibc
#endif
import CNuma
import Logging
import Synchronization

// DMA memory: buffers a device may read or write directly.
//
// Ownership rules, enforced by the types:
// - `DMABuffer` is non-copyable: exactly one owner, freed exactly once (in deinit),
//   so a double free cannot be written.
// - I/O refers to buffer memory through `DMASegment`, which carries the buffer's
//   generation. Submitting a segment of a freed buffer, or freeing a buffer while an
//   I/O holds a pin on it, stops the process with a message (programmer error), so a
//   use-after-free through the safe API cannot go unnoticed.
// - Raw pointers appear only inside `withUnsafe*` closures and in the bdev module API.

/// Bookkeeping of one pool slot, kept apart from the data in memory that is never
/// freed, so that a stale segment can always be checked against it.
package struct DMABufferHeader {
    package var generation: UInt32 = 0
    package var pins: UInt32 = 0
}

/// A pool of DMA-able memory: 2 MiB hugepage chunks when the system has them reserved,
/// ordinary page-aligned memory otherwise; placed on a NUMA node when asked and the
/// machine has more than one.
public final class DMAPool: @unchecked Sendable {
    public static let chunkBytes = 2 << 20
    public static let minimumBufferBytes = 4096
    static let sizeClassCount = 10  // 4 KiB ... 2 MiB

    /// The process-wide pool (local NUMA placement by first touch).
    public static let shared = DMAPool(numaNode: nil)

    public let numaNode: Int?
    private let state = Mutex(State())
    private static let logger = Log.logger("env.dma")

    private struct Slot: @unchecked Sendable {
        var base: UnsafeMutableRawPointer
        var header: UnsafeMutablePointer<DMABufferHeader>
    }

    private struct State {
        var freeSlots: [[Slot]] = Array(repeating: [], count: DMAPool.sizeClassCount)
        var hugepagesAvailable: Bool? = nil
        var bytesMapped = 0
        var chunks: [DMAChunk] = []
        var observers: [(id: Int, observe: ChunkObserver)] = []
        var nextObserverID = 0
    }

    /// A mapped range of the pool; devices that translate addresses (VFIO, UIO) learn of
    /// every chunk through `observeChunks`.
    public struct DMAChunk: @unchecked Sendable {
        public let base: UnsafeMutableRawPointer
        public let bytes: Int
    }

    /// Called once per chunk, for existing chunks at registration and for new ones as
    /// they are mapped; a thrown error fails the allocation that needed the chunk.
    public typealias ChunkObserver = @Sendable (DMAChunk) throws -> Void

    public init(numaNode: Int?) {
        self.numaNode = numaNode
    }

    /// Whether memory comes from hugepages (nil until the first chunk is mapped).
    public var usesHugepages: Bool? { state.withLock { $0.hugepagesAvailable } }
    public var bytesMapped: Int { state.withLock { $0.bytesMapped } }

    /// Registers `observer`; returns a token for `stopObserving`. If the observer fails
    /// on an existing chunk it is not kept.
    @discardableResult
    public func observeChunks(_ observer: @escaping ChunkObserver) throws -> Int {
        let (id, existing) = state.withLock { state -> (Int, [DMAChunk]) in
            state.nextObserverID += 1
            state.observers.append((state.nextObserverID, observer))
            return (state.nextObserverID, state.chunks)
        }
        do {
            for chunk in existing { try observer(chunk) }
        } catch {
            stopObserving(id)
            throw error
        }
        return id
    }

    public func stopObserving(_ id: Int) {
        state.withLock { $0.observers.removeAll { $0.id == id } }
    }

    /// A buffer of at least `bytes` bytes, aligned to 4 KiB (to its size class up to 2 MiB).
    public func allocate(bytes: Int) throws(SystemError) -> DMABuffer {
        precondition(bytes > 0, "DMA buffer of \(bytes) bytes")
        if bytes > Self.chunkBytes {
            let mapped = (bytes + Self.chunkBytes - 1) / Self.chunkBytes * Self.chunkBytes
            let base = try mapChunk(bytes: mapped)
            let header = UnsafeMutablePointer<DMABufferHeader>.allocate(capacity: 1)
            header.initialize(to: DMABufferHeader())
            return DMABuffer(base: base, count: bytes, header: header, pool: self, sizeClass: -mapped)
        }
        let sizeClass = Self.sizeClass(for: bytes)
        let slot = try takeSlot(sizeClass: sizeClass)
        return DMABuffer(base: slot.base, count: bytes, header: slot.header, pool: self, sizeClass: sizeClass)
    }

    static func sizeClass(for bytes: Int) -> Int {
        var size = minimumBufferBytes
        var index = 0
        while size < bytes { size <<= 1; index += 1 }
        return index
    }

    private func takeSlot(sizeClass: Int) throws(SystemError) -> Slot {
        if let slot = state.withLock({ $0.freeSlots[sizeClass].popLast() }) { return slot }
        let chunk = try mapChunk(bytes: Self.chunkBytes)
        let slotBytes = Self.minimumBufferBytes << sizeClass
        let count = Self.chunkBytes / slotBytes
        let headers = UnsafeMutablePointer<DMABufferHeader>.allocate(capacity: count)
        headers.initialize(repeating: DMABufferHeader(), count: count)
        var slots: [Slot] = []
        slots.reserveCapacity(count)
        for index in 0..<count {
            slots.append(Slot(base: chunk + index * slotBytes, header: headers + index))
        }
        let first = slots.removeLast()
        state.withLock { $0.freeSlots[sizeClass].append(contentsOf: slots) }
        return first
    }

    fileprivate func release(base: UnsafeMutableRawPointer, header: UnsafeMutablePointer<DMABufferHeader>,
                             sizeClass: Int) {
        precondition(header.pointee.pins == 0, "DMA buffer freed while \(header.pointee.pins) I/O still use it")
        header.pointee.generation &+= 1
        if sizeClass < 0 {
            munmap(base, -sizeClass)
            state.withLock { state in
                state.bytesMapped += sizeClass
                state.chunks.removeAll { $0.base == base }
            }
            return  // the header stays allocated: stale segments may still check it
        }
        state.withLock { $0.freeSlots[sizeClass].append(Slot(base: base, header: header)) }
    }

    private func mapChunk(bytes: Int) throws(SystemError) -> UnsafeMutableRawPointer {
        let tryHuge = state.withLock { $0.hugepagesAvailable } != false
        var memory: UnsafeMutableRawPointer? = nil
        if tryHuge {
            let result = mmap(nil, bytes, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_POPULATE, -1, 0)
            if result != MAP_FAILED, let result {
                memory = result
                state.withLock { $0.hugepagesAvailable = true }
            } else {
                let first = state.withLock { state -> Bool in
                    defer { state.hugepagesAvailable = false }
                    return state.hugepagesAvailable == nil
                }
                if first {
                    Self.logger.debug(
                        "DMA pool: no 2 MiB hugepages reserved (/proc/sys/vm/nr_hugepages); using 4 KiB pages")
                }
            }
        }
        if memory == nil {
            // Not populated: a page is faulted in on first use (the kernel's copy into a
            // FUSE ring entry, an O_DIRECT read, a store), so 128 MiB of FUSE ring payload
            // buffers that serve 4 KiB requests cost the pages they touch. VFIO pins what it
            // maps (its map call faults the chunk in); uio needs hugepages.
            let result = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            guard result != MAP_FAILED, let result else { throw SystemError("mmap(\(bytes) bytes of DMA memory)") }
            memory = result
        }
        let base = memory!
        if let numaNode, NUMA.nodeCount > 1 {
            numa_tonode_memory(base, bytes, Int32(numaNode))
        }
        let chunk = DMAChunk(base: base, bytes: bytes)
        let observers = state.withLock { state -> [ChunkObserver] in
            state.bytesMapped += bytes
            state.chunks.append(chunk)
            return state.observers.map(\.observe)
        }
        do {
            for observer in observers { try observer(chunk) }
        } catch {
            throw SystemError("map DMA chunk for a device: \(error)", errno: EIO)
        }
        return base
    }
}

/// One owned DMA buffer. Non-copyable: it is freed exactly once, when its owner drops it.
public struct DMABuffer: ~Copyable {
    @usableFromInline let base: UnsafeMutableRawPointer
    /// Usable length in bytes.
    public let count: Int
    let header: UnsafeMutablePointer<DMABufferHeader>
    let pool: DMAPool
    let sizeClass: Int

    fileprivate init(base: UnsafeMutableRawPointer, count: Int, header: UnsafeMutablePointer<DMABufferHeader>,
                     pool: DMAPool, sizeClass: Int) {
        self.base = base
        self.count = count
        self.header = header
        self.pool = pool
        self.sizeClass = sizeClass
    }

    /// A buffer from the shared pool.
    public static func allocate(bytes: Int) throws(SystemError) -> DMABuffer {
        try DMAPool.shared.allocate(bytes: bytes)
    }

    deinit {
        pool.release(base: base, header: header, sizeClass: sizeClass)
    }

    @inlinable
    public func withUnsafeMutableBytes<R, E: Error>(
        _ body: (UnsafeMutableRawBufferPointer) throws(E) -> R
    ) throws(E) -> R {
        try body(UnsafeMutableRawBufferPointer(start: base, count: count))
    }

    @inlinable
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: base, count: count))
    }

    /// A view of `count` bytes at `offset`, for submitting I/O.
    public func segment(offset: Int = 0, count: Int? = nil) -> DMASegment {
        let length = count ?? (self.count - offset)
        precondition(offset >= 0 && length >= 0 && offset + length <= self.count,
                     "segment \(offset)+\(length) outside a \(self.count)-byte DMA buffer")
        return DMASegment(base: base + offset, count: length, header: header, generation: header.pointee.generation)
    }

    public func fill(_ byte: UInt8) {
        memset(base, Int32(byte), count)
    }

    public func store(_ bytes: some Collection<UInt8>, at offset: Int = 0) {
        precondition(offset >= 0 && offset + bytes.count <= count,
                     "\(bytes.count) bytes at \(offset) outside a \(count)-byte DMA buffer")
        let copied = bytes.withContiguousStorageIfAvailable { source in
            (base + offset).copyMemory(from: source.baseAddress!, byteCount: source.count)
        }
        if copied == nil {
            var index = offset
            for byte in bytes {
                base.storeBytes(of: byte, toByteOffset: index, as: UInt8.self)
                index += 1
            }
        }
    }

    public func bytes(at offset: Int = 0, count length: Int? = nil) -> [UInt8] {
        let length = length ?? (count - offset)
        precondition(offset >= 0 && length >= 0 && offset + length <= count)
        return Array(UnsafeRawBufferPointer(start: base + offset, count: length))
    }
}

/// A byte range of DMA memory named by an I/O request. Copyable and cheap; checked
/// against its buffer's generation when an I/O takes it.
public struct DMASegment {
    public let base: UnsafeMutableRawPointer
    public let count: Int
    let header: UnsafeMutablePointer<DMABufferHeader>?
    let generation: UInt32

    fileprivate init(base: UnsafeMutableRawPointer, count: Int, header: UnsafeMutablePointer<DMABufferHeader>?,
                     generation: UInt32) {
        self.base = base
        self.count = count
        self.header = header
        self.generation = generation
    }

    /// `count` bytes of this segment from `offset`: the same buffer, checked the same way.
    public func slice(from offset: Int, count length: Int) -> DMASegment {
        precondition(offset >= 0 && length >= 0 && offset + length <= count,
                     "slice \(offset)+\(length) outside a \(count)-byte segment")
        return DMASegment(base: base + offset, count: length, header: header, generation: generation)
    }

    /// This segment and `next` as one, when `next` continues it in the same buffer (a
    /// request walked cluster by cluster over contiguous memory stays one iovec); nil
    /// otherwise.
    public func joined(with next: DMASegment) -> DMASegment? {
        guard header == next.header, generation == next.generation, base + count == next.base else { return nil }
        return DMASegment(base: base, count: count + next.count, header: header, generation: generation)
    }

    /// Memory that the caller owns and keeps alive until the I/O completes (e.g. a FUSE
    /// request buffer). Not checked: the caller answers for its lifetime.
    public init(unsafeExternal bytes: UnsafeMutableRawBufferPointer) {
        self.init(base: bytes.baseAddress!, count: bytes.count, header: nil, generation: 0)
    }

    /// Marks the buffer as used by an I/O; stops the process if the buffer was freed.
    @inline(__always)
    package func pin() {
        guard let header else { return }
        precondition(header.pointee.generation == generation, "I/O submitted on a freed DMA buffer")
        header.pointee.pins += 1
    }

    @inline(__always)
    package func unpin() {
        guard let header else { return }
        header.pointee.pins -= 1
    }
}
