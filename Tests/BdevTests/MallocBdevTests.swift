import XCTest
import Bdev
import BdevConformance
import BdevMalloc
import Env

final class MallocBdevTests: XCTestCase {
    func testConformance4K() throws {
        let reactor = try Reactor()
        try BdevConformance(reactor: reactor) {
            Bdev(backend: try MallocBdev(blockCount: 4096, blockSizeBytes: 4096))
        }.run()
    }

    func testConformance512() throws {
        let reactor = try Reactor()
        try BdevConformance(reactor: reactor) {
            Bdev(backend: try MallocBdev(blockCount: 8192, blockSizeBytes: 512))
        }.run()
    }

    func testBadGeometryIsRefused() {
        XCTAssertThrowsError(try MallocBdev(blockCount: 16, blockSizeBytes: 1000)) { error in
            XCTAssertEqual(error as? BdevError, .invalidConfiguration("malloc bdev: block size 1000 (512 or 4096)"))
        }
        XCTAssertThrowsError(try MallocBdev(blockCount: 0))
    }

    func testCompletionsComeFromThePollerNotFromSubmit() throws {
        let reactor = try Reactor()
        let bdev = Bdev(backend: try MallocBdev(blockCount: 64))
        let channel = try bdev.makeChannel(reactor: reactor)
        defer { channel.close() }
        final class Flag: BdevCompletionHandler {
            var done = false
            func bdevIOCompleted(tag: UInt64, status: BdevStatus) { done = true }
        }
        let flag = Flag()
        let buffer = try DMABuffer.allocate(bytes: 4096)
        try channel.write(from: buffer, offsetBlocks: 0, countBlocks: 1, handler: flag)
        XCTAssertFalse(flag.done, "no completion inside submit")
        XCTAssertEqual(channel.inFlight, 1)
        reactor.run(until: { flag.done })
        XCTAssertEqual(channel.inFlight, 0)
    }
}
