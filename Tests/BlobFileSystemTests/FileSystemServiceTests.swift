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
    private func fsync(_ service: FileSystemService, _ ino: InodeNumber) -> Int32 {
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

    /// Waits on the test thread for something the service answers on its reactor.
    private func waitFor<T: Sendable>(_ service: FileSystemService, _ start: @escaping @Sendable (@escaping @Sendable (T) -> Void) -> Void) -> T {
        let answer = Mutex<T?>(nil)
        service.blobService.reactor.send { start { value in answer.withLock { $0 = value } } }
        while true {
            if let value = answer.withLock({ $0 }) { return value }
            usleep(1000)
        }
    }

    /// FITRIM below FUSE (`FileSystemService.trim`) and `-o discard`: an unlinked file's
    /// clusters are unmapped once a flush made the unlink durable (with discard) or by the
    /// trim (either way); the file kept survives a power cut, the unlinked one stays gone.
    func testTrimAndOnlineDiscardGiveBackAnUnlinkedFile() throws {
        for discard in [false, true] {
            let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 8192)))
            let device = Bdev(backend: fault)
            let service = try FileSystemService(bdev: device, format: BlobStore.Options(), discard: discard)
            let keep = (0..<40_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
            let goneBytes = 100 * 4096
            service.perform { fs in
                for (name, data) in [("keep", keep), ("gone", [UInt8](repeating: 0x6B, count: goneBytes))] {
                    let made = try! fs.create(parent: FileSystem.rootIno, name: Array(name.utf8), mode: 0o644, caller: .root)
                    try! fs.write(ino: made.ino, offset: 0, data: data)
                    fs.release(ino: made.ino)
                }
                try! fs.sync()
                let gone = try! fs.lookup(parent: FileSystem.rootIno, name: Array("gone".utf8))
                try! fs.unlink(parent: FileSystem.rootIno, name: Array("gone".utf8))
                fs.forget(ino: gone.ino, count: 2)  // the kernel forgets it: the blob goes
            }
            _ = fault.takeUnmaps()
            XCTAssertTrue(waitFor(service) { done in service.flush { done($0) } })
            // Online discard is the reactor's, after the flush: give it a moment.
            var unmappedBlocks: UInt64 = 0
            for _ in 0..<(discard ? 2000 : 50) where unmappedBlocks < UInt64(goneBytes / 4096) {
                unmappedBlocks += fault.takeUnmaps().reduce(0) { $0 + $1.countBlocks }
                usleep(1000)
            }
            if discard {
                XCTAssertEqual(unmappedBlocks, UInt64(goneBytes / 4096), "the unlinked file's clusters, after the flush")
            } else {
                XCTAssertEqual(unmappedBlocks, 0, "nothing without -o discard")
            }
            let trimmed: Result<UInt64, FSError> = waitFor(service) { done in
                service.trim(startBytes: 0, lengthBytes: .max, minimumBytes: 0) { done($0) }
            }
            let free = service.perform { $0.store.freeClusterCount }
            XCTAssertGreaterThanOrEqual(try trimmed.get(), free * 4096, "every free cluster (and the dead log)")
            let invalid: Result<UInt64, FSError> = waitFor(service) { done in
                service.trim(startBytes: 1 << 40, lengthBytes: .max, minimumBytes: 0) { done($0) }
            }
            if case let .failure(error) = invalid { XCTAssertEqual(error.errno, EINVAL, "a range past the device") } else { XCTFail("a range past the device") }
            try afterPowerCut(fault, device, service) { fs in
                let found = try fs.lookup(parent: FileSystem.rootIno, name: Array("keep".utf8))
                XCTAssertTrue(try fs.read(ino: found.ino, offset: 0, count: keep.count) == keep, "discard \(discard)")
                XCTAssertThrowsError(try fs.lookup(parent: FileSystem.rootIno, name: Array("gone".utf8)))
            }
        }
    }

    func testAsynchronousFsyncIsDurable() throws {
        for round in 0..<3 {
            let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 4096)))
            let device = Bdev(backend: fault)
            let service = try FileSystemService(bdev: device, format: BlobStore.Options())
            let data = (0..<(10_000 + round * 5000)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ round) }
            let ino = service.perform { fs -> InodeNumber in
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
        let ino = service.perform { fs -> InodeNumber in
            let made = try! fs.create(parent: FileSystem.rootIno, name: Array("o".utf8), mode: 0o644, caller: .root)
            try! fs.write(ino: made.ino, offset: 0, data: original)
            return made.ino
        }
        XCTAssertEqual(fsync(service, ino), 0)
        let plan = service.perform { fs -> String in
            _ = try! fs.getAttributes(ino: ino)  // times seen: the write must stamp new ones
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

    /// The data path's reads (what FUSE uses): bytes at any offset and length, holes and
    /// the end of file as a read through the file system returns them; and a read still
    /// in flight when its clusters are released answers with the old owner's bytes,
    /// never another file's, even when the store must reuse those very clusters.
    func testDataPathReads() throws {
        let service = try FileSystemService(bdev: Bdev(backend: try MallocBdev(blockCount: 2048)), format: BlobStore.Options())
        defer { try? service.stop() }
        let data = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let checked = service.perform { fs -> String? in
            let file = try! service.create(parent: FileSystem.rootIno, name: Array("a".utf8), mode: 0o644, caller: .root)
            try! fs.write(ino: file.ino, offset: 0, data: data)
            try! fs.write(ino: file.ino, offset: 500_000, data: [1, 2, 3])  // a hole in between
            let buffer = try! DMABuffer.allocate(bytes: 1 << 20)
            let done = Completion()
            for (offset, count) in [(0, 4096), (1, 10), (4095, 2), (100_000, 200_000), (299_990, 20_000),
                                    (400_000, 5000), (499_998, 100), (500_003, 10), (900_000, 1)] {
                let expected = try! fs.read(ino: file.ino, offset: UInt64(offset), count: count)
                done.status = nil
                guard let started = try! service.startRead(ino: file.ino, offset: UInt64(offset), count: count,
                                                           into: buffer.segment(), handler: done, tag: 0) else {
                    if !expected.isEmpty { return "read \(offset)+\(count): end of file, expected \(expected.count) bytes" }
                    continue
                }
                if started.pending { while done.status == nil { service.blobService.reactor.runOnce() } }
                let got = buffer.bytes(at: started.skip, count: started.count)
                if got != expected { return "read \(offset)+\(count): \(got.count) bytes, expected \(expected.count)" }
            }
            // A read in flight; its file truncated; another file fills the store, which
            // must wait for the read before it may reuse the released clusters.
            done.status = nil
            let started = try! service.startRead(ino: file.ino, offset: 0, count: 8192, into: buffer.segment(), handler: done, tag: 0)!
            _ = try! fs.setAttributes(ino: file.ino, AttributeChanges(size: 0), caller: .root)
            let other = try! fs.create(parent: FileSystem.rootIno, name: Array("b".utf8), mode: 0o644, caller: .root)
            let free = Int(fs.store.freeClusterCount) - Int(fs.store.metadataClusterReserve) - 64
            let otherData = [UInt8](repeating: 0xEE, count: max(free, 1) * 4096)
            do { try fs.write(ino: other.ino, offset: 0, data: otherData) } catch {
                return "the other file could not have the released clusters: \(error)"
            }
            if done.status == nil { return "the store reused the clusters before the read in flight on them completed" }
            while done.status == nil { service.blobService.reactor.runOnce() }
            if buffer.bytes(at: started.skip, count: 8192) != Array(data[0..<8192]) {
                return "the in-flight read did not return the old bytes"
            }
            return nil
        }
        XCTAssertNil(checked)
    }

    /// The data path's writes: overwrites of whole io units inside the file go to the
    /// device straight from the caller's DMA buffer, the rest (unaligned, growing, into
    /// holes, append) synchronously; every byte reads back as a model says, and a write in
    /// flight when its clusters are released never lands in another file.
    func testDataPathWrites() throws {
        let service = try FileSystemService(bdev: Bdev(backend: try MallocBdev(blockCount: 8192)), format: BlobStore.Options())
        defer { try? service.stop() }
        let problem = service.perform { fs -> String? in
            let file = try! service.create(parent: FileSystem.rootIno, name: Array("w".utf8), mode: 0o644, caller: .root)
            var model = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 5) }
            try! fs.write(ino: file.ino, offset: 0, data: model)
            let buffer = try! DMABuffer.allocate(bytes: 1 << 20)
            let done = Completion()
            var random = SplitMix64(seed: 7)
            var asynchronous = 0
            for step in 0..<300 {
                let aligned = random.next() % 2 == 0
                var offset = Int(random.next() % 260_000)
                var count = Int(random.next() % 20_000) + 1
                if aligned { offset = offset / 4096 * 4096; count = (count + 4095) / 4096 * 4096 }
                let data = (0..<count).map { _ in UInt8(truncatingIfNeeded: random.next()) }
                buffer.store(data)
                done.status = nil
                switch try! service.startWrite(ino: file.ino, offset: UInt64(offset), data: buffer.segment(offset: 0, count: count),
                                               append: false, handler: done, tag: 0) {
                case .pending:
                    asynchronous += 1
                    while done.status == nil { service.blobService.reactor.runOnce() }
                    if done.status != .success { return "step \(step): write failed \(done.status!)" }
                case let .done(bytes):
                    if bytes != count { return "step \(step): wrote \(bytes) of \(count)" }
                }
                if offset > model.count { model += [UInt8](repeating: 0, count: offset - model.count) }
                if offset + count > model.count { model += [UInt8](repeating: 0, count: offset + count - model.count) }
                model.replaceSubrange(offset..<(offset + count), with: data)
            }
            if asynchronous == 0 { return "no write took the asynchronous path" }
            let size = try! fs.getAttributes(ino: file.ino).attributes.size
            if size != UInt64(model.count) { return "size \(size), model \(model.count)" }
            if try! fs.read(ino: file.ino, offset: 0, count: model.count) != model { return "contents differ from the model" }
            // An overwrite in flight, then the file truncated and another file written.
            buffer.fill(0x11)
            done.status = nil
            guard case .pending = try! service.startWrite(ino: file.ino, offset: 4096, data: buffer.segment(offset: 0, count: 8192),
                                                          append: false, handler: done, tag: 0) else { return "not asynchronous" }
            _ = try! fs.setAttributes(ino: file.ino, AttributeChanges(size: 0), caller: .root)
            let other = try! fs.create(parent: FileSystem.rootIno, name: Array("o".utf8), mode: 0o644, caller: .root)
            let otherData = [UInt8](repeating: 0xEE, count: 600_000)
            try! fs.write(ino: other.ino, offset: 0, data: otherData)
            while done.status == nil { service.blobService.reactor.runOnce() }
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
            let inos = service.perform { fs -> [InodeNumber] in
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
            // A lost waiter may hold the service's stop too: then leave the service be (the
            // test has failed already) rather than hang the run.
            guard missing.isEmpty else { return }
            try? service.stop()
        }
    }
}

