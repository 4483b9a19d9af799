import XCTest
import Bdev
import BdevMalloc
import Env
import Blobstore
@testable import BlobFileSystem

/// copy_file_range (FileSystem+Clones.swift) as a specification: a whole file copied to an
/// empty one shares its clusters (no space, no bytes moved), each side's writes stay on
/// its side, deleting either leaves the other whole and gives back what nobody reads,
/// and anything else is copied byte for byte.
final class CopyRangeTests: XCTestCase {
    private func makeFileSystem() throws -> (FileSystem, BlobStore, BdevSyncIO) {
        let bdev = Bdev(backend: try MallocBdev(blockCount: (64 << 20) / 4096, blockSizeBytes: 4096))
        let io = try BdevSyncIO(bdev: bdev, reactor: try Reactor())
        let store = try BlobStore.format(io)
        return (try FileSystem.format(store), store, io)
    }

    private func data(_ seed: UInt8, _ count: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 13) ^ seed } }

    private func create(_ fs: FileSystem, _ name: String) throws -> InodeNumber {
        let made = try fs.create(parent: .root, name: Array(name.utf8), mode: 0o644, caller: .root)
        fs.release(ino: made.ino)
        return made.ino
    }

    private func contents(_ fs: FileSystem, _ ino: InodeNumber) throws -> [UInt8] {
        try fs.read(ino: ino, offset: 0, count: Int(try fs.getAttributes(ino: ino).attributes.size))
    }

    func testAWholeFileCopiedToAnEmptyOneIsSharedAndWritesStayOnTheirSide() throws {
        let (fs, store, io) = try makeFileSystem()
        defer { io.close() }
        let source = try create(fs, "a")
        let original = data(1, 300_000)
        try fs.write(ino: source, offset: 0, data: original)
        try fs.sync()
        let free = fs.statistics().freeBlocks
        let target = try create(fs, "b")
        XCTAssertEqual(try fs.copyRange(from: source, offset: 0, to: target, offset: 0, length: 1 << 30), 300_000)
        XCTAssertEqual(fs.statistics().freeBlocks, free, "sharing takes no cluster (df does not move)")
        XCTAssertEqual(try contents(fs, target), original)
        XCTAssertEqual(try fs.copyRange(from: source, offset: 300_000, to: target, offset: 300_000, length: 1 << 30), 0,
                       "at the end of the source: 0, so cp stops")

        var expectedTarget = original
        try fs.write(ino: target, offset: 5000, data: [UInt8](repeating: 0xBB, count: 100))
        expectedTarget.replaceSubrange(5000..<5100, with: [UInt8](repeating: 0xBB, count: 100))
        XCTAssertEqual(fs.statistics().freeBlocks, free - 1, "the first write to a shared cluster copies one")
        var expectedSource = original
        try fs.write(ino: source, offset: 200_000, data: [UInt8](repeating: 0xAA, count: 8192))
        expectedSource.replaceSubrange(200_000..<208_192, with: [UInt8](repeating: 0xAA, count: 8192))
        try fs.allocate(ino: target, mode: [.keepSize, .punchHole], offset: 65536, length: 8192)
        expectedTarget.replaceSubrange(65536..<73728, with: [UInt8](repeating: 0, count: 8192))
        _ = try fs.setAttributes(ino: target, AttributeChanges(size: 100_000), caller: .root)
        _ = try fs.setAttributes(ino: target, AttributeChanges(size: 300_000), caller: .root)
        expectedTarget.replaceSubrange(100_000..<300_000, with: [UInt8](repeating: 0, count: 200_000))
        XCTAssertEqual(try contents(fs, source), expectedSource)
        XCTAssertEqual(try contents(fs, target), expectedTarget)
        XCTAssertTrue(FileSystem.check(store).isConsistent, "\(FileSystem.check(store).problems)")
        XCTAssertEqual(FileSystem.check(store).sharedDataBlobs, 1)

        // A copy of a copy that has written some clusters of its own: a snapshot of it, on the first.
        let third = try create(fs, "c")
        XCTAssertEqual(try fs.copyRange(from: target, offset: 0, to: third, offset: 0, length: 1 << 30), 300_000)
        XCTAssertEqual(try contents(fs, third), expectedTarget)

        // Deleting files leaves the others whole; the last one owns what is left.
        try fs.unlink(parent: .root, name: Array("a".utf8))
        fs.forget(ino: source, count: 1)
        try fs.unlink(parent: .root, name: Array("b".utf8))
        fs.forget(ino: target, count: 1)
        XCTAssertEqual(try contents(fs, third), expectedTarget)
        XCTAssertEqual(FileSystem.check(store).sharedDataBlobs, 0, "the shared data merged into the last file reading it")
        XCTAssertTrue(FileSystem.check(store).isConsistent, "\(FileSystem.check(store).problems)")
        XCTAssertTrue(store.verify().isConsistent)
        try fs.unlink(parent: .root, name: Array("c".utf8))
        fs.forget(ino: third, count: 1)
        try fs.sync()
        XCTAssertGreaterThanOrEqual(fs.statistics().freeBlocks, free + 70, "every cluster back once no file reads it")
    }

    /// A copy cut to nothing lets go of the shared data; copied into again, it takes the
    /// new source's; nothing is left behind that no file reads.
    func testACopyTruncatedToNothingLetsGoOfTheSharedData() throws {
        let (fs, store, io) = try makeFileSystem()
        defer { io.close() }
        let a = try create(fs, "a"), c = try create(fs, "c")
        try fs.write(ino: a, offset: 0, data: data(3, 40_000))
        try fs.write(ino: c, offset: 0, data: data(4, 30_000))
        let b = try create(fs, "b")
        XCTAssertEqual(try fs.copyRange(from: a, offset: 0, to: b, offset: 0, length: 40_000), 40_000)
        _ = try fs.setAttributes(ino: b, AttributeChanges(size: 0), caller: .root)
        XCTAssertNil(store.parent(of: b.blobID))
        XCTAssertEqual(try fs.copyRange(from: c, offset: 0, to: b, offset: 0, length: 30_000), 30_000)
        XCTAssertEqual(try contents(fs, b), data(4, 30_000))
        XCTAssertEqual(try contents(fs, a), data(3, 40_000))
        let report = FileSystem.check(store)
        XCTAssertTrue(report.isConsistent, "\(report.problems)")
        XCTAssertEqual(report.sharedDataBlobs, 1, "a's shared data merged back into a; c's shared by c and b")
        XCTAssertTrue(store.verify().isConsistent)
    }

    func testPartialCopiesCopyBytes() throws {
        let (fs, store, io) = try makeFileSystem()
        defer { io.close() }
        let source = try create(fs, "a")
        let original = data(2, 50_000)
        try fs.write(ino: source, offset: 0, data: original)
        let target = try create(fs, "b")
        try fs.write(ino: target, offset: 0, data: [1, 2, 3])
        XCTAssertEqual(try fs.copyRange(from: source, offset: 1000, to: target, offset: 10, length: 20_000), 20_000)
        XCTAssertNil(store.parent(of: target.blobID), "a partial copy shares nothing")
        XCTAssertEqual(try contents(fs, target), [1, 2, 3] + [UInt8](repeating: 0, count: 7) + Array(original[1000..<21_000]))
        // Into a non-empty file, even whole: copied.
        XCTAssertEqual(try fs.copyRange(from: source, offset: 0, to: target, offset: 0, length: 1 << 20), 50_000)
        XCTAssertEqual(Array(try contents(fs, target)[0..<50_000]), original)
        XCTAssertNil(store.parent(of: target.blobID))
    }
}
