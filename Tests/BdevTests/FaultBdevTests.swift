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
        for (blockSize, blockCount) in [(4096, UInt64(4096)), (512, 8192)] {
            let reactor = try Reactor()
            let inner = Bdev(backend: try MallocBdev(blockCount: blockCount, blockSizeBytes: blockSize))
            try BdevConformance(reactor: reactor) { Bdev(backend: FaultBdev(wrapping: inner)) }.run()
        }
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
    /// gave it; nothing else ever appears. Before the crash, every read returns the
    /// newest bytes written, flushed or not.
    func testCrashInvariantOverManySeeds() throws {
        var sawTear = false
        var sawKeep = false
        var sawDrop = false
        for seed in UInt64(0)..<200 {
            for blockSize in [4096, 512] {
                let (fault, _, reactor, io) = try makeDevice(blockSize: blockSize)
                var random = SplitMix64(seed: seed)
                var durable = [UInt8](repeating: 0, count: Int(blocks) * blockSize)
                var current = durable
                var candidates = [Set<[UInt8]>](repeating: [], count: durable.count / 512)  // per sector
                for step in 0..<16 {
                    let count = 1 + random.next() % 4
                    let offset = random.next() % (blocks - count + 1)
                    let range = Int(offset) * blockSize..<Int(offset + count) * blockSize
                    var data = [UInt8](repeating: 0, count: range.count)
                    switch random.next() % 6 {
                    case 0: try io.writeZeroes(offsetBlocks: offset, countBlocks: count)
                    case 1: try io.unmap(offsetBlocks: offset, countBlocks: count)
                    case 2:
                        data = pattern(seed: seed &* 1000 &+ UInt64(step), bytes: range.count)
                        try writeVectored(io, data, offsetBlocks: offset, random: &random)
                    default:
                        data = pattern(seed: seed &* 1000 &+ UInt64(step), bytes: range.count)
                        try io.writeBytes(data, offsetBlocks: offset)
                    }
                    current.replaceSubrange(range, with: data)
                    for sector in 0..<(range.count / 512) {
                        candidates[range.lowerBound / 512 + sector].insert(Array(data[(sector * 512)..<((sector + 1) * 512)]))
                    }
                    let readCount = 1 + random.next() % 8
                    let readOffset = random.next() % (blocks - readCount + 1)
                    let readRange = Int(readOffset) * blockSize..<Int(readOffset + readCount) * blockSize
                    XCTAssertEqual(try io.readBytes(offsetBlocks: readOffset, countBlocks: readCount),
                                   Array(current[readRange]), "seed \(seed) bs \(blockSize) step \(step): read")
                    if random.next() % 4 == 0 {
                        try io.flush()
                        durable = try medium(fault, reactor)
                        XCTAssertEqual(durable, current, "seed \(seed) bs \(blockSize) step \(step): medium after flush")
                        XCTAssertEqual(fault.unflushedWriteCount, 0)
                        candidates = [Set<[UInt8]>](repeating: [], count: durable.count / 512)
                    }
                }
                io.close()
                let report = try fault.crash(seed: seed, reactor: reactor)
                sawTear = sawTear || report.torn != nil
                sawKeep = sawKeep || !report.kept.isEmpty
                sawDrop = sawDrop || !report.dropped.isEmpty
                XCTAssertEqual(fault.unflushedWriteCount, 0)
                let after = try medium(fault, reactor)
                for sector in 0..<candidates.count {
                    let bytes = Array(after[(sector * 512)..<((sector + 1) * 512)])
                    let old = Array(durable[(sector * 512)..<((sector + 1) * 512)])
                    XCTAssertTrue(bytes == old || candidates[sector].contains(bytes),
                                  "seed \(seed) bs \(blockSize): sector \(sector) holds bytes nobody wrote (\(report))")
                }
                // Powered on again: the device reads what the medium holds.
                let again = try BdevSyncIO(bdev: Bdev(backend: fault), reactor: reactor)
                XCTAssertEqual(try again.readBytes(offsetBlocks: 0, countBlocks: blocks), after)
                again.close()
            }
        }
        XCTAssertTrue(sawTear && sawKeep && sawDrop, "the seeds exercise keeping, dropping and tearing")
    }

    /// Writes `data` as up to four segments cut at random 512-byte boundaries.
    private func writeVectored(_ io: BdevSyncIO, _ data: [UInt8], offsetBlocks: UInt64,
                               random: inout SplitMix64) throws {
        let buffer = try DMABuffer.allocate(bytes: data.count)
        buffer.store(data)
        let sectors = data.count / 512
        var cuts = Set((0..<3).map { _ in Int(random.next() % UInt64(sectors)) * 512 })
        cuts.remove(0)
        let bounds = [0] + cuts.sorted() + [data.count]
        let segments = (0..<(bounds.count - 1)).map { buffer.segment(offset: bounds[$0], count: bounds[$0 + 1] - bounds[$0]) }
        try io.writev(segments, offsetBlocks: offsetBlocks, countBlocks: UInt64(data.count / io.geometry.blockSizeBytes))
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
                XCTAssertTrue((1..<8).contains(torn.sectorsApplied.count), "a tear mixes old and new: \(torn)")
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

    func testPowerCutAtOrBelowTheWriteCountCutsAtOnce() throws {
        let (fault, _, reactor, io) = try makeDevice()
        try io.writeBytes(pattern(seed: 1, bytes: 4096), offsetBlocks: 0)
        fault.powerCut(afterWrites: 1)
        XCTAssertTrue(fault.isPoweredOff)
        XCTAssertThrowsError(try io.readBytes(offsetBlocks: 0, countBlocks: 1)) {
            XCTAssertEqual($0 as? BdevError, .io(errno: EIO))
        }
        io.close()
        _ = try fault.crash(policy: .keepNone, reactor: reactor)
        XCTAssertEqual(fault.ioCount, 0)
        XCTAssertEqual(fault.writeCount, 0)
    }

    func testCrashKeepingFaultsCountsAfresh() throws {
        let (fault, bdev, reactor, io) = try makeDevice()
        fault.failIO(at: 2)
        fault.corruptReads(block: 3)
        io.close()
        _ = try fault.crash(policy: .keepAll, reactor: reactor, keepingFaults: true)
        let after = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { after.close() }
        XCTAssertNotEqual(try after.readBytes(offsetBlocks: 3, countBlocks: 1), [UInt8](repeating: 0, count: 4096))
        XCTAssertThrowsError(try after.flush()) { XCTAssertEqual($0 as? BdevError, .io(errno: EIO)) }
        XCTAssertNoThrow(try after.flush())
    }

    /// More unflushed runs than the inner channel's queue depth: the flush queues its
    /// writes rather than failing with queueFull.
    func testFlushOfMoreRunsThanTheInnerQueueDepth() throws {
        let reactor = try Reactor()
        let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 1024, blockSizeBytes: 512)))
        let io = try BdevSyncIO(bdev: Bdev(backend: fault), reactor: reactor)
        defer { io.close() }
        let runs = BdevLimits.queueDepthDefault + 44
        for run in 0..<runs { try io.writeBytes(pattern(seed: UInt64(run), bytes: 512), offsetBlocks: UInt64(2 * run)) }
        try io.flush()
        XCTAssertEqual(fault.unflushedWriteCount, 0)
        let durable = try BdevSyncIO(bdev: fault.inner, reactor: reactor)
        defer { durable.close() }
        let bytes = try durable.readBytes(offsetBlocks: 0, countBlocks: 1024)
        for run in 0..<runs {
            XCTAssertEqual(Array(bytes[(2 * run * 512)..<((2 * run + 1) * 512)]), pattern(seed: UInt64(run), bytes: 512))
        }
    }

    /// Two channels flush at once over a medium that completes in reverse order: the
    /// flushes take turns, so the newer version of a block is the one that stays.
    func testFlushesOfTwoChannelsDoNotReorderTheMedium() throws {
        let reactor = try Reactor()
        let scripted = ScriptedBdev(blockCount: 16)
        let fault = FaultBdev(wrapping: Bdev(backend: scripted))
        let bdev = Bdev(backend: fault)
        let first = try bdev.makeChannel(reactor: reactor)
        let second = try bdev.makeChannel(reactor: reactor)
        defer { first.close(); second.close() }
        let completions = Completions()
        let old = try DMABuffer.allocate(bytes: 4096)
        let new = try DMABuffer.allocate(bytes: 4096)
        old.store(pattern(seed: 1, bytes: 4096))
        new.store(pattern(seed: 2, bytes: 4096))
        try first.write(from: old, offsetBlocks: 5, countBlocks: 1, handler: completions, tag: 1)
        try first.flush(handler: completions, tag: 2)
        try second.write(from: new, offsetBlocks: 5, countBlocks: 1, handler: completions, tag: 3)
        try second.flush(handler: completions, tag: 4)
        reactor.run(until: { completions.statuses.count == 4 })
        XCTAssertEqual(completions.statuses, [1: .success, 2: .success, 3: .success, 4: .success])
        XCTAssertEqual(scripted.bytes(block: 5), new.bytes())
        XCTAssertEqual(fault.unflushedWriteCount, 0)
    }

    /// A read whose medium half completes after a flush has emptied the overlay still
    /// returns the unflushed bytes it was submitted behind.
    func testReadOverlappingAFlushSeesTheOverlayAsSubmitted() throws {
        let reactor = try Reactor()
        let scripted = ScriptedBdev(blockCount: 16)
        let fault = FaultBdev(wrapping: Bdev(backend: scripted))
        let channel = try Bdev(backend: fault).makeChannel(reactor: reactor)
        defer { channel.close() }
        let completions = Completions()
        let data = try DMABuffer.allocate(bytes: 4096)
        data.store(pattern(seed: 3, bytes: 4096))
        let back = try DMABuffer.allocate(bytes: 4096)
        try channel.write(from: data, offsetBlocks: 2, countBlocks: 1, handler: completions, tag: 1)
        scripted.holdsReads = true
        try channel.read(into: back, offsetBlocks: 2, countBlocks: 1, handler: completions, tag: 2)
        try channel.flush(handler: completions, tag: 3)
        reactor.run(until: { completions.statuses[3] != nil })
        XCTAssertEqual(fault.unflushedWriteCount, 0)
        XCTAssertNil(completions.statuses[2], "the read is still held")
        scripted.holdsReads = false
        reactor.run(until: { completions.statuses.count == 3 })
        XCTAssertEqual(completions.statuses, [1: .success, 2: .success, 3: .success])
        XCTAssertEqual(back.bytes(), data.bytes())
    }
}

