#if canImport(Glibc)
import Glibc
#endif
import XCTest
import Bdev
import BdevMalloc
import Env
import Blobstore
import ToolSupport
@testable import BlobFileSystem

/// The damage campaign of `fsck --repair` (issue 21): populated images — files of many
/// sizes, fragmented files, a directory of many entries, nested directories, symlinks,
/// hard links, xattrs; in two geometries; one unmounted cleanly, one with a log of changes
/// after its last checkpoint — get seeded random bit flips and zeroed pages in a metadata region (a super
/// block slot, the log, the table, the bitmaps, the metadata pages, chain pages in
/// clusters, or two of them). Each goes through fsck, the repair both tools run
/// (`ToolSupport.Fsck.repair`), fsck again (must be clean), a mount and a walk that reads
/// every file, then an unmount and fsck again. Every 4 KiB block a file reads is zeros or
/// its own (blocks carry their inode and index): no file reads another's bytes. A file
/// the repair does not name as touched, whose last change the log replay reached, reads
/// back exactly (data, size, xattrs, symlink target).
///
/// Seeds: `REPAIR_CAMPAIGN_SEEDS` (default 300, under a minute in a debug build here; release
/// checks run 5000: docs/BLOBCLI.md). `REPAIR_CAMPAIGN_FIRST` starts elsewhere.
final class RepairCampaignTests: XCTestCase {
    /// The stores the campaign damages: the default layout (metadata pages spill into
    /// clusters), and 512-byte blocks with 16 KiB clusters (a page is 8 blocks; no
    /// metadata pages in clusters).
    struct Geometry {
        var name: String
        var megabytes: UInt64
        var blockBytes: Int
        var clusterBytes: Int
    }

    static let geometries = [
        Geometry(name: "4 KiB blocks and clusters", megabytes: 16, blockBytes: 4096, clusterBytes: 4096),
        Geometry(name: "512-byte blocks, 16 KiB clusters", megabytes: 40, blockBytes: 512, clusterBytes: 16384),
    ]
    /// Clusters of each fragmented file: an extent each, more than one page holds.
    static let fragmentClusters = 210

    /// What a file should hold.
    struct Expected {
        var ino: InodeNumber
        var path: String
        var mode: UInt32
        var size: UInt64
        var xattrs: [String: [UInt8]] = [:]
        var target: [UInt8]?
        /// The log sequence after its last change was synced: a replay that reaches it
        /// brings the file back whole.
        var lastLSN: UInt64 = 0
        /// A copy (copy_file_range, sharing clusters) holds this inode's blocks.
        var contentOf: InodeNumber?
        /// Deleted after the checkpoint: a repair whose replay stops before the delete
        /// brings it back (with its own blocks); else it is gone.
        var deleted = false
    }

    /// A populated image: its bytes, and what each file holds.
    struct Image {
        var name: String
        var geometry: Int
        var bytes: [UInt8]
        var files: [InodeNumber: Expected]
        /// Device pages worth aiming at: chain pages (region and clusters), the log in use.
        var chainRegionPages: [UInt64]
        var chainClusterPages: [UInt64]
        var logPagesInUse: [UInt64]
        var block: SuperBlock
    }

    // MARK: - Content

