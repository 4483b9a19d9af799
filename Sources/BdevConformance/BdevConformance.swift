import Bdev
import Env

/// The checks every bdev module must pass (in the manner of SPDK's bdevio). Runs on a
/// reactor stepped by hand on the calling thread; throws the first failure, naming the
/// check and what differed.
public struct BdevConformance {
    public struct Failure: Error, CustomStringConvertible {
        public let check: String
        public let message: String
        public var description: String { "\(check): \(message)" }
    }

    public typealias Opener = () throws -> Bdev

    private let open: Opener
    private let reactor: Reactor

    /// `open` is called once at the start and again for the persistence check; it must
    /// return the same device (same backing store) each time.
    public init(reactor: Reactor, open: @escaping Opener) {
        self.reactor = reactor
        self.open = open
    }

    /// Runs every check; returns their names.
    @discardableResult
    public func run() throws -> [String] {
        let bdev = try open()
        let io: BdevSyncIO
        do { io = try BdevSyncIO(bdev: bdev, reactor: reactor) } catch {
            bdev.close()
            throw error
        }
        var closed = false
        defer {
            if !closed {  // a failed check still releases the device
                io.close()
                bdev.close()
            }
        }
        var passed: [String] = []
        func check(_ name: String, _ body: () throws -> Void) throws {
            do { try body() } catch let failure as Failure { throw failure } catch {
                throw Failure(check: name, message: "\(error)")
            }
            passed.append(name)
        }
        try check("patterns") { try patterns(io) }
        try check("vectored") { try vectored(io) }
        try check("rejections") { try rejections(io) }
        try check("zeroes") { try zeroes(io) }
        try check("queue-depth-128") { try inFlight(io, count: 128) }
        try check("queue-full") { try queueFull(bdev) }
        try check("flush-ordering") { try flushOrdering(io) }
        let persistent = bdev.geometry.isPersistent
        let marker = try writeMarker(io)
        closed = true
        io.close()
        bdev.close()
        if persistent {
            try check("persistence") {
                let reopened = try open()
                let again = try BdevSyncIO(bdev: reopened, reactor: reactor)
                defer { again.close(); reopened.close() }
                try expectMarker(again, marker)
            }
        }
        return passed
    }

    // MARK: - Checks

    private func patterns(_ io: BdevSyncIO) throws {
        let geometry = io.geometry
        let blocks = geometry.blockCount
        var random = SplitMix64(seed: 1)
        var cases: [(UInt64, UInt64)] = [(0, 1), (1, 1), (0, 8), (7, 9), (blocks - 1, 1), (blocks - 8, 8)]
        for _ in 0..<24 {
            let count = 1 + random.next() % min(64, blocks)
            cases.append((random.next() % (blocks - count + 1), count))
        }
        if blocks >= 256 { cases.append((blocks / 2, 256)) }
        for (offset, count) in cases where count <= blocks && offset + count <= blocks {
            let data = pattern(seed: offset &* 31 &+ count, bytes: Int(count) * geometry.blockSizeBytes)
            try io.writeBytes(data, offsetBlocks: offset)
            let back = try io.readBytes(offsetBlocks: offset, countBlocks: count)
            try expectEqual(back, data, "\(count) blocks at \(offset)")
        }
        // Overwrite a sub-range and check the neighbours kept their bytes.
        let bs = geometry.blockSizeBytes
        let base = pattern(seed: 99, bytes: 8 * bs)
        try io.writeBytes(base, offsetBlocks: 16)
        let middle = pattern(seed: 100, bytes: 2 * bs)
        try io.writeBytes(middle, offsetBlocks: 19)
        let expected = Array(base[0..<(3 * bs)]) + middle + Array(base[(5 * bs)...])
        try expectEqual(try io.readBytes(offsetBlocks: 16, countBlocks: 8), expected, "overwrite of blocks 19-20")
    }