extension FileSystemServiceTests {
    /// A device that starts failing: the first failed flush turns the store read-only
    /// (the reason kept, the first one only), and from then on every write gets EROFS —
    /// overwrites that would go straight to the device, growing writes, creates, renames,
    /// attribute changes — and fsync EIO, each answered at once; reads still work; the
    /// unmount reports the failure instead of hanging.
    func testADeviceErrorMakesTheStoreReadOnlyAndEveryWriteGetsEROFS() throws {
        let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 4096)))
        let service = try FileSystemService(bdev: Bdev(backend: fault), format: BlobStore.Options())
        let data = [UInt8](repeating: 0x42, count: 64 * 1024)
        let ino = service.perform { fs -> InodeNumber in
            let made = try! service.create(parent: FileSystem.rootIno, name: Array("f".utf8), mode: 0o644, caller: .root)
            try! fs.write(ino: made.ino, offset: 0, data: data)
            return made.ino
        }
        XCTAssertEqual(fsync(service, ino), 0)
        fault.failIO(from: fault.ioCount + 1)
        service.perform { fs in _ = try? fs.write(ino: ino, offset: 100, data: [1, 2, 3]) }  // in memory until the flush
        XCTAssertEqual(fsync(service, ino), EIO, "the flush fails")
        XCTAssertEqual(fsync(service, ino), EIO, "and every fsync after it")
        fault.clearFaults()  // the device works again: the store stays read-only all the same
        let status = service.perform { _ in service.statusOnReactor()! }
        XCTAssertTrue(status.readOnly)
        let reason = try XCTUnwrap(status.readOnlyReason)
        XCTAssertTrue(reason.contains("flush"), reason)
        XCTAssertGreaterThan(status.deviceErrors, 0)
        let answers = service.perform { fs -> [String: Int32] in
            func errno(_ body: () throws -> Void) -> Int32 {
                do { try body(); return 0 } catch let error as FSError { return error.errno } catch { return -1 }
            }
            let buffer = try! DMABuffer.allocate(bytes: 8192)
            let done = Completion()
            return [
                "overwrite": errno { _ = try service.startWrite(ino: ino, offset: 4096, data: buffer.segment(offset: 0, count: 4096),
                                                                append: false, handler: done, tag: 0) },
                "growing write": errno { _ = try fs.write(ino: ino, offset: UInt64(data.count), data: [9]) },
                "create": errno { _ = try fs.create(parent: FileSystem.rootIno, name: Array("g".utf8), mode: 0o644, caller: .root) },
                "mkdir": errno { _ = try fs.make(parent: FileSystem.rootIno, name: Array("d".utf8), mode: 0o040755, caller: .root) },
                "rename": errno { try fs.rename(parent: FileSystem.rootIno, name: Array("f".utf8), newParent: FileSystem.rootIno,
                                                newName: Array("h".utf8), flags: []) },
                "truncate": errno { _ = try fs.setAttributes(ino: ino, AttributeChanges(size: 10), caller: .root) },
                "read": errno { _ = try fs.read(ino: ino, offset: 0, count: 4096) },
            ]
        }
        for (what, errno) in answers where what != "read" { XCTAssertEqual(errno, EROFS, what) }
        XCTAssertEqual(answers["read"], 0, "reads still work")
        let again = service.perform { _ in service.statusOnReactor()!.readOnlyReason }
        XCTAssertEqual(again, reason, "the first failure is the reason")
        XCTAssertThrowsError(try service.stop(), "the unmount reports that the store could not be left clean")
    }
}

/// How many times each call was answered (a class so the reactor's closures share it).
private final class AnswerCounts: @unchecked Sendable {
    var counts: [Int]
    init(_ count: Int) { counts = [Int](repeating: 0, count: count) }
}

/// Records a data-path completion (on the reactor).
private final class Completion: BdevCompletionHandler, @unchecked Sendable {
    var status: BdevStatus?
    func bdevIOCompleted(tag: UInt64, status: BdevStatus) { self.status = status }
}
