import Env
import Synchronization

/// Wraps a backend and counts what its consumers submit: reads and writes with their
/// bytes, flushes, and write-zeroes and unmaps, per channel, for `blobfs stats`. The
/// request object goes to the wrapped backend's channel as it is (its completion reaches
/// the consumer's channel directly): no allocation, one call more per request.
public final class CountingBdev: BdevBackend, @unchecked Sendable {
    public let inner: any BdevBackend
    private let counters = Mutex<[IOCounters]>([])

    public init(wrapping inner: any BdevBackend) { self.inner = inner }

    public var name: String { inner.name }
    public var geometry: BdevGeometry { inner.geometry }

    public func makeChannel(reactor: Reactor) throws(BdevError) -> any BdevBackendChannel {
        let channel = CountingChannel(inner: try inner.makeChannel(reactor: reactor))
        counters.withLock { $0.append(channel.counters) }
        return channel
    }

    public func close() { inner.close() }

    public func refreshGeometry() throws(BdevError) -> BdevGeometry { try inner.refreshGeometry() }

    /// What every channel made so far submitted (closed channels included).
    public struct Totals: Sendable, Equatable {
        public var reads: UInt64 = 0
        public var readBytes: UInt64 = 0
        public var writes: UInt64 = 0
        public var writeBytes: UInt64 = 0
        public var flushes: UInt64 = 0
        /// Write-zeroes and unmaps.
        public var others: UInt64 = 0
        public init() {}
    }

    /// Sums the channels' counters (any thread; each counter is read atomically, the sum
    /// is not one instant's but never goes backwards).
    public var totals: Totals {
        counters.withLock { list in
            var sum = Totals()
            for channel in list {
                sum.reads &+= channel.reads.load(ordering: .relaxed)
                sum.readBytes &+= channel.readBytes.load(ordering: .relaxed)
                sum.writes &+= channel.writes.load(ordering: .relaxed)
                sum.writeBytes &+= channel.writeBytes.load(ordering: .relaxed)
                sum.flushes &+= channel.flushes.load(ordering: .relaxed)
                sum.others &+= channel.others.load(ordering: .relaxed)
            }
            return sum
        }
    }
}

/// One channel's counts: written by its reactor only (relaxed load and store, no
/// read-modify-write: plain moves on x86), read by any thread.
final class IOCounters: Sendable {
    let reads = Atomic<UInt64>(0)
    let readBytes = Atomic<UInt64>(0)
    let writes = Atomic<UInt64>(0)
    let writeBytes = Atomic<UInt64>(0)
    let flushes = Atomic<UInt64>(0)
    let others = Atomic<UInt64>(0)

    @inline(__always)
    static func bump(_ counter: borrowing Atomic<UInt64>, by amount: UInt64 = 1) {
        counter.store(counter.load(ordering: .relaxed) &+ amount, ordering: .relaxed)
    }
}

final class CountingChannel: BdevBackendChannel {
    let inner: any BdevBackendChannel
    let counters = IOCounters()

    init(inner: any BdevBackendChannel) { self.inner = inner }

    func submit(_ io: BdevIO) {
        switch io.type {
        case .read:
            IOCounters.bump(counters.reads)
            IOCounters.bump(counters.readBytes, by: UInt64(io.byteCount))
        case .write:
            IOCounters.bump(counters.writes)
            IOCounters.bump(counters.writeBytes, by: UInt64(io.byteCount))
        case .flush: IOCounters.bump(counters.flushes)
        case .writeZeroes, .unmap: IOCounters.bump(counters.others)
        }
        inner.submit(io)
    }

    func poll() -> PollStatus { inner.poll() }
    func close() { inner.close() }
}