    private func vectored(_ io: BdevSyncIO) throws {
        let bs = io.geometry.blockSizeBytes
        let first = try DMABuffer.allocate(bytes: bs)
        let second = try DMABuffer.allocate(bytes: 3 * bs)
        let third = try DMABuffer.allocate(bytes: 3 * bs)
        let data = pattern(seed: 7, bytes: 4 * bs)
        first.store(data[0..<bs])
        second.store(data[bs..<(bs + bs / 2)])                 // half a block in one segment...
        third.store(data[(bs + bs / 2)..<(4 * bs)])            // ...and the rest in another
        try io.writev([first.segment(count: bs), second.segment(count: bs / 2), third.segment(count: 2 * bs + bs / 2)],
                      offsetBlocks: 40, countBlocks: 4)
        try expectEqual(try io.readBytes(offsetBlocks: 40, countBlocks: 4), data, "vectored write")
        let readA = try DMABuffer.allocate(bytes: 3 * bs)
        let readB = try DMABuffer.allocate(bytes: bs)
        try io.readv([readA.segment(count: 3 * bs), readB.segment(count: bs)], offsetBlocks: 40, countBlocks: 4)
        try expectEqual(readA.bytes() + readB.bytes(), data, "vectored read")
        let many = try DMABuffer.allocate(bytes: 64 * bs)
        many.store(pattern(seed: 8, bytes: 64 * bs))
        let sixtyFour = (0..<64).map { many.segment(offset: $0 * bs, count: bs) }
        try io.writev(sixtyFour, offsetBlocks: 64, countBlocks: 64)
        try expectEqual(try io.readBytes(offsetBlocks: 64, countBlocks: 64), many.bytes(), "64-segment write")
    }

    private func rejections(_ io: BdevSyncIO) throws {
        let geometry = io.geometry
        let bs = geometry.blockSizeBytes
        let buffer = try DMABuffer.allocate(bytes: 2 * bs)
        try expectError(.outOfRange(offsetBlocks: geometry.blockCount, countBlocks: 1, blockCount: geometry.blockCount),
                        "read past the end") { () throws(BdevError) in
            try io.read(into: buffer, offsetBlocks: geometry.blockCount, countBlocks: 1)
        }
        try expectError(.outOfRange(offsetBlocks: geometry.blockCount - 1, countBlocks: 2, blockCount: geometry.blockCount),
                        "write straddling the end") { () throws(BdevError) in
            try io.write(from: buffer, offsetBlocks: geometry.blockCount - 1, countBlocks: 2)
        }
        try expectError(.outOfRange(offsetBlocks: UInt64.max, countBlocks: 2, blockCount: geometry.blockCount),
                        "offset overflow") { () throws(BdevError) in
            try io.writeZeroes(offsetBlocks: UInt64.max, countBlocks: 2)
        }
        try expectError(.emptyRequest, "zero-length unmap") { () throws(BdevError) in
            try io.unmap(offsetBlocks: 0, countBlocks: 0)
        }
        try expectError(.lengthMismatch(bufferBytes: 2 * bs, requestBytes: 3 * bs), "buffer too small") {
            () throws(BdevError) in
            try io.read(into: buffer, offsetBlocks: 0, countBlocks: 3)
        }
        try expectError(.lengthMismatch(bufferBytes: bs + 100, requestBytes: bs), "segments not a whole block") {
            () throws(BdevError) in
            try io.writev([buffer.segment(count: bs + 100)], offsetBlocks: 0, countBlocks: 1)
        }
        let tooMany = (0...BdevLimits.segmentCountMax).map { _ in buffer.segment(count: 8) }
        try expectError(.tooManySegments(count: tooMany.count, max: BdevLimits.segmentCountMax), "too many segments") {
            () throws(BdevError) in
            try io.readv(tooMany, offsetBlocks: 0, countBlocks: 1)
        }
        if geometry.bufferAlignmentBytes > 1 {
            try expectError(.misalignedBuffer(alignmentBytes: geometry.bufferAlignmentBytes), "misaligned buffer") {
                () throws(BdevError) in
                try io.readv([buffer.segment(offset: 1, count: bs)], offsetBlocks: 0, countBlocks: 1)
            }
        }
        if io.channel.inFlight != 0 { throw Failure(check: "rejections", message: "a refused request stayed in flight") }
    }

