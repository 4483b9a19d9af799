#if canImport(Glibc)
import Glibc
#endif
import Env

// The API for consumers (SPDK's bdev.h): open a device, get a channel per reactor,
// submit requests in blocks, get exactly one completion per accepted request, on the
// submitting reactor, from the channel's poller.

/// Receives completions. Implemented by long-lived consumer objects; the channel holds
/// no strong reference (the consumer outlives its requests).
public protocol BdevCompletionHandler: AnyObject {
    func bdevIOCompleted(tag: UInt64, status: BdevStatus)
}

/// An opened block device.
public final class Bdev: Sendable {
    public let backend: any BdevBackend

    public init(backend: any BdevBackend) {
        let geometry = backend.geometry
        precondition(BdevGeometry.supportedBlockSizes.contains(geometry.blockSizeBytes),
                     "bdev \(backend.name): block size \(geometry.blockSizeBytes)")
        self.backend = backend
    }

    public var name: String { backend.name }
    public var geometry: BdevGeometry { backend.geometry }

    /// A channel for the calling reactor (or a reactor stepped by hand on this thread).
    public func makeChannel(reactor: Reactor, queueDepth: Int = BdevLimits.queueDepthDefault)
        throws(BdevError) -> BdevChannel
    {
        guard queueDepth > 0 && queueDepth <= BdevLimits.queueDepthMax else {
            throw .invalidConfiguration("queue depth \(queueDepth) outside 1...\(BdevLimits.queueDepthMax)")
        }
        let backendChannel = try backend.makeChannel(reactor: reactor)
        return BdevChannel(bdev: self, backend: backendChannel, reactor: reactor, queueDepth: queueDepth)
    }

    public func close() { backend.close() }

    /// The device's geometry after looking at its size again (see
    /// `BdevBackend.refreshGeometry`); channels take a larger size at their next request
    /// beyond the old one.
    public func refreshGeometry() throws(BdevError) -> BdevGeometry { try backend.refreshGeometry() }
}

/// A reactor's path to a device: a pool of requests, a poller that reaps and delivers.
/// Used only on its reactor's thread.
public final class BdevChannel {
    public let bdev: Bdev
    public let reactor: Reactor
    public let queueDepth: Int
    let backend: any BdevBackendChannel
    private let blockSizeBytes: Int
    /// The device's size when last looked at: a request beyond it looks again (the
    /// device may have grown), so the common path reads no shared state.
    private var blockCount: UInt64
    private let alignmentMask: Int
    /// The pool; owns the requests for the channel's life.
    private var requests: ContiguousArray<BdevIO> = []
    /// The same requests unretained, for the per-I/O path: reached through
    /// `_withUnsafeGuaranteedRef`, they take no reference count per request.
    private let requestRefs: UnsafeMutablePointer<Unmanaged<BdevIO>>
    /// Indices of free requests, a stack of `freeCount` (capacity `queueDepth`).
    private let freeIndices: UnsafeMutablePointer<Int>
    private var freeCount = 0
    private var completedHead = -1
    private var completedTail = -1
    private var pollerID: PollerID?
    public private(set) var inFlight = 0

    init(bdev: Bdev, backend: any BdevBackendChannel, reactor: Reactor, queueDepth: Int) {
        self.bdev = bdev
        self.backend = backend
        self.reactor = reactor
        self.queueDepth = queueDepth
        let geometry = bdev.geometry
        blockSizeBytes = geometry.blockSizeBytes
        blockCount = geometry.blockCount
        alignmentMask = geometry.bufferAlignmentBytes - 1
        requests.reserveCapacity(queueDepth)
        freeIndices = .allocate(capacity: queueDepth)
        requestRefs = .allocate(capacity: queueDepth)
        for index in 0..<queueDepth {
            requests.append(BdevIO(index: index, channel: self))
            freeIndices[index] = queueDepth - 1 - index
        }
        for index in 0..<queueDepth { requestRefs[index] = Unmanaged.passUnretained(requests[index]) }
        freeCount = queueDepth
        // unowned(unsafe): the poller is unregistered by close(), at the latest in deinit,
        // so it never runs on a freed channel (and takes no reference count per pass).
        pollerID = reactor.registerPoller { [unowned(unsafe) self] in self.poll() }
    }

    /// A channel dropped without `close()` closes itself, so its poller never outlives it.
    deinit {
        if pollerID != nil { close() }
        freeIndices.deallocate()
        requestRefs.deallocate()
    }

