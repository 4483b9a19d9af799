#if canImport(Glibc)
import Glibc
#endif
import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
import Blobstore
import Synchronization
@testable import BlobFileSystem

/// The fault bdev under the whole file system: power is cut after every write index of a
/// namespace-heavy workload (each data write followed by fsync), with several seeds
/// deciding which unflushed writes survive or tear. After each: load (replay) and mount
/// succeed, both verifiers are clean, and the tree is exactly the one after some
/// operation between the last completed fsync and the interrupted one (namespace changes
/// are durable at the next flush, in order; the interrupted write's file may mix old and
/// new).
final class FileSystemCrashTests: XCTestCase {
    enum Op {
        case mkdir(String)
        case create(String)
        case write(String, offset: UInt64, count: Int, seed: UInt64)
        case link(String, String)
        case symlink(String, target: String)
        case rename(String, String, FileSystem.RenameFlags)
        case unlink(String)
        case rmdir(String)
        case truncate(String, UInt64)
        case setXattr(String, String)
        case openUnlinkWriteRelease(String)
        /// copy_file_range of a whole file into an empty one (shared clusters), then fsync.
        case copy(String, String)
    }

    static let workload: [Op] = [
        .mkdir("a"), .create("a/f1"), .write("a/f1", offset: 0, count: 10_000, seed: 1), .create("b"),
        .write("b", offset: 100, count: 5_000, seed: 2), .link("b", "a/b2"), .symlink("s", target: "a/f1"),
        .rename("a/f1", "f1moved", []), .mkdir("a/sub"), .create("a/sub/x"), .rename("a/sub", "sub2", []),
        .rename("b", "f1moved", []), .setXattr("sub2", "user.k"), .truncate("a/b2", 700),
        .write("a/b2", offset: 9_000, count: 3_000, seed: 3), .create("c"), .rename("c", "a/b2", .exchange),
        .unlink("c"), .unlink("sub2/x"), .rmdir("sub2"), .openUnlinkWriteRelease("a/b2"), .mkdir("d"),
        .create("d/1"), .create("d/2"), .create("d/3"), .write("d/2", offset: 0, count: 20_000, seed: 4),
        .rename("d/2", "d/1", []), .unlink("d/3"), .write("f1moved", offset: 2_000, count: 100, seed: 5),
        // Whole io units inside the file: through the service, an asynchronous overwrite.
        .write("d/1", offset: 4096, count: 8192, seed: 6),
        // Instant copies: shared, each side copying what it writes, merged when one goes.
        .create("e"), .copy("d/1", "e"), .write("e", offset: 100, count: 300, seed: 7),
        .write("d/1", offset: 0, count: 4096, seed: 8), .create("g"), .copy("e", "g"), .unlink("d/1"),
        .write("g", offset: 12_288, count: 4096, seed: 9), .unlink("e"), .truncate("g", 0), .copy("f1moved", "g"),
    ]

