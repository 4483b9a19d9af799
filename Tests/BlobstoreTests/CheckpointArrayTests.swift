import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
import Synchronization
@testable import Blobstore

/// The first checkpoint after a load writes the pages of the table and bitmaps that
/// differ from what the copy it overwrites holds (known from the last checkpoint's
/// record), not both arrays whole: recovery costs what the log tail changed, not what
/// the device's size makes the arrays.
final class CheckpointArrayTests: XCTestCase {
    func testLoadsWriteOnlyTheArrayPagesThatDiffer() throws {
        let reactor = try Reactor()
        let counter = InstrumentedBdev(try MallocBdev(blockCount: (1 << 30) / 4096))
        let io = try BdevSyncIO(bdev: Bdev(backend: counter), reactor: reactor)
        var store = try BlobStore.format(io)
        let block = store.superBlock
        let arrayPages = Int(block.table.pageCount + block.bitmaps.pageCount)
        XCTAssertGreaterThan(arrayPages, 130, "1 GiB: 129 table pages and the bitmaps per copy")
        var ids: [BlobID] = []
        for index in 0..<40 {
            let id = try store.createBlob(clusterCount: 2)
            try store.write(blob: id, offsetUnits: 0, data: BlobStoreCrashTests.data(UInt64(index), 8192))
            ids.append(id)
        }
        try store.unload()
        XCTAssertNotNil(store.superBlock.changedSincePrevious)

        func loadCounting(_ what: String) throws -> Int {
            let before = counter.written.load(ordering: .relaxed)
            store = try BlobStore.load(io).0
            let pages = (counter.written.load(ordering: .relaxed) - before) / 4096
            let report = store.verify()
            XCTAssertTrue(report.isConsistent, "\(what): \(report.problems)")
            return pages
        }
        // Clean loads and dirty ones (operations in the log, no unload), in turn.
        for round in 0..<4 {
            let pages = try loadCounting("round \(round)")
            // The checkpoint: a super block, a few array pages per copy, chains of changed blobs.
            XCTAssertLessThan(pages, 16, "round \(round): a load wrote \(pages) pages (\(arrayPages) per array copy)")
            let id = try store.createBlob(clusterCount: 1)
            try store.write(blob: id, offsetUnits: 0, data: BlobStoreCrashTests.data(100 + UInt64(round), 4096))
            try store.deleteBlob(ids.removeFirst())
            ids.append(id)
            if round % 2 == 0 { try store.unload() }
        }
        _ = try loadCounting("last")
        for (index, id) in ids.enumerated() where index >= ids.count - 4 {
            XCTAssertEqual(try store.read(blob: id, offsetUnits: 0, countUnits: 1),
                           BlobStoreCrashTests.data(100 + UInt64(index - (ids.count - 4)), 4096))
        }
        // Both copies hold what the metadata says: the other copy becomes active after
        // one more checkpoint, and verifies too.
        try store.checkpoint()
        XCTAssertTrue(store.verify().isConsistent)
        try store.unload()
        io.close()
    }

