import XCTest
import Bdev
import BdevMalloc
import Env
@testable import Blobstore

/// `fsck --repair` at the blob-store level (`StoreRepair`, `BlobStore.salvage`): each
/// damage is repaired into a store that verifies, each change is listed, what the damage
/// did not reach is kept exactly, a dry run writes nothing, and the undo file gives back
/// every byte the repair overwrote.
final class RepairTests: XCTestCase {
    /// Every blob's metadata and data, to compare before and after.
    private func contents(_ image: TestImage) throws -> [BlobID: (BlobMetadata, [UInt8])] {
        try image.with { io in
            let (store, _) = try BlobStore.load(io, readOnly: true)
            var result: [BlobID: (BlobMetadata, [UInt8])] = [:]
            for id in store.blobIDList {
                let blob = try XCTUnwrap(store.blob(id))
                let data = blob.clusterCount == 0 ? [] : try store.read(blob: id, offsetUnits: 0, countUnits: blob.clusterCount)
                result[id] = (blob, data)
            }
            return result
        }
    }

    private func assertSameContents(_ image: TestImage, _ expected: [BlobID: (BlobMetadata, [UInt8])],
                                    except: Set<BlobID> = [], file: StaticString = #filePath, line: UInt = #line) throws {
        let now = try contents(image)
        for (id, (blob, data)) in expected where !except.contains(id) {
            guard let found = now[id] else { return XCTFail("blob \(id) is gone", file: file, line: line) }
            XCTAssertEqual(found.0, blob, "blob \(id)", file: file, line: line)
            XCTAssertTrue(found.1 == data, "blob \(id): data differs", file: file, line: line)
        }
    }

    private func repairAndVerify(_ image: TestImage, options: RepairOptions = RepairOptions(),
                                 file: StaticString = #filePath, line: UInt = #line) throws -> RepairReport {
        let repair = try image.with { StoreRepair.repair($0, options: options) }
        XCTAssertEqual(repair.outcome, .repaired, "\(repair.refusal.map { "\($0)" } ?? "") \(repair.remaining)", file: file, line: line)
        XCTAssertEqual(try image.with { Verifier.verify($0) }.problems, [], file: file, line: line)
        return repair
    }

    private func activeTablePage(_ image: TestImage) throws -> UInt64 {
        let block = try image.superBlock()
        return block.table.startPage + UInt64(block.activeCopy) * block.table.pageCount
    }

    // MARK: - Blob table

    func testDamagedTablePageIsTakenFromTheOtherCopyWhenTheCheckpointLeftThemTheSame() throws {
        let image = try TestImage.populated()
        // A checkpoint that changes no blob writes no table page: both copies hold the same.
        try image.with { io in try BlobStore.load(io).0.unload() }
        let expected = try contents(image)
        let page = try activeTablePage(image)
        try image.edit(page: page) { $0[100] ^= 0x10 }
        XCTAssertMentions(try image.with { Verifier.verify($0) }.problems.joined(), "blob table page 0", "at byte \(page * 4096 + 4)")
        let repair = try repairAndVerify(image)
        let change = try XCTUnwrap(repair.changes.first { $0.kind == "table_page" })
        XCTAssertMentions(change.text, "blob table page 0", "rebuilt from copy")
        XCTAssertEqual(repair.affectedBlobs, [])
        try assertSameContents(image, expected)
    }

    func testDamagedTablePageWithAStaleOtherCopyIsRebuiltFromTheChains() throws {
        // A blob deleted after its chain was written leaves that chain in a free page: the
        // scan must not bring it back (its id is free in the bitmap).
        let image = try TestImage(megabytes: 8)
        var ghost = BlobID(rawValue: 0)
        try image.format { store in
            ghost = try store.createBlob(clusterCount: 1, xattrs: [("ghost", [1])])
            try store.write(blob: ghost, offsetUnits: 0, data: [UInt8](repeating: 0x66, count: 4096))
            try store.checkpoint()
            for index in 0..<5 {
                let id = try store.createBlob(clusterCount: 2, xattrs: [("n", [UInt8(index)])])
                try store.write(blob: id, offsetUnits: 0, data: [UInt8](repeating: UInt8(index + 1), count: 8192))
            }
            try store.deleteBlob(ghost)
        }
        let expected = try contents(image)
        XCTAssertNil(expected[ghost])
        let page = try activeTablePage(image)
        try image.edit(page: page) { $0[0] = 0 }
        let repair = try repairAndVerify(image)
        let change = try XCTUnwrap(repair.changes.first { $0.kind == "table_page" })
        XCTAssertMentions(change.text, "blob table page 0", "bad magic", "rebuilt from the metadata chains", "5 blobs found")
        XCTAssertEqual(Set(repair.changes.filter { $0.kind == "blob_recovered" }.compactMap(\.blob)), Set(expected.keys))
        try assertSameContents(image, expected)
        XCTAssertEqual(Set(try contents(image).keys), Set(expected.keys), "the deleted blob stays deleted")
    }

