import XCTest
import Bdev
import BdevMalloc
import Env
@testable import Blobstore

/// Images mutated behind their checksums: random edits in the metadata structures with
/// every CRC recomputed, so that the edits reach the field checks (what a random bit flip
/// rarely makes). Every reader blobcli has must answer with a report or a typed error,
/// never trap or hang.
final class HostileImageTests: XCTestCase {
    /// Bounded fuzz: random edits in the metadata structures of a store with a pending
    /// log, checksums recomputed so that the edits reach the field checks. Every reader
    /// blobcli has must answer (a report, a typed error) and a writable load must either
    /// refuse or leave a store that verifies.
    func testResealedMutationsNeverTrapOrHang() throws {
        let iterations = ProcessInfo.processInfo.environment["BLOBCLI_FUZZ_ITERATIONS"].flatMap(Int.init) ?? 300
        let image = try TestImage.populated(clean: false)
        let pristine = try image.snapshot()
        let block = try image.superBlock()
        let logPages = (0..<block.log.pageCount).map { block.log.startPage + $0 }
        let chainPages = try image.with { io in
            try { let store = try BlobStore.load(io, readOnly: true).0; try store.readAllChains(); return store }().metadataPageOwners.map { block.metadataPages.startPage + UInt64($0.page) }
        }
        let targets: [UInt64] = [0, 1] + logPages.prefix(8) + chainPages
            + (0..<(2 * block.table.pageCount)).map { block.table.startPage + $0 }
            + (0..<(2 * block.bitmaps.pageCount)).map { block.bitmaps.startPage + $0 }
        var random = SplitMix64(seed: 0x5EA1)
        var outcomes: [String: Int] = [:]
        let started = ContinuousClock.now
        for iteration in 0..<iterations {
            let page = targets[Int(random.next() % UInt64(targets.count))]
            try image.edit(page: page) { bytes in
                for _ in 0..<(1 + Int(random.next() % 4)) {
                    // Headers and first descriptors/records, where the parsing is.
                    let at = random.next() % 3 == 0 ? Int(random.next() % 4096) : Int(random.next() % 256)
                    bytes[at] = random.next() % 3 == 0 ? 0xFF : UInt8(truncatingIfNeeded: random.next())
                }
                TestImage.resealPage(&bytes)
            }
            let iterationStart = ContinuousClock.now
            let before = try image.with { Verifier.verify($0) }
            try image.with { io in
                do {
                    let (store, _) = try BlobStore.load(io, readOnly: true)
                    for id in store.blobIDList.prefix(8) { _ = store.chainPages(id) }
                    outcomes["read-only load", default: 0] += 1
                } catch {
                    outcomes["read-only refused", default: 0] += 1
                }
                _ = try? LogInspection.inspect(io)
            }
            if iteration % 2 == 0 {
                try image.with { io in
                    do {
                        let (store, _) = try BlobStore.load(io)
                        try store.unload()
                        outcomes["writable load", default: 0] += 1
                    } catch {
                        outcomes["writable refused", default: 0] += 1
                        return
                    }
                    // A load reads no chain, so it does not rebuild what an edit of a chain
                    // made inconsistent with the bitmaps; it must never add a problem.
                    let after = Verifier.verify(io)
                    XCTAssertTrue(Set(after.problems).isSubset(of: Set(before.problems)),
                                  "iteration \(iteration), page \(page): a load and unload added problems: \(after.problems) (before: \(before.problems))")
                }
            }
            // Whatever the edit, a repair ends with a store that verifies; only a super block
            // the edit made unusable may be refused (the other slot is as old as the log).
            let repair = try image.with { StoreRepair.repair($0) }
            outcomes["repair \(repair.outcome.rawValue)", default: 0] += 1
            switch repair.outcome {
            case .clean, .repaired:
                let after = try image.with { Verifier.verify($0) }
                XCTAssertTrue(after.isConsistent, "iteration \(iteration), page \(page): after repair: \(after.problems)")
            case .notRepairable:
                XCTAssertLessThan(page, 2, "iteration \(iteration), page \(page): \(repair.refusal.map { "\($0)" } ?? "")")
            case .incomplete, .planned:
                XCTFail("iteration \(iteration), page \(page): \(repair.outcome): \(repair.refusal.map { "\($0)" } ?? "") \(repair.remaining)")
            }
            XCTAssertLessThan(ContinuousClock.now - iterationStart, .seconds(5), "iteration \(iteration), page \(page)")
            try image.restore(pristine)
        }
        print("resealed fuzz: \(iterations) images in \(ContinuousClock.now - started): \(outcomes.sorted { $0.key < $1.key })")
    }

