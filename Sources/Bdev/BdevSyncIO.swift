import Env

/// Blocking I/O over a channel whose reactor is stepped on the calling thread: for
/// tests, offline tools and set-up paths. Never used on a running reactor's data path.
public final class BdevSyncIO: BdevCompletionHandler {
    public let channel: BdevChannel
    private var outstanding = 0
    private var firstError: BdevError?

    public init(channel: BdevChannel) {
        self.channel = channel
    }

    public convenience init(bdev: Bdev, reactor: Reactor) throws(BdevError) {
        self.init(channel: try bdev.makeChannel(reactor: reactor))
    }

    public var geometry: BdevGeometry { channel.bdev.geometry }

    public func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        outstanding -= 1
        if case let .failed(error) = status, firstError == nil { firstError = error }
    }

    private func wait() throws(BdevError) {
        channel.reactor.run(until: { outstanding == 0 })
        if let error = firstError {
            firstError = nil
            throw error
        }
    }

    private func submitted(_ body: () throws(BdevError) -> Void) throws(BdevError) {
        try body()
        outstanding += 1
        try wait()
    }

    public func read(into buffer: borrowing DMABuffer, bufferOffset: Int = 0, offsetBlocks: UInt64,
                     countBlocks: UInt64) throws(BdevError) {
        try channel.read(into: buffer, bufferOffset: bufferOffset, offsetBlocks: offsetBlocks,
                         countBlocks: countBlocks, handler: self)
        outstanding += 1
        try wait()
    }

    /// The most offsets `readScattered` joins into one read.
    static let scatteredRunMax = 64

    /// Reads `countBlocks` blocks at each of `offsets` into consecutive slices of `buffer`
    /// (read `i` at byte `i * countBlocks * blockSize`), keeping up to the channel's queue
    /// depth in flight, offsets that follow each other on the device joined into one read
    /// (up to `scatteredRunMax`); returns when all have completed. The first error is
    /// thrown, after every submitted read has completed.
    public func readScattered(into buffer: borrowing DMABuffer, offsets: some Collection<UInt64>,
                              countBlocks: UInt64) throws(BdevError) {
        let bytes = Int(countBlocks) * geometry.blockSizeBytes
        guard offsets.count * bytes <= buffer.count else {
            throw .lengthMismatch(bufferBytes: buffer.count, requestBytes: offsets.count * bytes)
        }
        var submitError: BdevError?
        let offsets = Array(offsets)
        var index = 0
        while index < offsets.count {
            // Offsets that follow each other on the device are one read (chains written in
            // one checkpoint lie in runs of consecutive pages).
            var end = index + 1
            while end < offsets.count, end - index < Self.scatteredRunMax, offsets[end] == offsets[end - 1] &+ countBlocks { end += 1 }
            if channel.inFlight >= channel.queueDepth {
                channel.reactor.run(until: { channel.inFlight < channel.queueDepth })
            }
            do {
                try channel.read(into: buffer, bufferOffset: index * bytes, offsetBlocks: offsets[index],
                                 countBlocks: countBlocks * UInt64(end - index), handler: self)
            } catch {
                submitError = error
                break
            }
            outstanding += 1
            index = end
            if firstError != nil { break }
        }
        channel.reactor.run(until: { outstanding == 0 })
        if let error = submitError ?? firstError {
            firstError = nil
            throw error
        }
    }

    public func write(from buffer: borrowing DMABuffer, bufferOffset: Int = 0, offsetBlocks: UInt64,
                      countBlocks: UInt64) throws(BdevError) {
        try channel.write(from: buffer, bufferOffset: bufferOffset, offsetBlocks: offsetBlocks,
                          countBlocks: countBlocks, handler: self)
        outstanding += 1
        try wait()
    }

    public func readv(_ segments: [DMASegment], offsetBlocks: UInt64, countBlocks: UInt64) throws(BdevError) {
        try submitted { () throws(BdevError) in
            try channel.readv(segments, offsetBlocks: offsetBlocks, countBlocks: countBlocks, handler: self)
        }
    }

    public func writev(_ segments: [DMASegment], offsetBlocks: UInt64, countBlocks: UInt64) throws(BdevError) {
        try submitted { () throws(BdevError) in
            try channel.writev(segments, offsetBlocks: offsetBlocks, countBlocks: countBlocks, handler: self)
        }
    }

    public func flush() throws(BdevError) {
        try submitted { () throws(BdevError) in try channel.flush(handler: self) }
    }

    public func writeZeroes(offsetBlocks: UInt64, countBlocks: UInt64) throws(BdevError) {
        try submitted { () throws(BdevError) in
            try channel.writeZeroes(offsetBlocks: offsetBlocks, countBlocks: countBlocks, handler: self)
        }
    }

    public func unmap(offsetBlocks: UInt64, countBlocks: UInt64) throws(BdevError) {
        try submitted { () throws(BdevError) in
            try channel.unmap(offsetBlocks: offsetBlocks, countBlocks: countBlocks, handler: self)
        }
    }

    /// Unmaps every range, up to the channel's queue depth in flight; returns when all
    /// have completed. The first error is thrown, after every submitted unmap completed.
    public func unmapScattered(_ ranges: some Collection<(offsetBlocks: UInt64, countBlocks: UInt64)>) throws(BdevError) {
        var submitError: BdevError?
        for range in ranges {
            if channel.inFlight >= channel.queueDepth {
                channel.reactor.run(until: { channel.inFlight < channel.queueDepth })
            }
            do {
                try channel.unmap(offsetBlocks: range.offsetBlocks, countBlocks: range.countBlocks, handler: self)
            } catch {
                submitError = error
                break
            }
            outstanding += 1
            if firstError != nil { break }
        }
        channel.reactor.run(until: { outstanding == 0 })
        if let error = submitError ?? firstError {
            firstError = nil
            throw error
        }
    }

    /// Reads `countBlocks` blocks into a new array (tests and tools).
    public func readBytes(offsetBlocks: UInt64, countBlocks: UInt64) throws(BdevError) -> [UInt8] {
        let bytes = Int(countBlocks) * geometry.blockSizeBytes
        let buffer: DMABuffer
        do { buffer = try DMABuffer.allocate(bytes: bytes) } catch { throw .system(error) }
        try read(into: buffer, offsetBlocks: offsetBlocks, countBlocks: countBlocks)
        return buffer.bytes(count: bytes)
    }

    /// Writes whole blocks from an array (tests and tools).
    public func writeBytes(_ bytes: [UInt8], offsetBlocks: UInt64) throws(BdevError) {
        let blockSize = geometry.blockSizeBytes
        guard !bytes.isEmpty, bytes.count % blockSize == 0 else {
            throw .lengthMismatch(bufferBytes: bytes.count, requestBytes: (bytes.count / blockSize + 1) * blockSize)
        }
        let buffer: DMABuffer
        do { buffer = try DMABuffer.allocate(bytes: bytes.count) } catch { throw .system(error) }
        buffer.store(bytes)
        try write(from: buffer, offsetBlocks: offsetBlocks, countBlocks: UInt64(bytes.count / blockSize))
    }

    public func close() { channel.close() }
}
