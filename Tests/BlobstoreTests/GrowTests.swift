import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
@testable import Blobstore

/// Online grow: a loaded store extends onto a device that grew under it (FORMAT.md,
/// "Online grow"). The new table and bitmaps go past everything the store used, and one
/// super block switches to them; a power cut at any write of the grow leaves the old
/// store or the grown one, whole.
final class GrowTests: XCTestCase {
    static let pageBlocks: UInt64 = 1  // 4 KiB blocks

    /// A store with blobs of every kind of metadata, some of it only in the log.
    private func populate(_ store: BlobStore, count: Int, seed: UInt64) throws -> [BlobID: [UInt8]] {
        var contents: [BlobID: [UInt8]] = [:]
        for index in 0..<count {
            let id = try store.createBlob(clusterCount: 3, xattrs: [("n", Array("blob \(index)".utf8))])
            let data = BlobStoreCrashTests.data(seed &+ UInt64(index), 8192)
            try store.write(blob: id, offsetUnits: 1, data: data)
            contents[id] = data
        }
        return contents
    }

    private func check(_ store: BlobStore, _ contents: [BlobID: [UInt8]], _ context: String) throws {
        let report = store.verify()
        XCTAssertTrue(report.isConsistent, "\(context): \(report.problems)")
        for (id, data) in contents {
            guard store.blob(id) != nil else { XCTFail("\(context): blob \(id) lost"); continue }
            XCTAssertEqual(try store.read(blob: id, offsetUnits: 1, countUnits: 2), data, "\(context): blob \(id)")
        }
    }

    /// Grows twice (the first moves the arrays from the front to the end, the second from
    /// the old end to the new one, whose pages become clusters), fills the new clusters,
    /// and reloads after each step.
    func testGrowTwiceAndUseTheNewClusters() throws {
        let reactor = try Reactor()
        let malloc = try MallocBdev(blockCount: 4096, reservedBlockCount: 16384)
        let bdev = Bdev(backend: malloc)
        var io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        var store = try BlobStore.format(io)
        var contents = try populate(store, count: 40, seed: 1)
        let formatted = store.superBlock
        XCTAssertFalse(formatted.hasArraysAfterData)
        XCTAssertThrowsError(try store.grow(), "the device has not grown") { error in
            guard case .invalidArgument = error as? BlobStoreError else { return XCTFail("\(error)") }
        }
        // Too little growth for the new arrays: refused before anything is written.
        malloc.grow(to: 4097)
        let sequence = store.superBlock.sequence
        XCTAssertThrowsError(try store.grow()) { error in
            guard case .noSpace = error as? BlobStoreError else { return XCTFail("\(error)") }
        }
        XCTAssertEqual(store.superBlock.sequence, sequence, "a refused grow writes nothing")

        for (round, blocks) in [(1, UInt64(8192)), (2, UInt64(16384))] {
            malloc.grow(to: blocks)
            let before = store.superBlock
            let report = try store.grow()
            let after = store.superBlock
            XCTAssertTrue(after.hasArraysAfterData)
            XCTAssertEqual(report.devicePagesAfter, blocks)
            XCTAssertEqual(after.devicePages, blocks)
            XCTAssertGreaterThan(after.clusterCount, before.clusterCount)
            XCTAssertEqual(after.table.startPage + 2 * after.table.pageCount + 2 * after.bitmaps.pageCount, blocks,
                           "the arrays end the device")
            XCTAssertGreaterThanOrEqual(after.table.startPage, before.devicePages, "the arrays are past the old store")
            XCTAssertEqual(after.dataStartPage + after.clusterCount, after.table.startPage, "clusters up to the arrays")
            XCTAssertGreaterThanOrEqual(after.blobIDLimit, before.blobIDLimit)
            try check(store, contents, "round \(round), after the grow")
            // Fill the store: the new clusters, the old arrays' pages among them, take data.
            let free = store.freeClusterCount
            let big = try store.createBlob(clusterCount: free / 2)
            let data = [UInt8](repeating: UInt8(round), count: Int(free / 2) * 4096)
            try store.write(blob: big, offsetUnits: 0, data: data)
            XCTAssertTrue(store.blob(big)!.extents.contains { $0.firstCluster + UInt64($0.count) > before.clusterCount },
                          "round \(round): clusters past the old end are in use")
            contents.merge(try populate(store, count: 20, seed: UInt64(round) * 1000)) { $1 }
            try store.unload()
            io.close()
            io = try BdevSyncIO(bdev: bdev, reactor: reactor)
            store = try BlobStore.load(io).0
            XCTAssertEqual(store.superBlock.devicePages, blocks)
            try check(store, contents, "round \(round), reloaded")
            XCTAssertEqual(try store.read(blob: big, offsetUnits: 0, countUnits: UInt64(data.count / 4096)), data)
            try store.deleteBlob(big)
            // Both copies of the new arrays verify: the other one becomes active now.
            try store.checkpoint()
            try check(store, contents, "round \(round), other copy")
        }
        try store.unload()
        io.close()
    }