    // MARK: - Crafted fields (valid checksums)

    /// Little-endian bytes of `value`.
    private static func le(_ value: UInt64, _ width: Int) -> [UInt8] {
        (0..<width).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
    }

    private static func descriptor(_ type: UInt8, _ payload: [UInt8]) -> [UInt8] {
        [type, 0] + le(UInt64(payload.count), 2) + payload
    }

    private static func blobInfo(clusterCount: UInt64) -> [UInt8] {
        descriptor(1, le(clusterCount, 8) + [UInt8](repeating: 0, count: 24))
    }

    private static func extents(_ list: [(index: UInt64, count: UInt32, first: UInt64)]) -> [UInt8] {
        descriptor(2, le(UInt64(list.count), 2) + list.flatMap { le($0.index, 8) + le(UInt64($0.count), 4) + le($0.first, 8) })
    }

    private static func xattr(name: [UInt8], value: [UInt8], isInternal: Bool = false) -> [UInt8] {
        descriptor(isInternal ? 4 : 3, le(UInt64(name.count), 2) + le(UInt64(value.count), 2) + name + value)
    }

    /// Replaces the one-page chain of `blob` with a page holding `descriptors` (header and
    /// CRC valid): what a crafted image carries where the encoder's preconditions never ran.
    private func craftChain(_ image: TestImage, blob: BlobID, _ descriptors: [[UInt8]]) throws -> (pageID: UInt32, offset: UInt64) {
        let pageID = try image.chain(of: blob)[0]
        let sequence = try image.superBlock().sequence
        let body = descriptors.flatMap { $0 }
        var bytes = Self.le(UInt64(MetadataPage.magic), 4) + Self.le(0, 4) + Self.le(blob.rawValue, 8) + Self.le(0, 4)
            + Self.le(UInt64(MetadataPage.noNextPage), 4) + Self.le(sequence, 8) + Self.le(UInt64(body.count), 2)
            + Self.le(UInt64(descriptors.count), 2) + Self.le(0, 4) + body
        bytes += [UInt8](repeating: 0, count: TestImage.pageBytes - bytes.count)
        TestImage.resealPage(&bytes)
        let page = try image.metadataPage(pageID)
        try image.write(page: page, bytes)
        return (pageID, page * UInt64(TestImage.pageBytes))
    }

    /// Sets the 8-byte field at `offset` of both super block slots and reseals them, so that
    /// no older slot serves instead.
    private func setSuperBlockField(_ image: TestImage, at offset: Int, _ value: UInt64) throws {
        for slot: UInt64 in [0, 1] {
            try image.edit(page: slot) { bytes in
                bytes.replaceSubrange(offset..<(offset + 8), with: Self.le(value, 8))
                TestImage.resealPage(&bytes)
            }
        }
    }

