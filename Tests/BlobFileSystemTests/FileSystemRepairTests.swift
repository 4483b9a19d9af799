#if canImport(Glibc)
import Glibc
#endif
import XCTest
import Bdev
import BdevMalloc
import Env
import Blobstore
@testable import BlobFileSystem

/// `FileSystem.repair` on stores whose blob level is sound but whose file system is not
/// (what the blob-store repair leaves after removing damaged blobs, or crafted): each
/// repair lists its changes, `check` is clean after it, and the file system mounts with
/// every file's bytes where the repair says.
final class FileSystemRepairTests: XCTestCase {
    private func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

    /// A file system with /d/a, /d/b, /d/s/c, /top, a symlink /l and a hard link /d/a2 of
    /// /d/a; unmounted (the store stays loaded, writable). Returns the store and inode numbers.
    private func makeTree() throws -> (BlobStore, [String: InodeNumber]) {
        let bdev = Bdev(backend: try MallocBdev(blockCount: (32 << 20) / 4096, blockSizeBytes: 4096))
        let io = try BdevSyncIO(bdev: bdev, reactor: try Reactor())
        let store = try BlobStore.format(io)
        let fs = try FileSystem.format(store)
        var inos: [String: InodeNumber] = [:]
        let d = try fs.make(parent: .root, name: bytes("d"), mode: UInt32(S_IFDIR) | 0o755, caller: .root).ino
        let s = try fs.make(parent: d, name: bytes("s"), mode: UInt32(S_IFDIR) | 0o755, caller: .root).ino
        inos["/d"] = d
        inos["/d/s"] = s
        for (path, parent, name) in [("/d/a", d, "a"), ("/d/b", d, "b"), ("/d/s/c", s, "c"), ("/top", InodeNumber.root, "top")] {
            let file = try fs.create(parent: parent, name: bytes(name), mode: 0o644, caller: .root)
            try fs.write(ino: file.ino, offset: 0, data: [UInt8](repeating: UInt8(path.count), count: 5000 + path.count))
            fs.release(ino: file.ino)
            inos[path] = file.ino
        }
        inos["/l"] = try fs.make(parent: .root, name: bytes("l"), mode: UInt32(S_IFLNK) | 0o777, symlinkTarget: bytes("/d/a"),
                                 caller: .root).ino
        _ = try fs.link(ino: inos["/d/a"]!, newParent: d, newName: bytes("a2"))
        try fs.unmount()
        XCTAssertEqual(FileSystem.check(store).problems, [])
        return (store, inos)
    }

    private func id(_ ino: InodeNumber) -> BlobID { ino.blobID }

    private func XCTAssertMentions(_ text: String, _ parts: String..., file: StaticString = #filePath, line: UInt = #line) {
        for part in parts where !text.contains(part) { XCTFail("\"\(text)\" does not mention \"\(part)\"", file: file, line: line) }
    }

    @discardableResult
    private func repairAndCheck(_ store: BlobStore, file: StaticString = #filePath, line: UInt = #line) throws -> FileSystemRepairReport {
        XCTAssertFalse(FileSystem.check(store).isConsistent, "the damage is seen", file: file, line: line)
        let report = try FileSystem.repair(store, expectFileSystem: true)
        XCTAssertEqual(FileSystem.check(store).problems, [], "\(report.changes.map(\.text))", file: file, line: line)
        XCTAssertEqual(store.verify().problems, [], "the blob store the repair wrote through", file: file, line: line)
        return report
    }

    /// The inode at `path` in a mounted file system.
    private func resolve(_ fs: FileSystem, _ path: String) throws -> Attributes {
        var current = try fs.getAttributes(ino: .root)
        for part in path.split(separator: "/") { current = try fs.lookup(parent: current.ino, name: Array(part.utf8)) }
        return current
    }

    func testADirectoryNoDirectoryNamesGoesToLostAndFoundWithItsSubtree() throws {
        let (store, inos) = try makeTree()
        XCTAssertTrue(try store.removeXattr(.rootDirectory, name: "dd", isInternal: true))
        let report = try repairAndCheck(store)
        XCTAssertTrue(report.changes.contains { $0.kind == "lost_found_made" })
        let linked = try XCTUnwrap(report.changes.first { $0.kind == "lost_found" })
        XCTAssertEqual(linked.blob, id(inos["/d"]!))
        XCTAssertMentions(linked.text, "inode \(inos["/d"]!)", "/lost+found/\(inos["/d"]!)")
        XCTAssertEqual(report.changes.filter { $0.kind == "lost_found" }.count, 1, "the subtree comes with its top: \(report.changes.map(\.text))")
        XCTAssertEqual(report.affectedBlobs, [], "nothing's content changed")
        let fs = try FileSystem.mount(store)
        let moved = try resolve(fs, "/lost+found/\(inos["/d"]!)/s/c")
        XCTAssertEqual(moved.ino, inos["/d/s/c"])
        XCTAssertEqual(try fs.read(ino: moved.ino, offset: 0, count: 10_000), [UInt8](repeating: 6, count: 5006))
        XCTAssertEqual(try fs.getAttributes(ino: inos["/d"]!).attributes.parent, id(try resolve(fs, "/lost+found").ino))
        XCTAssertEqual(try resolve(fs, "/lost+found").attributes.mode & 0o7777, 0o700)
        XCTAssertEqual(try fs.getAttributes(ino: .root).attributes.nlink, 3, "the root: itself, its entry, lost+found")
    }

