#if canImport(Glibc)
import Glibc
#endif
import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
import Synchronization
import Blobstore
@testable import BlobFileSystem

/// The asynchronous fsync of `FileSystemService` (what FUSE uses), under the fault bdev:
/// once it has answered, the file survives a power cut that drops every unflushed write.
final class FileSystemServiceTests: XCTestCase {
    /// The service's asynchronous fsync, waited for from the test thread; its errno.
    private func fsync(_ service: FileSystemService, _ ino: UInt64) -> Int32 {
        let answer = Atomic<Int32>(-1)
        service.blobService.reactor.send { service.fsync(ino: ino) { errno in answer.store(errno, ordering: .releasing) } }
        while answer.load(ordering: .acquiring) < 0 { usleep(1000) }
        return answer.load(ordering: .acquiring)
    }

    /// Power goes now (nothing not yet flushed reaches the medium), the service stops, and
    /// the store comes back read-only; `body` gets the file system as it was recovered.
    private func afterPowerCut(_ fault: FaultBdev, _ device: Bdev, _ service: FileSystemService,
                               _ body: (FileSystem) throws -> Void) throws {
        fault.powerCut(afterWrites: fault.writeCount)
        try? service.stop()
        let reactor = try Reactor()
        _ = try fault.crash(policy: .keepNone, reactor: reactor)
        let io = try BdevSyncIO(bdev: device, reactor: reactor)
        defer { io.close() }
        try body(try FileSystem.mount(try BlobStore.load(io, readOnly: true).0))
    }

