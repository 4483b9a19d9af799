import XCTest
import Bdev
import BdevConformance
import BdevMalloc
import BdevURing
import Env
@testable import NVMe

final class NVMeDriverTests: XCTestCase {
    final class Collector: BdevCompletionHandler {
        var results: [UInt64: BdevStatus] = [:]
        func bdevIOCompleted(tag: UInt64, status: BdevStatus) { results[tag] = status }
    }

    private func emulated(blocks: UInt64 = 4096, blockSize: Int = 4096, queueEntries: Int = 256,
                          timeoutNs: UInt64 = 10_000_000_000) throws -> (NVMeBdev, Bdev) {
        let backend = try NVMeBdev.emulated(namespace: Bdev(backend: try MallocBdev(blockCount: blocks, blockSizeBytes: blockSize)),
                                            queueEntries: queueEntries, timeoutNs: timeoutNs)
        return (backend, Bdev(backend: backend))
    }

    func testConformanceOverAFileWith512ByteBlocks() throws {
        let path = "/var/tmp/blobfs-nvme-\(getpid()).img"
        unlink(path)
        defer { unlink(path) }
        let reactor = try Reactor()
        try BdevConformance(reactor: reactor) {
            let file = Bdev(backend: try URingBdev(path: path, blockSizeBytes: 512, createSizeBytes: 8 << 20))
            return Bdev(backend: try NVMeBdev.emulated(namespace: file))
        }.run()
    }

    /// Unmap through the driver is Write Zeroes with DEAC; the software controller
    /// deallocates for it (DLFEAT bit 3), so a file namespace gets a hole: its allocated
    /// size falls, the range reads zeros, write-zeroes (no DEAC) still allocates.
    func testUnmapDeallocatesAFileNamespace() throws {
        let path = "/var/tmp/blobfs-nvme-unmap-\(getpid()).img"
        unlink(path)
        defer { unlink(path) }
        let reactor = try Reactor()
        let file = Bdev(backend: try URingBdev(path: path, blockSizeBytes: 4096, createSizeBytes: 16 << 20))
        let bdev = Bdev(backend: try NVMeBdev.emulated(namespace: file))
        defer { bdev.close() }
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        func allocated() -> Int {
            var info = stat()
            stat(path, &info)
            return Int(info.st_blocks) * 512
        }
        XCTAssertTrue((bdev.backend as! NVMeBdev).controller.namespaceData.writeZeroesDeallocates)
        try io.writeBytes([UInt8](repeating: 0x3C, count: 8 << 20), offsetBlocks: 0)
        try io.flush()
        let written = allocated()
        XCTAssertGreaterThanOrEqual(written, 8 << 20)
        try io.unmap(offsetBlocks: 256, countBlocks: 1024)  // 4 MiB from 1 MiB
        XCTAssertLessThanOrEqual(allocated(), written - (4 << 20), "a hole")
        XCTAssertTrue(try io.readBytes(offsetBlocks: 256, countBlocks: 1024) == [UInt8](repeating: 0, count: 4 << 20))
        XCTAssertTrue(try io.readBytes(offsetBlocks: 255, countBlocks: 1) == [UInt8](repeating: 0x3C, count: 4096))
        try io.writeZeroes(offsetBlocks: 256, countBlocks: 1024)
        XCTAssertTrue(try io.readBytes(offsetBlocks: 256, countBlocks: 1024) == [UInt8](repeating: 0, count: 4 << 20))
    }

    func testIdentifyReportsTheNamespace() throws {
        let (backend, bdev) = try emulated(blocks: 1000, blockSize: 512)
        defer { bdev.close() }
        XCTAssertEqual(backend.controller.namespaceData.size, 1000)
        XCTAssertEqual(backend.controller.namespaceData.blockSizeBytes, 512)
        XCTAssertEqual(backend.controller.controllerData.modelNumber, "blobfs software NVMe controller")
        XCTAssertTrue(backend.controller.controllerData.supportsWriteZeroes)
        XCTAssertEqual(backend.controller.maxTransferBytes, 128 << 10)
        XCTAssertGreaterThanOrEqual(backend.controller.ioQueuesGranted, 1)
    }