    /// Closes the channel; every request must have completed.
    public func close() {
        precondition(inFlight == 0, "bdev channel closed with \(inFlight) requests in flight")
        if let pollerID { reactor.unregisterPoller(pollerID) }
        pollerID = nil
        backend.close()
    }

    // MARK: - Submission

    public func read(into buffer: borrowing DMABuffer, bufferOffset: Int = 0, offsetBlocks: UInt64,
                     countBlocks: UInt64, handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BdevError) {
        let bytes = try requestBytes(countBlocks)
        guard bufferOffset >= 0, bufferOffset + bytes <= buffer.count else {
            throw .lengthMismatch(bufferBytes: buffer.count - bufferOffset, requestBytes: bytes)
        }
        try submitData(.read, CollectionOfOne(buffer.segment(offset: bufferOffset, count: bytes)),
                       offsetBlocks, countBlocks, handler, tag)
    }

    public func write(from buffer: borrowing DMABuffer, bufferOffset: Int = 0, offsetBlocks: UInt64,
                      countBlocks: UInt64, handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BdevError) {
        let bytes = try requestBytes(countBlocks)
        guard bufferOffset >= 0, bufferOffset + bytes <= buffer.count else {
            throw .lengthMismatch(bufferBytes: buffer.count - bufferOffset, requestBytes: bytes)
        }
        try submitData(.write, CollectionOfOne(buffer.segment(offset: bufferOffset, count: bytes)),
                       offsetBlocks, countBlocks, handler, tag)
    }

    public func readv<S: Collection<DMASegment>>(_ segments: S, offsetBlocks: UInt64, countBlocks: UInt64,
                                                  handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BdevError) {
        try submitData(.read, segments, offsetBlocks, countBlocks, handler, tag)
    }

    public func writev<S: Collection<DMASegment>>(_ segments: S, offsetBlocks: UInt64, countBlocks: UInt64,
                                                   handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BdevError) {
        try submitData(.write, segments, offsetBlocks, countBlocks, handler, tag)
    }

    /// `readv` of a buffer of segments, not generic: a caller in another module (the blob
    /// store's channel, the NVMe emulator) gets the path specialized here, not the
    /// unspecialized generic one, which walks the collection through witness tables on
    /// every request.
    public func readv(_ segments: UnsafeBufferPointer<DMASegment>, offsetBlocks: UInt64, countBlocks: UInt64,
                      handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BdevError) {
        try submitData(.read, segments, offsetBlocks, countBlocks, handler, tag)
    }

    /// `writev` of a buffer of segments, not generic (see `readv(_:offsetBlocks:countBlocks:handler:tag:)`).
    public func writev(_ segments: UnsafeBufferPointer<DMASegment>, offsetBlocks: UInt64, countBlocks: UInt64,
                       handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BdevError) {
        try submitData(.write, segments, offsetBlocks, countBlocks, handler, tag)
    }

    /// Makes every write completed before this call durable.
    public func flush(handler: any BdevCompletionHandler, tag: UInt64 = 0) throws(BdevError) {
        let io = try takeRequest()
        io.type = .flush
        io.offsetBlocks = 0
        io.countBlocks = 0
        io.byteCount = 0
        io.segmentCount = 0
        start(io, handler, tag)
    }

    /// Blocks read back as zeros afterwards.
    public func writeZeroes(offsetBlocks: UInt64, countBlocks: UInt64, handler: any BdevCompletionHandler,
                            tag: UInt64 = 0) throws(BdevError) {
        try submitRange(.writeZeroes, offsetBlocks, countBlocks, handler, tag)
    }

    /// Blocks are released; in every module of this project they read back as zeros.
    public func unmap(offsetBlocks: UInt64, countBlocks: UInt64, handler: any BdevCompletionHandler,
                      tag: UInt64 = 0) throws(BdevError) {
        try submitRange(.unmap, offsetBlocks, countBlocks, handler, tag)
    }

    @inline(__always)
    private func requestBytes(_ countBlocks: UInt64) throws(BdevError) -> Int {
        guard countBlocks > 0 else { throw .emptyRequest }
        guard countBlocks <= blockCount || countBlocks <= grownBlockCount() else {
            throw .outOfRange(offsetBlocks: 0, countBlocks: countBlocks, blockCount: blockCount)
        }
        return Int(countBlocks) * blockSizeBytes
    }

