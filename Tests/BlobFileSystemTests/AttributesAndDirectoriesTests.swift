#if canImport(Glibc)
import Glibc
#endif
import XCTest
import Bdev
import BdevMalloc
import Env
import Blobstore
@testable import BlobFileSystem

/// Attributes, extended attributes and directory listings as a specification: what each
/// call changes, what it refuses and with which errno.
final class AttributesAndDirectoriesTests: XCTestCase {
    private func name(_ text: String) -> [UInt8] { Array(text.utf8) }

    private func makeFileSystem() throws -> FileSystem {
        let bdev = Bdev(backend: try MallocBdev(blockCount: (32 << 20) / 4096, blockSizeBytes: 4096))
        return try FileSystem.format(try BlobStore.format(try BdevSyncIO(bdev: bdev, reactor: try Reactor())))
    }

    private func errno(_ body: () throws -> Void) -> Int32? {
        do { try body(); return nil } catch let error as FSError { return error.errno } catch { return -1 }
    }

    // MARK: - Attributes

    func testSetattrChangesWhatItNamesAndAlwaysTheChangeTime() throws {
        let fs = try makeFileSystem()
        let file = try fs.create(parent: .root, name: name("f"), mode: 0o644, caller: .root)
        fs.release(ino: file.ino)
        let before = file.attributes
        let after = try fs.setAttributes(ino: file.ino, AttributeChanges(mode: 0o600, mtime: .ns(1_000_000_000)), caller: .root)
        XCTAssertEqual(after.attributes.mode & 0o7777, 0o600)
        XCTAssertEqual(after.attributes.mode & UInt32(S_IFMT), UInt32(S_IFREG), "the type stays")
        XCTAssertEqual(after.attributes.mtimeNs, 1_000_000_000)
        XCTAssertEqual(after.attributes.uid, before.uid)
        XCTAssertGreaterThanOrEqual(after.attributes.ctimeNs, before.ctimeNs)
        XCTAssertFalse(try fs.inode(file.ino).dirty, "committed")
    }

    /// chown drops set-user-ID, and set-group-ID where group-execute is set, of anything
    /// but a directory, whoever the caller (Linux's chown_common; with
    /// FUSE_HANDLE_KILLPRIV_V2 the kernel leaves it to us, root's chown included).
    func testChownDropsSetIDBits() throws {
        let fs = try makeFileSystem()
        let file = try fs.create(parent: .root, name: name("s"), mode: 0o6755, caller: .root)
        fs.release(ino: file.ino)
        let user = Caller(uid: 1000, gid: 100)
        let after = try fs.setAttributes(ino: file.ino, AttributeChanges(uid: 1000), caller: user)
        XCTAssertEqual(after.attributes.mode & 0o7777, 0o755, "set-user-ID and set-group-ID with group execute go")
        _ = try fs.setAttributes(ino: file.ino, AttributeChanges(mode: 0o6755), caller: .root)
        XCTAssertEqual(try fs.setAttributes(ino: file.ino, AttributeChanges(gid: 5), caller: .root).attributes.mode & 0o7777,
                       0o755, "root's chown drops them too")
        _ = try fs.setAttributes(ino: file.ino, AttributeChanges(mode: 0o2745), caller: .root)
        XCTAssertEqual(try fs.setAttributes(ino: file.ino, AttributeChanges(uid: 7), caller: .root).attributes.mode & 0o7777,
                       0o2745, "set-group-ID without group execute (a locking mark) stays")
        let directory = try fs.make(parent: .root, name: name("d"), mode: UInt32(S_IFDIR) | 0o2775, caller: .root)
        XCTAssertEqual(try fs.setAttributes(ino: directory.ino, AttributeChanges(uid: 7), caller: .root).attributes.mode & 0o7777,
                       0o2775, "a directory keeps set-group-ID")
    }

    /// What the kernel asks for with FATTR_KILL_SUIDGID, FUSE_WRITE_KILL_SUIDGID and
    /// FUSE_OPEN_KILL_SUIDGID: the same drop, without a chown.
    func testDropSetIDAlone() throws {
        let fs = try makeFileSystem()
        let file = try fs.create(parent: .root, name: name("s"), mode: 0o6777, caller: .root)
        fs.release(ino: file.ino)
        let after = try fs.setAttributes(ino: file.ino, AttributeChanges(dropSetID: true), caller: Caller(uid: 1000, gid: 100))
        XCTAssertEqual(after.attributes.mode & 0o7777, 0o777)
        XCTAssertEqual(after.attributes.uid, 0, "owner unchanged")
    }

    func testTruncateOfADirectoryIsRefused() throws {
        let fs = try makeFileSystem()
        let directory = try fs.make(parent: .root, name: name("d"), mode: UInt32(S_IFDIR) | 0o755, caller: .root)
        XCTAssertEqual(errno { _ = try fs.setAttributes(ino: directory.ino, AttributeChanges(size: 0), caller: .root) }, EISDIR)
    }

