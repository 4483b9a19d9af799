import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
@testable import Blobstore

/// Discard (docs/ARCHITECTURE.md, "Discard"): released clusters are unmapped only once
/// their release is durable and never while anything owns them, explicit trims unmap all
/// free space, and a power cut at any write or unmap of a workload that writes, deletes,
/// trims and reuses space loses nothing.
final class DiscardTests: XCTestCase {
    /// A deferred-mode store (as the file system runs it) on a fault device, with online
    /// discard, and its trimmer on a reactor of its own; both reactors stepped here.
    final class Rig {
        let reactor = try! Reactor(name: "store-io")
        let trimReactor = try! Reactor(name: "trim")
        let fault: FaultBdev
        let device: Bdev
        var io: BdevSyncIO
        var store: BlobStore
        var trimmer: ClusterTrimmer

        /// `pages`: the device's size in 4 KiB pages, whatever its block size.
        init(pages: UInt64 = 1024, blockSize: Int = 4096, discard: Bool = true,
             options: BlobStore.Options = BlobStoreTests.options) throws {
            fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: pages * UInt64(4096 / blockSize),
                                                                     blockSizeBytes: blockSize)))
            device = Bdev(backend: fault)
            io = try BdevSyncIO(bdev: device, reactor: reactor)
            store = try BlobStore.format(io, options: options)
            store.deferCommitFlush = true
            store.discardsReleasedClusters = discard
            trimmer = ClusterTrimmer(store: store, channel: try device.makeChannel(reactor: trimReactor, queueDepth: 8))
        }

        /// Steps the trimmer until nothing is ready or in flight.
        func settle() { trimmer.drain() }

        /// An explicit trim, run to its answer.
        func trim(startBytes: UInt64 = 0, lengthBytes: UInt64 = .max, minimumBytes: UInt64 = 0) throws -> UInt64 {
            var answer: Result<UInt64, BlobStoreError>?
            trimmer.trimFreeSpace(startBytes: startBytes, lengthBytes: lengthBytes, minimumBytes: minimumBytes) { answer = $0 }
            while answer == nil { _ = trimReactor.runOnce() }
            return try answer!.get()
        }

        /// Device blocks of blob `id`'s clusters (4 KiB blocks).
        func blocks(of id: BlobID) -> [UInt64] {
            store.blob(id)!.extents.flatMap { extent in
                (0..<UInt64(extent.count)).map { store.clusterOffsetBytes(extent.firstCluster + $0) / 4096 }
            }
        }

        /// Power off (the trimmer stopped first, its unmaps failing), then the store as a
        /// load finds it, which the verifier must pass.
        func crashAndLoad(_ policy: FaultBdev.CrashPolicy, _ context: String) throws -> BlobStore {
            trimmer.close()
            io.close()
            let report = try fault.crash(policy: policy, reactor: reactor)
            io = try BdevSyncIO(bdev: device, reactor: reactor)
            let loaded = try BlobStore.load(io).0
            XCTAssertTrue(loaded.verify().isConsistent, "\(context), crash \(report): \(loaded.verify())")
            return loaded
        }

        func close() {
            trimmer.close()
            io.close()
        }
    }

    /// The bytes of cluster `index` of the blob named `name`: never zero, so a cluster
    /// unmapped while live reads differently.
    static func pattern(_ name: String, _ index: UInt64) -> [UInt8] {
        let seed = UInt64(name.utf8.reduce(0) { $0 &* 31 &+ UInt32($1) })
        let start = seed &+ index &* 7
        return [UInt8](unsafeUninitializedCapacity: 4096) { bytes, count in
            for offset in 0..<4096 { bytes[offset] = UInt8(truncatingIfNeeded: (start &+ UInt64(offset)) % 255 + 1) }
            count = 4096
        }
    }

    /// A blob of `clusters` clusters, each written with its pattern, named by xattr.
    @discardableResult
    static func makeBlob(_ store: BlobStore, _ name: String, clusters: UInt64) throws -> BlobID {
        let id = try store.createBlob(clusterCount: clusters, xattrs: [("name", Array(name.utf8))])
        try store.write(blob: id, offsetUnits: 0, data: (0..<clusters).flatMap { pattern(name, $0) })
        return id
    }

    /// Every unmap since the last call touched only pages nothing in `store` uses: no
    /// blob's cluster, no chain page of the checkpoint, no log page replay reads, no super
    /// block, table or bitmap page (live pages in 4 KiB pages, unmaps in device blocks).
    @discardableResult
    static func checkUnmaps(_ fault: FaultBdev, _ store: BlobStore,
                            _ context: String) -> [(writeIndex: UInt64, offsetBlocks: UInt64, countBlocks: UInt64)] {
        var live = Set<UInt64>()
        let block = store.superBlock
        live.formUnion(0..<2)
        live.formUnion(block.table.startPage..<(block.table.startPage + 2 * block.table.pageCount))
        live.formUnion(block.bitmaps.startPage..<(block.bitmaps.startPage + 2 * block.bitmaps.pageCount))
        for sequence in block.logTailSequence..<store.metadataLog.head { live.insert(block.log.startPage + sequence % block.log.pageCount) }
        for chain in store.durableChains.values { for page in chain { live.insert(block.metadataPageAddress(page)) } }
        for id in store.blobIDList {
            for extent in store.blob(id)!.extents {
                for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) {
                    live.insert(store.clusterOffsetBytes(cluster) / 4096)
                }
            }
        }
        let unmaps = fault.takeUnmaps()
        let blocksPerPage = UInt64(4096 / fault.geometry.blockSizeBytes)
        for unmap in unmaps {
            let pages = (unmap.offsetBlocks / blocksPerPage)...((unmap.offsetBlocks + unmap.countBlocks - 1) / blocksPerPage)
            let hit = pages.first { live.contains($0) }
            XCTAssertNil(hit, "\(context): unmap of blocks \(unmap.offsetBlocks)+\(unmap.countBlocks) hits live page \(hit ?? 0)")
        }
        return unmaps
    }

    // MARK: - Online discard

    /// A deleted blob's clusters are unmapped after the flush that makes the delete
    /// durable, not before; meanwhile nothing else is given them.
    func testReleasedClustersAreUnmappedOnceTheReleaseIsDurable() throws {
        let rig = try Rig()
        defer { rig.close() }
        let store = rig.store
        let a = try Self.makeBlob(store, "a", clusters: 6)
        try store.sync()
        let aBlocks = rig.blocks(of: a)
        _ = rig.fault.takeUnmaps()
        try store.deleteBlob(a)
        rig.settle()
        XCTAssertTrue(rig.fault.takeUnmaps().isEmpty, "the delete is not durable yet: nothing may be unmapped")
        let b = try Self.makeBlob(store, "b", clusters: 6)
        XCTAssertTrue(Set(rig.blocks(of: b)).isDisjoint(with: aBlocks), "clusters held for their unmap are not allocated")
        try store.sync()
        rig.settle()
        let unmapped = rig.fault.takeUnmaps().flatMap { $0.offsetBlocks..<($0.offsetBlocks + $0.countBlocks) }
        XCTAssertEqual(Set(unmapped), Set(aBlocks), "exactly the deleted blob's clusters")
        XCTAssertEqual(rig.trimmer.discardedBytes, 6 * 4096)
        for block in aBlocks { XCTAssertTrue(try rig.io.readBytes(offsetBlocks: block, countBlocks: 1) == [UInt8](repeating: 0, count: 4096)) }
        XCTAssertTrue(try store.read(blob: b, offsetUnits: 0, countUnits: 6) == (0..<6).flatMap { Self.pattern("b", $0) })
        XCTAssertEqual(store.discards.heldClusterCount, 0)
        XCTAssertTrue(store.verify().isConsistent)
    }

    /// Without online discard, released clusters go straight back to allocation and
    /// nothing is unmapped.
    func testWithoutOnlineDiscardNothingIsUnmapped() throws {
        let rig = try Rig(discard: false)
        defer { rig.close() }
        let a = try Self.makeBlob(rig.store, "a", clusters: 4)
        try rig.store.deleteBlob(a)
        try rig.store.sync()
        rig.settle()
        XCTAssertTrue(rig.fault.takeUnmaps().isEmpty)
        XCTAssertEqual(rig.store.discards.heldClusterCount, 0)
    }

    /// A checkpoint taken while clusters are held for discard persists them as free (the
    /// verifier compares the bitmaps with the metadata), and a held cluster is still free
    /// space.
    func testHeldClustersArePersistedFree() throws {
        let rig = try Rig()
        defer { rig.close() }
        let free = rig.store.freeClusterCount
        let a = try Self.makeBlob(rig.store, "a", clusters: 5)
        try rig.store.deleteBlob(a)
        XCTAssertEqual(rig.store.discards.heldClusterCount, 5)
        XCTAssertEqual(rig.store.freeClusterCount, free, "held clusters count as free")
        try rig.store.checkpoint()
        XCTAssertTrue(rig.store.verify().isConsistent, "\(rig.store.verify())")
        XCTAssertTrue(rig.store.hasDiscardsReady, "durable at the checkpoint's switch")
        rig.settle()
        XCTAssertTrue(rig.store.verify().isConsistent)
    }

    /// A cluster whose unmap is in flight is not allocated; a write that needs it (the
    /// store is full) waits for the unmap's completion, then takes it.
    func testAClusterBeingUnmappedIsNotAllocatedUntilTheUnmapCompleted() throws {
        let rig = try Rig()
        defer { rig.close() }
        let store = rig.store
        let a = try Self.makeBlob(store, "a", clusters: 4)
        try store.sync()
        let aBlocks = Set(rig.blocks(of: a))
        try store.deleteBlob(a)
        try store.sync()
        // Submitted, not completed: the trimmer's channel is not polled.
        _ = rig.trimmer.poll()
        XCTAssertEqual(rig.trimmer.inFlight, 1)
        let b = try Self.makeBlob(store, "b", clusters: 4)
        XCTAssertTrue(Set(rig.blocks(of: b)).isDisjoint(with: aBlocks), "in flight: not allocated")
        XCTAssertEqual(rig.trimmer.inFlight, 1)
        // Fill the store: the last clusters free are those being unmapped.
        let fill = store.freeClusterCount - store.metadataClusterReserve
        let c = try Self.makeBlob(store, "c", clusters: fill)
        XCTAssertEqual(rig.trimmer.inFlight, 0, "the write waited for the unmap")
        XCTAssertFalse(Set(rig.blocks(of: c)).isDisjoint(with: aBlocks), "and then took its clusters")
        XCTAssertTrue(try store.read(blob: c, offsetUnits: 0, countUnits: fill) == (0..<fill).flatMap { Self.pattern("c", $0) })
        try store.sync()
        XCTAssertTrue(store.verify().isConsistent)
    }

    /// Space is short: clusters held for discard (released, not yet durable or not yet
    /// submitted) go back to allocation without their unmap.
    func testHeldClustersAreGivenBackWhenSpaceIsShort() throws {
        let rig = try Rig()
        defer { rig.close() }
        let store = rig.store
        let fill = store.freeClusterCount - store.metadataClusterReserve
        let a = try Self.makeBlob(store, "a", clusters: fill)
        try store.sync()
        try store.deleteBlob(a)
        XCTAssertEqual(store.discards.heldClusterCount, fill, "held: the delete is not durable")
        let b = try Self.makeBlob(store, "b", clusters: fill)
        XCTAssertTrue(try store.read(blob: b, offsetUnits: 0, countUnits: fill) == (0..<fill).flatMap { Self.pattern("b", $0) })
        XCTAssertEqual(store.discards.heldClusterCount, 0)
        try store.sync()
        rig.settle()
        Self.checkUnmaps(rig.fault, store, "after the refill")
        XCTAssertTrue(store.verify().isConsistent)
    }

    // MARK: - Explicit trims

    /// A trim unmaps every free cluster, the dead log and the free metadata pages, and
    /// reports their bytes; live data stays.
    func testTrimUnmapsAllFreeSpace() throws {
        let rig = try Rig(discard: false)
        defer { rig.close() }
        let store = rig.store
        let keep = try Self.makeBlob(store, "keep", clusters: 3)
        let gone = try Self.makeBlob(store, "gone", clusters: 7)
        try store.sync()
        let goneBlocks = rig.blocks(of: gone)
        try store.deleteBlob(gone)
        _ = rig.fault.takeUnmaps()
        let trimmed = try rig.trim()
        Self.checkUnmaps(rig.fault, store, "trim")
        let clusterBytes = store.freeClusterCount * 4096
        let block = store.superBlock
        let logBytes = block.log.pageCount * 4096  // the checkpoint emptied the log
        let regionBytes = store.freeRegionMetadataPageCount * 4096
        XCTAssertEqual(trimmed, clusterBytes + logBytes + regionBytes)
        for page in goneBlocks { XCTAssertTrue(try rig.io.readBytes(offsetBlocks: page, countBlocks: 1) == [UInt8](repeating: 0, count: 4096)) }
        XCTAssertTrue(try store.read(blob: keep, offsetUnits: 0, countUnits: 3) == (0..<3).flatMap { Self.pattern("keep", $0) })
        rig.trimmer.close()
        try store.unload()
        rig.io.close()
        rig.io = try BdevSyncIO(bdev: rig.device, reactor: rig.reactor)
        let (loaded, _) = try BlobStore.load(rig.io)
        XCTAssertTrue(loaded.verify().isConsistent)
        XCTAssertTrue(try loaded.read(blob: keep, offsetUnits: 0, countUnits: 3) == (0..<3).flatMap { Self.pattern("keep", $0) })
    }

    /// FITRIM's range and minimum length: only whole clusters inside the range, only free
    /// runs at least that long.
    func testTrimHonoursRangeAndMinimumLength() throws {
        let rig = try Rig(discard: false)
        defer { rig.close() }
        let store = rig.store
        // Free runs of 1 and 3 clusters between live ones, then the rest of the device.
        let ids = try (0..<5).map { try Self.makeBlob(store, "b\($0)", clusters: [2, 1, 2, 3, 2][$0]) }
        try store.sync()
        let single = rig.blocks(of: ids[1]), triple = rig.blocks(of: ids[3])
        try store.deleteBlob(ids[1])
        try store.deleteBlob(ids[3])
        let dataStart = store.clusterOffsetBytes(0)
        let end = store.clusterOffsetBytes(store.blob(ids[4])!.extents[0].firstCluster + 2)
        _ = rig.fault.takeUnmaps()
        // Data clusters only (the range starts after the metadata regions), runs of 2 or more.
        let trimmed = try rig.trim(startBytes: dataStart, lengthBytes: end - dataStart, minimumBytes: 8192)
        let unmapped = Set(rig.fault.takeUnmaps().flatMap { $0.offsetBlocks..<($0.offsetBlocks + $0.countBlocks) })
        XCTAssertEqual(unmapped, Set(triple), "the 3-cluster run; not the single cluster, nothing past the range")
        XCTAssertEqual(trimmed, 3 * 4096)
        XCTAssertTrue(unmapped.isDisjoint(with: single))
        // A range that starts mid-cluster takes only the whole clusters after it.
        let second = try rig.trim(startBytes: single[0] * 4096 + 1, lengthBytes: 4096 * 2)
        XCTAssertEqual(second, 0, "the single free cluster is not wholly inside")
        XCTAssertThrowsError(try rig.trim(startBytes: store.superBlock.devicePages * 4096))
    }

    /// A trim runs a window of free runs at a time while the store keeps working: a
    /// cluster released between two windows is unmapped only after its release is durable
    /// (else a power cut that keeps the unmap and loses the release brings the blob back
    /// with zeros).
    func testATrimNeverUnmapsAClusterWhoseReleaseIsNotDurable() throws {
        let rig = try Rig(discard: false)
        defer { rig.close() }
        let store = rig.store
        // Single free clusters between live ones: more runs than one window takes.
        let ids = try (0..<40).map { try Self.makeBlob(store, "s\($0)", clusters: 1) }
        try store.sync()
        for index in stride(from: 0, to: 38, by: 2) { try store.deleteBlob(ids[index]) }
        var answer: Result<UInt64, BlobStoreError>?
        rig.trimmer.trimFreeSpace(startBytes: 0, lengthBytes: .max, minimumBytes: 0) { answer = $0 }
        _ = rig.trimmer.poll()
        XCTAssertEqual(rig.trimmer.inFlight, ClusterTrimmer.requestsInFlightMax, "the first window")
        // Released now, in a run the trim has not reached; not durable (deferred commit).
        let late = ids[39]
        let lateBlocks = rig.blocks(of: late)
        try store.deleteBlob(late)
        XCTAssertTrue(store.hasUnflushedCommits)
        while answer == nil { _ = rig.trimReactor.runOnce() }
        let unmapped = Set(rig.fault.takeUnmaps().flatMap { $0.offsetBlocks..<($0.offsetBlocks + $0.countBlocks) })
        XCTAssertTrue(unmapped.isSuperset(of: lateBlocks), "the trim reached it")
        let loaded = try rig.crashAndLoad(.keepAll, "after the trim")
        XCTAssertNil(loaded.blobIDList.first { loaded.xattr($0, name: "name") == Array("s39".utf8) },
                     "unmapped, so its release must have been durable first")
        rig.io.close()
    }

    /// Trimming the metadata regions leaves the log pages a replay needs: a store with
    /// committed transactions after its checkpoint comes back with them.
    func testTrimmingMetadataRegionsKeepsTheLiveLog() throws {
        let rig = try Rig(discard: false)
        defer { rig.close() }
        let store = rig.store
        store.deferCommitFlush = false  // each commit durable in the log, no checkpoint
        let ids = try (0..<6).map { try Self.makeBlob(store, "l\($0)", clusters: 1) }
        XCTAssertGreaterThan(store.logPagesInUse, 0)
        _ = rig.fault.takeUnmaps()
        let bytes = try store.trimMetadataRegions(startBytes: 0, endBytes: .max, minimumBytes: 0)
        XCTAssertGreaterThan(bytes, 0)
        Self.checkUnmaps(rig.fault, store, "metadata trim")
        let loaded = try rig.crashAndLoad(.keepAll, "after the metadata trim")
        XCTAssertEqual(loaded.blobIDList.count, ids.count, "every commit replayed")
        rig.io.close()
    }

    /// A blob deleted while a handle is open: its clusters wait for the handle
    /// (quarantine), then for the durability of the delete, then are unmapped.
    func testQuarantinedClustersAreUnmappedOnceSettledAndDurable() throws {
        let rig = try Rig()
        defer { rig.close() }
        let store = rig.store
        let a = try Self.makeBlob(store, "a", clusters: 3)
        try store.sync()
        let aBlocks = Set(rig.blocks(of: a))
        let handle = try store.openBlob(a)
        try store.deleteBlob(a)
        XCTAssertEqual(store.releases.quarantinedClusterCount, 3)
        try store.sync()
        // The handle (this thread's, no I/O in flight) acknowledged at once; the trimmer
        // takes the settled clusters without waiting for an allocating write.
        rig.settle()
        XCTAssertEqual(store.releases.quarantinedClusterCount, 0)
        let unmapped = Set(rig.fault.takeUnmaps().flatMap { $0.offsetBlocks..<($0.offsetBlocks + $0.countBlocks) })
        XCTAssertEqual(unmapped, aBlocks)
        store.closeBlob(handle)
        XCTAssertTrue(store.verify().isConsistent)
    }

    /// Trims and online discard on a read-only store are refused.
    func testTrimOfAReadOnlyStoreIsRefused() throws {
        let rig = try Rig(discard: false)
        defer { rig.close() }
        try rig.store.unload()
        let io = try BdevSyncIO(bdev: rig.device, reactor: rig.reactor)
        defer { io.close() }
        let (readOnly, _) = try BlobStore.load(io, readOnly: true)
        let trimmer = ClusterTrimmer(store: readOnly, channel: try rig.device.makeChannel(reactor: rig.trimReactor))
        defer { trimmer.close() }
        var answer: Result<UInt64, BlobStoreError>?
        trimmer.trimFreeSpace(startBytes: 0, lengthBytes: .max, minimumBytes: 0) { answer = $0 }
        XCTAssertEqual(answer.map { if case .failure(.readOnly) = $0 { true } else { false } }, true)
    }

    // MARK: - Power cuts

    /// Steps of the crash workload: blobs by name (ids are reused).
    enum Step {
        case create(String, clusters: UInt64)
        case delete(String)
        case shrink(String, clusters: UInt64)
        case sync
        case settle
        case trim
    }

    static let workload: [Step] = [
        .create("a", clusters: 4), .create("b", clusters: 3), .create("c", clusters: 2), .create("d", clusters: 4), .sync,
        .delete("a"), .delete("b"), .settle, .sync, .settle,
        .create("e", clusters: 5), .delete("c"), .create("f", clusters: 2), .sync, .settle,
        .trim, .shrink("d", clusters: 2), .create("g", clusters: 3), .sync, .settle,
        .delete("e"), .trim, .create("h", clusters: 6), .delete("f"), .sync, .settle,
    ]

    /// Runs the workload until it completes or a step fails (the power is off); returns
    /// what a load must find: the blobs that must exist (and their clusters), and the
    /// names that may exist.
    static func run(_ rig: Rig, context: String,
                    sawUnmaps: ([(writeIndex: UInt64, offsetBlocks: UInt64, countBlocks: UInt64)]) -> Void = { _ in })
        -> (mustExist: [String: UInt64], mayExist: [String: Set<UInt64>], completed: Bool) {
        var ids: [String: BlobID] = [:]
        var sizes: [String: Set<UInt64>] = [:]   // the sizes a load may find
        var synced: [String: UInt64] = [:]        // sizes as of the last completed sync
        var created: [String: UInt64] = [:]
        for step in workload {
            do {
                switch step {
                case let .create(name, clusters):
                    sizes[name] = [clusters]
                    ids[name] = try makeBlob(rig.store, name, clusters: clusters)
                    created[name] = clusters
                case let .delete(name):
                    created[name] = nil
                    synced[name] = nil
                    try rig.store.deleteBlob(ids[name]!)
                case let .shrink(name, clusters):
                    sizes[name]!.insert(clusters)
                    synced[name] = nil  // either size until the next sync
                    created[name] = clusters
                    try rig.store.resizeBlob(ids[name]!, clusterCount: clusters)
                case .sync:
                    try rig.store.sync()
                    synced = synced.merging(created) { $1 }
                case .settle:
                    rig.settle()
                case .trim:
                    _ = try rig.trim()
                }
            } catch {
                sawUnmaps(checkUnmaps(rig.fault, rig.store, "\(context), in \(step)"))
                return (synced, sizes, false)
            }
            sawUnmaps(checkUnmaps(rig.fault, rig.store, "\(context), after \(step)"))
        }
        return (synced, sizes, true)
    }

    /// A power cut at every write and unmap index of a workload that writes, deletes,
    /// trims (online and explicitly) and reuses the space, 4 seeds each: after the load,
    /// every blob reads its own bytes in every cluster it maps (an unmapped live cluster
    /// would read zeros), every blob synced and not deleted is there, and no unmap ever
    /// touched a block in use when it was submitted.
    func testPowerCutDuringDiscardsLosesNothing() throws {
        try powerCutAtEveryWriteAndUnmap(blockSize: 4096, seeds: BlobStoreCrashTests.seedCount(4))
    }

    /// The same on 512-byte blocks (a cluster is 8 blocks; unmaps and tears in sectors).
    func testPowerCutDuringDiscardsLosesNothingOn512ByteBlocks() throws {
        try powerCutAtEveryWriteAndUnmap(blockSize: 512, seeds: BlobStoreCrashTests.seedCount(2))
    }

    private func powerCutAtEveryWriteAndUnmap(blockSize: Int, seeds: UInt64) throws {
        let total: UInt64
        var unmapIndices = Set<UInt64>()
        do {
            let rig = try Rig(blockSize: blockSize)
            // What the reference run unmaps (checkUnmaps takes them after each step).
            let outcome = Self.run(rig, context: "no cut") { unmapIndices.formUnion($0.map(\.writeIndex)) }
            XCTAssertTrue(outcome.completed)
            total = rig.fault.writeCount
            rig.close()
        }
        XCTAssertGreaterThan(unmapIndices.count, 8, "the workload unmaps: online, after checkpoints, in trims")
        for cut in 1...total {
            for seed in UInt64(0)..<seeds {
                let rig = try Rig(blockSize: blockSize)
                rig.fault.powerCut(afterWrites: cut)
                let context = "\(blockSize)-byte blocks, cut \(cut), seed \(seed)"
                let expected = Self.run(rig, context: context)
                let loaded = try rig.crashAndLoad(.random(seed: seed), context)
                var found: [String: UInt64] = [:]
                for id in loaded.blobIDList {
                    guard let name = loaded.xattr(id, name: "name").map({ String(decoding: $0, as: UTF8.self) }) else {
                        XCTFail("\(context): blob \(id) without a name")
                        continue
                    }
                    let blob = loaded.blob(id)!
                    XCTAssertTrue(expected.mayExist[name]?.contains(blob.clusterCount) ?? false,
                                  "\(context): \(name) of \(blob.clusterCount) clusters")
                    found[name] = blob.clusterCount
                    let units = UInt64(4096 / loaded.ioUnitBytes)
                    for extent in blob.extents {
                        for index in extent.clusterIndex..<(extent.clusterIndex + UInt64(extent.count)) {
                            XCTAssertTrue(try loaded.read(blob: id, offsetUnits: index * units, countUnits: units) == Self.pattern(name, index),
                                          "\(context): cluster \(index) of \(name) does not hold its bytes")
                        }
                    }
                }
                for (name, clusters) in expected.mustExist {
                    XCTAssertEqual(found[name], clusters, "\(context): \(name) was synced")
                    if let id = loaded.blobIDList.first(where: { loaded.xattr($0, name: "name") == Array(name.utf8) }) {
                        XCTAssertEqual(loaded.blob(id)!.extents.reduce(0) { $0 + UInt64($1.count) }, clusters,
                                       "\(context): every cluster of \(name) mapped")
                    }
                }
                rig.io.close()
            }
        }
    }
}