    /// A 4-entry queue (3 commands at once) wraps and flips its phase many times, and
    /// the requests beyond it wait in the driver until slots free.
    func testQueueWrapPhaseFlipAndFullQueue() throws {
        let (_, bdev) = try emulated(queueEntries: 4)
        defer { bdev.close() }
        let reactor = try Reactor()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        let collector = Collector()
        let buffer = try DMABuffer.allocate(bytes: 64 * 4096)
        buffer.store(pattern(seed: 5, bytes: 64 * 4096))
        for round in 0..<5 {
            for index in 0..<64 {
                try io.channel.write(from: buffer, bufferOffset: index * 4096, offsetBlocks: UInt64(index + round * 64),
                                     countBlocks: 1, handler: collector, tag: UInt64(round * 64 + index))
            }
            XCTAssertEqual(io.channel.inFlight, 64, "all accepted; 61 wait for queue slots")
            reactor.run(until: { collector.results.count == (round + 1) * 64 })
        }
        XCTAssertTrue(collector.results.values.allSatisfy { $0 == .success })
        for round in 0..<5 {
            XCTAssertEqual(try io.readBytes(offsetBlocks: UInt64(round * 64), countBlocks: 64), buffer.bytes())
        }
    }

    func testCompletionsOutOfOrder() throws {
        let (backend, bdev) = try emulated()
        defer { bdev.close() }
        var faults = NVMeSoftController.Faults()
        faults.reverseCompletions = true
        backend.emulator!.setFaults(faults)
        let reactor = try Reactor()
        let channel = try bdev.makeChannel(reactor: reactor)
        defer { channel.close() }
        final class Order: BdevCompletionHandler {
            var tags: [UInt64] = []
            func bdevIOCompleted(tag: UInt64, status: BdevStatus) { tags.append(tag) }
        }
        let order = Order()
        let buffer = try DMABuffer.allocate(bytes: 32 * 4096)
        for index in 0..<32 {
            try channel.write(from: buffer, bufferOffset: index * 4096, offsetBlocks: UInt64(index), countBlocks: 1,
                              handler: order, tag: UInt64(index))
        }
        reactor.run(until: { order.tags.count == 32 })
        XCTAssertEqual(Set(order.tags), Set(0..<32))
        XCTAssertNotEqual(order.tags, Array(0..<32), "the controller answered out of order")
    }

    func testErrorStatusIsATypedFailure() throws {
        let (backend, bdev) = try emulated()
        defer { bdev.close() }
        var faults = NVMeSoftController.Faults()
        faults.failLBA = (lba: 7, status: .lbaOutOfRange)
        backend.emulator!.setFaults(faults)
        let reactor = try Reactor()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        XCTAssertThrowsError(try io.readBytes(offsetBlocks: 7, countBlocks: 1)) {
            XCTAssertEqual($0 as? BdevError, .deviceStatus(code: UInt32(NVMeStatus.lbaOutOfRange.raw),
                                                            meaning: "LBA out of range (SCT 0, SC 0x80)"))
        }
        XCTAssertNoThrow(try io.readBytes(offsetBlocks: 8, countBlocks: 1))
        faults = NVMeSoftController.Faults()
        faults.namespaceNotReady = true
        backend.emulator!.setFaults(faults)
        XCTAssertThrowsError(try io.readBytes(offsetBlocks: 8, countBlocks: 1)) {
            guard case let .deviceStatus(_, meaning) = $0 as? BdevError else { return XCTFail("\($0)") }
            XCTAssertTrue(meaning.hasPrefix("namespace not ready"), meaning)
        }
    }

    func testLostCommandTimesOut() throws {
        let (backend, bdev) = try emulated(timeoutNs: 200_000_000)
        defer { bdev.close() }
        var faults = NVMeSoftController.Faults()
        faults.dropLBA = 3
        backend.emulator!.setFaults(faults)
        let reactor = try Reactor()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let start = MonotonicClock.nowNs()
        XCTAssertThrowsError(try io.readBytes(offsetBlocks: 3, countBlocks: 1)) {
            XCTAssertEqual($0 as? BdevError, .io(errno: ETIMEDOUT))
        }
        XCTAssertLessThan(MonotonicClock.nowNs() - start, 2_000_000_000)
        XCTAssertNoThrow(try io.readBytes(offsetBlocks: 4, countBlocks: 1), "the queue still works")
        backend.emulator!.setFaults(NVMeSoftController.Faults())
        io.close()  // with the lost command still outstanding: deleting the queue ends it
    }

