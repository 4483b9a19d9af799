import XCTest
import Bdev
import BdevMalloc
import Env
@testable import Blobstore

/// With 4 KiB clusters, metadata pages that do not fit the metadata page region live in
/// data clusters: the region's size no longer limits the number of blobs.
final class MetadataPagesInClustersTests: XCTestCase {
    private func makeIO(megabytes: UInt64 = 8) throws -> (BdevSyncIO, Reactor) {
        let reactor = try Reactor()
        let bdev = Bdev(backend: try MallocBdev(blockCount: (megabytes << 20) / 4096))
        return (try BdevSyncIO(bdev: bdev, reactor: reactor), reactor)
    }

    private static let small = BlobStore.Options(clusterSizeBytes: 4096, logPages: 16, metadataPages: 16, blobIDLimit: 1024)

    private static func content(_ index: Int) -> [UInt8] { BlobStoreCrashTests.data(UInt64(index) + 1, 4096) }

    func testFormatSetsTheFeatureWithFourKiBClustersOnly() throws {
        let (io, _) = try makeIO()
        let store = try BlobStore.format(io)
        XCTAssertTrue(store.superBlock.hasMetadataPagesInClusters)
        XCTAssertEqual(store.superBlock.metadataPageIDLimit, store.superBlock.metadataPages.pageCount + store.superBlock.clusterCount)
        try store.unload()
        let large = try BlobStore.format(io, options: .init(clusterSizeBytes: 65536))
        XCTAssertFalse(large.superBlock.hasMetadataPagesInClusters)
        XCTAssertThrowsError(try BlobStore.format(io, options: .init(clusterSizeBytes: 65536, metadataPagesInClusters: true))) { error in
            guard case BlobStoreError.invalidArgument = error else { return XCTFail("\(error)") }
        }
        // The super block decoder refuses the feature with larger clusters (a crafted image).
        var block = large.superBlock
        block.incompatibleFeatures |= SuperBlock.Features.metadataPagesInClusters
        XCTAssertThrowsError(try SuperBlock.decode(block.encode()[...], offset: 0)) { error in
            XCTAssertTrue("\(error)".contains("cluster size"), "\(error)")
        }
    }

    /// 300 blobs of 4 KiB with an xattr each on a region of 16 pages: most chains are in
    /// clusters; everything survives unload and load, verifies, and deletes give the
    /// clusters back.
    func testManySmallBlobsOutgrowTheRegion() throws {
        let (io, _) = try makeIO()
        let store = try BlobStore.format(io, options: Self.small)
        let freeAtStart = store.freeClusterCount
        var ids: [BlobID] = []
        for index in 0..<300 {
            let id = try store.createBlob(clusterCount: 1, xattrs: [("name", Array("blob \(index)".utf8))])
            try store.write(blob: id, offsetUnits: 0, data: Self.content(index))
            ids.append(id)
        }
        try store.checkpoint()
        let inClusters = store.durableChains.values.joined().filter { $0 >= 16 }.count
        XCTAssertGreaterThanOrEqual(inClusters, 284, "chains beyond the 16-page region")
        // Each blob: one data cluster, and its chain's page where the region had none.
        XCTAssertEqual(freeAtStart - store.freeClusterCount, UInt64(300 + inClusters))
        var report = store.verify()
        XCTAssertTrue(report.isConsistent, "\(report.problems)")
        XCTAssertEqual(report.blobCount, 300)
        XCTAssertEqual(report.metadataPagesInUse, 300)
        try store.unload()

        let (loaded, _) = try BlobStore.load(io)
        for (index, id) in ids.enumerated() {
            XCTAssertEqual(try loaded.read(blob: id, offsetUnits: 0, countUnits: 1), Self.content(index), "blob \(id)")
            XCTAssertEqual(loaded.xattr(id, name: "name"), Array("blob \(index)".utf8))
        }
        // Rewriting chains (an xattr on every blob) supersedes the pages in clusters: the
        // old ones come back after the checkpoint that replaced them.
        let freeBefore = loaded.freeClusterCount
        for id in ids { try loaded.setXattr(id, name: "more", value: [1, 2, 3]) }
        try loaded.checkpoint()
        XCTAssertEqual(loaded.freeClusterCount, freeBefore, "superseded pages in clusters are released")
        for id in ids.prefix(150) { try loaded.deleteBlob(id) }
        try loaded.checkpoint()
        report = loaded.verify()
        XCTAssertTrue(report.isConsistent, "\(report.problems)")
        XCTAssertEqual(report.blobCount, 150)
        for id in ids.suffix(150) { try loaded.deleteBlob(id) }
        try loaded.unload()
        let (empty, _) = try BlobStore.load(io)
        XCTAssertEqual(empty.freeClusterCount, freeAtStart, "every cluster back")
        XCTAssertTrue(empty.verify().isConsistent)
    }