    // MARK: - Chains

    func testChainCutAtADamagedSecondPageKeepsWhatTheFirstHolds() throws {
        let image = try TestImage(megabytes: 8)
        var big = BlobID(rawValue: 0)
        var other = BlobID(rawValue: 0)
        try image.format { store in
            big = try store.createBlob(clusterCount: 1, xattrs: (0..<4).map { ("x\($0)", [UInt8](repeating: UInt8($0), count: 1500)) })
            try store.write(blob: big, offsetUnits: 0, data: [UInt8](repeating: 0x42, count: 4096))
            other = try store.createBlob(clusterCount: 1)
            try store.write(blob: other, offsetUnits: 0, data: [UInt8](repeating: 0x43, count: 4096))
        }
        let expected = try contents(image)
        let chain = try image.chain(of: big)
        XCTAssertGreaterThanOrEqual(chain.count, 2)
        try image.edit(page: try image.metadataPage(chain[1])) { $0[2000] ^= 1 }
        let repair = try repairAndVerify(image)
        let change = try XCTUnwrap(repair.changes.first { $0.kind == "blob_cut" })
        XCTAssertEqual(change.blob, big)
        XCTAssertMentions(change.text, "metadata page \(chain[1])", "CRC32C mismatch", "first 1 metadata page")
        XCTAssertEqual(repair.affectedBlobs, [big])
        let now = try contents(image)
        let kept = try XCTUnwrap(now[big])
        XCTAssertEqual(kept.1, expected[big]!.1, "blob info and extents are on the first page: the data stays")
        XCTAssertEqual(kept.0.xattrs.count, 2, "the xattrs of the first page")
        XCTAssertEqual(try image.chain(of: big).count, 1, "the chain is rewritten without the lost page")
        try assertSameContents(image, expected, except: [big])
    }

    // MARK: - Super block

    func testDamagedCurrentSlotFallsBackToTheOlderOneAndReplaysTheLogFromIt() throws {
        let image = try TestImage.populated()
        let expected = try contents(image)
        let current = try image.superBlock()
        try image.edit(page: UInt64(current.slot)) { $0[50] ^= 4 }
        XCTAssertLessThan(try image.superBlock().sequence, current.sequence, "the older slot is what is left")
        let repair = try repairAndVerify(image)
        XCTAssertMentions(repair.changes[0].text, "super block at byte \(current.slot * 4096 + 4092)", "slot \(current.slot) is rewritten")
        XCTAssertGreaterThan(repair.replayedTransactions, 0, "what the lost checkpoint held is in the log after the older one")
        try assertSameContents(image, expected)
        XCTAssertEqual(Set(try contents(image).keys), Set(expected.keys))
    }

    func testAnAnnouncementServesWhenTheOtherSlotIsDamaged() throws {
        let image = try TestImage.populated()
        let expected = try contents(image)
        let current = try image.superBlock()
        var announcement = current
        announcement.sequence += 1
        announcement.isCheckpointIntent = true
        announcement.changedSincePrevious = []
        try image.write(page: UInt64(announcement.slot), announcement.encode())
        try image.edit(page: UInt64(current.slot)) { $0[0] = 0 }
        XCTAssertThrowsError(try image.with { try BlobStore.load($0, readOnly: true) })
        let repair = try repairAndVerify(image)
        XCTAssertMentions(repair.changes.map(\.text).joined(separator: "\n"), "announcement of checkpoint \(announcement.sequence)")
        try assertSameContents(image, expected)
    }

    func testBothSlotsDamagedIsRefusedWithNothingWritten() throws {
        let image = try TestImage.populated()
        try image.edit(page: 0) { $0[9] ^= 1 }
        try image.edit(page: 1) { $0[9] ^= 1 }
        let before = try image.snapshot()
        let repair = try image.with { StoreRepair.repair($0) }
        XCTAssertEqual(repair.outcome, .notRepairable)
        guard case .noSuperBlock = repair.refusal else { return XCTFail("\(String(describing: repair.refusal))") }
        XCTAssertTrue(try image.snapshot() == before)
    }

