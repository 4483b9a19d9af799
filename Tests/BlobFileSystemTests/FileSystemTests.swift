#if canImport(Glibc)
import Glibc
#endif
import XCTest
import Bdev
import BdevMalloc
import Env
import Blobstore
@testable import BlobFileSystem

final class FileSystemTests: XCTestCase {
    private func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

    private func makeStore(megabytes: UInt64 = 64) throws -> (BlobStore, BdevSyncIO) {
        let bdev = Bdev(backend: try MallocBdev(blockCount: (megabytes << 20) / 4096, blockSizeBytes: 4096))
        let io = try BdevSyncIO(bdev: bdev, reactor: try Reactor())
        return (try BlobStore.format(io), io)
    }

    private func remount(_ fs: FileSystem, _ io: BdevSyncIO) throws -> FileSystem {
        try fs.unmount()
        try fs.store.unload()
        let (store, _) = try BlobStore.load(io)
        return try FileSystem.mount(store)
    }

    func testCreateWriteReadAndPersist() throws {
        let (store, io) = try makeStore()
        var fs = try FileSystem.format(store)
        let dir = try fs.make(parent: .root, name: bytes("dir"), mode: UInt32(S_IFDIR) | 0o755, caller: .root)
        let file = try fs.create(parent: dir.ino, name: bytes("file"), mode: 0o644, caller: Caller(uid: 1000, gid: 100))
        XCTAssertEqual(file.attributes.uid, 1000)
        let data = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 * 7) }
        try fs.write(ino: file.ino, offset: 3, data: data)
        try fs.write(ino: file.ino, offset: 20_000, data: bytes("tail"))
        fs.release(ino: file.ino)
        XCTAssertEqual(try fs.read(ino: file.ino, offset: 3, count: 10_000), data)
        XCTAssertEqual(try fs.read(ino: file.ino, offset: 10_003, count: 100), [UInt8](repeating: 0, count: 100))
        XCTAssertEqual(try fs.getAttributes(ino: .root).attributes.nlink, 3)
        fs = try remount(fs, io)
        let found = try fs.lookup(parent: try fs.lookup(parent: .root, name: bytes("dir")).ino, name: bytes("file"))
        XCTAssertEqual(found.attributes.size, 20_004)
        XCTAssertEqual(try fs.read(ino: found.ino, offset: 0, count: 20_004).count, 20_004)
        XCTAssertEqual(try fs.read(ino: found.ino, offset: 3, count: 10_000), data)
        XCTAssertEqual(try fs.read(ino: found.ino, offset: 20_000, count: 10), bytes("tail"))
        XCTAssertTrue(FileSystem.check(fs.store).isConsistent, "\(FileSystem.check(fs.store).problems)")
    }

    /// Multigrain times: a write after the times were seen always changes them (and never
    /// moves them back); writes nobody looked at in between may share one coarse stamp and
    /// then leave the inode clean, so an fsync has nothing to commit.
    func testDataWriteTimesAreMultigrain() throws {
        let (store, _) = try makeStore()
        let fs = try FileSystem.format(store)
        let file = try fs.create(parent: .root, name: bytes("f"), mode: 0o644, caller: .root)
        let block = [UInt8](repeating: 7, count: 4096)
        try fs.write(ino: file.ino, offset: 0, data: block)
        var seen = try fs.getAttributes(ino: file.ino).attributes
        for _ in 0..<200 {
            try fs.write(ino: file.ino, offset: 0, data: block)
            let now = try fs.getAttributes(ino: file.ino).attributes
            XCTAssertGreaterThan(now.mtimeNs, seen.mtimeNs, "a write after a stat changes mtime")
            XCTAssertEqual(now.ctimeNs, now.mtimeNs)
            seen = now
        }
        try fs.writeBack()
        let inode = try fs.inode(file.ino)
        XCTAssertFalse(inode.dirty)
        // Nobody looks: at most one stamp per clock tick, each a coarse one past the last.
        var stamps = 0
        for _ in 0..<1000 {
            try fs.write(ino: file.ino, offset: 0, data: block)
            if inode.dirty { stamps += 1; XCTAssertGreaterThan(inode.attributes.mtimeNs, seen.mtimeNs) }
            seen.mtimeNs = inode.attributes.mtimeNs
            try fs.writeBack()
        }
        XCTAssertLessThan(stamps, 1000, "writes within a tick that nobody saw share their stamp")
        // A chmod stamps ctime finely: a later write's times never go before it.
        _ = try fs.setAttributes(ino: file.ino, AttributeChanges(mode: 0o4755), caller: .root)
        let ctime = inode.attributes.ctimeNs
        try fs.write(ino: file.ino, offset: 0, data: block)
        XCTAssertGreaterThanOrEqual(inode.attributes.ctimeNs, ctime)
        XCTAssertEqual(inode.attributes.mode & UInt32(S_ISUID), 0, "a write drops set-user-ID")
        // An mtime set in the future (touch -d, tar) is brought back to now by a write.
        let future: Int64 = 4_000_000_000 * 1_000_000_000
        _ = try fs.setAttributes(ino: file.ino, AttributeChanges(mtime: .ns(future)), caller: .root)
        try fs.write(ino: file.ino, offset: 0, data: block)
        XCTAssertLessThan(inode.attributes.mtimeNs, future, "a write sets mtime to now, not past a future one")
        XCTAssertEqual(inode.attributes.mtimeNs, inode.attributes.ctimeNs)
    }

    func testTruncateThenGrowReadsZeros() throws {
        let (store, _) = try makeStore()
        let fs = try FileSystem.format(store)
        let file = try fs.create(parent: .root, name: bytes("f"), mode: 0o644, caller: .root)
        try fs.write(ino: file.ino, offset: 0, data: [UInt8](repeating: 0xAB, count: 20_000))
        _ = try fs.setAttributes(ino: file.ino, AttributeChanges(size: 5_000), caller: .root)
        _ = try fs.setAttributes(ino: file.ino, AttributeChanges(size: 30_000), caller: .root)
        let back = try fs.read(ino: file.ino, offset: 0, count: 30_000)
        XCTAssertEqual(Array(back[0..<5_000]), [UInt8](repeating: 0xAB, count: 5_000))
        XCTAssertEqual(Array(back[5_000...]), [UInt8](repeating: 0, count: 25_000))
        try fs.allocate(ino: file.ino, mode: [.punchHole, .keepSize], offset: 100, length: 9_000)
        let punched = try fs.read(ino: file.ino, offset: 0, count: 10_000)
        XCTAssertEqual(Array(punched[0..<100]), [UInt8](repeating: 0xAB, count: 100))
        XCTAssertEqual(Array(punched[100..<5_000]), [UInt8](repeating: 0, count: 4_900))
    }

    func testRenameLinkUnlinkAndOrphans() throws {
        let (store, io) = try makeStore()
        var fs = try FileSystem.format(store)
        let a = try fs.create(parent: .root, name: bytes("a"), mode: 0o644, caller: .root)
        try fs.write(ino: a.ino, offset: 0, data: bytes("hello"))
        _ = try fs.link(ino: a.ino, newParent: .root, newName: bytes("b"))
        XCTAssertEqual(try fs.getAttributes(ino: a.ino).attributes.nlink, 2)
        let d1 = try fs.make(parent: .root, name: bytes("d1"), mode: UInt32(S_IFDIR) | 0o755, caller: .root)
        let d2 = try fs.make(parent: .root, name: bytes("d2"), mode: UInt32(S_IFDIR) | 0o755, caller: .root)
        try fs.rename(parent: .root, name: bytes("d1"), newParent: d2.ino, newName: bytes("d1"))
        XCTAssertEqual(try fs.getAttributes(ino: d2.ino).attributes.nlink, 3)
        XCTAssertEqual(try fs.getAttributes(ino: d1.ino).attributes.parent, d2.ino.blobID)
        XCTAssertThrowsError(try fs.rename(parent: .root, name: bytes("a"), newParent: .root, newName: bytes("d2"))) {
            XCTAssertEqual(($0 as? FSError)?.errno, EISDIR)
        }
        XCTAssertThrowsError(try fs.rename(parent: .root, name: bytes("b"), newParent: .root, newName: bytes("a"), flags: .noReplace)) {
            XCTAssertEqual(($0 as? FSError)?.errno, EEXIST)
        }
        let c = try fs.create(parent: .root, name: bytes("c"), mode: 0o644, caller: .root)
        try fs.rename(parent: .root, name: bytes("c"), newParent: .root, newName: bytes("a"), flags: .exchange)
        XCTAssertEqual(try fs.lookup(parent: .root, name: bytes("a")).ino, c.ino)
        // a's inode (still named b) unlinked while open: an orphan until released.
        try fs.unlink(parent: .root, name: bytes("b"))
        try fs.unlink(parent: .root, name: bytes("c"))
        XCTAssertNotNil(fs.store.blob(a.ino.blobID))
        XCTAssertEqual(try fs.read(ino: a.ino, offset: 0, count: 5), bytes("hello"))
        XCTAssertEqual(FileSystem.check(fs.store).orphans, 1)
        XCTAssertTrue(FileSystem.check(fs.store).isConsistent, "\(FileSystem.check(fs.store).problems)")
        fs = try remount(fs, io)
        XCTAssertNil(fs.store.blob(a.ino.blobID), "orphans are deleted at mount")
        XCTAssertEqual(FileSystem.check(fs.store).orphans, 0)
        XCTAssertThrowsError(try fs.removeDirectory(parent: .root, name: bytes("d2"))) { XCTAssertEqual(($0 as? FSError)?.errno, ENOTEMPTY) }
        try fs.removeDirectory(parent: d2.ino, name: bytes("d1"))
        try fs.removeDirectory(parent: .root, name: bytes("d2"))
        XCTAssertEqual(try fs.getAttributes(ino: .root).attributes.nlink, 2)
        let report = FileSystem.check(fs.store)
        XCTAssertTrue(report.isConsistent, "\(report.problems)")
    }

    func testNamesAsBytesAndLength() throws {
        let (store, _) = try makeStore()
        let fs = try FileSystem.format(store)
        let nfc: [UInt8] = [0xC3, 0xA9], nfd: [UInt8] = [0x65, 0xCC, 0x81], invalid: [UInt8] = [0xFF, 0xFE, 0x41]
        for name in [nfc, nfd, invalid] { _ = try fs.create(parent: .root, name: name, mode: 0o644, caller: .root) }
        let long = [UInt8](repeating: 0xFF, count: 255)
        _ = try fs.create(parent: .root, name: long, mode: 0o644, caller: .root)
        XCTAssertThrowsError(try fs.create(parent: .root, name: long + [0x41], mode: 0o644, caller: .root)) {
            XCTAssertEqual(($0 as? FSError)?.errno, ENAMETOOLONG)
        }
        let handle = try fs.openDirectory(ino: .root)
        var names: [[UInt8]] = []
        try fs.readDirectory(handle: handle, offset: 0) { entry, _ in names.append(entry.name); return true }
        XCTAssertEqual(Set(names), Set([[46], [46, 46], nfc, nfd, invalid, long]))
    }

    func testLargeDirectory() throws {
        let (store, _) = try makeStore(megabytes: 1024)
        let fs = try FileSystem.format(store)
        let dir = try fs.make(parent: .root, name: bytes("big"), mode: UInt32(S_IFDIR) | 0o755, caller: .root)
        let count = 20_000
        let start = MonotonicClock.nowNs()
        for index in 0..<count { _ = try fs.make(parent: dir.ino, name: bytes("f\(index)"), mode: UInt32(S_IFREG) | 0o644, caller: .root) }
        let created = MonotonicClock.nowNs()
        for index in stride(from: 0, to: count, by: 7) { _ = try fs.lookup(parent: dir.ino, name: bytes("f\(index)")) }
        let looked = MonotonicClock.nowNs()
        print("large directory: \(count) creates \((created - start) / 1_000_000) ms, \(count / 7) lookups \((looked - created) / 1_000_000) ms")
        let handle = try fs.openDirectory(ino: dir.ino)
        var seen = 0
        try fs.readDirectory(handle: handle, offset: 0) { _, _ in seen += 1; return true }
        XCTAssertEqual(seen, count + 2)
    }
}