    static func data(_ seed: UInt64, _ count: Int) -> [UInt8] {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<count).map { _ in
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return UInt8(truncatingIfNeeded: state)
        }
    }

    static func resolve(_ fs: FileSystem, _ path: String) throws -> (parent: InodeNumber, name: [UInt8]) {
        var parent = FileSystem.rootIno
        let parts = path.split(separator: "/").map { Array($0.utf8) }
        for part in parts.dropLast() { parent = try fs.lookup(parent: parent, name: part).ino }
        return (parent, parts.last!)
    }

    static func ino(_ fs: FileSystem, _ path: String) throws -> InodeNumber {
        let (parent, name) = try resolve(fs, path)
        return try fs.lookup(parent: parent, name: name).ino
    }

    static func run(_ op: Op, _ fs: FileSystem) throws {
        switch op {
        case let .mkdir(path):
            let (parent, name) = try resolve(fs, path)
            _ = try fs.make(parent: parent, name: name, mode: UInt32(S_IFDIR) | 0o755, caller: .root)
        case let .create(path):
            let (parent, name) = try resolve(fs, path)
            let made = try fs.create(parent: parent, name: name, mode: 0o644, caller: .root)
            fs.release(ino: made.ino)
        case let .write(path, offset, count, seed):
            let ino = try ino(fs, path)
            try fs.write(ino: ino, offset: offset, data: data(seed, count))
            try fs.fsync(ino: ino)
        case let .link(from, to):
            let (parent, name) = try resolve(fs, to)
            _ = try fs.link(ino: try ino(fs, from), newParent: parent, newName: name)
        case let .symlink(path, target):
            let (parent, name) = try resolve(fs, path)
            _ = try fs.make(parent: parent, name: name, mode: UInt32(S_IFLNK) | 0o777, symlinkTarget: Array(target.utf8),
                            caller: .root)
        case let .rename(from, to, flags):
            let (p1, n1) = try resolve(fs, from)
            let (p2, n2) = try resolve(fs, to)
            try fs.rename(parent: p1, name: n1, newParent: p2, newName: n2, flags: flags)
        case let .unlink(path):
            let (parent, name) = try resolve(fs, path)
            try fs.unlink(parent: parent, name: name)
        case let .rmdir(path):
            let (parent, name) = try resolve(fs, path)
            try fs.removeDirectory(parent: parent, name: name)
        case let .truncate(path, size):
            _ = try fs.setAttributes(ino: try ino(fs, path), AttributeChanges(size: size), caller: .root)
        case let .setXattr(path, name):
            try fs.setXattr(ino: try ino(fs, path), name: name, value: [1, 2, 3], create: false, replace: false)
        case let .copy(from, to):
            let source = try ino(fs, from), target = try ino(fs, to)
            let size = try fs.getAttributes(ino: source).attributes.size
            let copied = try fs.copyRange(from: source, offset: 0, to: target, offset: 0, length: size)
            guard copied == size else { throw FSError(EIO, "copied \(copied) of \(size) bytes") }
            try fs.fsync(ino: target)
        case let .openUnlinkWriteRelease(path):
            let ino = try ino(fs, path)
            try fs.open(ino: ino)
            let (parent, name) = try resolve(fs, path)
            try fs.unlink(parent: parent, name: name)
            try fs.write(ino: ino, offset: 0, data: data(9, 5000))
            fs.release(ino: ino)
            fs.forget(ino: ino, count: 100)
        }
    }

    /// Path → description (type, mode, links, size, content, symlink target, xattrs).
    static func snapshot(_ fs: FileSystem) throws -> [String: String] {
        var result: [String: String] = [:]
        var queue: [(InodeNumber, String)] = [(FileSystem.rootIno, "")]
        while let (directory, prefix) = queue.popLast() {
            let handle = try fs.openDirectory(ino: directory)
            var entries: [DirectoryEntry] = []
            try fs.readDirectory(handle: handle, offset: 2) { entry, _ in entries.append(entry); return true }
            fs.releaseDirectory(ino: directory, handle: handle)
            for entry in entries {
                let path = prefix + String(decoding: entry.name, as: UTF8.self)
                let a = try fs.getAttributes(ino: entry.ino).attributes
                var text = "ino \(entry.ino) mode \(String(a.mode, radix: 8)) links \(a.nlink) size \(a.size)"
                if a.isDirectory { queue.append((entry.ino, path + "/")) }
                if a.isRegular { text += " data \(try fs.read(ino: entry.ino, offset: 0, count: Int(a.size)).hashValue)" }
                if a.isSymlink { text += " -> \(String(decoding: try fs.readSymlink(ino: entry.ino), as: UTF8.self))" }
                text += " xattrs \(try fs.listXattrs(ino: entry.ino).sorted())"
                result[path] = text
            }
        }
        return result
    }

    func testPowerCutAtEveryWriteIndex() throws {
        try powerCutAtEveryWriteIndex(options: BlobStore.Options(), seeds: 0..<Self.seedCount(4))
    }

    /// A log of 3 pages: checkpoints (copy-on-write metadata, table and bitmap copies,
    /// super block switches) happen all through the workload and get cut too.
    func testPowerCutWithCheckpointsThroughout() throws {
        try powerCutAtEveryWriteIndex(options: BlobStore.Options(logPages: 3), seeds: 0..<Self.seedCount(4))
    }

    /// Seeds per write index: `default`, or BLOBFS_CRASH_SEEDS for a longer campaign.
    static func seedCount(_ default: UInt64) -> UInt64 {
        ProcessInfo.processInfo.environment["BLOBFS_CRASH_SEEDS"].flatMap(UInt64.init) ?? `default`
    }

    /// The same workload through `FileSystemService`, as FUSE drives it: data written with
    /// `startWrite` (overwrites go to the device from a DMA buffer, answered from their
    /// completion) and made durable with the service's asynchronous fsync, everything else
    /// on the service's reactor.
    func testPowerCutAtEveryWriteIndexThroughTheService() throws {
        try powerCutAtEveryWriteIndex(options: BlobStore.Options(), seeds: 0..<Self.seedCount(3), throughService: true)
    }

    /// Runs `op` on the service's reactor; a write's data goes through `startWrite` and its
    /// fsync is the service's asynchronous one, waited for here.
    static func run(_ op: Op, _ service: FileSystemService) throws {
        guard case let .write(path, offset, count, seed) = op else {
            let failure: String? = service.perform { fs in
                do { try run(op, fs) } catch { return "\(error)" }
                return nil
            }
            if let failure { throw FSError(EIO, failure) }
            return
        }
        let done = Completion()
        let failure: String? = service.perform { fs in
            do {
                let ino = try ino(fs, path)
                let buffer = try DMABuffer.allocate(bytes: count)
                buffer.store(data(seed, count))
                if case .pending = try service.startWrite(ino: ino, offset: offset, data: buffer.segment(), append: false,
                                                          handler: done, tag: 0) {
                    while done.status == nil { service.blobService.reactor.runOnce() }
                    guard done.status == .success else { return "write failed" }
                }
                service.fsync(ino: ino) { errno in done.fsyncErrno.store(errno, ordering: .releasing) }
                return nil
            } catch { return "\(error)" }
        }
        if let failure { throw FSError(EIO, failure) }
        while done.fsyncErrno.load(ordering: .acquiring) == -1 { usleep(100) }
        guard done.fsyncErrno.load(ordering: .acquiring) == 0 else { throw FSError(EIO, "fsync failed") }
    }

    private final class Completion: BdevCompletionHandler, @unchecked Sendable {
        var status: BdevStatus?
        let fsyncErrno = Atomic<Int32>(-1)
        func bdevIOCompleted(tag: UInt64, status: BdevStatus) { self.status = status }
    }

    private func powerCutAtEveryWriteIndex(options: BlobStore.Options, seeds: Range<UInt64>, throughService: Bool = false) throws {
        let reactor = try Reactor()
        let deviceBytes: UInt64 = 8 << 20
        let blockSize = 4096
        var reference: [[String: String]] = []
        do {
            let io = try BdevSyncIO(bdev: Bdev(backend: try MallocBdev(blockCount: deviceBytes / 4096)), reactor: reactor)
            let fs = try FileSystem.format(try BlobStore.format(io, options: options))
            reference.append(try Self.snapshot(fs))
            for op in Self.workload {
                try Self.run(op, fs)
                reference.append(try Self.snapshot(fs))
            }
            io.close()
        }
        var cutIndex: UInt64 = 1
        var recoveries = 0
        while cutIndex < 3000 {
            var completedAll = false
            for seed in seeds {
                let inner = Bdev(backend: try MallocBdev(blockCount: deviceBytes / UInt64(blockSize), blockSizeBytes: blockSize))
                do {
                    let fill = try BdevSyncIO(bdev: inner, reactor: reactor)
                    try fill.writeBytes([UInt8](repeating: 0xEE, count: Int(deviceBytes)), offsetBlocks: 0)
                    fill.close()
                }
                let fault = FaultBdev(wrapping: inner)
                let device = Bdev(backend: fault)
                var completed = 0
                if throughService {
                    let service = try FileSystemService(bdev: device, format: options)
                    fault.powerCut(afterWrites: fault.writeCount + cutIndex)
                    do {
                        for op in Self.workload {
                            try Self.run(op, service)
                            completed += 1
                        }
                    } catch {}
                    try? service.stop()
                } else {
                    let io = try BdevSyncIO(bdev: device, reactor: reactor)
                    let fs = try FileSystem.format(try BlobStore.format(io, options: options))
                    fault.powerCut(afterWrites: fault.writeCount + cutIndex)
                    do {
                        for op in Self.workload {
                            try Self.run(op, fs)
                            completed += 1
                        }
                    } catch {}
                    io.close()
                }
                completedAll = completed == Self.workload.count
                let report = try fault.crash(seed: seed, reactor: reactor)
                let io = try BdevSyncIO(bdev: device, reactor: reactor)
                defer { io.close() }
                let context = "cut after write \(cutIndex), seed \(seed), \(completed) ops done, crash \(report)"
                let mounted: FileSystem
                do { mounted = try FileSystem.mount(try BlobStore.load(io).0) } catch {
                    XCTFail("\(context): load or mount failed: \(error)")
                    continue
                }
                let blobReport = mounted.store.verify()
                XCTAssertTrue(blobReport.isConsistent, "\(context): \(blobReport.problems)")
                let fsReport = FileSystem.check(mounted.store)
                XCTAssertTrue(fsReport.isConsistent, "\(context): \(fsReport.problems)")
                let state = try Self.snapshot(mounted)
                // Namespace changes are durable at the next flush: every operation up to the
                // last completed fsync (each write op ends with one) must be there; later
                // completed ones may or may not be, in order — the tree is the reference
                // after some operation j with synced <= j <= completed + 1.
                let synced = Self.workload.prefix(completed).lastIndex { if case .write = $0 { true } else { false } }
                    .map { $0 + 1 } ?? 0
                let candidates = reference[synced...min(completed + 1, Self.workload.count)]
                var matches = candidates.contains(state)
                if !matches, completed < Self.workload.count, case let .write(path, _, _, _) = Self.workload[completed] {
                    // An interrupted write: everything else exact; that file's (and its hard
                    // links') size and data may be either side's or mixed.
                    let inode = reference[completed][path].map { String($0.split(separator: " ")[1]) }
                    let strip = { (tree: [String: String]) in
                        tree.filter { $0.key != path && String($0.value.split(separator: " ")[1]) != inode }
                    }
                    matches = candidates.contains { strip($0) == strip(state) }
                }
                XCTAssertTrue(matches, "\(context): tree is none of the states from the last fsync (op \(synced)) on\n"
                              + "state \(state.sorted { $0.key < $1.key })")
                recoveries += 1
            }
            if completedAll { break }
            cutIndex += 1
        }
        XCTAssertLessThan(cutIndex, 3000, "the workload never completes")
        print("file-system crash test (log \(options.logPages.map(String.init) ?? "default") pages\(throughService ? ", through the service" : "")): \(cutIndex) write indices × \(seeds.count) seeds = \(recoveries) recoveries")
    }
}