    /// A power cut after every write index of a grow (N = 1, 2, ... until it completes),
    /// with seeds deciding which unflushed writes survive or tear, on a store with commits
    /// waiting in memory (deferred, as the file system runs it): the load gives the old
    /// store or the grown one, the verifier passes, everything synced before is there,
    /// and the store works on: it fills clusters of the size it has, checkpoints (writing
    /// the other copy of the arrays) and loads again clean.
    func testPowerCutAtEveryWriteOfAGrow() throws {
        let reactor = try Reactor()
        let oldBlocks: UInt64 = 4096, newBlocks: UInt64 = 8192
        let image: [UInt8]
        var synced: [BlobID: [UInt8]] = [:]
        do {
            let io = try BdevSyncIO(bdev: Bdev(backend: try MallocBdev(blockCount: oldBlocks)), reactor: reactor)
            let store = try BlobStore.format(io, options: .init(logPages: 32))
            synced = try populate(store, count: 60, seed: 7)
            try store.unload()
            image = try BlobStore.readPages(io, at: 0, count: oldBlocks)
            io.close()
        }
        var cut: UInt64 = 1
        var outcomes = (old: 0, grown: 0)
        while true {
            var finished = false
            for seed in UInt64(0)..<BlobStoreCrashTests.seedCount(4) {
                let malloc = try MallocBdev(blockCount: oldBlocks, reservedBlockCount: newBlocks)
                let fault = try BlobStoreCrashTests.faultDevice(malloc, holding: image, reactor: reactor)
                var io = try BdevSyncIO(bdev: Bdev(backend: fault), reactor: reactor)
                let store = try BlobStore.load(io).0
                store.deferCommitFlush = true
                // Commits only in memory when the grow begins: its checkpoint holds them.
                for id in synced.keys.sorted().prefix(5) { try store.setXattr(id, name: "late", value: [1]) }
                let pending = try store.createBlob(clusterCount: 1)
                malloc.grow(to: newBlocks)
                fault.powerCut(afterWrites: fault.writeCount + cut)
                do {
                    _ = try store.grow()
                    finished = true
                } catch {}
                io.close()
                let crash = try fault.crash(seed: seed, reactor: reactor)
                io = try BdevSyncIO(bdev: Bdev(backend: fault), reactor: reactor)
                let context = "cut after write \(cut), seed \(seed), crash \(crash)"
                let loaded: BlobStore
                do { loaded = try BlobStore.load(io).0 } catch {
                    XCTFail("\(context): load: \(error)")
                    io.close()
                    continue
                }
                let pages = loaded.superBlock.devicePages
                XCTAssertTrue(pages == oldBlocks || pages == newBlocks, "\(context): a store of \(pages) pages")
                if pages == newBlocks { outcomes.grown += 1 } else { outcomes.old += 1 }
                if finished { XCTAssertEqual(pages, newBlocks, "\(context): a grow that returned is durable") }
                try check(loaded, synced, context)
                if pages == newBlocks {
                    // What the grow's checkpoint held is in the grown store.
                    XCTAssertNotNil(loaded.blob(pending), "\(context): the grown store lacks a commit its checkpoint held")
                }
                // The store works on at the size it has: fill it, checkpoint, load again.
                let free = loaded.freeClusterCount
                let fill = try loaded.createBlob(clusterCount: free / 2)
                try loaded.write(blob: fill, offsetUnits: 0, data: [UInt8](repeating: 0xA5, count: Int(free / 2) * 4096))
                try loaded.checkpoint()
                try check(loaded, synced, "\(context), filled")
                try loaded.unload()
                io.close()
                io = try BdevSyncIO(bdev: Bdev(backend: fault), reactor: reactor)
                try check(try BlobStore.load(io).0, synced, "\(context), loaded again")
                io.close()
            }
            if finished { break }
            cut += 1
            if cut > 500 { return XCTFail("the grow never completes") }
        }
        XCTAssertGreaterThan(outcomes.old, 0)
        XCTAssertGreaterThan(outcomes.grown, 0)
        print("grow crash test: \(cut) write indices, \(outcomes.old) recoveries to the old size, \(outcomes.grown) to the grown one")
    }

    /// The super block of a grown store: its layout decodes, and what breaks it is refused
    /// with the field's offset (arrays overlapping the clusters, or past the device).
    func testTheGrownLayoutIsValidatedOnDecode() throws {
        let reactor = try Reactor()
        let malloc = try MallocBdev(blockCount: 4096, reservedBlockCount: 8192)
        let io = try BdevSyncIO(bdev: Bdev(backend: malloc), reactor: reactor)
        defer { io.close() }
        let store = try BlobStore.format(io)
        malloc.grow(to: 8192)
        _ = try store.grow()
        let block = store.superBlock
        XCTAssertEqual(try SuperBlock.decode(block.encode()[...], offset: 0), block)
        var overlapping = block
        overlapping.clusterCount += 1  // the last cluster runs into the table
        XCTAssertThrowsError(try SuperBlock.decode(overlapping.encode()[...], offset: 0)) { error in
            XCTAssertEqual((error as? FormatError)?.offset, 104, "\(error)")
        }
        var beyond = block
        beyond.devicePages -= 1
        XCTAssertThrowsError(try SuperBlock.decode(beyond.encode()[...], offset: 0)) { error in
            XCTAssertEqual((error as? FormatError)?.offset, 120, "\(error)")
        }
        var unknown = block
        unknown.incompatibleFeatures &= ~SuperBlock.Features.arraysAfterData  // read as the format's layout
        XCTAssertThrowsError(try SuperBlock.decode(unknown.encode()[...], offset: 0))
    }
}
