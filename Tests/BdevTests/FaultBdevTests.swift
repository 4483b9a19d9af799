import XCTest
import Bdev
import BdevConformance
import BdevFault
import BdevMalloc
import Env

final class FaultBdevTests: XCTestCase {
    private let blocks: UInt64 = 64

    private func makeDevice(blockSize: Int = 4096) throws -> (FaultBdev, Bdev, Reactor, BdevSyncIO) {
        let reactor = try Reactor()
        let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: blocks, blockSizeBytes: blockSize)))
        let bdev = Bdev(backend: fault)
        return (fault, bdev, reactor, try BdevSyncIO(bdev: bdev, reactor: reactor))
    }

    /// The medium as it is, bypassing the overlay.
    private func medium(_ fault: FaultBdev, _ reactor: Reactor) throws -> [UInt8] {
        let io = try BdevSyncIO(bdev: fault.inner, reactor: reactor)
        defer { io.close() }
        return try io.readBytes(offsetBlocks: 0, countBlocks: blocks)
    }

    func testConformance() throws {
        let reactor = try Reactor()
        let inner = Bdev(backend: try MallocBdev(blockCount: 4096))
        try BdevConformance(reactor: reactor) { Bdev(backend: FaultBdev(wrapping: inner)) }.run()
    }

    func testReadsSeeUnflushedWritesButTheMediumDoesNot() throws {
        let (fault, _, reactor, io) = try makeDevice()
        defer { io.close() }
        let data = pattern(seed: 1, bytes: 2 * 4096)
        try io.writeBytes(data, offsetBlocks: 3)
        XCTAssertEqual(try io.readBytes(offsetBlocks: 3, countBlocks: 2), data)
        XCTAssertEqual(fault.unflushedWriteCount, 1)
        XCTAssertEqual(try medium(fault, reactor)[(3 * 4096)..<(5 * 4096)], ArraySlice(repeating: 0, count: 2 * 4096))
        try io.flush()
        XCTAssertEqual(fault.unflushedWriteCount, 0)
        XCTAssertEqual(Array(try medium(fault, reactor)[(3 * 4096)..<(5 * 4096)]), data)
    }

    func testKeepNoneAndKeepAll() throws {
        for policy in [FaultBdev.CrashPolicy.keepNone, .keepAll] {
            let (fault, _, reactor, io) = try makeDevice()
            let flushed = pattern(seed: 10, bytes: 4096)
            try io.writeBytes(flushed, offsetBlocks: 0)
            try io.flush()
            let unflushed = pattern(seed: 11, bytes: 4096)
            try io.writeBytes(unflushed, offsetBlocks: 1)
            try io.writeZeroes(offsetBlocks: 0, countBlocks: 1)
            io.close()
            let report = try fault.crash(policy: policy, reactor: reactor)
            let after = try medium(fault, reactor)
            switch policy {
            case .keepNone:
                XCTAssertEqual(report.kept, [])
                XCTAssertEqual(Array(after[0..<4096]), flushed)
                XCTAssertEqual(after[4096..<8192], ArraySlice(repeating: 0, count: 4096))
            default:
                XCTAssertEqual(report.kept, [0, 1])
                XCTAssertEqual(after[0..<4096], ArraySlice(repeating: 0, count: 4096))
                XCTAssertEqual(Array(after[4096..<8192]), unflushed)
            }
        }
    }

    /// The crash invariant over many seeds: flushed data survives; every 512-byte
    /// sector holds either its durable bytes or exactly the bytes one unflushed write
    /// gave it; nothing else ever appears.
    func testCrashInvariantOverManySeeds() throws {
        var sawTear = false
        var sawKeep = false
        var sawDrop = false
        for seed in UInt64(0)..<200 {
            for blockSize in [4096, 512] {
                let (fault, _, reactor, io) = try makeDevice(blockSize: blockSize)
                var random = SplitMix64(seed: seed)
                var durable = [UInt8](repeating: 0, count: Int(blocks) * blockSize)
                var candidates = [Set<[UInt8]>](repeating: [], count: durable.count / 512)  // per sector
                for step in 0..<12 {
                    let count = 1 + random.next() % 4
                    let offset = random.next() % (blocks - count + 1)
                    let range = Int(offset) * blockSize..<Int(offset + count) * blockSize
                    let data = random.next() % 5 == 0
                        ? [UInt8](repeating: 0, count: range.count)
                        : pattern(seed: seed &* 1000 &+ UInt64(step), bytes: range.count)
                    if data.allSatisfy({ $0 == 0 }) {
                        try io.writeZeroes(offsetBlocks: offset, countBlocks: count)
                    } else {
                        try io.writeBytes(data, offsetBlocks: offset)
                    }
                    for sector in 0..<(range.count / 512) {
                        candidates[range.lowerBound / 512 + sector].insert(Array(data[(sector * 512)..<((sector + 1) * 512)]))
                    }
                    if random.next() % 4 == 0 {
                        try io.flush()
                        durable = try medium(fault, reactor)
                        candidates = [Set<[UInt8]>](repeating: [], count: durable.count / 512)
                    }
                }
                io.close()
                let report = try fault.crash(seed: seed, reactor: reactor)
                sawTear = sawTear || report.torn != nil
                sawKeep = sawKeep || !report.kept.isEmpty
                sawDrop = sawDrop || !report.dropped.isEmpty
                let after = try medium(fault, reactor)
                for sector in 0..<candidates.count {
                    let bytes = Array(after[(sector * 512)..<((sector + 1) * 512)])
                    let old = Array(durable[(sector * 512)..<((sector + 1) * 512)])
                    XCTAssertTrue(bytes == old || candidates[sector].contains(bytes),
                                  "seed \(seed) bs \(blockSize): sector \(sector) holds bytes nobody wrote (\(report))")
                }
            }
        }
        XCTAssertTrue(sawTear && sawKeep && sawDrop, "the seeds exercise keeping, dropping and tearing")
    }

    func testSameSeedSameOutcomeDifferentSeedsDiffer() throws {
        func outcome(_ seed: UInt64) throws -> [UInt8] {
            let (fault, _, reactor, io) = try makeDevice()
            for step in 0..<16 { try io.writeBytes(pattern(seed: UInt64(step), bytes: 4096), offsetBlocks: UInt64(step)) }
            io.close()
            _ = try fault.crash(seed: seed, reactor: reactor)
            return try medium(fault, reactor)
        }
        XCTAssertEqual(try outcome(7), try outcome(7))
        let distinct = Set(try (0..<8).map { try outcome($0) })
        XCTAssertGreaterThan(distinct.count, 4)
    }

    func testTornWritesAreSectorAligned() throws {
        var tears = 0
        for seed in UInt64(0)..<64 {
            let (fault, _, reactor, io) = try makeDevice()
            let old = pattern(seed: 1, bytes: 4096)
            try io.writeBytes(old, offsetBlocks: 5)
            try io.flush()
            let new = pattern(seed: 2, bytes: 4096)
            try io.writeBytes(new, offsetBlocks: 5)
            io.close()
            let report = try fault.crash(seed: seed, reactor: reactor)
            let block = Array(try medium(fault, reactor)[(5 * 4096)..<(6 * 4096)])
            for sector in 0..<8 {
                let range = (sector * 512)..<((sector + 1) * 512)
                XCTAssertTrue(block[range] == old[range] || block[range] == new[range], "seed \(seed) sector \(sector)")
            }
            if let torn = report.torn {
                tears += 1
                for sector in 0..<8 {
                    let range = (sector * 512)..<((sector + 1) * 512)
                    XCTAssertEqual(block[range] == new[range], torn.sectorsApplied.contains(sector))
                }
            }
        }
        XCTAssertGreaterThan(tears, 5)
    }

    func testFailIOAtAndFrom() throws {
        let (fault, _, _, io) = try makeDevice()
        defer { io.close() }
        fault.failIO(at: 2)
        try io.writeBytes(pattern(seed: 1, bytes: 4096), offsetBlocks: 0)
        XCTAssertThrowsError(try io.readBytes(offsetBlocks: 0, countBlocks: 1)) {
            XCTAssertEqual($0 as? BdevError, .io(errno: EIO))
        }
        XCTAssertNoThrow(try io.readBytes(offsetBlocks: 0, countBlocks: 1))
        fault.failIO(from: 5)
        XCTAssertNoThrow(try io.flush())  // the 4th
        for _ in 0..<3 {
            XCTAssertThrowsError(try io.readBytes(offsetBlocks: 0, countBlocks: 1)) {
                XCTAssertEqual($0 as? BdevError, .io(errno: EIO))
            }
        }
        XCTAssertEqual(fault.ioCount, 7)
    }

    func testPowerCutAfterWritesThenCrash() throws {
        let (fault, bdev, reactor, io) = try makeDevice()
        fault.powerCut(afterWrites: 2)
        try io.writeBytes(pattern(seed: 1, bytes: 4096), offsetBlocks: 0)
        try io.writeBytes(pattern(seed: 2, bytes: 4096), offsetBlocks: 1)
        XCTAssertTrue(fault.isPoweredOff)
        XCTAssertThrowsError(try io.writeBytes(pattern(seed: 3, bytes: 4096), offsetBlocks: 2))
        XCTAssertThrowsError(try io.flush())
        XCTAssertEqual(fault.writeCount, 2)
        io.close()
        _ = try fault.crash(policy: .keepAll, reactor: reactor)
        XCTAssertFalse(fault.isPoweredOff)
        let after = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { after.close() }
        XCTAssertEqual(try after.readBytes(offsetBlocks: 1, countBlocks: 1), pattern(seed: 2, bytes: 4096))
        XCTAssertEqual(try after.readBytes(offsetBlocks: 2, countBlocks: 1), [UInt8](repeating: 0, count: 4096),
                       "the write refused after the power cut never appears")
    }

    func testCorruptReadsLeaveTheMediumIntact() throws {
        let (fault, _, reactor, io) = try makeDevice()
        defer { io.close() }
        let data = pattern(seed: 4, bytes: 3 * 4096)
        try io.writeBytes(data, offsetBlocks: 10)
        try io.flush()
        fault.corruptReads(block: 11)
        let read = try io.readBytes(offsetBlocks: 10, countBlocks: 3)
        XCTAssertEqual(Array(read[0..<4096]), Array(data[0..<4096]))
        XCTAssertNotEqual(Array(read[4096..<8192]), Array(data[4096..<8192]))
        XCTAssertEqual(Array(read[8192...]), Array(data[8192...]))
        XCTAssertEqual(Array(try medium(fault, reactor)[(10 * 4096)..<(13 * 4096)]), data)
        fault.clearFaults()
        XCTAssertEqual(try io.readBytes(offsetBlocks: 10, countBlocks: 3), data)
    }
}