private final class Completions: BdevCompletionHandler {
    var statuses: [UInt64: BdevStatus] = [:]
    func bdevIOCompleted(tag: UInt64, status: BdevStatus) { statuses[tag] = status }
}

/// A RAM device with an awkward but legal timing: reads copy at submission, writes
/// land when they complete, completions come in reverse order of submission, and reads
/// can be held back.
private final class ScriptedBdev: BdevBackend, BdevBackendChannel, @unchecked Sendable {
    let name = "scripted"
    let geometry: BdevGeometry
    var memory: [UInt8]
    var holdsReads = false
    private var pending: [(BdevIO, [UInt8])] = []

    init(blockCount: UInt64) {
        geometry = BdevGeometry(blockSizeBytes: 4096, blockCount: blockCount, isPersistent: false)
        memory = [UInt8](repeating: 0, count: Int(blockCount) * 4096)
    }

    func bytes(block: UInt64) -> [UInt8] { Array(memory[(Int(block) * 4096)..<(Int(block + 1) * 4096)]) }
    func makeChannel(reactor: Reactor) throws(BdevError) -> any BdevBackendChannel { self }
    func close() {}

    func submit(_ io: BdevIO) {
        let start = Int(io.offsetBlocks) * 4096
        var data: [UInt8] = []
        switch io.type {
        case .read: memory.withUnsafeBytes { io.scatter(from: $0.baseAddress! + start) }
        case .write:
            data = [UInt8](repeating: 0, count: io.byteCount)
            data.withUnsafeMutableBytes { io.gather(into: $0.baseAddress!) }
        case .writeZeroes, .unmap: data = [UInt8](repeating: 0, count: Int(io.countBlocks) * 4096)
        case .flush: break
        }
        pending.append((io, data))
    }

    func poll() -> PollStatus {
        guard !pending.isEmpty else { return .idle }
        var held: [(BdevIO, [UInt8])] = []
        var completed = false
        for (io, data) in pending.reversed() {
            if io.type == .read && holdsReads {
                held.insert((io, data), at: 0)
                continue
            }
            if !data.isEmpty {
                let start = Int(io.offsetBlocks) * 4096
                memory.replaceSubrange(start..<(start + data.count), with: data)
            }
            io.complete(.success)
            completed = true
        }
        pending = held
        return completed ? .busy : .pending
    }
}