    func testAsynchronousFsyncIsDurable() throws {
        for round in 0..<3 {
            let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 4096)))
            let device = Bdev(backend: fault)
            let service = try FileSystemService(bdev: device, format: BlobStore.Options())
            let data = (0..<(10_000 + round * 5000)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ round) }
            let ino = service.perform { fs -> UInt64 in
                let made = try! fs.create(parent: FileSystem.rootIno, name: Array("f\(round)".utf8), mode: 0o644, caller: .root)
                try! fs.write(ino: made.ino, offset: 0, data: data)
                fs.release(ino: made.ino)
                return made.ino
            }
            XCTAssertEqual(fsync(service, ino), 0)
            try afterPowerCut(fault, device, service) { fs in
                let found = try fs.lookup(parent: FileSystem.rootIno, name: Array("f\(round)".utf8))
                XCTAssertEqual(found.attributes.size, UInt64(data.count), "round \(round)")
                XCTAssertTrue(try fs.read(ino: found.ino, offset: 0, count: data.count) == data, "round \(round): data after the power cut")
            }
        }
    }

    /// An overwrite that does not grow the file takes the one-flush fsync (times committed,
    /// then one flush for data and log): after its answer, both survive a power cut that
    /// drops every unflushed write.
    func testFsyncOfAnOverwriteIsDurable() throws {
        let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 4096)))
        let device = Bdev(backend: fault)
        let service = try FileSystemService(bdev: device, format: BlobStore.Options())
        let original = (0..<50_000).map { UInt8(truncatingIfNeeded: $0 &* 3) }
        let patch = [UInt8](repeating: 0x5A, count: 12_288)
        let ino = service.perform { fs -> UInt64 in
            let made = try! fs.create(parent: FileSystem.rootIno, name: Array("o".utf8), mode: 0o644, caller: .root)
            try! fs.write(ino: made.ino, offset: 0, data: original)
            return made.ino
        }
        XCTAssertEqual(fsync(service, ino), 0)
        let plan = service.perform { fs -> String in
            try! fs.write(ino: ino, offset: 8192, data: patch)  // inside the file: no growth
            let plan = try! fs.fsyncPlan(ino: ino)
            return "\(plan.needsAttributes) \(plan.dataFirst == nil)"
        }
        XCTAssertEqual(plan, "true true", "an overwrite needs its times committed, not a data flush first")
        XCTAssertEqual(fsync(service, ino), 0)
        var expected = original
        expected.replaceSubrange(8192..<(8192 + patch.count), with: patch)
        try afterPowerCut(fault, device, service) { fs in
            XCTAssertTrue(try fs.read(ino: ino, offset: 0, count: original.count) == expected, "the overwrite after the power cut")
        }
    }

    /// Asynchronous reads (what FUSE uses): bytes at any offset and length, holes and the
    /// end of file as a read through the file system returns them; and a read still in
    /// flight when its clusters are released completes before any of them is handed to
    /// another file (its answer is the old owner's bytes, given before that write returns).
    func testAsynchronousReads() throws {
        let service = try FileSystemService(bdev: Bdev(backend: try MallocBdev(blockCount: 8192)), format: BlobStore.Options())
        defer { try? service.stop() }
        let data = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let checked = service.perform { fs -> String? in
            let file = try! fs.create(parent: FileSystem.rootIno, name: Array("a".utf8), mode: 0o644, caller: .root)
            try! fs.write(ino: file.ino, offset: 0, data: data)
            try! fs.write(ino: file.ino, offset: 500_000, data: [1, 2, 3])  // a hole in between
            for (offset, count) in [(0, 4096), (1, 10), (4095, 2), (100_000, 200_000), (299_990, 20_000),
                                    (400_000, 5000), (499_998, 100), (500_003, 10), (900_000, 1)] {
                let expected = try! fs.read(ino: file.ino, offset: UInt64(offset), count: count)
                var got: [UInt8]?
                var status: Int32 = -1
                service.read(ino: file.ino, offset: UInt64(offset), count: count) { bytes, errno in
                    got = Array(bytes)
                    status = errno
                }
                while got == nil { service.blobService.reactor.runOnce() }
                if status != 0 || got! != expected { return "read \(offset)+\(count): errno \(status), \(got!.count) bytes, expected \(expected.count)" }
            }
            // A read in flight, then its file truncated and another file written.
            var answer: [UInt8]?
            service.read(ino: file.ino, offset: 0, count: 8192) { bytes, _ in answer = Array(bytes) }
            _ = try! fs.setAttributes(ino: file.ino, AttributeChanges(size: 0), caller: .root)
            let other = try! fs.create(parent: FileSystem.rootIno, name: Array("b".utf8), mode: 0o644, caller: .root)
            try! fs.write(ino: other.ino, offset: 0, data: [UInt8](repeating: 0xEE, count: 600_000))
            guard let answer else { return "the read was still in flight when released clusters were reused" }
            if answer != Array(data[0..<8192]) { return "the in-flight read did not return the old bytes" }
            return nil
        }
        XCTAssertNil(checked)
    }

    /// Writes through the service (what FUSE uses): overwrites of whole io units inside
    /// the file go to the device asynchronously, the rest (unaligned, growing, into holes,
    /// append) synchronously; every byte reads back as a model says, and a write in flight
    /// when its clusters are released is done before they are handed out again.
    func testAsynchronousWrites() throws {
        let service = try FileSystemService(bdev: Bdev(backend: try MallocBdev(blockCount: 8192)), format: BlobStore.Options())
        defer { try? service.stop() }
        let problem = service.perform { fs -> String? in
            let file = try! fs.create(parent: FileSystem.rootIno, name: Array("w".utf8), mode: 0o644, caller: .root)
            var model = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 5) }
            try! fs.write(ino: file.ino, offset: 0, data: model)
            var random = SplitMix64(seed: 7)
            for step in 0..<300 {
                let aligned = random.next() % 2 == 0
                var offset = Int(random.next() % 260_000)
                var count = Int(random.next() % 20_000) + 1
                if aligned { offset = offset / 4096 * 4096; count = (count + 4095) / 4096 * 4096 }
                let data = (0..<count).map { _ in UInt8(truncatingIfNeeded: random.next()) }
                var answer: (Int, Int32)?
                data.withUnsafeBytes { service.write(ino: file.ino, offset: UInt64(offset), data: $0, append: false) { answer = ($0, $1) } }
                while answer == nil { service.blobService.reactor.runOnce() }
                if answer! != (count, 0) { return "step \(step): write answered \(answer!)" }
                if offset > model.count { model += [UInt8](repeating: 0, count: offset - model.count) }
                if offset + count > model.count { model += [UInt8](repeating: 0, count: offset + count - model.count) }
                model.replaceSubrange(offset..<(offset + count), with: data)
            }
            let size = try! fs.getAttributes(ino: file.ino).attributes.size
            if size != UInt64(model.count) { return "size \(size), model \(model.count)" }
            if try! fs.read(ino: file.ino, offset: 0, count: model.count) != model { return "contents differ from the model" }
            // An overwrite in flight, then the file truncated and another file written.
            var answered = false
            [UInt8](repeating: 0x11, count: 8192).withUnsafeBytes {
                service.write(ino: file.ino, offset: 4096, data: $0, append: false) { _, _ in answered = true }
            }
            _ = try! fs.setAttributes(ino: file.ino, AttributeChanges(size: 0), caller: .root)
            let other = try! fs.create(parent: FileSystem.rootIno, name: Array("o".utf8), mode: 0o644, caller: .root)
            let otherData = [UInt8](repeating: 0xEE, count: 600_000)
            try! fs.write(ino: other.ino, offset: 0, data: otherData)
            if !answered { return "the write was still in flight when released clusters were reused" }
            if try! fs.read(ino: other.ino, offset: 0, count: otherData.count) != otherData { return "the other file's bytes changed" }
            return nil
        }
        XCTAssertNil(problem)
    }

    /// What FUSE's fsync does under load on a full device with failing flushes: many
    /// fsyncs of grown files at once (their second halves ask for flushes from inside a
    /// flush's completion), writes that run out of space, and device flushes that fail.
    /// Every fsync is answered exactly once, within a time limit; ENOSPC and EIO are fine
    /// answers, silence is not. (Before the fix, two data-first fsyncs sharing a flush lost
    /// one of their second flushes' waiters: the caller waited forever.)
    func testEveryFsyncIsAnsweredOnceOnAFullDeviceWithFailingFlushes() throws {
        for round in 0..<4 {
            let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 2048)))
            let device = Bdev(backend: fault)
            let service = try FileSystemService(bdev: device, format: BlobStore.Options(logPages: 8))
            let files = 12
            let inos = service.perform { fs -> [UInt64] in
                (0..<files).map { index in
                    try! fs.create(parent: FileSystem.rootIno, name: Array("f\(index)".utf8), mode: 0o644, caller: .root).ino
                }
            }
            let calls = 40 * files
            let answers = AnswerCounts(calls)  // touched on the reactor only
            let answered = Atomic<Int>(0)
            let errors = Atomic<Int>(0)
            var random = SplitMix64(seed: UInt64(round) + 1)
            for wave in 0..<40 {
                if round >= 2 && wave % 7 == 3 { fault.failIO(from: fault.ioCount + random.next() % 8) }
                if round >= 2 && wave % 7 == 5 { fault.clearFaults() }
                let sizes = (0..<files).map { _ in Int(random.next() % 300_000) + 1 }
                let base = wave * files
                service.perform { fs in
                    // Grow every file (the device fills up and writes start failing), then
                    // ask for every fsync in one go: they share flushes.
                    for (index, ino) in inos.enumerated() {
                        let data = [UInt8](repeating: UInt8(truncatingIfNeeded: wave), count: sizes[index])
                        _ = try? fs.write(ino: ino, offset: UInt64(wave * 4096), data: data)
                    }
                    for (index, ino) in inos.enumerated() {
                        service.fsync(ino: ino) { errno in
                            answers.counts[base + index] += 1
                            if errno != 0 { errors.add(1, ordering: .relaxed) }
                            answered.add(1, ordering: .releasing)
                        }
                    }
                }
            }
            let deadline = MonotonicClock.nowNs() + 30_000_000_000
            while answered.load(ordering: .acquiring) < calls && MonotonicClock.nowNs() < deadline { usleep(1000) }
            fault.clearFaults()
            let counts = service.perform { _ in answers.counts }
            let missing = counts.indices.filter { counts[$0] == 0 }
            let twice = counts.indices.filter { counts[$0] > 1 }
            XCTAssertEqual(missing, [], "round \(round): fsyncs never answered (of \(calls))")
            XCTAssertEqual(twice, [], "round \(round): fsyncs answered more than once")
            if round >= 2 { XCTAssertGreaterThan(errors.load(ordering: .relaxed), 0, "round \(round): no flush failed") }
            try? service.stop()
        }
    }
}

/// How many times each call was answered (a class so the reactor's closures share it).
private final class AnswerCounts: @unchecked Sendable {
    var counts: [Int]
    init(_ count: Int) { counts = [Int](repeating: 0, count: count) }
}
