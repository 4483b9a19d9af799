import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
@testable import Blobstore

/// Deferred commits (`deferCommitFlush`, as the file system runs the store): a commit is
/// durable at the next flush; a crash brings the store back as of an earlier commit.
final class DeferredCommitTests: XCTestCase {
    /// A deferred-mode store on a fault device, and the load after a power cut.
    private struct Rig {
        let reactor: Reactor
        let fault: FaultBdev
        let device: Bdev
        var io: BdevSyncIO
        let store: BlobStore

        init(_ reactor: Reactor, blocks: UInt64 = 1024, options: BlobStore.Options = BlobStoreTests.options) throws {
            self.reactor = reactor
            fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: blocks)))
            device = Bdev(backend: fault)
            io = try BdevSyncIO(bdev: device, reactor: reactor)
            store = try BlobStore.format(io, options: options)
            store.deferCommitFlush = true
        }

        /// Power off (unflushed writes kept, dropped or torn as `policy` says), then the
        /// store as a load finds it, which the verifier must pass. Call `io.close()` after.
        mutating func crashAndLoad(_ policy: FaultBdev.CrashPolicy, _ context: String) throws -> (BlobStore, FaultBdev.CrashReport) {
            io.close()
            let report = try fault.crash(policy: policy, reactor: reactor)
            io = try BdevSyncIO(bdev: device, reactor: reactor)
            let loaded = try BlobStore.load(io).0
            XCTAssertTrue(loaded.verify().isConsistent, "\(context), crash \(report)")
            return (loaded, report)
        }
    }

    /// Options that put checkpoint chains in data clusters (a 16-page region) and make a
    /// few pages of waiting records overflow the log (4 pages).
    private static let smallLogAndRegion = BlobStore.Options(logPages: 4, metadataPages: 16, blobIDLimit: 128)

    /// A deleted blob's clusters are not reused before the delete is durable: otherwise a
    /// crash that drops the delete but keeps the new owner's data would bring the blob
    /// back with someone else's bytes in it.
    func testReleasedClustersWaitForTheReleaseToBeDurable() throws {
        let reactor = try Reactor()
        for seed in UInt64(0)..<24 {
            for cut in UInt64(1)...4 {
                var rig = try Rig(reactor)
                let store = rig.store
                let a = try store.createBlob(clusterCount: 2)
                let original = [UInt8](repeating: 0xA1, count: 8192)
                try store.write(blob: a, offsetUnits: 0, data: original)
                try store.sync()
                try store.deleteBlob(a)
                let b = try store.createBlob(clusterCount: 3)  // may reuse id a: told apart by size
                // The delete and the create wait in memory (group commit); the write that
                // reuses the clusters writes and flushes them first. Power goes after each of
                // its first writes (the log page, the data).
                XCTAssertEqual(rig.fault.unflushedWriteCount, 0)
                XCTAssertEqual(store.metadataLog.pending.count, 5, "the delete (2 records) and the sized create (3), not yet written")
                rig.fault.powerCut(afterWrites: rig.fault.writeCount + cut)
                _ = try? store.write(blob: b, offsetUnits: 0, data: [UInt8](repeating: 0xB2, count: 8192))
                let (loaded, report) = try rig.crashAndLoad(.random(seed: seed), "seed \(seed), cut \(cut)")
                if loaded.blob(a)?.clusterCount == 2 {
                    XCTAssertTrue(try loaded.read(blob: a, offsetUnits: 0, countUnits: 2) == original,
                                  "seed \(seed), cut \(cut), crash \(report): the delete was lost, so blob \(a) must hold its own data")
                }
                rig.io.close()
            }
        }
    }

    /// The records waiting in memory are written to the log in one device write when
    /// their pages lie side by side in the region: a batch of `pendingLogLimit` bytes (8-9
    /// pages) was one synchronous write per page, each a wait of the metadata reactor in
    /// the middle of a FUSE CREATE.
    func testWaitingRecordsGoToTheLogInOneWrite() throws {
        let reactor = try Reactor()
        let options = BlobStore.Options(clusterSizeBytes: 4096, logPages: 64, metadataPages: 128, blobIDLimit: 128)
        let rig = try Rig(reactor, blocks: 4096, options: options)
        defer { rig.io.close() }
        let store = rig.store
        let id = try store.createBlob(clusterCount: 0)
        try store.sync()
        let headBefore = store.metadataLog.head
        let writesBefore = rig.fault.writeCount
        var commits = 0
        repeat {
            try store.setXattr(id, name: "k", value: [UInt8](repeating: UInt8(truncatingIfNeeded: commits), count: 300))
            commits += 1
        } while !store.metadataLog.pending.isEmpty
        XCTAssertGreaterThanOrEqual(store.metadataLog.head - headBefore, 8, "a batch of 8 pages or more (\(commits) commits)")
        XCTAssertEqual(rig.fault.writeCount - writesBefore, 1, "the batch's pages in one write")
        try store.unload()
        let (loaded, _) = try BlobStore.load(rig.io)
        XCTAssertEqual(loaded.xattr(id, name: "k"), [UInt8](repeating: UInt8(truncatingIfNeeded: commits - 1), count: 300))
        try loaded.unload()
    }

    func testCommitsBecomeDurableInOrderAtSync() throws {
        var rig = try Rig(try Reactor())
        let store = rig.store
        let first = try store.createBlob()
        try store.sync()
        XCTAssertFalse(store.hasUnflushedCommits)
        _ = try store.createBlob()
        XCTAssertTrue(store.hasUnflushedCommits)
        XCTAssertEqual(rig.fault.unflushedWriteCount, 0, "held in memory until a sync, a flush or a checkpoint")
        let (loaded, _) = try rig.crashAndLoad(.keepNone, "keep none")
        XCTAssertEqual(loaded.blobIDList, [first], "the synced create survives, the unsynced one is gone")
        rig.io.close()
    }

    /// Group commit: allocating writes in deferred mode do not flush one by one; their
    /// mappings wait in memory and are written only after one flush of all their data. A
    /// power cut at every write of the sync that writes them, each with seeds that keep,
    /// drop or tear the unflushed writes: every blob that comes back reads its own bytes,
    /// never those of the deleted blob whose clusters it took (stale data).
    func testGroupCommitNeverMapsUnflushedData() throws {
        let reactor = try Reactor()
        var cuts = 0
        for cut in UInt64(1)...12 {
            for seed in UInt64(0)..<6 {
                var rig = try Rig(reactor)
                let store = rig.store
                // Old bytes in clusters that the new blobs will take.
                let old = try store.createBlob(clusterCount: 8)
                try store.write(blob: old, offsetUnits: 0, data: [UInt8](repeating: 0x0D, count: 8 * 4096))
                try store.deleteBlob(old)
                try store.sync()
                let writesBefore = rig.fault.writeCount
                var made: [(BlobID, [UInt8])] = []
                for index in 0..<6 {
                    let id = try store.createBlob(clusterCount: 1)
                    let data = [UInt8](repeating: UInt8(0x40 + index), count: 4096)
                    try store.write(blob: id, offsetUnits: 0, data: data)
                    made.append((id, data))
                }
                XCTAssertEqual(rig.fault.writeCount - writesBefore, 6, "six data writes, no log page yet")
                rig.fault.powerCut(afterWrites: rig.fault.writeCount + cut)
                let synced = (try? store.sync()) != nil
                let (loaded, report) = try rig.crashAndLoad(.random(seed: seed), "cut \(cut), seed \(seed)")
                for (id, data) in made {
                    guard let blob = loaded.blob(id), !blob.extents.isEmpty else {
                        XCTAssertFalse(synced, "cut \(cut), seed \(seed): blob \(id) was synced")
                        continue
                    }
                    XCTAssertTrue(try loaded.read(blob: id, offsetUnits: 0, countUnits: 1) == data,
                                  "cut \(cut), seed \(seed), crash \(report): blob \(id) maps a cluster without its data")
                }
                if !synced { cuts += 1 }
                rig.io.close()
            }
        }
        XCTAssertGreaterThan(cuts, 0, "some power cuts fell inside the sync")
    }

    /// An allocating write that first has to make a release durable can, in deferred mode,
    /// write the waiting transactions and take a checkpoint (they fill the log) before its
    /// clusters are mapped: that checkpoint must not put metadata pages in the clusters the
    /// write has chosen (which it then fills with data).
    func testACheckpointInsideAnAllocatingWriteLeavesItsClustersAlone() throws {
        var rig = try Rig(try Reactor(), blocks: 2048, options: Self.smallLogAndRegion)
        let store = rig.store
        var blobs: [(BlobID, [UInt8])] = []
        for index in 0..<24 {
            let id = try store.createBlob(clusterCount: 1)
            let data = [UInt8](repeating: UInt8(index + 1), count: 4096)
            try store.write(blob: id, offsetUnits: 0, data: data)
            blobs.append((id, data))
        }
        try store.sync()
        // A release, then five pages of waiting records (more than the 4-page log).
        try store.deleteBlob(blobs.removeLast().0)
        for (id, _) in blobs.prefix(5) { try store.setXattr(id, name: "v", value: [UInt8](repeating: 7, count: 3000)) }
        let sequence = store.superBlock.sequence
        let id = try store.createBlob(clusterCount: 2)
        let data = [UInt8](repeating: 0xEE, count: 8192)
        try store.write(blob: id, offsetUnits: 0, data: data)
        XCTAssertGreaterThan(store.superBlock.sequence, sequence, "the write took a checkpoint")
        blobs.append((id, data))
        try store.unload()
        let (loaded, _) = try rig.crashAndLoad(.keepAll, "after unload")
        for (id, data) in blobs {
            XCTAssertTrue(try loaded.read(blob: id, offsetUnits: 0, countUnits: UInt64(data.count / 4096)) == data, "blob \(id)")
        }
        rig.io.close()
    }

    /// A checkpoint that holds waiting transactions (they do not fit the log) makes their
    /// releases durable only at its switch: until then it puts no metadata page in the
    /// clusters they released. A power cut at every write of it, with seeds: when the
    /// delete is lost, the deleted blob's clusters still hold its bytes.
    func testACheckpointHoldingADeleteLeavesTheReleasedClustersAlone() throws {
        let reactor = try Reactor()
        var checkpointed = 0
        for cut in UInt64(1)...10 {
            for seed in UInt64(0)..<4 {
                var rig = try Rig(reactor, blocks: 2048, options: Self.smallLogAndRegion)
                let store = rig.store
                let victim = try store.createBlob(clusterCount: 4)
                let original = [UInt8](repeating: 0xAA, count: 4 * 4096)
                try store.write(blob: victim, offsetUnits: 0, data: original)
                var others: [BlobID] = []
                for index in 0..<20 {
                    let id = try store.createBlob(clusterCount: 1)
                    try store.write(blob: id, offsetUnits: 0, data: [UInt8](repeating: UInt8(index), count: 4096))
                    others.append(id)
                }
                try store.sync()
                try store.deleteBlob(victim)
                for id in others.prefix(5) { try store.setXattr(id, name: "v", value: [UInt8](repeating: 7, count: 3000)) }
                let sequence = store.superBlock.sequence
                rig.fault.powerCut(afterWrites: rig.fault.writeCount + cut)
                // Allocates (the victim's first cluster, reclaimed), then makes the delete
                // durable: the waiting records do not fit the log, so a checkpoint holds them.
                let newcomer = try store.createBlob(clusterCount: 1)
                _ = try? store.write(blob: newcomer, offsetUnits: 0, data: [UInt8](repeating: 0xBB, count: 4096))
                if store.superBlock.sequence > sequence { checkpointed += 1 }
                let (loaded, report) = try rig.crashAndLoad(.random(seed: seed), "cut \(cut), seed \(seed)")
                if loaded.blob(victim)?.clusterCount == 4 {
                    XCTAssertTrue(try loaded.read(blob: victim, offsetUnits: 0, countUnits: 4) == original,
                                  "cut \(cut), seed \(seed), crash \(report): the delete was lost, so the blob must hold its bytes")
                }
                rig.io.close()
            }
        }
        XCTAssertGreaterThan(checkpointed, 0, "some runs took the checkpoint")
    }
}
