#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env
import Synchronization

/// Clusters a blob released while open handles could still reach them through their
/// old extent map: the store keeps them out of allocation until every such handle has
/// taken the new map and finished the I/O it submitted under the old one. Each handle
/// acknowledges once, from its owner's thread; the store reads the count from its own.
final class ReleaseTicket: Sendable {
    private let pending: Atomic<Int>
    init(handles: Int) { pending = Atomic(handles) }
    func acknowledge() { pending.subtract(1, ordering: .releasing) }
    var isSettled: Bool { pending.load(ordering: .acquiring) <= 0 }
}

/// An open blob as the data path sees it: its extent map, kept current by the store
/// while the handle is open. A handle belongs to one reactor (its `owner`; nil: the
/// store's own thread) and is only read and updated there: changes made on the
/// metadata thread reach it as a message.
///
/// Clusters released by a shrink, unmap or delete stay unallocatable until each handle
/// of the blob has applied the change and its I/O submitted under the old map has
/// completed (`ReleaseTicket`): a late write never lands in a cluster that has a new
/// owner, a late read never returns its bytes. Close a handle only after its I/O
/// completed (channels keep an unretained reference while a request is in flight).
public final class BlobHandle: @unchecked Sendable {
    public let id: BlobID
    public let owner: Reactor?
    public internal(set) var clusterCount: UInt64
    /// Sorted by cluster index.
    var extents: ContiguousArray<Extent>
    /// What a clone reads from its ancestors (sorted; empty for a blob without a parent;
    /// looked up after the blob's own extents, which it may overlap). Reads only: a write
    /// there goes to the store, which copies. The store's cached view, shared, not copied.
    var shared: ContiguousArray<Extent>
    /// A snapshot: writes are refused.
    public internal(set) var isSnapshot: Bool
    /// Owner thread only: which map a request was submitted under, and how many requests
    /// of the current map and of earlier maps are in flight.
    private(set) var generation: UInt32 = 0
    private var inFlight = 0
    private var olderInFlight = 0
    /// Releases waiting for the earlier maps' requests to complete.
    private var waiting: [ReleaseTicket] = []

    init(_ blob: BlobMetadata, shared: ContiguousArray<Extent>, owner: Reactor?) {
        id = blob.id
        self.owner = owner
        clusterCount = blob.clusterCount
        extents = ContiguousArray(blob.extents)
        self.shared = shared
        isSnapshot = blob.isSnapshot
    }

    func refresh(_ blob: BlobMetadata, shared: ContiguousArray<Extent>, releasing ticket: ReleaseTicket?) {
        clusterCount = blob.clusterCount
        extents = ContiguousArray(blob.extents)
        self.shared = shared
        isSnapshot = blob.isSnapshot
        olderInFlight += inFlight
        inFlight = 0
        generation &+= 1
        guard let ticket else { return }
        if olderInFlight == 0 { ticket.acknowledge() } else { waiting.append(ticket) }
    }

    /// Applies a new snapshot on the owner's thread; `ticket` when clusters were released.
    func update(_ blob: BlobMetadata, shared: ContiguousArray<Extent>, releasing ticket: ReleaseTicket?) {
        guard let owner, !owner.isCurrent else { return refresh(blob, shared: shared, releasing: ticket) }
        owner.send { [self] in self.refresh(blob, shared: shared, releasing: ticket) }
    }

    /// Requests through this handle not completed yet (owner thread only): close the
    /// handle only when this is 0.
    public var ioInFlight: Int { inFlight + olderInFlight }

    /// A request reaching the device under the current map.
    @inline(__always)
    func began() -> UInt32 {
        inFlight += 1
        return generation
    }

    /// The request begun under map `generation` completed.
    @inline(__always)
    func ended(_ generation: UInt32) {
        if generation == self.generation {
            inFlight -= 1
            return
        }
        olderInFlight -= 1
        if olderInFlight == 0 && !waiting.isEmpty {
            for ticket in waiting { ticket.acknowledge() }
            waiting.removeAll(keepingCapacity: true)
        }
    }

