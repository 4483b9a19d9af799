import XCTest
import Bdev
import BdevConformance
import BdevMalloc
import Env

final class CountingBdevTests: XCTestCase {
    /// The wrapper is a bdev like any other: the conformance suite passes through it.
    func testConformance() throws {
        let reactor = try Reactor()
        try BdevConformance(reactor: reactor) {
            Bdev(backend: CountingBdev(wrapping: try MallocBdev(blockCount: 4096, blockSizeBytes: 4096)))
        }.run()
    }

    func testCountsWhatChannelsSubmit() throws {
        let reactor = try Reactor()
        let counting = CountingBdev(wrapping: try MallocBdev(blockCount: 64, blockSizeBytes: 512))
        let bdev = Bdev(backend: counting)
        let first = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let second = try BdevSyncIO(bdev: bdev, reactor: reactor)
        try first.writeBytes([UInt8](repeating: 7, count: 2048), offsetBlocks: 0)
        _ = try second.readBytes(offsetBlocks: 0, countBlocks: 8)
        try second.flush()
        first.close()  // a closed channel's counts stay in the totals
        var expected = CountingBdev.Totals()
        expected.reads = 1
        expected.readBytes = 4096
        expected.writes = 1
        expected.writeBytes = 2048
        expected.flushes = 1
        XCTAssertEqual(counting.totals, expected)
        second.close()
    }
}