    /// Every reader blobcli has, on `image`: none may trap; the verifier must not call it
    /// clean unless `consistent`; loads must refuse (`loadRefuses`) with a typed error.
    /// `repairs`: a repair rebuilds the store (the damage is in one blob's chain, which it
    /// removes) and it verifies after; otherwise the repair refuses and writes nothing
    /// (no usable super block).
    private func assertRefused(_ image: TestImage, mentioning parts: [String], verifierMentions: [String]? = nil,
                               logInspects: Bool = true, repairs: Bool = false,
                               file: StaticString = #filePath, line: UInt = #line) throws {
        let started = ContinuousClock.now
        let report = try image.with { Verifier.verify($0) }
        XCTAssertFalse(report.isConsistent, "the verifier calls it clean", file: file, line: line)
        XCTAssertLessThan(report.problems.count, 20, "\(report.problems.prefix(20))", file: file, line: line)
        let problems = report.problems.joined(separator: "\n")
        for part in verifierMentions ?? parts { XCTAssertMentions(problems, part, file: file, line: line) }
        // A load reads no chain: reading them all (list, the checks) refuses it.
        for readOnly in [true, false] {
            try image.with { io in
                XCTAssertThrowsError(try BlobStore.load(io, readOnly: readOnly).0.readAllChains(), file: file, line: line) { error in
                    guard let error = error as? BlobStoreError else { return XCTFail("untyped \(error)", file: file, line: line) }
                    for part in parts { XCTAssertMentions("\(error)", part, file: file, line: line) }
                }
            }
        }
        if logInspects {
            XCTAssertNoThrow(try image.with { try LogInspection.inspect($0) }, file: file, line: line)
        } else {
            try image.with { io in
                XCTAssertThrowsError(try LogInspection.inspect(io), file: file, line: line) { error in
                    XCTAssertNotNil(error as? BlobStoreError, "untyped \(error)", file: file, line: line)
                }
            }
        }
        let before = try image.snapshot()
        let repair = try image.with { StoreRepair.repair($0) }
        if repairs {
            XCTAssertEqual(repair.outcome, .repaired, "\(repair.remaining)", file: file, line: line)
            XCTAssertEqual(repair.removedBlobs.count, 1, "\(repair.changes)", file: file, line: line)
            XCTAssertTrue(try image.with { Verifier.verify($0) }.isConsistent, file: file, line: line)
        } else {
            XCTAssertEqual(repair.outcome, .notRepairable, file: file, line: line)
            XCTAssertTrue(try image.snapshot() == before, "a refused repair writes nothing", file: file, line: line)
        }
        XCTAssertLessThan(ContinuousClock.now - started, .seconds(5), file: file, line: line)
    }

    /// A crafted log record the decoder must refuse: the valid log ends before it (its
    /// transaction is not applied), the scan names the record, and a writable load leaves
    /// a store that verifies.
    private func assertLogEndsAt(_ records: [LogRecord], mentioning parts: [String],
                                 file: StaticString = #filePath, line: UInt = #line) throws {
        let image = try TestImage.populated()
        let block = try image.superBlock()
        let blobs = try image.with { io in try image.blobs.map { try BlobStore.load(io, readOnly: true).0.blob($0) } }
        try image.appendTransaction(records)
        let expected = ["log page \(block.logTailSequence) record 0"] + parts
        for readOnly in [true, false] {
            try image.with { io in
                let (store, report) = try BlobStore.load(io, readOnly: readOnly)
                XCTAssertEqual(report.replayedTransactions, 0, file: file, line: line)
                let stop = try XCTUnwrap(report.logStop, file: file, line: line)
                for part in expected { XCTAssertMentions("\(stop)", part, file: file, line: line) }
                XCTAssertEqual(image.blobs.map { store.blob($0) }, blobs, "nothing of the transaction applied", file: file, line: line)
                if !readOnly { try store.unload() }
            }
        }
        let log = try image.with { try LogInspection.inspect($0) }
        for part in expected { XCTAssertMentions("\(try XCTUnwrap(log.stop, file: file, line: line))", part, file: file, line: line) }
        XCTAssertTrue(try image.with { Verifier.verify($0) }.isConsistent, file: file, line: line)
    }