    /// Device cluster of blob cluster `index`, if the blob maps it (binary search).
    @inline(__always)
    func physicalCluster(_ index: UInt64) -> UInt64? {
        Self.lookup(extents, index)
    }

    /// Device cluster blob cluster `index` reads from: its own, else an ancestor's.
    @inline(__always)
    func readCluster(_ index: UInt64) -> UInt64? {
        if let own = Self.lookup(extents, index) { return own }
        return shared.isEmpty ? nil : Self.lookup(shared, index)
    }

    @inline(__always)
    private static func lookup(_ extents: ContiguousArray<Extent>, _ index: UInt64) -> UInt64? {
        var low = 0
        var high = extents.count
        while low < high {
            let middle = (low + high) / 2
            let extent = extents[middle]
            if index < extent.clusterIndex {
                high = middle
            } else if index >= extent.clusterIndex + UInt64(extent.count) {
                low = middle + 1
            } else {
                return extent.firstCluster + (index - extent.clusterIndex)
            }
        }
        return nil
    }
}

extension BlobStore {
    /// Opens a blob for the data path of `owner` (nil: this thread); the handle follows
    /// the blob's metadata changes. Call on the store's thread.
    public func openBlob(_ id: BlobID, owner: Reactor? = nil) throws(BlobStoreError) -> BlobHandle {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        let handle = BlobHandle(blob, shared: ancestorView(blob), owner: owner)
        openHandles[id, default: []].append(handle)
        return handle
    }

    public func closeBlob(_ handle: BlobHandle) {
        openHandles[handle.id]?.removeAll { $0 === handle }
        if openHandles[handle.id]?.isEmpty == true { openHandles[handle.id] = nil }
    }

    /// The device the store lives on (for data channels on other reactors).
    public var bdevChannelDevice: Bdev { io.channel.bdev }

    /// A data channel over `bdevChannel` (same device) for use on this store's thread;
    /// writes to unallocated clusters are refused. `BlobStoreService.makeChannel` gives
    /// channels for other reactors, whose allocating writes go to the metadata reactor.
    public func makeChannel(_ bdevChannel: BdevChannel, queueDepth: Int = BdevLimits.queueDepthDefault) -> BlobChannel {
        BlobChannel(bdevChannel: bdevChannel, dataStartBytes: superBlock.dataStartPage * UInt64(Self.pageBytes),
                    clusterBytes: UInt64(clusterSizeBytes), queueDepth: queueDepth, service: nil)
    }
}

/// Reads and writes of allocated blob data from one reactor, asynchronously, without
/// allocating: a blob request becomes one device request per run of physically
/// contiguous clusters, and completes (exactly once, from the channel's poller or the
/// device's) when they all have. Unallocated clusters read as zeros. A write that needs
/// clusters allocated goes, with a copy of its data, to the metadata reactor
/// (`BlobStoreService`), which allocates, writes, flushes and commits, updates the open
/// handles and answers by message; without a service it is refused with `.unallocated`.
public final class BlobChannel: BdevCompletionHandler {
    private final class Request {
        unowned(unsafe) var handler: (any BdevCompletionHandler)?
        var tag: UInt64 = 0
        /// The blob whose map placed the request's device I/O (nil: none, or forwarded).
        unowned(unsafe) var blob: BlobHandle?
        var generation: UInt32 = 0
        var remaining = 0
        var status: BdevStatus = .success
        var nextReady = -1
    }

    public let bdevChannel: BdevChannel
    private let service: BlobStoreService?
    private let dataStartBytes: UInt64
    private let clusterBytes: UInt64
    private let unitBytes: UInt64
    private var requests: ContiguousArray<Request> = []
    private var free: ContiguousArray<Int> = []
    private var readyHead = -1
    private var readyTail = -1
    private var pollerID: PollerID?
    /// Segments of one device request, built per run (copied by the bdev layer at submission).
    private let scratch = UnsafeMutablePointer<DMASegment>.allocate(capacity: BdevLimits.segmentCountMax)