    // MARK: - Log

    func testReplayDropsTheRecordsOfARemovedBlobAndAppliesTheRest() throws {
        let image = try TestImage.populated()
        try image.appendTransaction([.setXattr(id: image.blobs[1], internal: false, name: "k", value: [1]),
                                     .setXattr(id: image.blobs[2], internal: false, name: "k", value: [2])])
        try image.edit(page: try image.metadataPage(try image.chain(of: image.blobs[1])[0])) { $0[3000] ^= 1 }
        let repair = try repairAndVerify(image)
        XCTAssertEqual(repair.replayedTransactions, 1)
        let dropped = try XCTUnwrap(repair.changes.first { $0.kind == "log_records_dropped" })
        XCTAssertEqual(dropped.blob, image.blobs[1])
        XCTAssertMentions(dropped.text, "1 record about blob \(image.blobs[1])", "no such blob")
        try image.with { io in
            let (store, _) = try BlobStore.load(io, readOnly: true)
            XCTAssertEqual(store.xattr(image.blobs[2], name: "k"), [2])
        }
    }

    func testALogCreateOfAnIdTheCheckpointHoldsReplacesTheStaleBlob() throws {
        let image = try TestImage.populated()
        let stale = image.blobs[0]
        try image.appendTransaction([.createBlob(id: stale), .setXattr(id: stale, internal: false, name: "new", value: [9])])
        XCTAssertThrowsError(try image.with { try BlobStore.load($0, readOnly: true) })
        let repair = try repairAndVerify(image)
        XCTAssertTrue(repair.changes.contains { $0.kind == "blob_removed" && $0.blob == stale }, "\(repair.changes)")
        try image.with { io in
            let (store, _) = try BlobStore.load(io, readOnly: true)
            XCTAssertEqual(store.blob(stale)?.extents, [], "the new blob, not the old one's data")
            XCTAssertEqual(store.xattr(stale, name: "new"), [9])
        }
    }

    func testPagesOfThisStorePastTheTailAreZeroed() throws {
        let image = try TestImage.populated()
        let block = try image.superBlock()
        // A page of this store one past the tail (as a torn earlier page leaves the ones
        // written after it): after new commits it could line up and be replayed.
        let next = block.logTailSequence + 1
        let page = LogPage.encode(sequence: next, storeTag: block.storeID.0, records: [
            LoggedRecord(lsn: block.checkpointLSN + 5, transaction: block.checkpointLSN + 5, record: .deleteBlob(id: image.blobs[0])),
            LoggedRecord(lsn: block.checkpointLSN + 6, transaction: block.checkpointLSN + 5, record: .commit(recordCount: 2)),
        ])
        let at = block.log.startPage + next % block.log.pageCount
        try image.write(page: at, page)
        // Something for the repair to do.
        try image.edit(page: try activeTablePage(image)) { $0[0] = 0 }
        let repair = try repairAndVerify(image)
        XCTAssertEqual(repair.clearedLogPages, [next])
        XCTAssertMentions(repair.changes.last?.text ?? "", "zeroed 1 pages past the new tail")
        XCTAssertEqual(try image.page(at), [UInt8](repeating: 0, count: 4096))
    }

    // MARK: - Dry run and undo

    private func damagedImage() throws -> TestImage {
        let image = try TestImage.populated()
        try image.edit(page: try image.metadataPage(try image.chain(of: image.blobs[1])[0])) { $0[300] ^= 0x40 }
        try image.edit(page: try activeTablePage(image)) { $0[4000] ^= 1 }
        return image
    }

    func testADryRunListsTheChangesOfTheRepairAndWritesNothing() throws {
        let image = try damagedImage()
        let before = try image.snapshot()
        let planned = try image.with { StoreRepair.repair($0, options: RepairOptions(dryRun: true)) }
        XCTAssertEqual(planned.outcome, .planned)
        XCTAssertTrue(try image.snapshot() == before, "a dry run writes nothing")
        XCTAssertFalse(planned.changes.isEmpty)
        let done = try repairAndVerify(image)
        XCTAssertEqual(planned.changes, done.changes)
        XCTAssertEqual(planned.bitmapChanges, done.bitmapChanges)
        XCTAssertEqual(planned.removedBlobs, done.removedBlobs)
    }

