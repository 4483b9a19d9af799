import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
@testable import Blobstore

/// Deferred commits (`deferCommitFlush`, as the file system runs the store): a commit is
/// durable at the next flush; a crash brings the store back as of an earlier commit.
final class DeferredCommitTests: XCTestCase {
    /// A deleted blob's clusters are not reused before the delete is durable: otherwise a
    /// crash that drops the delete but keeps the new owner's data would bring the blob
    /// back with someone else's bytes in it.
    func testReleasedClustersWaitForTheReleaseToBeDurable() throws {
        let reactor = try Reactor()
        for seed in UInt64(0)..<24 {
            let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 1024)))
            let device = Bdev(backend: fault)
            var io = try BdevSyncIO(bdev: device, reactor: reactor)
            let store = try BlobStore.format(io, options: BlobStoreTests.options)
            store.deferCommitFlush = true
            let a = try store.createBlob(clusterCount: 2)
            let original = [UInt8](repeating: 0xA1, count: 8192)
            try store.write(blob: a, offsetUnits: 0, data: original)
            try store.sync()
            try store.deleteBlob(a)
            let b = try store.createBlob(clusterCount: 3)  // may reuse id a: told apart by size
            // The delete and the create are unflushed; power goes right after the data write.
            XCTAssertEqual(fault.unflushedWriteCount, 2)
            fault.powerCut(afterWrites: fault.writeCount + 1)
            _ = try? store.write(blob: b, offsetUnits: 0, data: [UInt8](repeating: 0xB2, count: 8192))
            io.close()
            let report = try fault.crash(seed: seed, reactor: reactor)
            io = try BdevSyncIO(bdev: device, reactor: reactor)
            let loaded = try BlobStore.load(io).0
            XCTAssertTrue(loaded.verify().isConsistent, "seed \(seed)")
            if loaded.blob(a)?.clusterCount == 2 {
                XCTAssertTrue(try loaded.read(blob: a, offsetUnits: 0, countUnits: 2) == original,
                               "seed \(seed), crash \(report): the delete was lost, so blob \(a) must hold its own data")
            }
            io.close()
        }
    }

    func testCommitsBecomeDurableInOrderAtSync() throws {
        let reactor = try Reactor()
        let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 1024)))
        let device = Bdev(backend: fault)
        var io = try BdevSyncIO(bdev: device, reactor: reactor)
        let store = try BlobStore.format(io, options: BlobStoreTests.options)
        store.deferCommitFlush = true
        let first = try store.createBlob()
        try store.sync()
        XCTAssertFalse(store.hasUnflushedCommits)
        _ = try store.createBlob()
        XCTAssertTrue(store.hasUnflushedCommits)
        io.close()
        _ = try fault.crash(policy: .keepNone, reactor: reactor)
        io = try BdevSyncIO(bdev: device, reactor: reactor)
        let loaded = try BlobStore.load(io).0
        XCTAssertEqual(loaded.blobIDList, [first], "the synced create survives, the unsynced one is gone")
        io.close()
    }
}