    /// Block `index` of the file with inode `ino`: its inode and index, then bytes of a
    /// generator seeded by both — any block read is known by its first 16 bytes.
    static func pattern(ino: UInt64, index: UInt64) -> [UInt8] {
        var generator = SplitMix64(seed: ino &* 0x9E37_79B9_7F4A_7C15 ^ index)
        var bytes = [UInt8](repeating: 0, count: 4096)
        for byte in 0..<8 {
            bytes[byte] = UInt8(truncatingIfNeeded: ino >> (8 * UInt64(byte)))
            bytes[8 + byte] = UInt8(truncatingIfNeeded: index >> (8 * UInt64(byte)))
        }
        for word in 2..<512 {
            let value = generator.next()
            for byte in 0..<8 { bytes[word * 8 + byte] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(byte))) }
        }
        return bytes
    }

    static func content(ino: InodeNumber, size: UInt64) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Int(size))
        var index: UInt64 = 0
        while UInt64(bytes.count) < size {
            bytes += pattern(ino: ino.rawValue, index: index).prefix(Int(size) - bytes.count)
            index += 1
        }
        return bytes
    }

    // MARK: - Populating

    private static func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

    /// The images (for each geometry, unmounted cleanly and with a log after the
    /// checkpoint), made once for every test of the class.
    nonisolated(unsafe) static var images: [Image]?

    static func device(_ geometry: Geometry) throws -> Bdev {
        Bdev(backend: try MallocBdev(blockCount: (geometry.megabytes << 20) / UInt64(geometry.blockBytes),
                                     blockSizeBytes: geometry.blockBytes))
    }

    static func makeImages() throws -> [Image] {
        if let images { return images }
        var made: [Image] = []
        let reactor = try Reactor()
        for (index, geometry) in geometries.enumerated() {
            let bdev = try device(geometry)
            var files: [InodeNumber: Expected] = [:]
            try withIO(bdev, reactor) { io in
                let store = try BlobStore.format(io, options: BlobStore.Options(clusterSizeBytes: geometry.clusterBytes))
                let fs = try FileSystem.format(store)
                try populate(fs, &files, clusterBytes: geometry.clusterBytes)
                try fs.unmount()
                try store.unload()
            }
            made.append(try snapshot(bdev, reactor, name: "clean, \(geometry.name)", geometry: index, files: files))
            try withIO(bdev, reactor) { io in
                let (store, _) = try BlobStore.load(io)
                let fs = try FileSystem.mount(store)
                try changeAfterTheCheckpoint(fs, &files)
                // As a power cut after a sync leaves it: the log holds the changes.
            }
            made.append(try snapshot(bdev, reactor, name: "log after checkpoint, \(geometry.name)", geometry: index, files: files))
        }
        images = made
        return made
    }

    static func withIO<T>(_ bdev: Bdev, _ reactor: Reactor, _ body: (BdevSyncIO) throws -> T) throws -> T {
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        return try body(io)
    }

    private static func write(_ fs: FileSystem, _ ino: InodeNumber, size: UInt64, from: UInt64 = 0) throws {
        let data = content(ino: ino, size: size)
        var offset = from
        while offset < size {
            let end = min(size, offset + 65536)
            _ = try fs.write(ino: ino, offset: offset, data: Array(data[Int(offset)..<Int(end)]))
            offset = end
        }
    }

    private static func file(_ fs: FileSystem, _ files: inout [InodeNumber: Expected], parent: InodeNumber, path: String, size: UInt64) throws -> InodeNumber {
        let name = String(path.split(separator: "/").last!)
        let made = try fs.create(parent: parent, name: bytes(name), mode: 0o644, caller: .root)
        try write(fs, made.ino, size: size)
        fs.release(ino: made.ino)
        files[made.ino] = Expected(ino: made.ino, path: path, mode: UInt32(S_IFREG), size: size)
        try synced(fs, &files, made.ino)
        return made.ino
    }

    /// Makes the file's changes durable (its size is written back at a sync) and notes
    /// the log sequence they end before.
    private static func synced(_ fs: FileSystem, _ files: inout [InodeNumber: Expected], _ ino: InodeNumber) throws {
        try fs.sync()
        files[ino]!.lastLSN = fs.store.logSequence
    }

    private static func directory(_ fs: FileSystem, parent: InodeNumber, _ name: String) throws -> InodeNumber {
        try fs.make(parent: parent, name: bytes(name), mode: UInt32(S_IFDIR) | 0o755, caller: .root).ino
    }

    private static func populate(_ fs: FileSystem, _ files: inout [InodeNumber: Expected], clusterBytes: Int) throws {
        let sizes: [UInt64] = [0, 1, 100, 4095, 4096, 5000, 12288, 20000, 40000, 70001]
        for d in 0..<5 {
            let dir = try directory(fs, parent: .root, "d\(d)")
            for (index, size) in sizes.enumerated() where (index + d) % 3 != 0 {
                _ = try file(fs, &files, parent: dir, path: "/d\(d)/f\(index)", size: size)
            }
            if d == 0 {
                let sub = try directory(fs, parent: dir, "sub")
                let deeper = try directory(fs, parent: sub, "deeper")
                _ = try file(fs, &files, parent: deeper, path: "/d0/sub/deeper/x", size: 9000)
                _ = try directory(fs, parent: sub, "empty")
            }
        }
        // A directory of many entries: a chain of several pages.
        let big = try directory(fs, parent: .root, "big")
        for index in 0..<160 { _ = try file(fs, &files, parent: big, path: "/big/entry-\(index)", size: UInt64(index * 37 % 300)) }
        // Two files written a cluster at a time in turn: an extent per cluster, chains of
        // two pages.
        let a = try fs.create(parent: .root, name: bytes("frag-a"), mode: 0o600, caller: .root).ino
        let b = try fs.create(parent: .root, name: bytes("frag-b"), mode: 0o600, caller: .root).ino
        let fragmentBytes = UInt64(fragmentClusters * clusterBytes)
        let (dataA, dataB) = (content(ino: a, size: fragmentBytes), content(ino: b, size: fragmentBytes))
        for cluster in 0..<fragmentClusters {
            let range = (cluster * clusterBytes)..<((cluster + 1) * clusterBytes)
            _ = try fs.write(ino: a, offset: UInt64(range.lowerBound), data: Array(dataA[range]))
            _ = try fs.write(ino: b, offset: UInt64(range.lowerBound), data: Array(dataB[range]))
        }
        fs.release(ino: a)
        fs.release(ino: b)
        files[a] = Expected(ino: a, path: "/frag-a", mode: UInt32(S_IFREG), size: fragmentBytes)
        files[b] = Expected(ino: b, path: "/frag-b", mode: UInt32(S_IFREG), size: fragmentBytes)
        try synced(fs, &files, a)
        try synced(fs, &files, b)
        // Copies sharing clusters (a snapshot of frag-a, two clones; one of a small file),
        // then frag-a rewritten with its own bytes: copy-on-write clusters of its own.
        for (source, name) in [(a, "copy-a"), (a, "copy-a2"), (try resolve(fs, "/d1/f3").ino, "copy-small")] {
            try copy(fs, &files, source, to: name)
        }
        try write(fs, a, size: fragmentBytes / 2)
        try synced(fs, &files, a)
        // Symlinks (one of two target pieces), a hard link, xattrs (one large).
        for (name, target) in [("short", bytes("/d1/f2")), ("long", [UInt8](repeating: UInt8(ascii: "t"), count: 3000))] {
            let link = try fs.make(parent: .root, name: bytes(name), mode: UInt32(S_IFLNK) | 0o777, symlinkTarget: target, caller: .root)
            files[link.ino] = Expected(ino: link.ino, path: "/" + name, mode: UInt32(S_IFLNK), size: UInt64(target.count), target: target)
            try synced(fs, &files, link.ino)
        }
        let linked = try fs.lookup(parent: try fs.lookup(parent: .root, name: bytes("d1")).ino, name: bytes("f1")).ino
        _ = try fs.link(ino: linked, newParent: try fs.lookup(parent: .root, name: bytes("d2")).ino, newName: bytes("hard"))
        try synced(fs, &files, linked)
        for (path, name, size) in [("/d1/f1", "user.colour", 4), ("/d3/f1", "user.big", 2000), ("/d4/f1", "user.x", 0)] {
            let ino = try resolve(fs, path).ino
            let value = [UInt8](repeating: UInt8(size % 251), count: size)
            try fs.setXattr(ino: ino, name: name, value: value, create: true, replace: false)
            files[ino]!.xattrs[name] = value
            try synced(fs, &files, ino)
        }
    }

    /// A copy of `source` at the root, named `name`, sharing its clusters.
    private static func copy(_ fs: FileSystem, _ files: inout [InodeNumber: Expected], _ source: InodeNumber, to name: String) throws {
        let made = try fs.create(parent: .root, name: bytes(name), mode: 0o644, caller: .root)
        let size = files[source]!.size
        guard try fs.copyRange(from: source, offset: 0, to: made.ino, offset: 0, length: size) == size else {
            throw FSError(EIO, "copy of \(size) bytes")
        }
        fs.release(ino: made.ino)
        files[made.ino] = Expected(ino: made.ino, path: "/" + name, mode: UInt32(S_IFREG), size: size,
                                   contentOf: files[source]!.contentOf ?? source)
        try synced(fs, &files, made.ino)
    }

    /// Changes after the checkpoint, each synced: new files, an append, a rename, an xattr,
    /// a directory and a symlink. Each file's last LSN is recorded.
    private static func changeAfterTheCheckpoint(_ fs: FileSystem, _ files: inout [InodeNumber: Expected]) throws {
        func done(_ ino: InodeNumber) throws { try synced(fs, &files, ino) }
        let late = try directory(fs, parent: .root, "late")
        for index in 0..<12 {
            let ino = try file(fs, &files, parent: late, path: "/late/n\(index)", size: UInt64(index * 3001))
            try done(ino)
        }
        let appended = try resolve(fs, "/d0/f7").ino
        let size = files[appended]!.size
        try write(fs, appended, size: size + 9000, from: size)
        files[appended]!.size = size + 9000
        try done(appended)
        let renamed = try resolve(fs, "/d2/f2").ino
        try fs.rename(parent: try resolve(fs, "/d2").ino, name: bytes("f2"), newParent: late, newName: bytes("moved"))
        files[renamed]!.path = "/late/moved"
        try done(renamed)
        let tagged = try resolve(fs, "/d4/f4").ino
        try fs.setXattr(ino: tagged, name: "user.late", value: bytes("after"), create: true, replace: false)
        files[tagged]!.xattrs["user.late"] = bytes("after")
        try done(tagged)
        let link = try fs.make(parent: late, name: bytes("ln"), mode: UInt32(S_IFLNK) | 0o777, symlinkTarget: bytes("n3"), caller: .root)
        files[link.ino] = Expected(ino: link.ino, path: "/late/ln", mode: UInt32(S_IFLNK), size: 2, target: bytes("n3"))
        try done(link.ino)
        // In the log: a copy (snapshot and clone records), and a file deleted after it was
        // copied (the merge of its snapshot into the copy).
        let source = try resolve(fs, "/late/n5").ino
        try copy(fs, &files, source, to: "late-copy")
        let doomed = try resolve(fs, "/late/n7").ino
        try copy(fs, &files, doomed, to: "late-orphaned-copy")
        try fs.unlink(parent: late, name: bytes("n7"))
        fs.forget(ino: doomed, count: 100)  // every lookup of it: the blob goes now, not at the next mount
        files[doomed]!.deleted = true
        try fs.sync()
        files[doomed]!.lastLSN = fs.store.logSequence
    }

    static func resolve(_ fs: FileSystem, _ path: String) throws -> Attributes {
        var current = try fs.getAttributes(ino: .root)
        for part in path.split(separator: "/") { current = try fs.lookup(parent: current.ino, name: Array(part.utf8)) }
        return current
    }

    private static func snapshot(_ bdev: Bdev, _ reactor: Reactor, name: String, geometry: Int,
                                 files: [InodeNumber: Expected]) throws -> Image {
        try withIO(bdev, reactor) { io in
            let (store, _) = try BlobStore.load(io, readOnly: true)
            try store.readAllChains()
            let block = store.superBlock
            var region: [UInt64] = []
            var inClusters: [UInt64] = []
            for (page, _) in store.metadataPageOwners {
                let address = block.metadataPageAddress(page)
                if block.metadataPageCluster(page) == nil { region.append(address) } else { inClusters.append(address) }
            }
            let scan = try XCTUnwrap(store.lastScan)
            let log = (block.logTailSequence..<scan.endSequence).map { block.log.startPage + $0 % block.log.pageCount }
            let bytes = try io.readBytes(offsetBlocks: 0, countBlocks: bdev.geometry.blockCount)
            return Image(name: name, geometry: geometry, bytes: bytes, files: files, chainRegionPages: region, chainClusterPages: inClusters,
                         logPagesInUse: log, block: block)
        }
    }

    // MARK: - Damage

    enum Region: CaseIterable {
        case superBlock, log, table, bitmaps, metadataPages, chainPagesInClusters
    }

    /// Pages of `region` to aim at: mostly those in use.
    private static func pick(_ region: Region, _ image: Image, _ random: inout SplitMix64) -> (page: UInt64, end: UInt64) {
        let block = image.block
        func any(_ start: UInt64, _ count: UInt64) -> (UInt64, UInt64) { (start + random.next() % count, start + count) }
        let inUse = random.next() % 10 < 8
        switch region {
        case .superBlock:
            let slot = random.next() % 2
            return (slot, slot + 1)
        case .log:
            if inUse, !image.logPagesInUse.isEmpty {
                return (image.logPagesInUse[Int(random.next() % UInt64(image.logPagesInUse.count))], block.log.endPage)
            }
            return any(block.log.startPage, block.log.pageCount)
        case .table:
            let copy = inUse ? UInt64(block.activeCopy) : UInt64(1 - block.activeCopy)
            return any(block.table.startPage + copy * block.table.pageCount, block.table.pageCount)
        case .bitmaps:
            let copy = inUse ? UInt64(block.activeCopy) : UInt64(1 - block.activeCopy)
            return any(block.bitmaps.startPage + copy * block.bitmaps.pageCount, block.bitmaps.pageCount)
        case .metadataPages:
            if inUse { return (image.chainRegionPages[Int(random.next() % UInt64(image.chainRegionPages.count))], block.metadataPages.endPage) }
            return any(block.metadataPages.startPage, block.metadataPages.pageCount)
        case .chainPagesInClusters:
            guard !image.chainClusterPages.isEmpty else { return pick(.metadataPages, image, &random) }
            let page = image.chainClusterPages[Int(random.next() % UInt64(image.chainClusterPages.count))]
            return (page, page + 1)
        }
    }

    /// Damages `bytes` (the whole device) in `regions`; returns what it did, for messages.
    private static func damage(_ bytes: inout [UInt8], _ image: Image, _ regions: [Region], _ random: inout SplitMix64) -> String {
        var done: [String] = []
        for region in regions {
            let (page, end) = pick(region, image, &random)
            let kind = random.next() % 20
            if kind < 10 {
                let flips = 1 + Int(random.next() % 8)
                for _ in 0..<flips {
                    let at = Int(page) * 4096 + Int(random.next() % 4096)
                    bytes[at] ^= 1 << UInt8(random.next() % 8)
                }
                done.append("\(region): \(flips) bits flipped in page \(page)")
            } else {
                // A run stops at the end of its region (of one slot for the super block).
                let count = kind < 17 ? 1 : min(2 + random.next() % 5, max(1, end - page))
                for zeroed in page..<(page + count) {
                    bytes.replaceSubrange((Int(zeroed) * 4096)..<(Int(zeroed + 1) * 4096), with: repeatElement(0, count: 4096))
                }
                done.append("\(region): pages \(page)..<\(page + count) zeroed")
            }
        }
        return done.joined(separator: "; ")
    }

    // MARK: - The campaign

    struct Tally {
        var images = 0
        var damaged = 0
        var repaired = 0
        var intactFiles = 0
        var touchedFiles = 0
        var missingFiles = 0
        var changeKinds: [String: Int] = [:]
    }

    func testDamagedImagesAreAllCleanAfterRepairAndNoFileReadsAnothersBytes() throws {
        let environment = ProcessInfo.processInfo.environment
        let seeds = environment["REPAIR_CAMPAIGN_SEEDS"].flatMap(Int.init) ?? 300
        let first = environment["REPAIR_CAMPAIGN_FIRST"].flatMap(UInt64.init) ?? 0
        let images = try Self.makeImages()
        let devices = try Self.geometries.map(Self.device)
        let reactor = try Reactor()
        var expectedContent: [InodeNumber: [UInt8]] = [:]
        for image in images {
            for (ino, file) in image.files where file.mode == UInt32(S_IFREG) && expectedContent[ino]?.count ?? -1 < Int(file.size) {
                expectedContent[ino] = Self.content(ino: file.contentOf ?? ino, size: file.size)
            }
        }
        var tally = Tally()
        let started = ContinuousClock.now
        for seed in first..<(first + UInt64(seeds)) {
            var random = SplitMix64(seed: seed &* 0x2545_F491_4F6C_DD1D &+ 21)
            let image = images[Int(seed % UInt64(images.count))]
            let count = random.next() % 6 == 0 ? 2 : 1
            var regions: [Region] = []
            for _ in 0..<count {
                var region = Region.allCases[Int(random.next() % UInt64(Region.allCases.count))]
                // Never both super block slots: the one damage a repair refuses.
                if region == .superBlock && regions.contains(.superBlock) { region = .table }
                regions.append(region)
            }
            var bytes = image.bytes
            let what = Self.damage(&bytes, image, regions, &random)
            let context = "seed \(seed) (\(image.name) image; \(what))"
            let seedStarted = ContinuousClock.now
            try Self.withIO(devices[image.geometry], reactor) { io in
                try io.writeBytes(bytes, offsetBlocks: 0)
                try runSeed(io, image: image, expected: expectedContent, context: context, tally: &tally)
            }
            XCTAssertLessThan(ContinuousClock.now - seedStarted, .seconds(20), "\(context): too slow (a hang?)")
        }
        let kinds = tally.changeKinds.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        print("repair campaign: \(tally.images) images, \(tally.damaged) found damaged by fsck, \(tally.repaired) clean after repair; "
              + "files checked intact \(tally.intactFiles), touched by the repair or the lost log \(tally.touchedFiles) "
              + "(\(tally.missingFiles) of them gone); changes: \(kinds); \(ContinuousClock.now - started)")
        XCTAssertEqual(tally.repaired, tally.damaged)
    }

    private func runSeed(_ io: BdevSyncIO, image: Image, expected: [InodeNumber: [UInt8]], context: String, tally: inout Tally) throws {
        tally.images += 1
        let before = Fsck.check(io)
        guard !before.clean else { return }  // flips in bytes nothing reads
        tally.damaged += 1
        let report = Fsck.repair(io)
        guard report.outcome == .repaired else {
            return XCTFail("\(context): repair \(report.outcome.rawValue): \(report.refusal.map { "\($0)" } ?? "") \(report.remaining)")
        }
        for change in report.changes { tally.changeKinds[change.kind, default: 0] += 1 }
        let after = Fsck.check(io)
        guard after.clean else { return XCTFail("\(context): fsck after repair: \(after.problems.prefix(5))") }
        tally.repaired += 1

        // Mount and read everything.
        let (store, _) = try BlobStore.load(io)
        let fs = try FileSystem.mount(store)
        var found: [InodeNumber: (attributes: InodeAttributes, data: [UInt8]?, target: [UInt8]?, xattrs: [String: [UInt8]])] = [:]
        var queue: [InodeNumber] = [FileSystem.rootIno]
        var visited: Set<InodeNumber> = [FileSystem.rootIno]
        while let directory = queue.popLast() {
            let handle = try fs.openDirectory(ino: directory)
            var entries: [DirectoryEntry] = []
            try fs.readDirectory(handle: handle, offset: 0) { entry, _ in
                entries.append(entry)
                return true
            }
            fs.releaseDirectory(ino: directory, handle: handle)
            for entry in entries.dropFirst(2) {
                let attributes = try fs.lookup(parent: directory, name: entry.name)
                fs.forget(ino: attributes.ino, count: 1)
                if attributes.attributes.isDirectory {
                    XCTAssertTrue(visited.insert(attributes.ino).inserted, "\(context): directory \(attributes.ino) reached twice")
                    queue.append(attributes.ino)
                    continue
                }
                guard found[attributes.ino] == nil else { continue }  // a hard link's other name
                var data: [UInt8]?
                if attributes.attributes.isRegular {
                    try fs.open(ino: attributes.ino)
                    var read: [UInt8] = []
                    read.reserveCapacity(Int(attributes.attributes.size))
                    while UInt64(read.count) < attributes.attributes.size {
                        let piece = try fs.read(ino: attributes.ino, offset: UInt64(read.count), count: 1 << 20)
                        guard !piece.isEmpty else { break }
                        read.append(contentsOf: piece)
                    }
                    fs.release(ino: attributes.ino)
                    data = read
                    checkBlocks(read, ino: attributes.ino, expected: expected[attributes.ino], context: context)
                }
                let target = attributes.attributes.isSymlink ? try fs.readSymlink(ino: attributes.ino) : nil
                var xattrs: [String: [UInt8]] = [:]
                for name in try fs.listXattrs(ino: attributes.ino) { xattrs[name] = try fs.getXattr(ino: attributes.ino, name: name) }
                found[attributes.ino] = (attributes.attributes, data, target, xattrs)
            }
        }
        try fs.unmount()
        try store.unload()
        XCTAssertEqual(Fsck.check(io).problems, [], "\(context): fsck after a mount and unmount of the repaired store")

        // Files the repair did not touch, whose last change the replay reached, are exact.
        for (ino, file) in image.files {
            let id = ino.blobID
            let reached = file.lastLSN <= report.replayEndLSN
            if file.deleted {
                if reached && !report.affectedBlobs.contains(id) && found[ino] != nil {
                    XCTFail("\(context): \(file.path) (inode \(ino)) was deleted, yet it is there: \(report.changes.map(\.text).prefix(12))")
                }
                continue
            }
            guard !report.affectedBlobs.contains(id), reached else {
                tally.touchedFiles += 1
                if found[ino] == nil { tally.missingFiles += 1 }
                continue
            }
            tally.intactFiles += 1
            guard let now = found[ino] else {
                XCTFail("\(context): \(file.path) (inode \(ino)) is untouched by the repair, yet no directory leads to it: \(report.changes.map(\.text).prefix(8))")
                continue
            }
            XCTAssertEqual(now.attributes.size, file.size, "\(context): \(file.path) size")
            if let data = now.data {
                XCTAssertTrue(expected[ino].map { Self.same(data[...], $0.prefix(Int(file.size))) } ?? data.isEmpty, "\(context): \(file.path) data")
            }
            XCTAssertEqual(now.target, file.target, "\(context): \(file.path) target")
            XCTAssertEqual(now.xattrs, file.xattrs, "\(context): \(file.path) xattrs")
        }
    }

    /// memcmp: a debug build compares arrays a byte at a time, and the campaign reads
    /// every file of every image.
    static func same(_ a: ArraySlice<UInt8>, _ b: ArraySlice<UInt8>) -> Bool {
        a.count == b.count && a.withUnsafeBytes { x in b.withUnsafeBytes { y in memcmp(x.baseAddress!, y.baseAddress!, a.count) == 0 } }
    }

    static let zeros = [UInt8](repeating: 0, count: 4096)

    /// Every 4 KiB block of a file is zeros or the file's own block at that index.
    private func checkBlocks(_ data: [UInt8], ino: InodeNumber, expected: [UInt8]?, context: String) {
        var offset = 0
        while offset < data.count {
            let end = min(data.count, offset + 4096)
            let block = data[offset..<end]
            if !Self.same(block, Self.zeros[0..<block.count]) {
                let own = expected.flatMap { end <= $0.count ? $0[offset..<end] : nil }
                guard let own, Self.same(own, block) else {
                    var header: (UInt64, UInt64) = (0, 0)
                    if block.count >= 16 {
                        for byte in 0..<8 {
                            header.0 |= UInt64(block[offset + byte]) << (8 * UInt64(byte))
                            header.1 |= UInt64(block[offset + 8 + byte]) << (8 * UInt64(byte))
                        }
                    }
                    XCTFail("\(context): inode \(ino) reads at \(offset) bytes that are not its own (they say inode \(header.0), block \(header.1); expected \(expected.map { "\($0.count) bytes" } ?? "none"))")
                    return
                }
            }
            offset = end
        }
    }
}