    init(bdevChannel: BdevChannel, dataStartBytes: UInt64, clusterBytes: UInt64, queueDepth: Int,
         service: BlobStoreService?) {
        self.bdevChannel = bdevChannel
        self.service = service
        self.dataStartBytes = dataStartBytes
        self.clusterBytes = clusterBytes
        unitBytes = UInt64(bdevChannel.bdev.geometry.blockSizeBytes)
        for index in 0..<queueDepth {
            requests.append(Request())
            free.append(queueDepth - 1 - index)
        }
        pollerID = bdevChannel.reactor.registerPoller { [unowned self] in self.deliverReady() }
    }

    public func close() {
        if let pollerID { bdevChannel.reactor.unregisterPoller(pollerID) }
        pollerID = nil
    }

    deinit {
        if pollerID != nil { close() }
        scratch.deallocate()
    }

    public var inFlight: Int { requests.count - free.count }

    public func read(_ blob: BlobHandle, offsetUnits: UInt64, countUnits: UInt64, into buffer: borrowing DMABuffer,
                     bufferOffset: Int = 0, handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BlobStoreError) {
        let bytes = Int(countUnits * unitBytes)
        guard bufferOffset >= 0, bufferOffset + bytes <= buffer.count else {
            throw .invalidArgument("buffer of \(buffer.count) bytes too small")
        }
        try submit(isRead: true, blob, offsetUnits, countUnits, CollectionOfOne(buffer.segment(offset: bufferOffset, count: bytes)),
                   handler, tag)
    }

    public func write(_ blob: BlobHandle, offsetUnits: UInt64, countUnits: UInt64, from buffer: borrowing DMABuffer,
                      bufferOffset: Int = 0, handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BlobStoreError) {
        let bytes = Int(countUnits * unitBytes)
        guard bufferOffset >= 0, bufferOffset + bytes <= buffer.count else {
            throw .invalidArgument("buffer of \(buffer.count) bytes too small")
        }
        try submit(isRead: false, blob, offsetUnits, countUnits, CollectionOfOne(buffer.segment(offset: bufferOffset, count: bytes)),
                   handler, tag)
    }

    /// A read into one segment of DMA memory (the FUSE front end's request buffers). Not
    /// generic, so callers in other modules get the specialized path (an unspecialized
    /// collection's accessors allocate).
    public func read(_ blob: BlobHandle, offsetUnits: UInt64, countUnits: UInt64, into segment: DMASegment,
                     handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BlobStoreError) {
        try submit(isRead: true, blob, offsetUnits, countUnits, CollectionOfOne(segment), handler, tag)
    }

    /// A write from one segment of DMA memory (see `read(_:offsetUnits:countUnits:into:handler:tag:)`).
    public func write(_ blob: BlobHandle, offsetUnits: UInt64, countUnits: UInt64, from segment: DMASegment,
                      handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BlobStoreError) {
        try submit(isRead: false, blob, offsetUnits, countUnits, CollectionOfOne(segment), handler, tag)
    }

    /// Vectored read: the blob range lands in `segments`, in order.
    public func readv<S: Collection<DMASegment>>(_ blob: BlobHandle, offsetUnits: UInt64, countUnits: UInt64, _ segments: S,
                                                 handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BlobStoreError) {
        try submit(isRead: true, blob, offsetUnits, countUnits, segments, handler, tag)
    }

    /// Vectored write: `segments`, in order, go to the blob range.
    public func writev<S: Collection<DMASegment>>(_ blob: BlobHandle, offsetUnits: UInt64, countUnits: UInt64, _ segments: S,
                                                  handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BlobStoreError) {
        try submit(isRead: false, blob, offsetUnits, countUnits, segments, handler, tag)
    }

