#if canImport(Glibc)
import Glibc
#endif
import XCTest
import Bdev
import BdevMalloc
import Env
import Blobstore
@testable import BlobFileSystem

/// The namespace as a specification: what each change does to names, link counts and
/// times, that each inode's attributes are written once per change (`InodeUpdates`), and
/// that a change the store refuses leaves the cached inodes as they were.
final class NamespaceTests: XCTestCase {
    private func name(_ text: String) -> [UInt8] { Array(text.utf8) }
    private let directoryMode = UInt32(S_IFDIR) | 0o755

    private func makeFileSystem() throws -> (FileSystem, BdevSyncIO) {
        let bdev = Bdev(backend: try MallocBdev(blockCount: (32 << 20) / 4096, blockSizeBytes: 4096))
        let io = try BdevSyncIO(bdev: bdev, reactor: try Reactor())
        return (try FileSystem.format(try BlobStore.format(io)), io)
    }

    /// The attributes as the log holds them (what a mount after a crash would see).
    private func logged(_ fs: FileSystem, _ ino: InodeNumber) throws -> InodeAttributes {
        let value = try XCTUnwrap(fs.store.xattr(ino.blobID, name: Key.inode, isInternal: true))
        return try XCTUnwrap(InodeAttributes.decode(value))
    }

    private func assertConsistent(_ fs: FileSystem, file: StaticString = #filePath, line: UInt = #line) {
        let check = FileSystem.check(fs.store)
        XCTAssertTrue(check.isConsistent, "\(check.problems)", file: file, line: line)
    }

    func testAnInodeStagedTwiceIsOneEntryWhoseChangesAddUp() throws {
        let (fs, _) = try makeFileSystem()
        let d = try fs.make(parent: FileSystem.rootIno, name: name("d"), mode: directoryMode, caller: .root)
        let inode = try fs.inode(d.ino)
        var updates = FileSystem.InodeUpdates()
        let from = updates.stage(d.ino.blobID, inode)
        let to = updates.stage(d.ino.blobID, inode)
        XCTAssertEqual(from, to)
        updates[from].nlink -= 1
        updates[to].nlink += 1
        XCTAssertEqual(updates[from].nlink, d.attributes.nlink)
        XCTAssertEqual(inode.attributes.nlink, d.attributes.nlink, "the cache is untouched until settle")
    }

    func testMakingADirectoryLinksItUnderItsParent() throws {
        let (fs, _) = try makeFileSystem()
        let before = try fs.getAttributes(ino: FileSystem.rootIno).attributes
        let made = try fs.make(parent: FileSystem.rootIno, name: name("d"), mode: directoryMode, caller: .root)
        let root = try fs.getAttributes(ino: FileSystem.rootIno).attributes
        XCTAssertEqual(made.attributes.nlink, 2, "a directory: its name and its '.'")
        XCTAssertEqual(root.nlink, before.nlink + 1, "the parent gains the child's '..'")
        XCTAssertGreaterThanOrEqual(root.mtimeNs, before.mtimeNs)
        XCTAssertEqual(try logged(fs, FileSystem.rootIno), root, "the parent's new attributes are in the log")
        assertConsistent(fs)
    }

    func testRenameWithinOneDirectoryLeavesItsLinkCount() throws {
        let (fs, _) = try makeFileSystem()
        let parent = try fs.make(parent: FileSystem.rootIno, name: name("p"), mode: directoryMode, caller: .root)
        _ = try fs.make(parent: parent.ino, name: name("sub"), mode: directoryMode, caller: .root)
        let before = try fs.getAttributes(ino: parent.ino).attributes
        try fs.rename(parent: parent.ino, name: name("sub"), newParent: parent.ino, newName: name("moved"))
        let after = try fs.getAttributes(ino: parent.ino).attributes
        XCTAssertEqual(after.nlink, before.nlink, "a directory moved within its parent leaves the parent's count")
        XCTAssertEqual(try logged(fs, parent.ino), after)
        XCTAssertThrowsError(try fs.lookup(parent: parent.ino, name: name("sub")))
        XCTAssertEqual(try fs.lookup(parent: parent.ino, name: name("moved")).attributes.parent, parent.ino.blobID)
        assertConsistent(fs)
    }