    @inline(__always)
    private func checkRange(_ offsetBlocks: UInt64, _ countBlocks: UInt64) throws(BdevError) {
        guard countBlocks > 0 else { throw .emptyRequest }
        let (end, overflow) = offsetBlocks.addingReportingOverflow(countBlocks)
        guard !overflow, end <= blockCount || end <= grownBlockCount() else {
            throw .outOfRange(offsetBlocks: offsetBlocks, countBlocks: countBlocks, blockCount: blockCount)
        }
    }

    /// Out of range as last known: the device's size now (slow path, off the common one).
    @inline(never)
    private func grownBlockCount() -> UInt64 {
        blockCount = max(blockCount, bdev.geometry.blockCount)
        return blockCount
    }

    private func submitRange(_ type: BdevIOType, _ offsetBlocks: UInt64, _ countBlocks: UInt64,
                             _ handler: any BdevCompletionHandler, _ tag: UInt64) throws(BdevError) {
        try checkRange(offsetBlocks, countBlocks)
        let io = try takeRequest()
        io.type = type
        io.offsetBlocks = offsetBlocks
        io.countBlocks = countBlocks
        io.byteCount = 0
        io.segmentCount = 0
        start(io, handler, tag)
    }

    @inline(__always)
    private func submitData<S: Collection<DMASegment>>(
        _ type: BdevIOType, _ segments: S, _ offsetBlocks: UInt64, _ countBlocks: UInt64,
        _ handler: any BdevCompletionHandler, _ tag: UInt64
    ) throws(BdevError) {
        try checkRange(offsetBlocks, countBlocks)
        let count = segments.count
        guard count > 0 && count <= BdevLimits.segmentCountMax else {
            throw .tooManySegments(count: count, max: BdevLimits.segmentCountMax)
        }
        var total = 0
        for segment in segments {
            guard Int(bitPattern: segment.base) & alignmentMask == 0 else {
                throw .misalignedBuffer(alignmentBytes: alignmentMask + 1)
            }
            total += segment.count
        }
        let bytes = Int(countBlocks) * blockSizeBytes
        guard total == bytes else { throw .lengthMismatch(bufferBytes: total, requestBytes: bytes) }
        let slot = try takeSlot()
        requestRefs[slot]._withUnsafeGuaranteedRef { io in
            var index = 0
            for segment in segments {
                segment.pin()
                io.segments[index] = segment
                io.iovecs[index] = iovec(iov_base: segment.base, iov_len: segment.count)
                index += 1
            }
            io.type = type
            io.offsetBlocks = offsetBlocks
            io.countBlocks = countBlocks
            io.byteCount = bytes
            io.segmentCount = count
            start(io, handler, tag)
        }
    }

    @inline(__always)
    private func takeSlot() throws(BdevError) -> Int {
        guard freeCount > 0 else { throw .queueFull }
        freeCount -= 1
        return freeIndices[freeCount]
    }

    @inline(__always)
    private func takeRequest() throws(BdevError) -> BdevIO { requests[try takeSlot()] }

    @inline(__always)
    private func release(_ index: Int) {
        precondition(freeCount < queueDepth, "bdev request \(index) released with every request already free")
        freeIndices[freeCount] = index
        freeCount += 1
    }

    @inline(__always)
    private func start(_ io: BdevIO, _ handler: any BdevCompletionHandler, _ tag: UInt64) {
        io.handler = handler
        io.tag = tag
        io.isInFlight = true
        inFlight += 1
        backend.submit(io)
    }

    // MARK: - Completion

    func enqueueCompleted(_ io: BdevIO) {
        io.nextCompleted = -1
        if completedTail >= 0 {
            requestRefs[completedTail]._withUnsafeGuaranteedRef { $0.nextCompleted = io.index }
        } else {
            completedHead = io.index
        }
        completedTail = io.index
    }

    /// Reaps the backend and delivers completions; the channel's registered poller.
    public func poll() -> PollStatus {
        let backendStatus = backend.poll()
        var delivered = false
        while completedHead >= 0 {
            let (handler, tag, status) = requestRefs[completedHead]._withUnsafeGuaranteedRef { io in
                completedHead = io.nextCompleted
                if completedHead < 0 { completedTail = -1 }
                for index in 0..<io.segmentCount { io.segments[index].unpin() }
                let delivery = (io.handler!, io.tag, io.status)
                io.handler = nil
                release(io.index)
                return delivery
            }
            inFlight -= 1
            delivered = true
            handler.bdevIOCompleted(tag: tag, status: status)
        }
        if delivered || backendStatus == .busy { return .busy }
        return backendStatus
    }
}