    /// Was: arithmetic overflow in replay (BlobStore+Apply, map extent: blob index +
    /// length, first device cluster + length).
    func testReplayedExtentNearUInt64MaxEndsTheLog() throws {
        let image = try TestImage.populated()
        let blob = image.blobs[0]
        try assertLogEndsAt([.mapExtent(id: blob, extent: Extent(clusterIndex: UInt64.max - 1, count: 4, firstCluster: 0))],
                            mentioning: ["extent"])
        try assertLogEndsAt([.mapExtent(id: blob, extent: Extent(clusterIndex: 1, count: 4, firstCluster: UInt64.max - 1))],
                            mentioning: ["extent"])
        try assertLogEndsAt([.resizeBlob(id: blob, clusterCount: UInt64.max)], mentioning: ["blob size"])
    }

    /// In range for the arithmetic, out of range for the store: the replay refuses with a
    /// typed error (the log contradicts the checkpoint) rather than trusting it.
    func testReplayedExtentBeyondTheDeviceIsRefused() throws {
        let image = try TestImage.populated()
        let block = try image.superBlock()
        try image.appendTransaction([.resizeBlob(id: image.blobs[2], clusterCount: 8),
                                     .mapExtent(id: image.blobs[2], extent: Extent(clusterIndex: 0, count: 4,
                                                                                   firstCluster: block.clusterCount - 2))])
        for readOnly in [true, false] {
            try image.with { io in
                XCTAssertThrowsError(try BlobStore.load(io, readOnly: readOnly)) { error in
                    guard case let .corrupt(what) = error as? BlobStoreError else { return XCTFail("\(error)") }
                    XCTAssertMentions(what, "extent out of range")
                }
            }
        }
    }

    /// Was: arithmetic overflow in replay (BlobStore+Apply, unmap: index + count).
    func testReplayedUnmapNearUInt64MaxEndsTheLog() throws {
        try assertLogEndsAt([.unmapClusters(id: try TestImage.populated().blobs[0], clusterIndex: UInt64.max - 2, count: 10)],
                            mentioning: ["unmap"])
    }

    /// Was: a precondition in MetadataPage.descriptors when the checkpoint after a writable
    /// load encoded a 600-byte xattr name replayed from the log.
    func testOversizedXattrNameInTheLogEndsTheLog() throws {
        let blob = try TestImage.populated().blobs[1]
        let long = String(repeating: "n", count: 600)
        try assertLogEndsAt([.setXattr(id: blob, internal: false, name: long, value: [1])], mentioning: ["xattr name", "600"])
        try assertLogEndsAt([.setXattr(id: blob, internal: true, name: long, value: [])], mentioning: ["xattr name", "600"])
        try assertLogEndsAt([.removeXattr(id: blob, internal: false, name: long)], mentioning: ["xattr name", "600"])
    }

    /// Was: the verifier called clean a chain with a 600-byte xattr name (which a writable
    /// load would then fail to re-encode).
    func testOversizedXattrNameInMetadataIsAFormatError() throws {
        let image = try TestImage.populated()
        let (pageID, _) = try craftChain(image, blob: image.blobs[2], [
            Self.blobInfo(clusterCount: 0), Self.xattr(name: [UInt8](repeating: 0x61, count: 600), value: [1, 2]),
        ])
        try assertRefused(image, mentioning: ["metadata page \(pageID)", "xattr name", "600"], repairs: true)
    }

    /// Was: arithmetic overflow in MetadataPage.decodeBlob (the last extent's end against the
    /// blob size) and in the verifier (first device cluster + length).
    func testMetadataExtentNearUInt64MaxIsAFormatError() throws {
        let image = try TestImage.populated()
        let pristine = try image.snapshot()
        var (pageID, offset) = try craftChain(image, blob: image.blobs[2], [
            Self.blobInfo(clusterCount: 4), Self.extents([(UInt64.max - 1, 4, 0)]),
        ])
        // The extent's first field: page header, blob info descriptor, extents descriptor header, count.
        let extentAt = offset + UInt64(MetadataPage.headerBytes + 36 + 4 + 2)
        try assertRefused(image, mentioning: ["metadata page \(pageID)", "at byte \(extentAt)", "extent"], repairs: true)
        try image.restore(pristine)
        (pageID, offset) = try craftChain(image, blob: image.blobs[2], [
            Self.blobInfo(clusterCount: 4), Self.extents([(0, 4, UInt64.max - 1)]),
        ])
        try assertRefused(image, mentioning: ["metadata page \(pageID)", "at byte \(extentAt)", "extent"], repairs: true)
    }