    func testRenameAcrossDirectoriesMovesTheLinkCountAndTheParent() throws {
        let (fs, _) = try makeFileSystem()
        let a = try fs.make(parent: FileSystem.rootIno, name: name("a"), mode: directoryMode, caller: .root)
        let b = try fs.make(parent: FileSystem.rootIno, name: name("b"), mode: directoryMode, caller: .root)
        let child = try fs.make(parent: a.ino, name: name("c"), mode: directoryMode, caller: .root)
        try fs.rename(parent: a.ino, name: name("c"), newParent: b.ino, newName: name("c"))
        XCTAssertEqual(try fs.getAttributes(ino: a.ino).attributes.nlink, 2)
        XCTAssertEqual(try fs.getAttributes(ino: b.ino).attributes.nlink, 3)
        XCTAssertEqual(try fs.getAttributes(ino: child.ino).attributes.parent, b.ino.blobID)
        for ino in [a.ino, b.ino, child.ino] {
            XCTAssertEqual(try logged(fs, ino), try fs.getAttributes(ino: ino).attributes, "inode \(ino) logged as cached")
        }
        assertConsistent(fs)
    }

    func testExchangeOfADirectoryAndAFileAcrossDirectories() throws {
        let (fs, _) = try makeFileSystem()
        let a = try fs.make(parent: FileSystem.rootIno, name: name("a"), mode: directoryMode, caller: .root)
        let b = try fs.make(parent: FileSystem.rootIno, name: name("b"), mode: directoryMode, caller: .root)
        let directory = try fs.make(parent: a.ino, name: name("x"), mode: directoryMode, caller: .root)
        let file = try fs.create(parent: b.ino, name: name("y"), mode: 0o644, caller: .root)
        fs.release(ino: file.ino)
        try fs.rename(parent: a.ino, name: name("x"), newParent: b.ino, newName: name("y"), flags: .exchange)
        XCTAssertEqual(try fs.lookup(parent: a.ino, name: name("x")).ino, file.ino)
        XCTAssertEqual(try fs.lookup(parent: b.ino, name: name("y")).ino, directory.ino)
        XCTAssertEqual(try fs.getAttributes(ino: a.ino).attributes.nlink, 2, "a lost its subdirectory")
        XCTAssertEqual(try fs.getAttributes(ino: b.ino).attributes.nlink, 3, "b gained it")
        XCTAssertEqual(try fs.getAttributes(ino: directory.ino).attributes.parent, b.ino.blobID)
        assertConsistent(fs)
    }

    func testLinkAndUnlinkCountNames() throws {
        let (fs, _) = try makeFileSystem()
        let file = try fs.create(parent: FileSystem.rootIno, name: name("f"), mode: 0o644, caller: .root)
        fs.release(ino: file.ino)
        let linked = try fs.link(ino: file.ino, newParent: FileSystem.rootIno, newName: name("g"))
        XCTAssertEqual(linked.attributes.nlink, 2)
        XCTAssertEqual(try logged(fs, file.ino).nlink, 2)
        try fs.unlink(parent: FileSystem.rootIno, name: name("f"))
        XCTAssertEqual(try fs.getAttributes(ino: file.ino).attributes.nlink, 1)
        XCTAssertEqual(try logged(fs, file.ino).nlink, 1)
        assertConsistent(fs)
    }

    func testARefusedChangeLeavesTheCachedInodesAsTheyWere() throws {
        let (fs, _) = try makeFileSystem()
        let a = try fs.make(parent: FileSystem.rootIno, name: name("a"), mode: directoryMode, caller: .root)
        let b = try fs.make(parent: FileSystem.rootIno, name: name("b"), mode: directoryMode, caller: .root)
        _ = try fs.make(parent: a.ino, name: name("c"), mode: directoryMode, caller: .root)
        let before = try [a.ino, b.ino].map { (ino) throws(FSError) in try fs.getAttributes(ino: ino).attributes }
        fs.store.externalFlushFailed(.io(errno: EIO))  // the store turns read-only
        XCTAssertThrowsError(try fs.rename(parent: a.ino, name: name("c"), newParent: b.ino, newName: name("c")))
        XCTAssertThrowsError(try fs.setXattr(ino: a.ino, name: "user.k", value: [1], create: false, replace: false))
        let after = try [a.ino, b.ino].map { (ino) throws(FSError) in try fs.getAttributes(ino: ino).attributes }
        XCTAssertEqual(after, before, "nothing staged reached the cache")
        XCTAssertEqual(try fs.lookup(parent: a.ino, name: name("c")).attributes.nlink, 2)
    }
}