    /// Checkpoints interrupted by power cuts, with deferred commits (so the log a load
    /// replays can be older than the state the interrupted checkpoint was writing): at
    /// every write index and several seeds, the load succeeds, and each copy of the table
    /// and bitmaps verifies when it becomes active (after the load's checkpoint, and after
    /// one more), with everything synced before the cut present.
    func testPowerCutsDuringCheckpointsLeaveBothCopiesRight() throws {
        let reactor = try Reactor()
        // 1,100 blobs fill table page 0 and part of page 1; the rounds change page 0 and
        // page 1 in turn, so a checkpoint writes a table page the previous one did not
        // change (where a copy's content could be taken for what it is not). Odd rounds
        // only delete: nothing flushes their commit before the checkpoint writes.
        let options = BlobStore.Options(clusterSizeBytes: 4096, logPages: 16, metadataPages: 1200, blobIDLimit: 2048)
        let blocks: UInt64 = 4096
        let image: [UInt8]
        do {
            let io = try BdevSyncIO(bdev: Bdev(backend: try MallocBdev(blockCount: blocks)), reactor: reactor)
            let store = try BlobStore.format(io, options: options)
            store.deferCommitFlush = true
            for _ in 0..<1100 { try store.createBlob() }
            try store.unload()
            image = try BlobStore.readPages(io, at: 0, count: blocks)
            io.close()
        }
        func workload(_ store: BlobStore, synced: inout Set<BlobID>) throws {
            for round in 0..<6 {
                if round % 2 == 0 {
                    try store.deleteBlob(BlobID(rawValue: UInt64(10 + round)))
                    let id = try store.createBlob(clusterCount: 1, xattrs: [("r", [UInt8(round)])])
                    try store.write(blob: id, offsetUnits: 0, data: BlobStoreCrashTests.data(UInt64(round), 4096))
                } else {
                    try store.deleteBlob(BlobID(rawValue: UInt64(1030 + round)))
                }
                if round == 2 {
                    try store.sync()
                    // What the later rounds delete may or may not survive the cut.
                    synced = Set(store.blobIDList).subtracting([14, 1033, 1035].map(BlobID.init(rawValue:)))
                }
                try store.checkpoint()
            }
        }
        var cut: UInt64 = 1
        var recoveries = 0
        while true {
            var finished = false
            for seed in UInt64(0)..<BlobStoreCrashTests.seedCount(3) {
                let fault = try BlobStoreCrashTests.faultDevice(try MallocBdev(blockCount: blocks), holding: image, reactor: reactor)
                var io = try BdevSyncIO(bdev: Bdev(backend: fault), reactor: reactor)
                let store = try BlobStore.load(io).0
                store.deferCommitFlush = true
                try store.checkpoint()  // the other copy now differs from this one in some pages only
                fault.powerCut(afterWrites: fault.writeCount + cut)
                var synced: Set<BlobID> = []
                do {
                    try workload(store, synced: &synced)
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
                var report = loaded.verify()
                XCTAssertTrue(report.isConsistent, "\(context), after the load: \(report.problems)")
                for id in synced { XCTAssertNotNil(loaded.blob(id), "\(context): synced blob \(id) lost") }
                try loaded.createBlob()
                try loaded.checkpoint()
                report = loaded.verify()
                XCTAssertTrue(report.isConsistent, "\(context), after one more checkpoint: \(report.problems)")
                io.close()
                recoveries += 1
            }
            if finished { break }
            cut += 1
            if cut > 3000 { return XCTFail("the workload never completes") }
        }
        print("checkpoint crash test: \(cut) write indices, \(recoveries) recoveries")
    }

    /// The case the announcement exists for, deterministically: a deferred delete whose
    /// log write is lost while the interrupted checkpoint's write of the table page
    /// survives. The load must rewrite that page (it was announced) or the blob's entry
    /// would be missing from the copy that becomes active.
    func testALostCommitUnderASurvivingCheckpointWrite() throws {
        let reactor = try Reactor()
        for cut in UInt64(1)...3 {
            let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 4096)))
            var io = try BdevSyncIO(bdev: Bdev(backend: fault), reactor: reactor)
            let store = try BlobStore.format(io, options: .init(logPages: 16, metadataPages: 1200, blobIDLimit: 2048))
            store.deferCommitFlush = true
            for _ in 0..<1100 { try store.createBlob() }
            try store.sync()
            try store.checkpoint()
            try store.checkpoint()  // both copies known, equal but for what the last one changed
            try store.deleteBlob(BlobID(rawValue: 1031))  // table page 1: not among the pages the last checkpoint changed
            // Power goes after `cut` writes of the checkpoint (the announcement, the table
            // page, a bitmap page); of the unflushed writes, all survive but the first (the
            // delete's log page, unless a flush made it durable).
            fault.powerCut(afterWrites: fault.writeCount + cut)
            XCTAssertThrowsError(try store.checkpoint())
            let unflushed = fault.unflushedWriteCount
            io.close()
            let report = try fault.crash(policy: .keep(Set(1..<max(unflushed, 1))), reactor: reactor)
            io = try BdevSyncIO(bdev: Bdev(backend: fault), reactor: reactor)
            let loaded = try BlobStore.load(io).0
            var verify = loaded.verify()
            XCTAssertTrue(verify.isConsistent, "cut \(cut), crash \(report): \(verify.problems)")
            try loaded.unload()
            let again = try BlobStore.load(io).0
            verify = again.verify()
            XCTAssertTrue(verify.isConsistent, "cut \(cut), crash \(report), second load: \(verify.problems)")
            XCTAssertEqual(again.blobCount, loaded.blobCount)
            io.close()
        }
    }

    /// A store whose last super block has no record (an older image, or a record too
    /// long to keep) loads with both arrays written whole, and records again after.
    func testWithoutARecordTheArraysAreWrittenWhole() throws {
        let reactor = try Reactor()
        let counter = InstrumentedBdev(try MallocBdev(blockCount: (64 << 20) / 4096))
        let io = try BdevSyncIO(bdev: Bdev(backend: counter), reactor: reactor)
        var store = try BlobStore.format(io)
        try store.createBlob(clusterCount: 1)
        try store.unload()
        var block = store.superBlock
        let arrayPages = Int(block.table.pageCount + block.bitmaps.pageCount)
        block.changedSincePrevious = nil
        try io.writeBytes(block.encode(), offsetBlocks: UInt64(block.slot))
        let before = counter.written.load(ordering: .relaxed)
        store = try BlobStore.load(io).0
        XCTAssertGreaterThanOrEqual((counter.written.load(ordering: .relaxed) - before) / 4096, arrayPages)
        XCTAssertNotNil(store.superBlock.changedSincePrevious)
        XCTAssertTrue(store.verify().isConsistent)
        try store.unload()
        io.close()
    }
}