    private func zeroes(_ io: BdevSyncIO) throws {
        let bs = io.geometry.blockSizeBytes
        for (offset, count) in [(UInt64(200), UInt64(1)), (210, 17), (256, 256)] where offset + count <= io.geometry.blockCount {
            try io.writeBytes(pattern(seed: offset, bytes: Int(count) * bs), offsetBlocks: offset)
            try io.writeZeroes(offsetBlocks: offset, countBlocks: count)
            try expectEqual(try io.readBytes(offsetBlocks: offset, countBlocks: count),
                            [UInt8](repeating: 0, count: Int(count) * bs), "write-zeroes of \(count) at \(offset)")
            try io.writeBytes(pattern(seed: offset + 1, bytes: Int(count) * bs), offsetBlocks: offset)
            try io.unmap(offsetBlocks: offset, countBlocks: count)
            try expectEqual(try io.readBytes(offsetBlocks: offset, countBlocks: count),
                            [UInt8](repeating: 0, count: Int(count) * bs), "unmap of \(count) at \(offset)")
        }
        // Neighbours of a zeroed range keep their data.
        let data = pattern(seed: 5, bytes: 3 * bs)
        try io.writeBytes(data, offsetBlocks: 600)
        try io.writeZeroes(offsetBlocks: 601, countBlocks: 1)
        let expected = Array(data[0..<bs]) + [UInt8](repeating: 0, count: bs) + Array(data[(2 * bs)...])
        try expectEqual(try io.readBytes(offsetBlocks: 600, countBlocks: 3), expected, "neighbours of write-zeroes")
    }

    private func inFlight(_ io: BdevSyncIO, count: Int) throws {
        let bs = io.geometry.blockSizeBytes
        let counter = CompletionCounter()
        let buffer = try DMABuffer.allocate(bytes: count * bs)
        let data = pattern(seed: 128, bytes: count * bs)
        buffer.store(data)
        let base: UInt64 = 1024
        for index in 0..<count {
            try io.channel.write(from: buffer, bufferOffset: index * bs, offsetBlocks: base + UInt64(index),
                                 countBlocks: 1, handler: counter, tag: UInt64(index))
        }
        if io.channel.inFlight != count {
            throw Failure(check: "queue-depth-128", message: "\(io.channel.inFlight) in flight, expected \(count)")
        }
        reactor.run(until: { counter.completed == count })
        try counter.expectAllSucceeded(count)
        let back = try DMABuffer.allocate(bytes: count * bs)
        counter.reset()
        for index in (0..<count).reversed() {
            try io.channel.read(into: back, bufferOffset: index * bs, offsetBlocks: base + UInt64(index),
                                countBlocks: 1, handler: counter, tag: UInt64(index))
        }
        reactor.run(until: { counter.completed == count })
        try counter.expectAllSucceeded(count)
        try expectEqual(back.bytes(), data, "\(count) concurrent reads")
    }

    private func queueFull(_ bdev: Bdev) throws {
        let channel = try bdev.makeChannel(reactor: reactor, queueDepth: 4)
        defer { channel.close() }
        let counter = CompletionCounter()
        let buffer = try DMABuffer.allocate(bytes: bdev.geometry.blockSizeBytes)
        for _ in 0..<4 { try channel.read(into: buffer, offsetBlocks: 0, countBlocks: 1, handler: counter) }
        do {
            try channel.read(into: buffer, offsetBlocks: 0, countBlocks: 1, handler: counter)
            throw Failure(check: "queue-full", message: "fifth request accepted on a depth-4 channel")
        } catch let error as BdevError where error == .queueFull {}
        reactor.run(until: { counter.completed == 4 })
        try counter.expectAllSucceeded(4)
        try channel.read(into: buffer, offsetBlocks: 0, countBlocks: 1, handler: counter)
        reactor.run(until: { counter.completed == 5 })
    }

