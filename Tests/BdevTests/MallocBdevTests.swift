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

    /// Unmap gives the memory back (the whole pages of the range), not only zeros; the
    /// unaligned edges of a 512-byte-block range read zeros, their neighbours keep their bytes.
    func testUnmapReleasesMemory() throws {
        func residentKiB() -> Int {
            let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
            let line = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") } ?? ""
            return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
        }
        let reactor = try Reactor()
        let bdev = Bdev(backend: try MallocBdev(blockCount: 131_072, blockSizeBytes: 512))  // 64 MiB
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        let chunk = [UInt8](repeating: 0xA5, count: 1 << 20)
        for mebibyte in 0..<64 { try io.writeBytes(chunk, offsetBlocks: UInt64(mebibyte) * 2048) }
        let full = residentKiB()
        try io.unmap(offsetBlocks: 1, countBlocks: 131_070)  // all but the first and last block
        XCTAssertLessThan(residentKiB(), full - 48 * 1024, "the unmapped pages are given back")
        XCTAssertTrue(try io.readBytes(offsetBlocks: 0, countBlocks: 1) == [UInt8](repeating: 0xA5, count: 512))
        XCTAssertTrue(try io.readBytes(offsetBlocks: 1, countBlocks: 16) == [UInt8](repeating: 0, count: 8192))
        XCTAssertTrue(try io.readBytes(offsetBlocks: 131_071, countBlocks: 1) == [UInt8](repeating: 0xA5, count: 512))
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