    private func submit<S: Collection<DMASegment>>(isRead: Bool, _ blob: BlobHandle, _ offsetUnits: UInt64,
                                                   _ countUnits: UInt64, _ segments: S,
                                                   _ handler: any BdevCompletionHandler, _ tag: UInt64) throws(BlobStoreError) {
        let start = offsetUnits * unitBytes
        let end = start + countUnits * unitBytes
        guard countUnits > 0, end <= blob.clusterCount * clusterBytes else {
            throw .invalidArgument("units \(offsetUnits)+\(countUnits) outside blob \(blob.id)")
        }
        var total = 0
        for segment in segments { total += segment.count }
        guard total == Int(end - start) else {
            throw .invalidArgument("segments of \(total) bytes for a request of \(end - start)")
        }
        guard isRead || !blob.isSnapshot else { throw .snapshotReadOnly(blob.id) }
        // Pass 1: count device requests and refuse what this path cannot do.
        var parts = 0
        var runEnd: UInt64 = .max  // device byte where the current run would continue
        var cursor = start
        while cursor < end {
            let index = cursor / clusterBytes
            let next = min(end, (index + 1) * clusterBytes)
            if let cluster = isRead ? blob.readCluster(index) : blob.physicalCluster(index) {
                let device = dataStartBytes + cluster * clusterBytes + (cursor - index * clusterBytes)
                if device != runEnd { parts += 1 }
                runEnd = device + (next - cursor)
            } else {
                guard isRead else {
                    guard let service else { throw .unallocated(blob: blob.id, cluster: index) }
                    return try forward(service, blob, offsetUnits, segments, handler, tag)
                }
                runEnd = .max
            }
            cursor = next
        }
        guard let slot = free.last else { throw .device(.queueFull) }
        guard bdevChannel.queueDepth - bdevChannel.inFlight >= parts else { throw .device(.queueFull) }
        free.removeLast()
        let request = requests[slot]
        request.handler = handler
        request.tag = tag
        request.status = .success
        request.remaining = parts
        if parts > 0 {
            request.blob = blob
            request.generation = blob.began()
        }
        // Pass 2: walk the blob range and the segments together; one device request per
        // physically contiguous run, zeros into the holes.
        var walker = SegmentWalker(segments)
        var runStart: UInt64 = 0
        var runBytes: UInt64 = 0
        var runSegments = 0
        cursor = start
        while cursor <= end {
            let index = cursor / clusterBytes
            let next = cursor == end ? end : min(end, (index + 1) * clusterBytes)
            let cluster = cursor == end ? nil : isRead ? blob.readCluster(index) : blob.physicalCluster(index)
            let device = cluster.map { dataStartBytes + $0 * clusterBytes + (cursor - index * clusterBytes) }
            if runBytes > 0 && device != runStart + runBytes {
                submitRun(isRead, runSegments, runStart, runBytes, slot)
                runBytes = 0
                runSegments = 0
            }
            if cursor == end { break }
            if let device {
                if runBytes == 0 { runStart = device }
                runSegments = walker.take(Int(next - cursor), into: scratch, at: runSegments)
                runBytes += next - cursor
            } else {
                walker.zero(Int(next - cursor))
            }
            cursor = next
        }
        if parts == 0 { makeReady(slot) }
    }

    /// Hands a write that needs allocation to the metadata reactor; the answer comes
    /// back to this reactor as a message, after the handle's update.
    private func forward<S: Collection<DMASegment>>(_ service: BlobStoreService, _ blob: BlobHandle, _ offsetUnits: UInt64,
                                                    _ segments: S, _ handler: any BdevCompletionHandler,
                                                    _ tag: UInt64) throws(BlobStoreError) {
        guard let slot = free.popLast() else { throw .device(.queueFull) }
        let request = requests[slot]
        request.handler = handler
        request.tag = tag
        request.status = .success
        request.remaining = 1
        var data: [UInt8] = []  // the allocating path copies
        for segment in segments { data += UnsafeRawBufferPointer(start: segment.base, count: segment.count) }
        let payload = data
        let id = blob.id
        let home = bdevChannel.reactor
        let channel = UnsafeSendable(self)
        service.submit { store in
            let status: BdevStatus
            do {
                try store.write(blob: id, offsetUnits: offsetUnits, data: payload)
                status = .success
            } catch let BlobStoreError.device(error) {
                status = .failed(error)
            } catch let error as BlobStoreError {
                status = .failed(.io(errno: error.errno))
            } catch {
                status = .failed(.io(errno: EIO))
            }
            // Handle updates were sent before this message: the channel sees them first.
            home.send { channel.value.bdevIOCompleted(tag: UInt64(slot), status: status) }
        }
    }