    /// Blob data never takes the clusters a checkpoint needs for metadata pages, and on a
    /// full store metadata changes that would leave a checkpoint without pages are refused
    /// (after a checkpoint that frees what it can), while deletes still go through: every
    /// checkpoint, and the unload, succeed.
    func testAFullStoreKeepsRoomForCheckpoints() throws {
        let (io, _) = try makeIO(megabytes: 4)
        let store = try BlobStore.format(io, options: Self.small)
        var small: [BlobID] = []
        for _ in 0..<60 { small.append(try store.createBlob(xattrs: [("x", [1])])) }
        try store.checkpoint()  // the region (16 pages) is full: chains in clusters
        XCTAssertGreaterThan(store.metadataClusterReserve, 0)
        let big = try store.createBlob(clusterCount: store.clusterCount)
        var written: UInt64 = 0
        do {
            while true {
                try store.write(blob: big, offsetUnits: written, data: [UInt8](repeating: 7, count: 4096))
                written += 1
            }
        } catch BlobStoreError.noSpace {}
        XCTAssertEqual(store.freeClusterCount, store.metadataClusterReserve)
        // Changing every small blob's chain: early checkpoints keep room, or the change is
        // refused with no space; never a checkpoint that cannot find pages.
        var refused = 0
        for id in small {
            do { try store.setXattr(id, name: "y", value: [UInt8](repeating: 2, count: 3000)) } catch BlobStoreError.noSpace {
                refused += 1
            }
        }
        var created = 0
        do {
            while true {
                try store.createBlob()
                created += 1
            }
        } catch BlobStoreError.noSpace {}
        try store.checkpoint()
        // Deleting on a full store works, and gives the room back.
        for id in small.prefix(30) { try store.deleteBlob(id) }
        try store.checkpoint()
        try store.createBlob()
        try store.unload()
        let (loaded, _) = try BlobStore.load(io)
        let report = loaded.verify()
        XCTAssertTrue(report.isConsistent, "\(report.problems)")
        XCTAssertEqual(loaded.blobCount, 60 - 30 + 1 + created + 1)
        print("full store: \(written) data clusters, \(refused) of 60 xattr changes refused, \(created) blobs created")
    }

    /// A chain pointing past the last cluster, and a metadata page in a cluster that a
    /// blob also maps: named by the verifier; the first refused when the chain is read
    /// (on demand or all at once), the second by a load that derives the bitmaps.
    func testDamagedChainsIntoClustersAreNamed() throws {
        let (io, _) = try makeIO()
        let store = try BlobStore.format(io, options: Self.small)
        var ids: [BlobID] = []
        for index in 0..<20 {
            let id = try store.createBlob(clusterCount: 1)
            try store.write(blob: id, offsetUnits: 0, data: Self.content(index))
            ids.append(id)
        }
        try store.unload()
        let (loaded, _) = try BlobStore.load(io, readOnly: true)
        try loaded.readAllChains()
        let chainPage = loaded.durableChains[ids[19]]![0]
        XCTAssertGreaterThanOrEqual(chainPage, 16)
        let victimCluster = loaded.blob(ids[0])!.extents[0].firstCluster
        let block = loaded.superBlock
        // Blob 19's chain, written again into blob 0's data cluster, and the table entry
        // of blob 19 pointed there.
        let movedID = UInt32(block.metadataPages.pageCount + victimCluster)
        let blob = loaded.blob(ids[19])!
        let encoded = MetadataPage.encodeChain(blob, pageIDs: [movedID], checkpointSequence: block.sequence)[0]
        try io.writeBytes(encoded, offsetBlocks: block.metadataPageAddress(movedID))
        try setTableEntry(io, block, id: ids[19], to: movedID)
        let report = Verifier.verify(io)
        XCTAssertTrue(report.problems.contains { $0.contains("cluster \(victimCluster) holds metadata page \(movedID)") },
                      "\(report.problems)")
        // A load that reads every chain (a super block without the recorded count, as
        // stores written before it) derives the bitmaps and finds the double owner.
        try clearRecordedCount(io)
        XCTAssertThrowsError(try BlobStore.load(io, readOnly: true)) { error in
            XCTAssertTrue("\(error)".contains("owned twice"), "\(error)")
        }
        // Past the last cluster: outside the metadata pages.
        try setTableEntry(io, block, id: ids[19], to: UInt32(block.metadataPageIDLimit))
        XCTAssertTrue(Verifier.verify(io).problems.contains { $0.contains("outside the metadata pages") })
        XCTAssertThrowsError(try BlobStore.load(io, readOnly: true)) { error in
            XCTAssertTrue("\(error)".contains("outside the metadata pages"), "\(error)")
        }
    }

    /// Rewrites the current super block without the count of metadata pages in clusters
    /// (offset 177), as a store written before the field existed has it.
    private func clearRecordedCount(_ io: BdevSyncIO) throws {
        guard let (_, block) = SuperBlock.current(try BlobStore.readSuperBlockSlots(io)) else { return XCTFail("no super block") }
        var old = block
        old.metadataPagesInClusters = nil
        try io.writeBytes(old.encode(), offsetBlocks: UInt64(old.slot) * UInt64(4096 / io.geometry.blockSizeBytes))
    }

    /// Points blob `id`'s entry in the active table at `page`.
    private func setTableEntry(_ io: BdevSyncIO, _ block: SuperBlock, id: BlobID, to page: UInt32) throws {
        let tableStart = block.table.startPage + UInt64(block.activeCopy) * block.table.pageCount
        let pageIndex = UInt64(TablePage.pageIndex(of: id))
        let raw = try BlobStore.readPages(io, at: tableStart + pageIndex, count: 1)
        var payload = Array(try ArrayPage.decode(raw[...], kind: .table, pageIndex: UInt32(pageIndex), offset: 0).payload)
        let at = Int(id.rawValue % UInt64(TablePage.entriesPerPage)) * 4
        let value = page + 1
        for byte in 0..<4 { payload[at + byte] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(byte))) }
        let encoded = ArrayPage.encode(kind: .table, checkpointSequence: block.sequence, pageIndex: UInt32(pageIndex), payload: payload[...])
        try io.writeBytes(encoded, offsetBlocks: tableStart + pageIndex)
    }
}