    private func temporaryPath(_ name: String) -> String {
        let path = NSTemporaryDirectory() + "/repair-tests-\(getpid())-\(name)"
        unlink(path)
        return path
    }

    func testTheUndoFileGivesBackEveryOverwrittenByte() throws {
        let image = try damagedImage()
        let before = try image.snapshot()
        let path = temporaryPath("undo")
        defer { unlink(path) }
        let repair = try repairAndVerify(image, options: RepairOptions(undoPath: path))
        XCTAssertEqual(repair.undoPath, path)
        XCTAssertGreaterThan(repair.undoPageCount, 0)
        let repaired = try image.snapshot()
        XCTAssertFalse(repaired == before)
        let contents = try UndoFile.read(path: path)
        XCTAssertTrue(contents.header.isComplete)
        XCTAssertEqual(contents.pages.count, repair.undoPageCount)
        // Every page that differs is in the file, and nothing else changed.
        var changed: Set<UInt64> = []
        for page in 0..<Int(image.pageCount) {
            let range = (page * 4096)..<((page + 1) * 4096)
            if repaired[range] != before[range] { changed.insert(UInt64(page)) }
        }
        XCTAssertTrue(changed.isSubset(of: Set(contents.pages.map(\.page))))
        let applied = try image.with { try UndoFile.apply(contents, to: $0) }
        XCTAssertEqual(applied.restoredPages.count, contents.pages.count)
        XCTAssertTrue(try image.snapshot() == before, "the device is as it was before the repair")
        // An existing undo file is never overwritten: the repair refuses, writing nothing.
        let refused = try image.with { StoreRepair.repair($0, options: RepairOptions(undoPath: path)) }
        XCTAssertEqual(refused.outcome, .notRepairable)
        XCTAssertMentions("\(String(describing: refused.refusal))", "undo file", path)
        XCTAssertTrue(try image.snapshot() == before)
    }

    func testAnUndoFileIsRefusedWhenTheDeviceChangedSinceOrItIsDamaged() throws {
        let image = try damagedImage()
        let path = temporaryPath("undo-refused")
        defer { unlink(path) }
        _ = try repairAndVerify(image, options: RepairOptions(undoPath: path))
        // Mounted and changed since: the super block pages differ from what the repair left.
        try image.with { io in
            let (store, _) = try BlobStore.load(io)
            try store.unload()
        }
        let changed = try image.snapshot()
        let contents = try UndoFile.read(path: path)
        try image.with { io in
            XCTAssertThrowsError(try UndoFile.apply(contents, to: io)) { error in
                XCTAssertMentions("\(error)", "super block pages changed", "--force")
            }
        }
        XCTAssertTrue(try image.snapshot() == changed)
        XCTAssertNoThrow(try image.with { try UndoFile.apply(contents, to: $0, force: true) })
        // A damaged entry: refused as a whole, naming the entry and its offset in the file.
        let fd = open(path, O_RDWR)
        var byte: UInt8 = 0
        XCTAssertEqual(pread(fd, &byte, 1, off_t(UndoFile.headerBytes + 100)), 1)
        byte ^= 1
        XCTAssertEqual(pwrite(fd, &byte, 1, off_t(UndoFile.headerBytes + 100)), 1)
        close(fd)
        XCTAssertThrowsError(try UndoFile.read(path: path)) { error in
            XCTAssertMentions("\(error)", "entry 0", "at byte \(UndoFile.headerBytes + 4)", "CRC32C mismatch")
        }
    }

    func testTheUndoFileOfAnInterruptedRepairKeepsItsWholeEntries() throws {
        let image = try damagedImage()
        let path = temporaryPath("undo-torn")
        defer { unlink(path) }
        _ = try repairAndVerify(image, options: RepairOptions(undoPath: path))
        let whole = try UndoFile.read(path: path)
        // As a repair cut short while appending its last entry leaves it.
        var header = whole.header
        header.isComplete = false
        let fd = open(path, O_RDWR)
        let encoded = header.encode()
        XCTAssertEqual(pwrite(fd, encoded, encoded.count, 0), encoded.count)
        XCTAssertEqual(ftruncate(fd, off_t(UndoFile.headerBytes + whole.pages.count * UndoFile.entryBytes - 100)), 0)
        close(fd)
        let torn = try UndoFile.read(path: path)
        XCTAssertTrue(torn.tornTail)
        XCTAssertEqual(torn.pages.map(\.page), whole.pages.dropLast().map(\.page))
    }
}