    /// CSTS.CFS with commands unanswered: the controller is reset (CC.EN 0 then 1), the
    /// queue pair made again with its ID, the unanswered write sent again; a second
    /// channel, on another reactor, finds its queue gone and makes it again too. Before
    /// this, a fatal status failed every request until a new bdev was opened.
    func testFatalStatusResetsTheControllerAndResendsWhatWasUnanswered() throws {
        let (backend, bdev) = try emulated()
        let reactor = try Reactor()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let other = try BdevSyncIO(bdev: bdev, reactor: try Reactor())
        try io.writeBytes([UInt8](repeating: 0xA1, count: 4096), offsetBlocks: 0)
        XCTAssertEqual(try other.readBytes(offsetBlocks: 0, countBlocks: 1), [UInt8](repeating: 0xA1, count: 4096))
        backend.emulator!.raiseFatalStatus()
        XCTAssertTrue(backend.controller.isFatal)
        // Submitted to a controller that no longer executes anything: it must be resent.
        let buffer = try DMABuffer.allocate(bytes: 4096)
        buffer.fill(0xB2)
        let collector = Collector()
        try io.channel.write(from: buffer, offsetBlocks: 5, countBlocks: 1, handler: collector, tag: 1)
        let deadline = MonotonicClock.nowNs() + 5_000_000_000
        reactor.run(until: { collector.results[1] != nil || MonotonicClock.nowNs() > deadline })
        XCTAssertEqual(collector.results[1], .success)
        XCTAssertFalse(backend.controller.isFatal)
        XCTAssertEqual(backend.controller.fatalResets, 1)
        XCTAssertEqual(try io.readBytes(offsetBlocks: 5, countBlocks: 1), [UInt8](repeating: 0xB2, count: 4096))
        XCTAssertEqual(try other.readBytes(offsetBlocks: 5, countBlocks: 1), [UInt8](repeating: 0xB2, count: 4096),
                       "the other channel's queue was made again too")
        XCTAssertEqual(backend.controller.fatalResets, 1, "one reset for both channels")
        io.close()
        other.close()
        bdev.close()
    }
}

/// Many sequential synchronous writes through the driver over a file, each from a fresh
/// pool buffer (buffers are reused as soon as a request completes), then every block
/// read back through the file directly: each block holds exactly what was written to it.
/// (It caught the software controller re-executing a lap of stale submission entries of
/// a queue deleted earlier in the same poll, at close.)
final class NVMeSequentialWriteTests: XCTestCase {
    func testEveryWriteLandsWhereItWasAddressed() throws {
        let path = "/var/tmp/blobfs-nvme-seq-\(getpid()).img"
        unlink(path)
        defer { unlink(path) }
        let reactor = try Reactor()
        let blocks: UInt64 = 8192
        let file = Bdev(backend: try URingBdev(path: path, blockSizeBytes: 4096, createSizeBytes: blocks * 4096))
        let device = Bdev(backend: try NVMeBdev.emulated(namespace: file))
        let io = try BdevSyncIO(bdev: device, reactor: reactor)
        var order = Array(0..<blocks)
        var random = SplitMix64(seed: 7)
        order.shuffle(using: &random)
        func pattern(_ block: UInt64, _ round: UInt64) -> [UInt8] {
            var bytes = (0..<4096).map { UInt8(truncatingIfNeeded: block &* 31 &+ round &* 7 &+ UInt64($0 / 64)) }
            for index in 0..<8 { bytes[index] = UInt8(truncatingIfNeeded: block >> (8 * UInt64(index))) }
            bytes[8] = UInt8(round)
            return bytes
        }
        for (index, block) in order.prefix(1000).enumerated() {
            try io.writeBytes(pattern(block, 1), offsetBlocks: block)
            if index % 300 == 299 { try io.flush() }
        }
        for block in order.prefix(50) { try io.writeBytes(pattern(block, 2), offsetBlocks: block) }
        try io.flush()
        io.close()
        device.close()
        let check = try BdevSyncIO(bdev: Bdev(backend: try URingBdev(path: path, blockSizeBytes: 4096)), reactor: reactor)
        defer { check.close() }
        var wrong: [UInt64] = []
        for (index, block) in order.prefix(1000).enumerated() {
            let expected = pattern(block, index < 50 ? 2 : 1)
            let found = try check.readBytes(offsetBlocks: block, countBlocks: 1)
            if found != expected {
                if wrong.count < 5 {
                    let holds = found[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
                    let position = order.firstIndex(of: block)!, other = order.firstIndex(of: holds) ?? -1
                    print("block \(block) (written #\(position)) holds block \(holds)'s data (written #\(other)), round \(found[8])")
                }
                wrong.append(block)
            }
        }
        XCTAssertEqual(wrong.count, 0, "blocks holding other data: \(wrong.prefix(10))")
    }
}