    func testEntriesOfMissingInodesAreDroppedAndLinkCountsFollowTheNames() throws {
        let (store, inos) = try makeTree()
        try store.deleteBlob(id(inos["/d/b"]!))
        // A wrong link count on the hard-linked file, and a wrong type in an entry.
        var attributes = try XCTUnwrap(InodeAttributes.decode(try XCTUnwrap(store.xattr(id(inos["/d/a"]!), name: "i", isInternal: true))))
        attributes.nlink = 7
        try store.setXattr(id(inos["/d/a"]!), name: "i", value: attributes.encode(), isInternal: true)
        try store.setXattr(.rootDirectory, name: "dtop", value: Key.entryValue(id: id(inos["/top"]!), type: UInt32(S_IFDIR)), isInternal: true)
        let report = try repairAndCheck(store)
        XCTAssertMentions(report.changes.map(\.text).joined(separator: "\n"), "entry \"b\" in directory \(inos["/d"]!): inode \(inos["/d/b"]!) does not exist: dropped",
                          "inode \(inos["/d/a"]!): link count 7 → 2", "entry \"top\" in directory 1: type 4")
        let fs = try FileSystem.mount(store)
        XCTAssertThrowsError(try resolve(fs, "/d/b"))
        XCTAssertEqual(try resolve(fs, "/d/a2").attributes.nlink, 2)
        XCTAssertEqual(try fs.readSymlink(ino: inos["/l"]!), bytes("/d/a"))
    }

    func testARootWhoseBlobIsGoneIsMadeAnewAndEverythingGoesToLostAndFound() throws {
        let (store, inos) = try makeTree()
        try store.deleteBlob(.rootDirectory)
        XCTAssertNil(store.superBlobID)
        let report = try FileSystem.repair(store, expectFileSystem: true)
        XCTAssertEqual(FileSystem.check(store).problems, [], "\(report.changes.map(\.text))")
        XCTAssertEqual(report.changes.first?.kind, "root_recreated")
        XCTAssertEqual(store.superBlobID, .rootDirectory)
        let fs = try FileSystem.mount(store)
        // The root named /d, /top and /l: they are linked by inode number; /d keeps its subtree.
        for path in ["/d", "/top", "/l"] {
            XCTAssertEqual(try resolve(fs, "/lost+found/\(inos[path]!)").ino, inos[path], path)
        }
        XCTAssertEqual(try resolve(fs, "/lost+found/\(inos["/d"]!)/a2").ino, inos["/d/a"])
        // Without a file system to expect, a store whose super blob is gone is left alone.
        let (plain, _) = try makeTree()
        try plain.deleteBlob(.rootDirectory)
        XCTAssertEqual(try FileSystem.repair(plain, expectFileSystem: false).changes, [])
    }

    func testSymlinksAndSizesAreMadeToAgreeWithWhatTheInodeHolds() throws {
        let (store, inos) = try makeTree()
        let link = id(inos["/l"]!)
        var attributes = try XCTUnwrap(InodeAttributes.decode(try XCTUnwrap(store.xattr(link, name: "i", isInternal: true))))
        attributes.size = 99
        try store.setXattr(link, name: "i", value: attributes.encode(), isInternal: true)
        let file = id(inos["/top"]!)
        var big = try XCTUnwrap(InodeAttributes.decode(try XCTUnwrap(store.xattr(file, name: "i", isInternal: true))))
        big.size = 1 << 40
        try store.setXattr(file, name: "i", value: big.encode(), isInternal: true)
        XCTAssertEqual(Set(FileSystem.check(store).problems), [
            "symlink inode \(inos["/l"]!): size 99, target of 4 bytes",
            "inode \(inos["/top"]!): size \(1 << 40) beyond its blob's \(try XCTUnwrap(store.blob(file)).clusterCount * 4096) bytes",
        ])
        let report = try repairAndCheck(store)
        XCTAssertEqual(report.affectedBlobs, [link, file])
        // A symlink without a target cannot be read: it goes, with the names of it.
        XCTAssertTrue(try store.removeXattr(link, name: "l", isInternal: true))
        XCTAssertEqual(FileSystem.check(store).problems, ["symlink inode \(inos["/l"]!): no target"])
        let removal = try repairAndCheck(store)
        XCTAssertTrue(removal.changes.contains { $0.kind == "symlink_removed" && $0.blob == link })
        XCTAssertNil(store.blob(link))
    }

    func testADirectoryNamedTwiceKeepsTheNameItsParentFieldGives() throws {
        let (store, inos) = try makeTree()
        try store.setXattr(.rootDirectory, name: "dalias", value: Key.entryValue(id: id(inos["/d/s"]!), type: UInt32(S_IFDIR)), isInternal: true)
        let report = try repairAndCheck(store)
        XCTAssertMentions(report.changes.map(\.text).joined(separator: "\n"), "entry \"alias\" in directory 1", "named elsewhere")
        let fs = try FileSystem.mount(store)
        XCTAssertEqual(try resolve(fs, "/d/s").ino, inos["/d/s"])
        XCTAssertThrowsError(try resolve(fs, "/alias"))
    }

    func testAnOrphanMarkerOnANamedInodeIsRemovedBeforeAMountWouldDeleteIt() throws {
        let (store, inos) = try makeTree()
        try store.setXattr(.rootDirectory, name: "o\(id(inos["/top"]!))", value: [], isInternal: true)
        try store.setXattr(.rootDirectory, name: "o999", value: [], isInternal: true)
        XCTAssertTrue(FileSystem.check(store).problems.contains("inode \(inos["/top"]!): marked an orphan, yet named in a directory"))
        try repairAndCheck(store)
        let fs = try FileSystem.mount(store)
        XCTAssertEqual(try fs.read(ino: try resolve(fs, "/top").ino, offset: 0, count: 10), [UInt8](repeating: 4, count: 10))
    }
}
