/// Log-linear latency buckets: 8 per power of two (each 12.5 % wide at most), exact below
/// 8 ns, up to 2^40 ns (18 minutes; longer lands in the last bucket). Fixed, so that a
/// histogram is an array of counts allocated once and recording is an index computation.
public enum LatencyBuckets {
    static let subBucketBits = 3
    static let subBuckets = 1 << subBucketBits
    static let magnitudeMax = 40
    /// Buckets in a histogram.
    public static let count = (magnitudeMax - subBucketBits + 1) * subBuckets

    @inline(__always)
    public static func index(ofNs value: UInt64) -> Int {
        if value < UInt64(subBuckets) { return Int(value) }
        let magnitude = 63 - value.leadingZeroBitCount  // subBucketBits ... 63
        if magnitude >= magnitudeMax { return count - 1 }
        let shift = magnitude - subBucketBits
        return (shift + 1) * subBuckets + Int(value >> UInt64(shift)) - subBuckets
    }

    /// The smallest latency that lands in `bucket`.
    public static func lowerBoundNs(_ bucket: Int) -> UInt64 {
        precondition(bucket >= 0 && bucket < count, "bucket \(bucket) of \(count)")
        if bucket < subBuckets { return UInt64(bucket) }
        let shift = bucket / subBuckets - 1
        return UInt64(subBuckets + bucket % subBuckets) << UInt64(shift)
    }
}

/// One kind of operation's counts as of some moment: a copy, for the control path.
public struct LatencySnapshot: Sendable, Equatable {
    public var counts: [UInt64]
    public var total: UInt64 = 0
    public var errors: UInt64 = 0
    public var bytes: UInt64 = 0
    public var sumNs: UInt64 = 0
    public var maxNs: UInt64 = 0

    public init() { counts = [UInt64](repeating: 0, count: LatencyBuckets.count) }

    /// The latency below which `fraction` of the operations fell: the middle of the bucket
    /// holding that rank (within 6.25 % of the true value), never above the largest seen.
    public func percentileNs(_ fraction: Double) -> UInt64 {
        guard total > 0 else { return 0 }
        let rank = max(1, UInt64((Double(total) * fraction).rounded(.up)))
        var seen: UInt64 = 0
        for (bucket, count) in counts.enumerated() where count > 0 {
            seen += count
            guard seen >= rank else { continue }
            let low = LatencyBuckets.lowerBoundNs(bucket)
            let high = bucket + 1 < LatencyBuckets.count ? LatencyBuckets.lowerBoundNs(bucket + 1) : low
            return min(low + (high - low) / 2, maxNs)
        }
        return maxNs
    }

    public var meanNs: Double { total == 0 ? 0 : Double(sumNs) / Double(total) }

    /// What happened between `earlier` and this snapshot (`maxNs` stays this one's: the
    /// largest since the start, an upper bound for the interval).
    public func since(_ earlier: LatencySnapshot) -> LatencySnapshot {
        var delta = self
        for index in counts.indices { delta.counts[index] = counts[index] &- earlier.counts[index] }
        delta.total = total &- earlier.total
        delta.errors = errors &- earlier.errors
        delta.bytes = bytes &- earlier.bytes
        delta.sumNs = sumNs &- earlier.sumNs
        if delta.total == 0 { delta.maxNs = 0 }
        return delta
    }
}

/// Latency histograms of several kinds of operation (`rows`: e.g. one per FUSE opcode),
/// with counts, errors and bytes, in one block of memory allocated at start: recording
/// allocates nothing and touches two cache lines. One thread records and takes
/// snapshots (the reactor that serves the operations).
public final class OperationHistograms {
    public let rows: Int
    private static let total = LatencyBuckets.count
    private static let errors = total + 1
    private static let bytes = total + 2
    private static let sumNs = total + 3
    private static let maxNs = total + 4
    private static let stride = total + 5
    private let storage: UnsafeMutablePointer<UInt64>

    public init(rows: Int) {
        precondition(rows > 0)
        self.rows = rows
        storage = .allocate(capacity: rows * Self.stride)
        storage.initialize(repeating: 0, count: rows * Self.stride)
    }

    deinit { storage.deallocate() }

    @inline(__always)
    public func record(row: Int, ns: UInt64, bytes: UInt64, failed: Bool) {
        precondition(row >= 0 && row < rows, "histogram row \(row) of \(rows)")
        let base = storage + row * Self.stride
        base[LatencyBuckets.index(ofNs: ns)] &+= 1
        base[Self.total] &+= 1
        if failed { base[Self.errors] &+= 1 }
        base[Self.bytes] &+= bytes
        base[Self.sumNs] &+= ns
        if ns > base[Self.maxNs] { base[Self.maxNs] = ns }
    }

    /// Operations recorded in `row` so far (cheap: no copy).
    public func total(row: Int) -> UInt64 { storage[row * Self.stride + Self.total] }

    public func snapshot(row: Int) -> LatencySnapshot {
        precondition(row >= 0 && row < rows, "histogram row \(row) of \(rows)")
        let base = storage + row * Self.stride
        var snapshot = LatencySnapshot()
        snapshot.counts.withUnsafeMutableBufferPointer { $0.baseAddress!.update(from: base, count: LatencyBuckets.count) }
        snapshot.total = base[Self.total]
        snapshot.errors = base[Self.errors]
        snapshot.bytes = base[Self.bytes]
        snapshot.sumNs = base[Self.sumNs]
        snapshot.maxNs = base[Self.maxNs]
        return snapshot
    }
}