    @inline(__always)
    private func submitRun(_ isRead: Bool, _ count: Int, _ device: UInt64, _ bytes: UInt64, _ slot: Int) {
        guard count <= BdevLimits.segmentCountMax else {
            return bdevIOCompleted(tag: UInt64(slot), status: .failed(.tooManySegments(count: count, max: BdevLimits.segmentCountMax)))
        }
        let segments = UnsafeBufferPointer(start: scratch, count: count)
        do {
            if isRead {
                try bdevChannel.readv(segments, offsetBlocks: device / unitBytes, countBlocks: bytes / unitBytes,
                                      handler: self, tag: UInt64(slot))
            } else {
                try bdevChannel.writev(segments, offsetBlocks: device / unitBytes, countBlocks: bytes / unitBytes,
                                       handler: self, tag: UInt64(slot))
            }
        } catch {
            // Room was checked; a refusal here is an argument error (e.g. more than 64 segments in one run).
            bdevIOCompleted(tag: UInt64(slot), status: .failed(error))
        }
    }

    public func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        let request = requests[Int(tag)]
        if case .failed = status, request.status == .success { request.status = status }
        request.remaining -= 1
        if request.remaining == 0 { finish(Int(tag)) }
    }

    private func finish(_ slot: Int) {
        let request = requests[slot]
        let handler = request.handler!
        request.handler = nil
        if let blob = request.blob {
            request.blob = nil
            blob.ended(request.generation)
        }
        free.append(slot)
        handler.bdevIOCompleted(tag: request.tag, status: request.status)
    }

    private func makeReady(_ slot: Int) {
        requests[slot].nextReady = -1
        if readyTail >= 0 { requests[readyTail].nextReady = slot } else { readyHead = slot }
        readyTail = slot
    }

    /// Completes requests that needed no device I/O (all holes), outside their submit call.
    private func deliverReady() -> PollStatus {
        guard readyHead >= 0 else { return .idle }
        while readyHead >= 0 {
            let slot = readyHead
            readyHead = requests[slot].nextReady
            if readyHead < 0 { readyTail = -1 }
            finish(slot)
        }
        return .busy
    }
}

/// A reference handed between reactors that only its home reactor dereferences.
struct UnsafeSendable<T: AnyObject>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

/// Walks a request's segments alongside the blob range.
struct SegmentWalker<S: Collection<DMASegment>> {
    private let segments: S
    private var index: S.Index
    private var offset = 0

    init(_ segments: S) {
        self.segments = segments
        index = segments.startIndex
    }

    /// Appends slices covering the next `bytes` to `scratch` from position `at` (up to
    /// the segment limit; past it the run is refused by the bdev layer); returns the new count.
    mutating func take(_ bytes: Int, into scratch: UnsafeMutablePointer<DMASegment>, at: Int) -> Int {
        var remaining = bytes
        var count = at
        while remaining > 0 {
            let segment = segments[index]
            let length = min(segment.count - offset, remaining)
            let piece = segment.slice(from: offset, count: length)
            if count > 0, count <= BdevLimits.segmentCountMax, let joined = scratch[count - 1].joined(with: piece) {
                // Contiguous with the piece before (the same buffer across a cluster
                // boundary of a physically contiguous run): one iovec.
                scratch[count - 1] = joined
            } else {
                if count < BdevLimits.segmentCountMax { (scratch + count).initialize(to: piece) }
                count += 1
            }
            advance(length)
            remaining -= length
        }
        return min(count, BdevLimits.segmentCountMax + 1)
    }

    /// Zeroes the next `bytes` (a hole read).
    mutating func zero(_ bytes: Int) {
        var remaining = bytes
        while remaining > 0 {
            let segment = segments[index]
            let length = min(segment.count - offset, remaining)
            (segment.base + offset).initializeMemory(as: UInt8.self, repeating: 0, count: length)
            advance(length)
            remaining -= length
        }
    }

    private mutating func advance(_ length: Int) {
        offset += length
        if offset == segments[index].count {
            index = segments.index(after: index)
            offset = 0
        }
    }
}