    // MARK: - Extended attributes

    func testXattrCreateAndReplaceFlags() throws {
        let fs = try makeFileSystem()
        let file = try fs.create(parent: .root, name: name("x"), mode: 0o644, caller: .root)
        XCTAssertEqual(errno { try fs.setXattr(ino: file.ino, name: "user.a", value: [1], create: false, replace: true) }, ENODATA)
        try fs.setXattr(ino: file.ino, name: "user.a", value: [1], create: true, replace: false)
        XCTAssertEqual(errno { try fs.setXattr(ino: file.ino, name: "user.a", value: [2], create: true, replace: false) }, EEXIST)
        try fs.setXattr(ino: file.ino, name: "user.a", value: [3], create: false, replace: true)
        XCTAssertEqual(try fs.getXattr(ino: file.ino, name: "user.a"), [3])
        try fs.removeXattr(ino: file.ino, name: "user.a")
        XCTAssertEqual(errno { _ = try fs.getXattr(ino: file.ino, name: "user.a") }, ENODATA)
        XCTAssertEqual(errno { try fs.removeXattr(ino: file.ino, name: "user.a") }, ENODATA)
    }

    func testXattrNamespacesSizesAndWhoSeesTrusted() throws {
        let fs = try makeFileSystem()
        let file = try fs.create(parent: .root, name: name("n"), mode: 0o644, caller: .root)
        XCTAssertEqual(errno { try fs.setXattr(ino: file.ino, name: "system.x", value: [], create: false, replace: false) },
                       EOPNOTSUPP)
        XCTAssertEqual(errno { try fs.setXattr(ino: file.ino, name: "user.", value: [], create: false, replace: false) },
                       EOPNOTSUPP, "a prefix alone is no name")
        XCTAssertEqual(errno { try fs.setXattr(ino: file.ino, name: "user." + String(repeating: "n", count: 251),
                                                value: [], create: false, replace: false) }, ERANGE)
        XCTAssertEqual(errno { try fs.setXattr(ino: file.ino, name: "user.big", value: [UInt8](repeating: 0, count: MetadataPage.xattrBytesMax),
                                                create: false, replace: false) }, E2BIG)
        try fs.setXattr(ino: file.ino, name: "user.u", value: [1], create: false, replace: false)
        try fs.setXattr(ino: file.ino, name: "trusted.t", value: [2], create: false, replace: false)
        XCTAssertEqual(Set(try fs.listXattrs(ino: file.ino)), ["user.u", "trusted.t"])
        XCTAssertEqual(try fs.listXattrs(ino: file.ino, privileged: false), ["user.u"])
    }

    // MARK: - Directory listings

    func testAListingIsASnapshotServedByOffset() throws {
        let fs = try makeFileSystem()
        let directory = try fs.make(parent: .root, name: name("d"), mode: UInt32(S_IFDIR) | 0o755, caller: .root)
        for index in 0..<10 { fs.release(ino: try fs.create(parent: directory.ino, name: name("f\(index)"), mode: 0o644, caller: .root).ino) }
        let handle = try fs.openDirectory(ino: directory.ino)
        var seen: [String] = []
        var offset: UInt64 = 0
        // Three entries a reply, with creates and removals in between.
        while true {
            var batch = 0
            try fs.readDirectory(handle: handle, offset: offset) { entry, next in
                guard batch < 3 else { return false }
                seen.append(String(decoding: entry.name, as: UTF8.self))
                offset = next
                batch += 1
                return true
            }
            if batch == 0 { break }
            _ = try fs.create(parent: directory.ino, name: name("new\(offset)"), mode: 0o644, caller: .root)
            try? fs.unlink(parent: directory.ino, name: name("f\(offset)"))
        }
        fs.releaseDirectory(ino: directory.ino, handle: handle)
        XCTAssertEqual(Array(seen.prefix(2)), [".", ".."])
        XCTAssertEqual(Set(seen.dropFirst(2)), Set((0..<10).map { "f\($0)" }), "each entry of the snapshot once, nothing added")
        XCTAssertEqual(seen.count, 12)
        XCTAssertEqual(errno { try fs.readDirectory(handle: handle, offset: 0) { _, _ in true } }, EBADF)
    }

    func testReaddirplusGivesEachEntrysAttributes() throws {
        let fs = try makeFileSystem()
        let file = try fs.create(parent: .root, name: name("p"), mode: 0o640, caller: .root)
        fs.release(ino: file.ino)
        let handle = try fs.openDirectory(ino: .root)
        var found: Attributes?
        try fs.readDirectoryPlus(handle: handle, offset: 0) { entry, attributes, _ in
            if entry.name == self.name("p") { found = attributes }
            return true
        }
        fs.releaseDirectory(ino: .root, handle: handle)
        XCTAssertEqual(found?.ino, file.ino)
        XCTAssertEqual(found.map { $0.attributes.mode & 0o7777 }, 0o640)
    }
}
