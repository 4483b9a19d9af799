import XCTest
@testable import Env

final class LatencyHistogramTests: XCTestCase {
    func testEveryValueLandsInTheBucketThatBoundsIt() {
        var previous = -1
        var value: UInt64 = 0
        while value < 1 << 41 {
            let bucket = LatencyBuckets.index(ofNs: value)
            XCTAssertGreaterThanOrEqual(bucket, previous, "buckets grow with the value (\(value))")
            previous = bucket
            XCTAssertLessThanOrEqual(LatencyBuckets.lowerBoundNs(bucket), value)
            if bucket + 1 < LatencyBuckets.count {
                XCTAssertLessThan(value, LatencyBuckets.lowerBoundNs(bucket + 1), "value \(value) bucket \(bucket)")
                // 12.5 % wide at most past the exact range.
                let width = LatencyBuckets.lowerBoundNs(bucket + 1) - LatencyBuckets.lowerBoundNs(bucket)
                XCTAssertLessThanOrEqual(width * 8, max(8, LatencyBuckets.lowerBoundNs(bucket)))
            }
            value = value < 64 ? value + 1 : value + value / 7
        }
        XCTAssertEqual(LatencyBuckets.index(ofNs: .max), LatencyBuckets.count - 1, "beyond 2^40 ns: the last bucket")
    }

    func testPercentilesAreWithinTheBucketWidth() {
        let histograms = OperationHistograms(rows: 2)
        // 1,000 operations: 1 µs ... 1 ms, in order.
        for index in 1...1000 { histograms.record(row: 1, ns: UInt64(index) * 1000, bytes: 4096, failed: index % 100 == 0) }
        let snapshot = histograms.snapshot(row: 1)
        XCTAssertEqual(snapshot.total, 1000)
        XCTAssertEqual(snapshot.errors, 10)
        XCTAssertEqual(snapshot.bytes, 4096 * 1000)
        XCTAssertEqual(snapshot.maxNs, 1_000_000)
        for (fraction, exact) in [(0.5, 500_000.0), (0.9, 900_000.0), (0.99, 990_000.0), (1.0, 1_000_000.0)] {
            let reported = Double(snapshot.percentileNs(fraction))
            XCTAssertEqual(reported, exact, accuracy: exact * 0.0625 + 1, "p\(fraction * 100)")
        }
        XCTAssertEqual(snapshot.meanNs, 500_500, accuracy: 1)
        XCTAssertEqual(histograms.snapshot(row: 0), LatencySnapshot(), "other rows untouched")
    }

    func testAnIntervalIsTheDifferenceOfTwoSnapshots() {
        let histograms = OperationHistograms(rows: 1)
        for _ in 0..<100 { histograms.record(row: 0, ns: 1_000, bytes: 1, failed: false) }
        let first = histograms.snapshot(row: 0)
        for _ in 0..<50 { histograms.record(row: 0, ns: 100_000, bytes: 2, failed: true) }
        let interval = histograms.snapshot(row: 0).since(first)
        XCTAssertEqual(interval.total, 50)
        XCTAssertEqual(interval.errors, 50)
        XCTAssertEqual(interval.bytes, 100)
        XCTAssertEqual(Double(interval.percentileNs(0.5)), 100_000, accuracy: 6_250)
        XCTAssertEqual(histograms.snapshot(row: 0).since(histograms.snapshot(row: 0)).total, 0)
    }
}
