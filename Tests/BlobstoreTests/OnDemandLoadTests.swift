import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
@testable import Blobstore

/// Chains read on demand (issue 20, step 1): a load reads the super blocks, the table,
/// the bitmaps and the log, never a blob's chain; a blob's chain is read when it is
/// first used; checkpoints keep the chains nobody read; a snapshot's clones are found
/// the first time they are asked for.
final class OnDemandLoadTests: XCTestCase {
    var reactor: Reactor!
    var fault: FaultBdev!
    var io: BdevSyncIO!

    override func setUpWithError() throws {
        reactor = try Reactor()
        fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 16384)))
        io = try BdevSyncIO(bdev: Bdev(backend: fault), reactor: reactor)
    }

    override func tearDown() {
        io?.close()
    }

    func bytes(_ seed: Int) -> [UInt8] { (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ seed) } }

    /// `count` blobs of one written cluster and an xattr each; the store unloaded.
    func filled(_ count: Int) throws -> [BlobID] {
        let store = try BlobStore.format(io, options: .init(metadataPages: 2048, blobIDLimit: 4096))
        var ids: [BlobID] = []
        for index in 0..<count {
            let id = try store.createBlob(clusterCount: 1, xattrs: [(name: "n", value: Array("\(index)".utf8))])
            try store.write(blob: id, offsetUnits: 0, data: bytes(index))
            ids.append(id)
        }
        try store.unload()
        return ids
    }

    func testALoadReadsNoChainAndABlobIsReadOnFirstUse() throws {
        let ids = try filled(1000)
        let before = fault.ioCount
        let (store, report) = try BlobStore.load(io)
        XCTAssertTrue(report.wasClean)
        // Two super block slots, the table, the bitmaps, a log page, then the load's
        // checkpoint (the super block, announcement, flushes): nothing per blob.
        XCTAssertLessThan(fault.ioCount - before, 20, "reads and writes of a load of 1,000 blobs")
        XCTAssertEqual(store.blobCount, 1000)
        XCTAssertEqual(store.blobs.readCount, 0, "no chain read")
        let used = fault.ioCount
        XCTAssertEqual(store.xattr(ids[500], name: "n"), Array("500".utf8))
        XCTAssertEqual(fault.ioCount - used, 1, "one chain page read for the first use")
        XCTAssertEqual(store.blobs.readCount, 1)
        XCTAssertEqual(try store.read(blob: ids[500], offsetUnits: 0, countUnits: 1), bytes(500))
        // Changes to some, deletes of others, checkpoints: the unread ones are kept.
        try store.write(blob: ids[1], offsetUnits: 0, data: bytes(7001))
        let created = try store.createBlob(clusterCount: 2)
        try store.deleteBlob(ids[2])
        try store.checkpoint()
        try store.unload()
        XCTAssertTrue(Verifier.verify(io).isConsistent, "\(Verifier.verify(io).problems)")
        let (again, _) = try BlobStore.load(io, readOnly: true)
        XCTAssertEqual(again.blobCount, 1000)
        XCTAssertNil(again.blob(ids[2]))
        XCTAssertEqual(again.blob(created)?.clusterCount, 2)
        XCTAssertEqual(try again.read(blob: ids[1], offsetUnits: 0, countUnits: 1), bytes(7001))
        for index in [0, 3, 499, 999] {
            XCTAssertEqual(try again.read(blob: ids[index], offsetUnits: 0, countUnits: 1), bytes(index), "blob \(index)")
        }
    }

    /// A log replayed over a load that reads chains on demand reads the blobs its records
    /// name, and only those; the free-space counts come from the bitmaps, exact.
    func testReplayReadsOnlyTheBlobsItsRecordsName() throws {
        let ids = try filled(300)
        var (store, _) = try BlobStore.load(io)
        let free = store.freeClusterCount
        store.deferCommitFlush = false
        try store.write(blob: ids[10], offsetUnits: 0, data: bytes(10_010))
        try store.resizeBlob(ids[11], clusterCount: 3)
        try store.deleteBlob(ids[12])
        let expectedFree = store.freeClusterCount
        XCTAssertEqual(expectedFree, free + 1, "the deleted blob's cluster")
        // No unload: the next load replays the log.
        (store, _) = try BlobStore.load(io)
        // The overwrite needs no record; the resize's blob is read, the deleted one is gone.
        XCTAssertEqual(store.blobs.readCount, 1, "the replay read only the blobs its records name")
        XCTAssertEqual(store.freeClusterCount, expectedFree)
        XCTAssertEqual(try store.read(blob: ids[10], offsetUnits: 0, countUnits: 1), bytes(10_010))
        XCTAssertEqual(store.blob(ids[11])?.clusterCount, 3)
        XCTAssertNil(store.blob(ids[12]))
        try store.unload()
        XCTAssertTrue(Verifier.verify(io).isConsistent, "\(Verifier.verify(io).problems)")
    }

    /// The clone index is not on the device: after a load that read no chain, the first
    /// question about a snapshot's clones reads every chain and answers right.
    func testASnapshotsClonesAreFoundAfterALoadThatReadNoChain() throws {
        let ids = try filled(50)
        var (store, _) = try BlobStore.load(io)
        let snapshot = try store.snapshotBlob(ids[5])
        let clone = try store.cloneBlob(snapshot)
        try store.unload()
        (store, _) = try BlobStore.load(io)
        XCTAssertEqual(store.blobs.readCount, 0)
        XCTAssertThrowsError(try store.deleteBlob(snapshot)) {
            XCTAssertEqual($0 as? BlobStoreError, .hasClones(blob: snapshot, count: 2))
        }
        XCTAssertEqual(store.clones(of: snapshot), [ids[5], clone].sorted())
        XCTAssertEqual(store.blobs.readCount, 52, "every chain read once")
        // A blob that is not a snapshot has no clones, without reading anything.
        (store, _) = try BlobStore.load(io)
        XCTAssertEqual(store.clones(of: ids[7]), [])
        try store.deleteBlob(ids[8])
        XCTAssertEqual(store.blobs.readCount, 1, "blob 7 read, blob 8 read and deleted")
        try store.unload()
        XCTAssertTrue(Verifier.verify(io).isConsistent)
    }

    /// A chain that is not where the table says (its page damaged): the load still works,
    /// the blob's first use names the page, and the store refuses changes from then on.
    func testADamagedChainIsNamedAtFirstUseAndStopsChanges() throws {
        let ids = try filled(20)
        let (probe, _) = try BlobStore.load(io, readOnly: true)
        let page = try XCTUnwrap(probe.chainPages(ids[4]).first)
        var raw = try io.readBytes(offsetBlocks: page.offset / 4096, countBlocks: 1)
        raw[100] ^= 0xFF
        try io.writeBytes(raw, offsetBlocks: page.offset / 4096)
        let (store, _) = try BlobStore.load(io)
        XCTAssertNotNil(store.blob(ids[3]))
        XCTAssertNil(store.blob(ids[4]))
        XCTAssertTrue("\(String(describing: store.chainReadFailure))".contains("metadata page"), "\(String(describing: store.chainReadFailure))")
        XCTAssertTrue(store.refusesChanges)
        XCTAssertThrowsError(try store.createBlob()) { XCTAssertEqual($0 as? BlobStoreError, .readOnly) }
        XCTAssertFalse(Verifier.verify(io).isConsistent, "the verifier names it too")
    }

    /// With a limit, blobs read past it are let go, oldest first, and read again on use;
    /// changed ones and those with an open handle stay; a blob let go and then changed or
    /// deleted supersedes or frees its chain as if it had stayed (the verifier finds no
    /// leaked page after the checkpoint).
    func testACacheLimitLetsCleanBlobsGoAndReadsThemAgain() throws {
        let ids = try filled(1000)
        let (store, _) = try BlobStore.load(io)
        store.metadataCacheLimit = 200
        let handle = try store.openBlob(ids[0], owner: reactor)
        try store.setXattr(ids[1], name: "changed", value: [1])
        for (index, id) in ids.enumerated() {
            XCTAssertEqual(store.xattr(id, name: "n"), Array("\(index)".utf8))
            XCTAssertLessThanOrEqual(store.metadataCacheCount, 200)
        }
        XCTAssertGreaterThan(store.metadataCacheEvictions, 700)
        XCTAssertTrue(store.isRead(ids[0]), "an open handle keeps its blob")
        XCTAssertTrue(store.isRead(ids[1]), "a changed blob stays until a checkpoint wrote it")
        XCTAssertFalse(store.isRead(ids[2]))
        // Let go, then changed, deleted, written: read again first.
        try store.setXattr(ids[2], name: "changed", value: [2])
        try store.deleteBlob(ids[3])
        try store.write(blob: ids[4], offsetUnits: 0, data: bytes(4004))
        try store.checkpoint()
        for id in ids[5..<600] { _ = store.blob(id) }
        XCTAssertFalse(store.isRead(ids[1]), "clean after the checkpoint: let go")
        store.closeBlob(handle)
        try store.unload()
        let report = Verifier.verify(io)
        XCTAssertTrue(report.isConsistent, "\(report.problems)")
        let (again, _) = try BlobStore.load(io, readOnly: true)
        XCTAssertEqual(again.xattr(ids[1], name: "changed"), [1])
        XCTAssertEqual(again.xattr(ids[2], name: "changed"), [2])
        XCTAssertNil(again.blob(ids[3]))
        XCTAssertEqual(try again.read(blob: ids[4], offsetUnits: 0, countUnits: 1), bytes(4004))
        XCTAssertEqual(again.blobCount, 999)
    }

    /// Changed blobs cannot be let go: past an eighth of the limit of them a commit checkpoints,
    /// so creating many more blobs than the limit keeps the cache near it.
    func testChangedBlobsPastAnEighthOfTheLimitAreCheckpointed() throws {
        _ = try filled(10)
        let (store, _) = try BlobStore.load(io)
        store.deferCommitFlush = true
        store.metadataCacheLimit = 200
        let checkpoints = store.checkpointCount
        for index in 0..<1000 {
            _ = try store.createBlob(xattrs: [(name: "n", value: Array("\(index)".utf8))])
            XCTAssertLessThanOrEqual(store.metadataCacheCount, 210, "created \(index + 1)")
        }
        XCTAssertGreaterThanOrEqual(store.checkpointCount - checkpoints, 30, "a checkpoint per ~25 changed blobs")
        try store.unload()
        XCTAssertTrue(Verifier.verify(io).isConsistent)
        XCTAssertEqual(try BlobStore.load(io, readOnly: true).0.blobCount, 1010)
    }
}
