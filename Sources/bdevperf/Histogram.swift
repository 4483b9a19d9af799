/// Latency histogram with log-linear buckets (2^6 sub-buckets per power of two: ~1.6%
/// resolution), preallocated: recording never allocates.
struct LatencyHistogram {
    private static let subBucketBits = 6
    private static let subBuckets = 1 << subBucketBits
    private var counts: [UInt64]
    private(set) var total: UInt64 = 0
    private(set) var maxNs: UInt64 = 0
    private(set) var sumNs: UInt64 = 0

    init() {
        counts = [UInt64](repeating: 0, count: (64 - Self.subBucketBits + 1) * Self.subBuckets)
    }

    @inline(__always)
    mutating func record(_ ns: UInt64) {
        counts[Self.bucket(of: ns)] &+= 1
        total &+= 1
        sumNs &+= ns
        if ns > maxNs { maxNs = ns }
    }

    @inline(__always)
    private static func bucket(of value: UInt64) -> Int {
        if value < UInt64(subBuckets) { return Int(value) }
        let magnitude = 63 - value.leadingZeroBitCount  // >= subBucketBits
        let shift = magnitude - subBucketBits
        let sub = Int(value >> UInt64(shift)) - subBuckets  // 0..<subBuckets
        return (shift + 1) * subBuckets + sub
    }

    private static func lowerBound(of bucket: Int) -> UInt64 {
        if bucket < subBuckets { return UInt64(bucket) }
        let shift = bucket / subBuckets - 1
        let sub = bucket % subBuckets
        return UInt64(subBuckets + sub) << UInt64(shift)
    }

    mutating func merge(_ other: LatencyHistogram) {
        for index in counts.indices { counts[index] &+= other.counts[index] }
        total &+= other.total
        sumNs &+= other.sumNs
        maxNs = max(maxNs, other.maxNs)
    }

    /// The latency below which `fraction` of the samples fall (bucket lower bound).
    func percentile(_ fraction: Double) -> UInt64 {
        guard total > 0 else { return 0 }
        let rank = UInt64((Double(total) * fraction).rounded(.up))
        var seen: UInt64 = 0
        for (index, count) in counts.enumerated() where count > 0 {
            seen += count
            if seen >= rank { return Self.lowerBound(of: index) }
        }
        return maxNs
    }

    var meanNs: Double { total == 0 ? 0 : Double(sumNs) / Double(total) }
}
