import XCTest
import Bdev
import BdevMalloc
import Env
@testable import Blobstore

/// Images damaged on purpose, as blobcli sees them: the verifier (`fsck`), the read-only
/// load (`info`, `list`, `show` ...), the log inspection (`log`) and the repair
/// (`fsck --repair`). Each damage is reported with its structure, its offset on the device
/// and what is wrong; the repairable ones are repaired and verify clean afterwards; the
/// others are refused without a byte written.
final class DamagedImageTests: XCTestCase {
    // MARK: - Metadata page

    func testBadCRCInAMetadataPageIsNamedWithItsOffsetAndRepairRemovesTheBlob() throws {
        let image = try TestImage.populated()
        let pageID = try image.chain(of: image.blobs[1])[0]
        let page = try image.metadataPage(pageID)
        let lostCluster = try image.with { io in
            try XCTUnwrap(try BlobStore.load(io, readOnly: true).0.blob(image.blobs[1])?.extents.first).firstCluster
        }
        try image.edit(page: page) { $0[300] ^= 0x40 }
        let crcOffset = page * UInt64(TestImage.pageBytes) + 4

        let report = try image.with { Verifier.verify($0) }
        XCTAssertFalse(report.isConsistent)
        XCTAssertMentions(report.problems[0], "blob \(image.blobs[1])", "metadata page \(pageID)", "at byte \(crcOffset)",
                          "CRC32C mismatch")
        XCTAssertLessThanOrEqual(report.problems.count, 2, "\(report.problems)")

        // A load reads no chain; reading them all (what list and the checks do) is a typed
        // error naming the page and the offset (exit 2).
        try image.with { io in
            XCTAssertThrowsError(try BlobStore.load(io, readOnly: true).0.readAllChains()) { error in
                guard case let .format(format) = error as? BlobStoreError else { return XCTFail("\(error)") }
                XCTAssertEqual(format.structure, "metadata page \(pageID)")
                XCTAssertEqual(format.offset, crcOffset)
                guard case .badChecksum = format.problem else { return XCTFail("\(format)") }
            }
        }
        // The log does not need the metadata: it still reads.
        XCTAssertNoThrow(try image.with { try LogInspection.inspect($0) })

        // Repair: the blob's metadata is gone, so the blob is removed (said, with the page and
        // its offset) and its cluster freed; the other blobs are untouched.
        let repair = try image.with { StoreRepair.repair($0) }
        XCTAssertEqual(repair.outcome, .repaired, "\(repair.remaining)")
        XCTAssertEqual(repair.removedBlobs, [image.blobs[1]])
        let removal = try XCTUnwrap(repair.changes.first { $0.kind == "blob_removed" })
        XCTAssertEqual(removal.blob, image.blobs[1])
        XCTAssertMentions(removal.text, "metadata page \(pageID)", "at byte \(crcOffset)", "removed")
        XCTAssertEqual(repair.bitmapChanges.first { $0.section == .clusters }?.freed, [lostCluster])
        XCTAssertEqual(try image.with { Verifier.verify($0) }.problems, [])
        try image.with { io in
            let (store, _) = try BlobStore.load(io, readOnly: true)
            XCTAssertNil(store.blob(image.blobs[1]))
            XCTAssertNil(store.superBlobID, "the super blob was the removed blob")
            XCTAssertEqual(try store.read(blob: image.blobs[0], offsetUnits: 0, countUnits: 2),
                           (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7) })
            XCTAssertEqual(store.blob(image.blobs[0])?.xattrs.first { $0.name == "name" }?.value, Array("data".utf8))
        }
    }

    func testChainPagesShowAPageDamagedAfterLoading() throws {
        // `show`: the store loaded, then the page went bad underneath (a device error, a stray write).
        let image = try TestImage.populated()
        try image.with { io in
            let (store, _) = try BlobStore.load(io, readOnly: true)
            let pageID = store.chainPages(image.blobs[0])[0].pageID
            XCTAssertNil(store.chainPages(image.blobs[0])[0].problem)
            let page = store.superBlock.metadataPages.startPage + UInt64(pageID)
            var bytes = try io.readBytes(offsetBlocks: page, countBlocks: 1)
            bytes[0] = 0
            try io.writeBytes(bytes, offsetBlocks: page)
            let shown = store.chainPages(image.blobs[0])[0]
            XCTAssertEqual(shown.offset, page * 4096)
            XCTAssertMentions(try XCTUnwrap(shown.problem), "metadata page \(pageID)", "at byte \(page * 4096)", "bad magic")
        }
    }

    // MARK: - Ownership

    func testDoublyOwnedClusterIsNamedAndUnmappedFromBothOwners() throws {
        let image = try TestImage.populated()
        // Rewrite blob 1's chain (valid CRC) so that its extent points at blob 0's first cluster.
        let (owner, victim) = (image.blobs[0], image.blobs[1])
        var (stolen, chain, metadata): (UInt64, [UInt32], BlobMetadata) = (0, [], BlobMetadata(id: BlobID(rawValue: 0)))
        var ownerExtents: [Extent] = []
        try image.with { io in
            let (store, _) = try BlobStore.load(io, readOnly: true)
            ownerExtents = try XCTUnwrap(store.blob(owner)?.extents)
            stolen = ownerExtents[0].firstCluster
            chain = store.chainPages(victim).map(\.pageID)
            metadata = try XCTUnwrap(store.blob(victim))
        }
        let victimCluster = metadata.extents[0].firstCluster
        metadata.extents[0].firstCluster = stolen
        let sequence = try image.superBlock().sequence
        for (pageID, bytes) in zip(chain, MetadataPage.encodeChain(metadata, pageIDs: chain, checkpointSequence: sequence)) {
            try image.write(page: try image.metadataPage(pageID), bytes)
        }

        let report = try image.with { Verifier.verify($0) }
        XCTAssertTrue(report.problems.contains("cluster \(stolen) is owned by blobs \(owner) and \(victim)"), "\(report.problems)")
        try image.with { io in
            XCTAssertThrowsError(try BlobStore.load(io, readOnly: true).0.readAllChains()) { error in
                guard case let .corrupt(what) = error as? BlobStoreError else { return XCTFail("\(error)") }
                XCTAssertMentions(what, "cluster \(stolen)", "owned twice")
            }
        }
        // Which owner is right is not knowable: neither keeps the cluster (both read zeros
        // there), so neither can read the other's bytes. Both are named.
        let repair = try image.with { StoreRepair.repair($0) }
        XCTAssertEqual(repair.outcome, .repaired, "\(repair.remaining)")
        XCTAssertEqual(Set(repair.changes.filter { $0.kind == "clusters_unmapped" }.compactMap(\.blob)), [owner, victim])
        XCTAssertEqual(repair.affectedBlobs, [owner, victim])
        XCTAssertEqual(try image.with { Verifier.verify($0) }.problems, [])
        try image.with { io in
            let (store, _) = try BlobStore.load(io, readOnly: true)
            XCTAssertEqual(try store.read(blob: owner, offsetUnits: 0, countUnits: 1), [UInt8](repeating: 0, count: 4096))
            XCTAssertEqual(try store.read(blob: owner, offsetUnits: 1, countUnits: 1),
                           (4096..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7) }, "the owner's other clusters stay")
            XCTAssertEqual(try store.read(blob: victim, offsetUnits: 0, countUnits: 1), [UInt8](repeating: 0, count: 4096))
            XCTAssertEqual(store.blob(owner)?.extents.contains { $0.firstCluster <= stolen && stolen < $0.firstCluster + UInt64($0.count) }, false)
        }
        XCTAssertEqual(repair.bitmapChanges.first { $0.section == .clusters }?.freed, [stolen, victimCluster].sorted(),
                       "the contested cluster and the victim's own (no longer mapped) are free")
    }

    // MARK: - Bitmaps (repairable)

    /// Sets or clears `bit` of a section of the active bitmap copy and reseals the page.
    private func flip(_ image: TestImage, _ section: BitmapChange.Section, bit: UInt64) throws -> UInt64 {
        let block = try image.superBlock()
        var sectionStart: UInt64 = 0
        for other in BitmapChange.Section.allCases {
            if other == section { break }
            let count = other == .clusters ? block.clusterCount
                : other == .metadataPages ? block.metadataPages.pageCount : block.blobIDLimit
            sectionStart += BitmapPage.pages(forBits: count)
        }
        let page = block.bitmaps.startPage + UInt64(block.activeCopy) * block.bitmaps.pageCount + sectionStart
            + bit / UInt64(BitmapPage.bitsPerPage)
        let within = Int(bit % UInt64(BitmapPage.bitsPerPage))
        try image.edit(page: page) { bytes in
            bytes[ArrayPage.headerBytes + within / 8] ^= 1 << (within % 8)
            TestImage.reseal(&bytes, over: 8..<4096, at: 4)
        }
        return page
    }

    func testLeakedClusterPageAndIDAreRepairedAndSayWhatChanged() throws {
        let image = try TestImage.populated()
        let block = try image.superBlock()
        let leakedCluster = block.clusterCount - 2
        let leakedPage = block.metadataPages.pageCount - 1
        let leakedID = block.blobIDLimit - 1
        _ = try flip(image, .clusters, bit: leakedCluster)
        _ = try flip(image, .metadataPages, bit: leakedPage)
        _ = try flip(image, .blobIDs, bit: leakedID)

        let report = try image.with { Verifier.verify($0) }
        XCTAssertEqual(Set(report.problems), [
            "1 clusters marked used but owned by nothing (first: [\(leakedCluster)])",
            "1 metadata pages marked used but owned by nothing (first: [\(leakedPage)])",
            "1 blob ids marked used but owned by nothing (first: [\(leakedID)])",
        ])
        // Leaks do not stop a load: read commands work.
        XCTAssertNoThrow(try image.with { try BlobStore.load($0, readOnly: true) })

        let repair = try image.with { StoreRepair.repair($0) }
        XCTAssertEqual(repair.outcome, .repaired, "\(repair.remaining)")
        XCTAssertEqual(Set(repair.fixed), Set(report.problems))
        XCTAssertEqual(repair.remaining, [])
        XCTAssertFalse(repair.bitmapsWereUnreadable)
        XCTAssertTrue(repair.rewrittenSuperBlockSlots.isEmpty)
        XCTAssertEqual(repair.bitmapChanges, [
            BitmapChange(section: .clusters, freedCount: 1, markedCount: 0, freed: [leakedCluster], marked: []),
            BitmapChange(section: .metadataPages, freedCount: 1, markedCount: 0, freed: [leakedPage], marked: []),
            BitmapChange(section: .blobIDs, freedCount: 1, markedCount: 0, freed: [leakedID], marked: []),
        ])
        // A second verify is clean; a second repair has nothing to do and writes nothing.
        XCTAssertEqual(try image.with { Verifier.verify($0) }.problems, [])
        let clean = try image.snapshot()
        XCTAssertEqual(try image.with { StoreRepair.repair($0) }.outcome, .clean)
        XCTAssertTrue(try image.snapshot() == clean, "a repair with nothing to do writes nothing")
        // The data is intact.
        try image.with { io in
            let (store, _) = try BlobStore.load(io, readOnly: true)
            XCTAssertEqual(try store.read(blob: image.blobs[1], offsetUnits: 0, countUnits: 1), [UInt8](repeating: 0x5A, count: 4096))
            XCTAssertEqual(store.blob(image.blobs[1])?.xattrs.first { $0.name == "colour" }?.value, Array("blue".utf8))
        }
    }

    func testStaleBitmapWithAnInUseClusterMarkedFreeIsRepaired() throws {
        // The dangerous direction: the allocator would hand the cluster out twice.
        let image = try TestImage.populated()
        let owned = try image.with { io in
            try XCTUnwrap(try BlobStore.load(io, readOnly: true).0.blob(image.blobs[0])?.extents.first).firstCluster
        }
        _ = try flip(image, .clusters, bit: owned)
        let report = try image.with { Verifier.verify($0) }
        XCTAssertEqual(report.problems, ["1 clusters in use but free in the bitmap (first: [\(owned)])"])
        let repair = try image.with { StoreRepair.repair($0) }
        XCTAssertEqual(repair.outcome, .repaired)
        XCTAssertEqual(repair.bitmapChanges, [BitmapChange(section: .clusters, freedCount: 0, markedCount: 1, freed: [], marked: [owned])])
        XCTAssertTrue(try image.with { Verifier.verify($0) }.isConsistent)
    }

    func testDamagedBitmapPageIsNamedAndRewritten() throws {
        let image = try TestImage.populated()
        let block = try image.superBlock()
        let page = block.bitmaps.startPage + UInt64(block.activeCopy) * block.bitmaps.pageCount
        try image.edit(page: page) { $0[1000] ^= 0xFF }
        let report = try image.with { Verifier.verify($0) }
        XCTAssertEqual(report.problems.count, 1, "\(report.problems)")
        XCTAssertMentions(report.problems[0], "bitmap page 0", "at byte \(page * 4096 + 4)", "CRC32C mismatch")
        let repair = try image.with { StoreRepair.repair($0) }
        XCTAssertEqual(repair.outcome, .repaired)
        XCTAssertTrue(repair.bitmapsWereUnreadable, "the old bitmaps did not decode: no bit-level diff")
        XCTAssertTrue(try image.with { Verifier.verify($0) }.isConsistent)
    }

    // MARK: - Super block

    func testOneDamagedSuperBlockSlotIsNamedAndRewritten() throws {
        let image = try TestImage.populated()
        let current = try image.with { try SuperBlockSlots.read($0).requireCurrent().slot }
        let other = UInt64(1 - current)
        try image.edit(page: other) { $0[70] ^= 0x01 }
        let slots = try image.with { try SuperBlockSlots.read($0) }
        XCTAssertEqual(slots.current?.slot, current)
        guard case let .failure(error) = slots.slots[Int(other)] else { return XCTFail("slot \(other) decodes") }
        XCTAssertEqual(error.offset, other * 4096 + 4092)

        let report = try image.with { Verifier.verify($0) }
        XCTAssertEqual(report.problems, ["super block at byte \(other * 4096 + 4092): \(error.description.split(separator: ":", maxSplits: 1)[1].dropFirst())"])
        XCTAssertNoThrow(try image.with { try BlobStore.load($0, readOnly: true) }, "the other slot serves")
        let repair = try image.with { StoreRepair.repair($0) }
        XCTAssertEqual(repair.outcome, .repaired)
        XCTAssertEqual(repair.rewrittenSuperBlockSlots.map(\.slot), [Int(other)])
        XCTAssertEqual(repair.rewrittenSuperBlockSlots.first?.problem, error)
        let after = try image.with { try SuperBlockSlots.read($0) }
        XCTAssertTrue(after.slots.allSatisfy { if case .success = $0 { true } else { false } })
    }

    func testNoValidSuperBlockIsUnreadableNamingBothSlots() throws {
        let image = try TestImage.populated()
        try image.edit(page: 0) { $0[0] = 0x42 ^ 0xFF }
        try image.edit(page: 1) { $0[4092] ^= 1 }
        try image.with { io in
            for attempt in [{ _ = try BlobStore.load(io, readOnly: true) }, { _ = try LogInspection.inspect(io) }] {
                XCTAssertThrowsError(try attempt()) { error in
                    guard case let .noSuperBlock(slot0, slot1) = error as? BlobStoreError else { return XCTFail("\(error)") }
                    XCTAssertEqual(slot0.offset, 0)
                    XCTAssertEqual(slot1.offset, 4096 + 4092)
                }
            }
            let report = Verifier.verify(io)
            XCTAssertEqual(report.problems.count, 2)
            XCTAssertMentions(report.problems[0], "super block at byte 0", "bad magic")
            XCTAssertMentions(report.problems[1], "super block at byte 8188", "CRC32C mismatch")
        }
        XCTAssertEqual(try image.with { StoreRepair.repair($0) }.outcome, .notRepairable)
    }

    // MARK: - Log

    func testLogInspectionAgreesWithReplayAfterACrash() throws {
        // The store left as a crash would: every transaction since the format is in the log.
        let image = try TestImage.populated(clean: false)
        let log = try image.with { try LogInspection.inspect($0) }
        try image.with { io in
            let (store, report) = try BlobStore.load(io, readOnly: true)
            let scan = try XCTUnwrap(store.lastScan)
            XCTAssertGreaterThan(report.replayedTransactions, 0)
            XCTAssertEqual(log.committedTransactions, report.replayedTransactions)
            XCTAssertEqual(log.uncommittedRecords, report.discardedRecords)
            XCTAssertEqual(log.endSequence, scan.endSequence)
            XCTAssertEqual(log.nextLSN, scan.nextLSN)
            XCTAssertEqual(log.stop, scan.stop)
            // The records replay applies are the committed ones, commit records aside, in order.
            let committed = log.pages.flatMap(\.records).filter { $0.status == .committed }
            XCTAssertEqual(committed.filter { if case .commit = $0.record { false } else { true } }.map(\.lsn),
                           scan.transactions.flatMap { $0 }.map(\.lsn))
        }
        XCTAssertFalse(log.isClean)
        XCTAssertEqual(log.pages.first?.sequence, log.tailSequence)
        XCTAssertEqual(log.laterPageCount, 0)
    }

    func testLogInspectionShowsAnUncommittedTransactionAndNothingAfterIt() throws {
        let image = try TestImage.populated()
        let tail = try image.superBlock().logTailSequence
        try image.appendTransaction([.setXattr(id: image.blobs[2], internal: false, name: "k", value: [1, 2])])
        var log = try image.with { try LogInspection.inspect($0) }
        XCTAssertEqual(log.committedTransactions, 1)
        XCTAssertEqual(log.transactions.map(\.recordCount), [2])
        XCTAssertEqual(log.pages.first?.records.map(\.status), [.committed, .committed])
        XCTAssertEqual(log.endSequence, tail + 1)
        XCTAssertNotNil(log.stop, "the next page is not of this lap")
        XCTAssertEqual(try image.with { try BlobStore.load($0, readOnly: true).1.replayedTransactions }, 1)

        try image.appendTransaction([.setXattr(id: image.blobs[2], internal: false, name: "k", value: [3])], commit: false)
        log = try image.with { try LogInspection.inspect($0) }
        XCTAssertEqual(log.committedTransactions, 0)
        XCTAssertEqual(log.uncommittedRecords, 1)
        XCTAssertEqual(log.transactions.map(\.committed), [false])
        XCTAssertEqual(log.pages.first?.records.map(\.status), [.uncommitted])
        XCTAssertEqual(log.endSequence, tail, "appending resumes over an uncommitted tail")
        XCTAssertEqual(try image.with { try BlobStore.load($0, readOnly: true).1.discardedRecords }, 1)
    }

    // MARK: - Truncation

    func testTruncatedImageIsUnreadableAndSaysSo() throws {
        let image = try TestImage.populated()
        let head = try image.page(0, count: image.pageCount / 2)
        let small = try TestImage(megabytes: 4)
        try small.write(page: 0, head)
        try small.with { io in
            XCTAssertThrowsError(try BlobStore.load(io, readOnly: true)) { error in
                guard case let .geometry(what) = error as? BlobStoreError else { return XCTFail("\(error)") }
                XCTAssertMentions(what, "truncated")
            }
            // (The verifier's side of it: HostileImageTests.testTruncatedImageIsNotCalledClean.)
            _ = Verifier.verify(io)
            // The log lies in the first pages: it still reads.
            let log = try LogInspection.inspect(io)
            XCTAssertEqual(log.committedTransactions, 0)
        }
        XCTAssertEqual(try small.with { StoreRepair.repair($0) }.outcome, .notRepairable)
    }

    func testImageCutInsideTheMetadataIsUnreadableNotACrash() throws {
        let image = try TestImage.populated()
        let block = try image.superBlock()
        // Cut in the middle of the bitmap copies: the table reads, the rest does not.
        let pages = block.bitmaps.startPage + 1
        let small = try TestImage(megabytes: 1)
        try small.write(page: 0, try image.page(0, count: min(pages, small.pageCount)))
        try small.with { io in
            XCTAssertThrowsError(try BlobStore.load(io, readOnly: true))
            XCTAssertFalse(Verifier.verify(io).isConsistent)
            XCTAssertNoThrow(try LogInspection.inspect(io))
        }
    }
}