    /// Was: the test process died (the verifier listed each of ~4 billion clusters beyond
    /// the device). Now the decoder names the extent, in time independent of its length.
    func testExtentOfBillionsOfClustersBeyondTheDeviceIsNamedAtOnce() throws {
        let image = try TestImage.populated()
        let (pageID, offset) = try craftChain(image, blob: image.blobs[2], [
            Self.blobInfo(clusterCount: UInt64(UInt32.max)), Self.extents([(0, UInt32.max, 10)]),
        ])
        let extentAt = offset + UInt64(MetadataPage.headerBytes + 36 + 4 + 2)
        try assertRefused(image, mentioning: ["metadata page \(pageID)", "at byte \(extentAt)", "extent", "device"], repairs: true)
    }

    /// Was: arithmetic overflow in the log scanner (tail sequence + log pages), in the
    /// verifier (checkpoint LSN + 1) and, for a writable load, in the checkpoint (sequence + 1).
    func testSequencesNearUInt64MaxAreRefusedAtDecode() throws {
        let image = try TestImage.populated()
        let pristine = try image.snapshot()
        for (offset, name) in [(192, "log tail sequence"), (184, "checkpoint LSN"), (40, "sequence")] {
            try setSuperBlockField(image, at: offset, UInt64.max)
            try assertRefused(image, mentioning: ["super block", "at byte \(offset)", name], logInspects: false)
            try image.restore(pristine)
        }
    }

    /// Was: arithmetic overflow in the load's device-size check (device pages 1 << 60).
    func testHugeDevicePagesIsRefused() throws {
        let image = try TestImage.populated()
        try setSuperBlockField(image, at: 80, 1 << 60)
        try assertRefused(image, mentioning: ["super block", "at byte 80", "device pages"], logInspects: false)
    }

    /// A device size that the arithmetic takes but the device does not have: the loads say
    /// so, and so does the verifier (it used to call such a store clean).
    func testDevicePagesBeyondTheDeviceIsReported() throws {
        let image = try TestImage.populated()
        let block = try image.superBlock()
        // Keep the regions' layout valid: only the data region grows (device pages and cluster count).
        try setSuperBlockField(image, at: 80, 1 << 40)
        try setSuperBlockField(image, at: 160, ((1 << 40) - block.dataStartPage) / block.clusterPages)
        // The bitmaps no longer cover the clusters either: the verifier names both.
        try assertRefused(image, mentioning: ["\(1 << 40) pages", "truncated"],
                          verifierMentions: ["\(1 << 40) pages", "truncated", "bitmap region pages"])
        let only = try TestImage.populated()
        try setSuperBlockField(only, at: 80, 1 << 40)
        try assertRefused(only, mentioning: ["\(1 << 40) pages"])
    }

    /// Was: the verifier called a truncated image (data region cut) clean.
    func testTruncatedImageIsNotCalledClean() throws {
        let image = try TestImage.populated()
        let small = try TestImage(megabytes: 6)
        try small.write(page: 0, try image.page(0, count: small.pageCount))
        try assertRefused(small, mentioning: ["truncated"])
    }

    /// Was: index out of range in the verifier (a bitmap region too small for its bitmaps).
    func testBitmapRegionTooSmallIsAFormatError() throws {
        let image = try TestImage.populated()
        try setSuperBlockField(image, at: 128, 1)
        let slot = try image.superBlock().slot
        try assertRefused(image, mentioning: ["super block at byte \(slot * 4096 + 128)", "bitmap region pages (3 needed) 1"])
    }
}