    private func flushOrdering(_ io: BdevSyncIO) throws {
        let bs = io.geometry.blockSizeBytes
        let counter = CompletionCounter()
        let first = try DMABuffer.allocate(bytes: bs)
        let second = try DMABuffer.allocate(bytes: bs)
        first.store(pattern(seed: 11, bytes: bs))
        second.store(pattern(seed: 12, bytes: bs))
        try io.channel.write(from: first, offsetBlocks: 300, countBlocks: 1, handler: counter, tag: 1)
        reactor.run(until: { counter.completed == 1 })
        try io.channel.flush(handler: counter, tag: 2)
        reactor.run(until: { counter.completed == 2 })
        try io.channel.write(from: second, offsetBlocks: 300, countBlocks: 1, handler: counter, tag: 3)
        reactor.run(until: { counter.completed == 3 })
        try io.channel.flush(handler: counter, tag: 4)
        reactor.run(until: { counter.completed == 4 })
        try counter.expectAllSucceeded(4)
        if counter.order != [1, 2, 3, 4] {
            throw Failure(check: "flush-ordering", message: "completion order \(counter.order)")
        }
        try expectEqual(try io.readBytes(offsetBlocks: 300, countBlocks: 1), second.bytes(), "data after flush")
    }

    private func writeMarker(_ io: BdevSyncIO) throws -> (UInt64, [UInt8]) {
        let blocks = io.geometry.blockCount
        let offset = blocks > 4 ? blocks - 4 : 0
        let data = pattern(seed: 4242, bytes: 2 * io.geometry.blockSizeBytes)
        try io.writeBytes(data, offsetBlocks: offset)
        try io.flush()
        return (offset, data)
    }

    private func expectMarker(_ io: BdevSyncIO, _ marker: (UInt64, [UInt8])) throws {
        try expectEqual(try io.readBytes(offsetBlocks: marker.0, countBlocks: 2), marker.1, "data after close and reopen")
    }

    // MARK: - Helpers

    private func expectEqual(_ actual: [UInt8], _ expected: [UInt8], _ what: String) throws {
        guard actual != expected else { return }
        let common = min(actual.count, expected.count)
        let first = (0..<common).first { actual[$0] != expected[$0] } ?? common
        throw Failure(check: what, message: "first difference at byte \(first) of \(expected.count)")
    }

    private func expectError(_ expected: BdevError, _ what: String, _ body: () throws(BdevError) -> Void) throws {
        do {
            try body()
        } catch {
            if error == expected { return }
            throw Failure(check: what, message: "got \(error), expected \(expected)")
        }
        throw Failure(check: what, message: "accepted; expected \(expected)")
    }
}

/// A deterministic byte pattern that differs per seed and per position.
public func pattern(seed: UInt64, bytes: Int) -> [UInt8] {
    var generator = SplitMix64(seed: seed &+ 0x9E37_79B9)
    var result = [UInt8](repeating: 0, count: bytes)
    var index = 0
    while index < bytes {
        var word = generator.next()
        for _ in 0..<8 where index < bytes {
            result[index] = UInt8(truncatingIfNeeded: word)
            word >>= 8
            index += 1
        }
    }
    return result
}

final class CompletionCounter: BdevCompletionHandler {
    private(set) var completed = 0
    private(set) var failures: [BdevError] = []
    private(set) var order: [UInt64] = []

    func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        completed += 1
        order.append(tag)
        if case let .failed(error) = status { failures.append(error) }
    }

    func reset() {
        completed = 0
        failures = []
        order = []
    }

    func expectAllSucceeded(_ count: Int) throws {
        if !failures.isEmpty || completed != count {
            throw BdevConformance.Failure(check: "completions",
                                          message: "\(completed)/\(count) completed, failures: \(failures)")
        }
    }
}
