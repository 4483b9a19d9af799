import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
@testable import Blobstore

final class BlobStoreTests: XCTestCase {
    static let options = BlobStore.Options(clusterSizeBytes: 4096, logPages: 16, metadataPages: 128, blobIDLimit: 128)

    private func makeDevice(megabytes: UInt64 = 8, blockSize: Int = 4096) throws -> (Bdev, Reactor) {
        let bdev = Bdev(backend: try MallocBdev(blockCount: (megabytes << 20) / UInt64(blockSize), blockSizeBytes: blockSize))
        return (bdev, try Reactor())
    }

    private func bytes(_ seed: UInt64, _ count: Int) -> [UInt8] {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<count).map { _ in
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return UInt8(truncatingIfNeeded: state)
        }
    }

    func testFormatLoadAndPersistence() throws {
        let (bdev, reactor) = try makeDevice()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let store = try BlobStore.format(io, options: Self.options)
        XCTAssertEqual(store.blobIDList, [])
        let total = store.freeClusterCount
        let a = try store.createBlob(clusterCount: 4, xattrs: [("name", Array("a".utf8))])
        let b = try store.createBlob()
        try store.resizeBlob(b, clusterCount: 2)
        let data = bytes(1, 8192)
        try store.write(blob: a, offsetUnits: 1, data: Array(data[0..<8192]))
        try store.setXattr(b, name: "fs.mode", value: [0xA4, 0x01], isInternal: true)
        try store.setSuperBlob(b)
        XCTAssertEqual(store.freeClusterCount, total - 2, "8 KiB at a 4 KiB offset fills blob clusters 1 and 2")
        try store.unload()
        io.close()

        let again = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let (loaded, report) = try BlobStore.load(again)
        XCTAssertTrue(report.wasClean)
        XCTAssertEqual(report.replayedTransactions, 0)
        XCTAssertEqual(loaded.blobIDList, [a, b])
        XCTAssertEqual(loaded.superBlobID, b)
        XCTAssertEqual(loaded.xattr(a, name: "name"), Array("a".utf8))
        XCTAssertEqual(loaded.xattr(b, name: "fs.mode", isInternal: true), [0xA4, 0x01])
        XCTAssertEqual(loaded.blob(b)?.clusterCount, 2)
        XCTAssertEqual(try loaded.read(blob: a, offsetUnits: 1, countUnits: 2), Array(data[0..<8192]))
        XCTAssertEqual(try loaded.read(blob: a, offsetUnits: 0, countUnits: 1), [UInt8](repeating: 0, count: 4096), "thin: reads zeros")
        XCTAssertEqual(loaded.freeClusterCount, total - 2)
        XCTAssertTrue(Verifier.verify(again).isConsistent, "\(Verifier.verify(again).problems)")
        again.close()
    }

    func testNoStaleDataInANewCluster() throws {
        let (bdev, reactor) = try makeDevice(blockSize: 512)
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        // The device held someone else's bytes.
        try io.writeBytes([UInt8](repeating: 0xAA, count: 8 << 20), offsetBlocks: 0)
        let store = try BlobStore.format(io, options: Self.options)
        let id = try store.createBlob(clusterCount: 1)
        try store.write(blob: id, offsetUnits: 3, data: [UInt8](repeating: 0x11, count: 512))
        let cluster = try store.read(blob: id, offsetUnits: 0, countUnits: 8)
        XCTAssertEqual(Array(cluster[0..<1536]), [UInt8](repeating: 0, count: 1536))
        XCTAssertEqual(Array(cluster[1536..<2048]), [UInt8](repeating: 0x11, count: 512))
        XCTAssertEqual(Array(cluster[2048...]), [UInt8](repeating: 0, count: 2048))
        io.close()
    }

    func testDirtyLoadReplaysTheLog() throws {
        let (bdev, reactor) = try makeDevice()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let store = try BlobStore.format(io, options: Self.options)
        let id = try store.createBlob(clusterCount: 3)
        try store.write(blob: id, offsetUnits: 0, data: bytes(2, 8192))
        try store.setXattr(id, name: "k", value: [1, 2])
        let gone = try store.createBlob(clusterCount: 1)
        try store.write(blob: gone, offsetUnits: 0, data: bytes(3, 4096))
        try store.deleteBlob(gone)
        // No unload: the process "died". Everything is in the log, nothing in a checkpoint.
        io.close()
        let again = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let (loaded, report) = try BlobStore.load(again)
        XCTAssertFalse(report.wasClean)
        XCTAssertGreaterThanOrEqual(report.replayedTransactions, 5)
        XCTAssertEqual(loaded.blobIDList, [id])
        XCTAssertEqual(try loaded.read(blob: id, offsetUnits: 0, countUnits: 2), bytes(2, 8192))
        XCTAssertEqual(loaded.xattr(id, name: "k"), [1, 2])
        XCTAssertTrue(Verifier.verify(again).isConsistent, "\(Verifier.verify(again).problems)")
        again.close()
    }

    func testFullLogForcesACheckpointNotAnError() throws {
        let (bdev, reactor) = try makeDevice()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let store = try BlobStore.format(io, options: Self.options)
        let id = try store.createBlob(clusterCount: 1)
        let before = store.superBlock.sequence
        for round in 0..<100 { try store.setXattr(id, name: "round", value: [UInt8(round)]) }
        XCTAssertGreaterThan(store.superBlock.sequence, before + 4, "the 16-page log wrapped several times")
        XCTAssertLessThanOrEqual(store.logPagesInUse, 16)
        io.close()
        let again = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let (loaded, _) = try BlobStore.load(again)
        XCTAssertEqual(loaded.xattr(id, name: "round"), [99])
        XCTAssertTrue(Verifier.verify(again).isConsistent)
        again.close()
    }

    func testWriteZeroesKeepsHolesAndZeroesData() throws {
        let (bdev, reactor) = try makeDevice()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        let store = try BlobStore.format(io, options: Self.options)
        let id = try store.createBlob(clusterCount: 3)
        try store.write(blob: id, offsetUnits: 0, data: bytes(9, 4096))
        try store.write(blob: id, offsetUnits: 2, data: bytes(10, 4096))
        let free = store.freeClusterCount
        try store.writeZeroes(blob: id, offsetUnits: 0, countUnits: 3)
        XCTAssertEqual(try store.read(blob: id, offsetUnits: 0, countUnits: 3), [UInt8](repeating: 0, count: 3 * 4096))
        XCTAssertEqual(store.freeClusterCount, free, "holes stay holes, allocated clusters stay allocated")
    }

    func testBadArgumentsAreRefusedAndChangeNothing() throws {
        let (bdev, reactor) = try makeDevice()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        let store = try BlobStore.format(io, options: Self.options)
        let id = try store.createBlob(clusterCount: 1)
        XCTAssertThrowsError(try store.write(blob: id, offsetUnits: 1, data: bytes(1, 4096))) {
            guard case .invalidArgument = $0 as? BlobStoreError else { return XCTFail("\($0)") }
        }
        XCTAssertThrowsError(try store.write(blob: id, offsetUnits: 0, data: bytes(1, 100)))
        let absent = BlobID(rawValue: 999)
        XCTAssertThrowsError(try store.deleteBlob(absent)) { XCTAssertEqual($0 as? BlobStoreError, .noSuchBlob(absent)) }
        XCTAssertThrowsError(try store.setXattr(id, name: "", value: []))
        XCTAssertThrowsError(try store.setXattr(id, name: "v", value: [UInt8](repeating: 0, count: 5000)))
        XCTAssertEqual(store.freeClusterCount, store.clusterCount)
    }

    func testLogSizeIsChosenAtFormatWithinBounds() throws {
        let (bdev, reactor) = try makeDevice()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        XCTAssertEqual(try BlobStore.format(io).superBlock.log.pageCount, 64, "an 8 MiB device gets the 256 KiB floor")
        for pages: UInt64 in [0, 1, (1 << 20) + 1] {
            var options = Self.options
            options.logPages = pages
            XCTAssertThrowsError(try BlobStore.format(io, options: options), "\(pages) log pages") {
                guard case let .invalidArgument(why) = $0 as? BlobStoreError, why.contains("log of \(pages) pages") else {
                    return XCTFail("\($0)")
                }
            }
        }
        var options = Self.options
        options.logPages = 300
        let store = try BlobStore.format(io, options: options)
        XCTAssertEqual(store.superBlock.log.pageCount, 300)
        let id = try store.createBlob(clusterCount: 1)
        try store.unload()
        let (loaded, _) = try BlobStore.load(io)
        XCTAssertEqual(loaded.superBlock.log.pageCount, 300)
        XCTAssertEqual(loaded.blobIDList, [id])
        try loaded.unload()
    }

    /// Load walks chains a batch of blobs at a time, each step's pages read together:
    /// batches of 256 blobs, chains of one to several pages, must come back exactly.
    func testLoadBringsBackManyChainsOfDifferentLengthsAcrossBatches() throws {
        let (bdev, reactor) = try makeDevice(megabytes: 64)
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        let store = try BlobStore.format(io, options: .init(metadataPages: 2048, blobIDLimit: 1024))
        var ids: [BlobID] = []
        for index in 0..<700 {
            let id = try store.createBlob(clusterCount: UInt64(1 + index % 5))
            // Every seventh blob gets xattrs enough for 2 to 4 pages.
            for name in 0..<(index % 7 == 0 ? 1 + index % 3 * 2 : 0) {
                try store.setXattr(id, name: "x\(name)", value: bytes(UInt64(index * 8 + name), 3000))
            }
            if index % 3 == 0 { try store.write(blob: id, offsetUnits: 0, data: bytes(UInt64(index), 4096)) }
            ids.append(id)
        }
        for id in ids where id.rawValue % 11 == 5 { try store.deleteBlob(id) }
        try store.checkpoint()
        let expected = store.blobIDList.map { store.blob($0)! }
        XCTAssertTrue(expected.contains { MetadataPage.pagesNeeded(for: $0) >= 3 }, "some chains are several pages long")
        let free = (store.freeClusterCount, store.metadataPageBits.setCount)
        try store.unload()
        let (loaded, _) = try BlobStore.load(io)
        XCTAssertEqual(loaded.blobIDList.count, expected.count)
        XCTAssertTrue(loaded.blobIDList.map { loaded.blob($0)! } == expected, "every blob's metadata as it was")
        XCTAssertEqual(loaded.freeClusterCount, free.0)
        XCTAssertEqual(loaded.metadataPageBits.setCount, free.1)
        XCTAssertEqual(try loaded.read(blob: BlobID(rawValue: 3), offsetUnits: 0, countUnits: 1), bytes(3, 4096))
        try loaded.unload()
        XCTAssertTrue(Verifier.verify(io).isConsistent)
    }

    /// A load reads the super blocks, the table, the bitmaps and the log, not the chains.
    /// A chain read that fails in the middle of a batch (`readAllChains`, 600 chains in
    /// three batches) fails with the device's error once every read of the batch has
    /// completed, and so does one read on first use (the blob reads as absent); either
    /// leaves the store refusing changes, and a later load works.
    func testAFailedChainReadFailsTheLoadCleanly() throws {
        let reactor = try Reactor()
        let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 4096)))
        let device = Bdev(backend: fault)
        var io = try BdevSyncIO(bdev: device, reactor: reactor)
        let store = try BlobStore.format(io, options: .init(metadataPages: 1200, blobIDLimit: 1024))
        for _ in 0..<600 { _ = try store.createBlob(clusterCount: 1) }
        try store.unload()
        io.close()
        func expectDeviceError(_ error: any Error) {
            guard case .device = error as? BlobStoreError else { return XCTFail("\(error)") }
        }
        // How many device reads a load and a readAllChains make (runs of consecutive
        // chain pages are joined into one read).
        io = try BdevSyncIO(bdev: device, reactor: reactor)
        var start = fault.ioCount
        let (probe, _) = try BlobStore.load(io)
        let loadIOs = fault.ioCount - start
        start = fault.ioCount
        try probe.readAllChains()
        let chainIOs = fault.ioCount - start
        XCTAssertGreaterThan(chainIOs, 2)
        XCTAssertLessThan(loadIOs, 20, "a load reads no chain")
        io.close()
        // A failed read during the load fails it.
        io = try BdevSyncIO(bdev: device, reactor: reactor)
        fault.failIO(at: fault.ioCount + 3)
        XCTAssertThrowsError(try BlobStore.load(io), "read 3 of the load fails", expectDeviceError)
        XCTAssertEqual(io.channel.inFlight, 0, "nothing left in flight")
        fault.clearFaults()
        io.close()
        // An early, a middle and the last read of the chains fails.
        for failing in [UInt64(1), chainIOs / 2, chainIOs] {
            io = try BdevSyncIO(bdev: device, reactor: reactor)
            let (loaded, _) = try BlobStore.load(io)
            fault.failIO(at: fault.ioCount + failing)
            XCTAssertThrowsError(try loaded.readAllChains(), "chain read \(failing) fails", expectDeviceError)
            XCTAssertEqual(io.channel.inFlight, 0, "nothing left in flight")
            XCTAssertNotNil(loaded.chainReadFailure)
            XCTAssertThrowsError(try loaded.createBlob()) { XCTAssertEqual($0 as? BlobStoreError, .readOnly) }
            fault.clearFaults()
            io.close()
        }
        // On first use: the blob reads as absent, and the store takes no change.
        io = try BdevSyncIO(bdev: device, reactor: reactor)
        let (onDemand, _) = try BlobStore.load(io)
        fault.failIO(at: fault.ioCount + 1)
        XCTAssertNil(onDemand.blob(BlobID(rawValue: 7)))
        fault.clearFaults()
        guard case .device = onDemand.chainReadFailure else { return XCTFail("\(String(describing: onDemand.chainReadFailure))") }
        XCTAssertTrue(onDemand.refusesChanges)
        XCTAssertNotNil(onDemand.blob(BlobID(rawValue: 8)), "other chains still read")
        io.close()
        io = try BdevSyncIO(bdev: device, reactor: reactor)
        // (The stores above were loaded for writing and never unloaded: not clean.)
        let (loaded, _) = try BlobStore.load(io)
        try loaded.readAllChains()
        XCTAssertEqual(loaded.blobIDList.count, 600)
        try loaded.unload()
        XCTAssertTrue(Verifier.verify(io).isConsistent)
        io.close()
    }

    /// Transactions waiting in memory when deferred mode is turned off go to the log before
    /// the next one; when they do not fit it, the checkpoint the full log takes holds them
    /// and they are not written again after it (a replay would apply them twice).
    func testWaitingTransactionsThatDoNotFitTheLogAreHeldByTheCheckpoint() throws {
        let (bdev, reactor) = try makeDevice()
        var io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let store = try BlobStore.format(io, options: .init(logPages: 4, metadataPages: 128, blobIDLimit: 128))
        store.deferCommitFlush = true
        var ids: [BlobID] = []
        for index in 0..<5 {  // five pages of records: more than the log
            let id = try store.createBlob()
            try store.setXattr(id, name: "v", value: bytes(UInt64(index), 3000))
            ids.append(id)
        }
        XCTAssertEqual(store.metadataLog.pending.count, 20, "ten transactions of two records wait")
        let checkpoints = store.superBlock.sequence
        store.deferCommitFlush = false
        let last = try store.createBlob()  // immediate: durable on return, after the waiting ones
        XCTAssertTrue(store.metadataLog.pending.isEmpty)
        XCTAssertGreaterThan(store.superBlock.sequence, checkpoints, "the waiting transactions took a checkpoint")
        io.close()  // no unload
        io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let (loaded, _) = try BlobStore.load(io)
        XCTAssertEqual(loaded.blobIDList, ids + [last])
        for (index, id) in ids.enumerated() {
            XCTAssertEqual(loaded.xattr(id, name: "v"), bytes(UInt64(index), 3000))
        }
        try loaded.unload()
        XCTAssertTrue(Verifier.verify(io).isConsistent)
        io.close()
    }

    func testRunningOutOfClustersIsAnErrorNotCorruption() throws {
        let (bdev, reactor) = try makeDevice(megabytes: 2)
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let store = try BlobStore.format(io, options: Self.options)
        let id = try store.createBlob(clusterCount: store.clusterCount + 10)
        var written = 0
        do {
            for index in 0..<(store.clusterCount + 10) {
                try store.write(blob: id, offsetUnits: index, data: bytes(index, 4096))
                written += 1
            }
            XCTFail("wrote more clusters than the store has")
        } catch BlobStoreError.noSpace {}
        XCTAssertEqual(store.freeClusterCount, 0)
        io.close()
        let again = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let (loaded, _) = try BlobStore.load(again)
        XCTAssertEqual(try loaded.read(blob: id, offsetUnits: UInt64(written - 1), countUnits: 1), bytes(UInt64(written - 1), 4096))
        XCTAssertTrue(Verifier.verify(again).isConsistent)
        again.close()
    }

    /// One write that needs more clusters than are free: noSpace at once (it used to loop
    /// forever looking for a free cluster outside the ones it had already picked).
    func testWriteLargerThanTheFreeSpaceFailsWithoutWriting() throws {
        let (bdev, reactor) = try makeDevice(megabytes: 2)
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let store = try BlobStore.format(io, options: Self.options)
        let id = try store.createBlob(clusterCount: store.clusterCount + 10)
        let free = store.freeClusterCount
        XCTAssertThrowsError(try store.write(blob: id, offsetUnits: 0, data: bytes(7, Int(free + 3) * 4096))) {
            guard case .noSpace = $0 as? BlobStoreError else { return XCTFail("\($0)") }
        }
        XCTAssertEqual(store.freeClusterCount, free, "nothing allocated by the failed write")
        try store.write(blob: id, offsetUnits: 0, data: bytes(7, Int(free) * 4096))
        XCTAssertEqual(store.freeClusterCount, 0)
        XCTAssertTrue(Verifier.verify(io).isConsistent)
        io.close()
    }

    func testRepeatedDirtyLoads() throws {
        let (bdev, reactor) = try makeDevice()
        var io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        _ = try BlobStore.format(io, options: Self.options)
        io.close()
        var ids: [BlobID] = []
        for round in 0..<6 {
            io = try BdevSyncIO(bdev: bdev, reactor: reactor)
            let (store, _) = try BlobStore.load(io)
            XCTAssertEqual(store.blobIDList, ids.sorted(), "round \(round)")
            for id in ids { XCTAssertEqual(try store.read(blob: id, offsetUnits: 0, countUnits: 1), bytes(id.rawValue, 4096)) }
            let id = try store.createBlob(clusterCount: 1)
            try store.write(blob: id, offsetUnits: 0, data: bytes(id.rawValue, 4096))
            ids.append(id)
            XCTAssertTrue(Verifier.verify(io).isConsistent, "round \(round): \(Verifier.verify(io).problems)")
            io.close()  // no unload
        }
    }
}
