import XCTest
import Env
@testable import Blobstore

/// Boundary cases of the on-disk format, with bytes edited on purpose (LevelDB's
/// log_test style): every bad input is a typed FormatError naming the structure and
/// offset, never a crash.
final class FormatTests: XCTestCase {
    static func sampleSuperBlock() -> SuperBlock {
        SuperBlock(sequence: 7, storeID: (0x1122, 0x3344), blockSizeBytes: 4096, clusterSizeBytes: 4096, isClean: true,
                   devicePages: 1 << 18, log: .init(startPage: 2, pageCount: 256),
                   table: .init(startPage: 258, pageCount: 4), bitmaps: .init(startPage: 266, pageCount: 4),
                   metadataPages: .init(startPage: 274, pageCount: 4096), dataStartPage: 4370,
                   clusterCount: (1 << 18) - 4370, blobIDLimit: 4 * UInt64(TablePage.entriesPerPage), activeCopy: 1,
                   checkpointLSN: 99, logTailSequence: 12, superBlobID: BlobID(rawValue: 3))
    }

    static func sampleBlob(extents: Int = 3) -> BlobMetadata {
        BlobMetadata(
            id: BlobID(rawValue: 42), clusterCount: UInt64(extents) * 10 + 5, flags: BlobFlags(readOnlyMetadata: 2),
            extents: (0..<extents).map { Extent(clusterIndex: UInt64($0) * 10, count: 7, firstCluster: 1000 + UInt64($0) * 64) },
            xattrs: [("name", Array("file.txt".utf8)), ("empty", [])],
            internalXattrs: [("fs.inode", [1, 2, 3, 4])])
    }

    /// Recomputes a structure's CRC after an edit, so the edit reaches field validation.
    static func reseal(_ bytes: inout [UInt8], over range: Range<Int>, at: Int) {
        let crc = bytes[range].withUnsafeBytes { CRC32C.checksum($0) }
        for index in 0..<4 { bytes[at + index] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(index))) }
    }

    private func expectProblem<T>(_ expected: FormatError.Problem, structure: String? = nil, offset: UInt64? = nil,
                                  _ body: () throws -> T, file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try body()
            XCTFail("decoded; expected \(expected)", file: file, line: line)
        } catch let error as FormatError {
            XCTAssertEqual(error.problem, expected, "\(error)", file: file, line: line)
            if let structure { XCTAssertEqual(error.structure, structure, file: file, line: line) }
            if let offset { XCTAssertEqual(error.offset, offset, "\(error)", file: file, line: line) }
        } catch {
            XCTFail("unexpected \(error)", file: file, line: line)
        }
    }

    // MARK: - Super block

    func testSuperBlockRoundTrip() throws {
        let block = Self.sampleSuperBlock()
        let bytes = block.encode()
        XCTAssertEqual(bytes.count, 4096)
        XCTAssertEqual(Array(bytes[0..<8]), Array("BLOBSTOR".utf8))
        XCTAssertEqual(try SuperBlock.decode(bytes[...], offset: 4096), block)
        XCTAssertEqual(block.slot, 1)
    }

    func testSuperBlockBadMagic() {
        var bytes = Self.sampleSuperBlock().encode()
        bytes[0] = UInt8(ascii: "X")
        expectProblem(.badMagic(found: 0x524F_5453_424F_4C58), structure: "super block", offset: 4096) {
            try SuperBlock.decode(bytes[...], offset: 4096)
        }
    }

    func testSuperBlockBadChecksum() {
        var bytes = Self.sampleSuperBlock().encode()
        bytes[200] ^= 1
        do {
            _ = try SuperBlock.decode(bytes[...], offset: 0)
            XCTFail("decoded a corrupt super block")
        } catch let error as FormatError {
            guard case .badChecksum = error.problem else { return XCTFail("\(error)") }
            XCTAssertEqual(error.offset, 4092)
        } catch { XCTFail("\(error)") }
    }

    func testSuperBlockTruncated() {
        let bytes = Self.sampleSuperBlock().encode()
        expectProblem(.truncated(needed: 4096, available: 4000), offset: 0) { try SuperBlock.decode(bytes[0..<4000], offset: 0) }
    }

    func testSuperBlockUnknownIncompatibleFeature() {
        var bytes = Self.sampleSuperBlock().encode()
        bytes[16 + 5] = 0x80  // bit 47 of the incompatible set
        Self.reseal(&bytes, over: 0..<4092, at: 4092)
        expectProblem(.unknownIncompatibleFeatures(1 << 47), offset: 16) { try SuperBlock.decode(bytes[...], offset: 0) }
    }

    func testSuperBlockUnknownReadOnlyFeaturesAreKept() throws {
        var bytes = Self.sampleSuperBlock().encode()
        bytes[24] = 0x01
        bytes[32] = 0x02
        Self.reseal(&bytes, over: 0..<4092, at: 4092)
        let block = try SuperBlock.decode(bytes[...], offset: 0)
        XCTAssertEqual(block.readOnlyDataFeatures, 1)
        XCTAssertEqual(block.readOnlyMetadataFeatures, 2)
    }

    func testSuperBlockUnsupportedVersionAndReservedBytes() {
        var bytes = Self.sampleSuperBlock().encode()
        bytes[8] = 2
        Self.reseal(&bytes, over: 0..<4092, at: 4092)
        expectProblem(.unsupportedVersion(2), offset: 8) { try SuperBlock.decode(bytes[...], offset: 0) }
        bytes = Self.sampleSuperBlock().encode()
        bytes[3000] = 1
        Self.reseal(&bytes, over: 0..<4092, at: 4092)
        expectProblem(.reservedNotZero, offset: 3000) { try SuperBlock.decode(bytes[...], offset: 0) }
    }

    func testSuperBlockOverlappingRegions() {
        var block = Self.sampleSuperBlock()
        block.table.startPage = 100  // inside the log
        expectProblem(.invalidField(name: "blob table region start", value: 100), offset: 104) {
            try SuperBlock.decode(block.encode()[...], offset: 0)
        }
        block = Self.sampleSuperBlock()
        block.clusterCount += 1  // one cluster past the device's end
        expectProblem(.invalidField(name: "cluster count", value: block.clusterCount), offset: 160) {
            try SuperBlock.decode(block.encode()[...], offset: 0)
        }
    }

    /// The record of array pages a checkpoint changed: absent (0 at offset 208), empty,
    /// a list; a count beyond what the slot holds and a page beyond the arrays are errors.
    func testSuperBlockChangedPagesRecord() throws {
        var block = Self.sampleSuperBlock()
        XCTAssertNil(try SuperBlock.decode(block.encode()[...], offset: 0).changedSincePrevious)
        block.changedSincePrevious = []
        XCTAssertEqual(try SuperBlock.decode(block.encode()[...], offset: 0).changedSincePrevious, [])
        block.changedSincePrevious = [0, 3, 7]  // table pages 0 and 3, bitmap page 3
        let decoded = try SuperBlock.decode(block.encode()[...], offset: 0)
        XCTAssertEqual(decoded.changedSincePrevious, [0, 3, 7])
        XCTAssertEqual(decoded, block)
        block.changedSincePrevious = [2, 8]  // 4 table + 4 bitmap pages: 8 is outside
        expectProblem(.invalidField(name: "changed array page", value: 8), offset: 216) {
            try SuperBlock.decode(block.encode()[...], offset: 0)
        }
        var bytes = Self.sampleSuperBlock().encode()
        bytes[208] = 0xFF; bytes[209] = 0xFF  // 65,535 - 1 entries: more than a slot holds
        Self.reseal(&bytes, over: 0..<4092, at: 4092)
        expectProblem(.invalidField(name: "changed array pages", value: 0xFFFF), offset: 208) {
            try SuperBlock.decode(bytes[...], offset: 0)
        }
        // A list too long to record is written as not recorded.
        block.changedSincePrevious = (0..<UInt32(SuperBlock.changedPagesMax + 1)).map { $0 % 8 }
        XCTAssertNil(try SuperBlock.decode(block.encode()[...], offset: 0).changedSincePrevious)
    }

    // MARK: - Metadata pages

    func testMetadataChainRoundTrip() throws {
        for extents in [0, 3, 250, 600] {
            let blob = Self.sampleBlob(extents: extents)
            let count = MetadataPage.pagesNeeded(for: blob)
            let ids = (0..<count).map { UInt32(500 + $0 * 3) }
            let pages = MetadataPage.encodeChain(blob, pageIDs: ids, checkpointSequence: 9)
            XCTAssertEqual(pages.count, count)
            let decoded = try pages.enumerated().map { try MetadataPage.decodePage($1[...], offset: UInt64(ids[$0]) * 4096, pageID: ids[$0]) }
            for (index, page) in decoded.enumerated() {
                XCTAssertEqual(page.nextPage, index + 1 < ids.count ? ids[index + 1] : nil)
                XCTAssertEqual(page.checkpointSequence, 9)
            }
            XCTAssertEqual(try MetadataPage.decodeBlob(decoded, pageIDs: ids, offsets: ids.map { UInt64($0) * 4096 }), blob,
                           "\(extents) extents over \(count) pages")
        }
        XCTAssertGreaterThan(MetadataPage.pagesNeeded(for: Self.sampleBlob(extents: 600)), 2)
    }

    func testMetadataPageBadChecksumAndMagic() {
        var page = MetadataPage.encodeChain(Self.sampleBlob(), pageIDs: [7], checkpointSequence: 1)[0]
        page[100] ^= 0x40
        do {
            _ = try MetadataPage.decodePage(page[...], offset: 7 * 4096, pageID: 7)
            XCTFail("decoded")
        } catch let error as FormatError {
            XCTAssertEqual(error.structure, "metadata page 7")
            XCTAssertEqual(error.offset, 7 * 4096 + 4)
            guard case .badChecksum = error.problem else { return XCTFail("\(error)") }
        } catch { XCTFail("\(error)") }
        page = MetadataPage.encodeChain(Self.sampleBlob(), pageIDs: [7], checkpointSequence: 1)[0]
        page[0] = 0
        expectProblem(.badMagic(found: 0x5044_4D00), structure: "metadata page 7", offset: 7 * 4096) {
            try MetadataPage.decodePage(page[...], offset: 7 * 4096, pageID: 7)
        }
    }

    func testTruncatedChainIsASequenceGap() throws {
        let blob = Self.sampleBlob(extents: 600)
        let ids = (0..<MetadataPage.pagesNeeded(for: blob)).map { UInt32(10 + $0) }
        let pages = MetadataPage.encodeChain(blob, pageIDs: ids, checkpointSequence: 1)
        // The chain's second page is lost: the third follows the first.
        let kept = [0, 2].map { try! MetadataPage.decodePage(pages[$0][...], offset: UInt64(ids[$0]) * 4096, pageID: ids[$0]) }
        expectProblem(.sequenceGap(expected: 1, found: 2), structure: "metadata page 12", offset: 12 * 4096 + 16) {
            try MetadataPage.decodeBlob(kept, pageIDs: [ids[0], ids[2]], offsets: [UInt64(ids[0]) * 4096, UInt64(ids[2]) * 4096])
        }
        // A chain cut after its first page loses extents and no longer covers the blob's clusters.
        let first = try MetadataPage.decodePage(pages[0][...], offset: 0, pageID: ids[0])
        XCTAssertNotNil(first.nextPage)
        XCTAssertNotEqual(try? MetadataPage.decodeBlob([first], pageIDs: [ids[0]], offsets: [0]), blob)
    }

    func testUnknownDescriptorType() {
        var page = MetadataPage.encodeChain(Self.sampleBlob(), pageIDs: [3], checkpointSequence: 1)[0]
        page[MetadataPage.headerBytes] = 77  // the first descriptor's type
        Self.reseal(&page, over: 8..<4096, at: 4)
        expectProblem(.invalidField(name: "descriptor type", value: 77), structure: "metadata page 3",
                      offset: 3 * 4096 + UInt64(MetadataPage.headerBytes)) {
            let decoded = try MetadataPage.decodePage(page[...], offset: 3 * 4096, pageID: 3)
            return try MetadataPage.decodeBlob([decoded], pageIDs: [3], offsets: [3 * 4096])
        }
    }

    // MARK: - Log

    static func transaction(_ id: UInt64, firstLSN: UInt64, _ records: [LogRecord]) -> [LoggedRecord] {
        let all = records + [.commit(recordCount: UInt32(records.count + 1))]
        return all.enumerated().map { LoggedRecord(lsn: firstLSN + UInt64($0), transaction: firstLSN, record: $1) }
    }

    /// Blob ids for the record tests (no literals: `BlobID` has none).
    static func blob(_ raw: UInt64) -> BlobID { BlobID(rawValue: raw) }

    static let everyRecordKind: [LogRecord] = [
        .createBlob(id: FormatTests.blob(5)), .resizeBlob(id: FormatTests.blob(5), clusterCount: 100),
        .mapExtent(id: FormatTests.blob(5), extent: Extent(clusterIndex: 3, count: 4, firstCluster: 99)),
        .unmapClusters(id: FormatTests.blob(5), clusterIndex: 3, count: 1),
        .setXattr(id: FormatTests.blob(5), internal: false, name: "user.x", value: [9, 8, 7]),
        .setXattr(id: FormatTests.blob(5), internal: true, name: "mode", value: []),
        .removeXattr(id: FormatTests.blob(5), internal: false, name: "user.x"),
        .setFlags(id: FormatTests.blob(5), flags: BlobFlags(invalid: 1, readOnlyData: 2, readOnlyMetadata: 3)),
        .setSuperBlob(id: FormatTests.blob(5)), .setSuperBlob(id: nil), .deleteBlob(id: FormatTests.blob(5)),
    ]

    /// A blob id is its raw u64 on disk, little-endian; no blob (a super blob or parent
    /// unset) is all ones, as it was when ids were bare integers.
    func testBlobIDsAreTheirRawValueOnDisk() throws {
        XCTAssertEqual(MemoryLayout<BlobID>.size, MemoryLayout<UInt64>.size)
        XCTAssertEqual(LogRecord.createBlob(id: Self.blob(0x0102_0304_0506_0708)).encodePayload(), [8, 7, 6, 5, 4, 3, 2, 1])
        XCTAssertEqual(LogRecord.setSuperBlob(id: nil).encodePayload(), [UInt8](repeating: 0xFF, count: 8))
        XCTAssertEqual(LogRecord.setParent(id: Self.blob(1), parent: nil, backedClusters: 0).encodePayload(),
                       [1, 0, 0, 0, 0, 0, 0, 0] + [UInt8](repeating: 0xFF, count: 8) + [UInt8](repeating: 0, count: 8))
        XCTAssertEqual(try LogRecord.decode(type: 9, payload: [UInt8](repeating: 0xFF, count: 8), structure: "test", offset: 0),
                       .setSuperBlob(id: nil))
        XCTAssertEqual(Self.blob(42).description, "42")
        XCTAssertLessThan(Self.blob(2), Self.blob(10))
    }

    /// A record's size is counted without encoding it (`payloadBytes`, what a commit
    /// sizes its pages by): it must be what the encoding writes, for every kind, with a
    /// multi-byte UTF-8 name too.
    func testPayloadBytesIsTheEncodedSize() {
        let records = Self.everyRecordKind + [
            .snapshot(id: Self.blob(5), snapshot: Self.blob(6)), .mergeIntoChild(id: Self.blob(6), child: Self.blob(5)),
            .setParent(id: Self.blob(5), parent: nil, backedClusters: 7), .commit(recordCount: 3),
            .setXattr(id: Self.blob(5), internal: true, name: "dnäme", value: [UInt8](repeating: 1, count: 80)),
            .removeXattr(id: Self.blob(5), internal: true, name: "dnäme"),
        ]
        for record in records {
            XCTAssertEqual(record.payloadBytes, record.encodePayload().count, "\(record)")
            XCTAssertEqual(LogPage.encodedBytes(record), LogPage.recordHeaderBytes + record.encodePayload().count, "\(record)")
        }
    }

    func testLogPageRoundTripWithEveryRecordKind() throws {
        let records = Self.transaction(3, firstLSN: 40, Self.everyRecordKind)
        let page = LogPage.encode(sequence: 17, storeTag: 0xABCD, records: records)
        let decoded = try LogPage.decode(page[...], offset: 8192)
        XCTAssertEqual(decoded.sequence, 17)
        XCTAssertEqual(decoded.storeTag, 0xABCD)
        XCTAssertEqual(decoded.records, records)
    }

    /// A log over `pages` pages holding `transactions`, for the scanner tests.
    private func logImage(pages: UInt64, tag: UInt64 = 1, content: [(sequence: UInt64, records: [LoggedRecord])])
        -> [UInt64: [UInt8]] {
        var image: [UInt64: [UInt8]] = [:]
        for (sequence, records) in content {
            image[sequence % pages] = LogPage.encode(sequence: sequence, storeTag: tag, records: records)
        }
        return image
    }

    private func scan(_ image: [UInt64: [UInt8]], pages: UInt64, tail: UInt64, lsn: UInt64, transaction: UInt64) -> LogScan {
        LogScanner.scan(tailSequence: tail, logPages: pages, storeTag: 1, firstLSN: lsn) {
            (image[$0 % pages] ?? [UInt8](repeating: 0, count: 4096), ($0 % pages) * 4096)
        }
    }

    func testRecordTornAtEveryByteOffset() throws {
        let first = Self.transaction(1, firstLSN: 1, [.createBlob(id: Self.blob(1)), .resizeBlob(id: Self.blob(1), clusterCount: 8)])
        let second = Self.transaction(2, firstLSN: 4, Self.everyRecordKind)
        // A 4-page log on its second lap: sequence 5 at index 1, sequence 6 at index 2,
        // over the first lap's page 2.
        let goodPage = LogPage.encode(sequence: 5, storeTag: 1, records: first)
        let lastPage = LogPage.encode(sequence: 6, storeTag: 1, records: second)
        let stale = LogPage.encode(sequence: 2, storeTag: 1, records: Self.transaction(1, firstLSN: 1, [.createBlob(id: Self.blob(7))]))
        let used = LogPage.headerBytes + second.reduce(0) { $0 + LogPage.encodedBytes($1.record) }
        for tear in 0..<used {
            // The device wrote the first `tear` bytes of the page; the rest is what was there.
            let torn = Array(lastPage[0..<tear]) + Array(stale[tear...])
            if torn == lastPage { continue }  // the bytes not written happen to match
            if let decoded = try? LogPage.decode(torn[...], offset: 0) {
                XCTAssertEqual(decoded.sequence, 2, "tear at \(tear): only the stale page itself decodes")
            }
            let result = scan([1: goodPage, 2: torn], pages: 4, tail: 5, lsn: 1, transaction: 1)
            XCTAssertEqual(result.transactions.count, 1, "tear at \(tear)")
            XCTAssertEqual(result.transactions.first, Array(first.dropLast()))
            XCTAssertEqual(result.endSequence, 6)
            XCTAssertNotNil(result.stop)
        }
        let whole = scan([1: goodPage, 2: lastPage], pages: 4, tail: 5, lsn: 1, transaction: 1)
        XCTAssertEqual(whole.transactions.count, 2)
        XCTAssertEqual(whole.nextLSN, 4 + UInt64(second.count))
    }

    func testLogWrapStopsAtAStalePage() {
        let pages: UInt64 = 4
        var lsn: UInt64 = 10
        // Sequence 4 was written at index 0 before the checkpoint moved the tail to 5.
        var content: [(UInt64, [LoggedRecord])] = [(4, Self.transaction(4, firstLSN: 7, [.createBlob(id: Self.blob(9))]))]
        for sequence in UInt64(5)...7 {
            let records = Self.transaction(sequence, firstLSN: lsn, [.createBlob(id: Self.blob(sequence))])
            content.append((sequence, records))
            lsn += UInt64(records.count)
        }
        let image = logImage(pages: pages, content: content)
        let result = scan(image, pages: pages, tail: 5, lsn: 10, transaction: 5)
        XCTAssertEqual(result.transactions.map { $0.map(\.record) }, (5...7).map { [.createBlob(id: Self.blob($0))] })
        XCTAssertEqual(result.endSequence, 8)
        XCTAssertEqual(result.stop?.problem, .sequenceGap(expected: 8, found: 4))
        XCTAssertEqual(result.stop?.offset, 0 * 4096 + 8, "page 8 lives at index 0; its sequence field is at byte 8")
    }

    func testLSNGapStopsReplay() {
        let first = Self.transaction(1, firstLSN: 1, [.createBlob(id: Self.blob(1))])
        let skipped = Self.transaction(2, firstLSN: 5, [.createBlob(id: Self.blob(2))])  // LSNs 3 and 4 are missing
        let image = logImage(pages: 8, content: [(0, first), (1, skipped)])
        let result = scan(image, pages: 8, tail: 0, lsn: 1, transaction: 1)
        XCTAssertEqual(result.transactions.count, 1)
        XCTAssertEqual(result.stop?.problem, .sequenceGap(expected: 3, found: 5))
        XCTAssertEqual(result.stop?.structure, "log page 1 record 0")
    }

    func testUncommittedTailIsDiscarded() {
        let committed = Self.transaction(1, firstLSN: 1, [.createBlob(id: Self.blob(1))])
        let open = [LoggedRecord(lsn: 3, transaction: 3, record: .createBlob(id: Self.blob(2)))]
        let image = logImage(pages: 8, content: [(0, committed), (1, open)])
        let result = scan(image, pages: 8, tail: 0, lsn: 1, transaction: 1)
        XCTAssertEqual(result.transactions.count, 1)
        XCTAssertEqual(result.uncommittedRecords, 1)
        XCTAssertEqual(result.endSequence, 1, "appending resumes over the uncommitted page")
        XCTAssertEqual(result.nextLSN, 3)
    }

    func testAnotherStoresLogPageEndsTheLog() {
        let image: [UInt64: [UInt8]] = [0: LogPage.encode(sequence: 0, storeTag: 2, records: Self.transaction(1, firstLSN: 1, [.createBlob(id: Self.blob(1))]))]
        let result = scan(image, pages: 8, tail: 0, lsn: 1, transaction: 1)
        XCTAssertEqual(result.transactions.count, 0)
        XCTAssertEqual(result.stop?.problem, .invalidField(name: "store tag", value: 2))
    }

    func testTableAndBitmapPages() throws {
        let payload = ArraySlice((0..<ArrayPage.payloadBytes).map { UInt8(truncatingIfNeeded: $0) })
        let page = ArrayPage.encode(kind: .bitmap, checkpointSequence: 4, pageIndex: 2, payload: payload)
        let decoded = try ArrayPage.decode(page[...], kind: .bitmap, pageIndex: 2, offset: 0)
        XCTAssertEqual(decoded.checkpointSequence, 4)
        XCTAssertEqual(Array(decoded.payload), Array(payload))
        expectProblem(.badMagic(found: UInt64(ArrayPageKind.bitmap.rawValue)), structure: "blob table page 2") {
            try ArrayPage.decode(page[...], kind: .table, pageIndex: 2, offset: 0)
        }
        expectProblem(.invalidField(name: "page index", value: 2), structure: "bitmap page 3", offset: 16) {
            try ArrayPage.decode(page[...], kind: .bitmap, pageIndex: 3, offset: 0)
        }
    }

    func testTableEntriesRoundTrip() throws {
        let perPage = UInt64(TablePage.entriesPerPage)
        // Page 1 of a table whose id limit ends inside it: ids past the limit are neither
        // written nor read.
        let limit = perPage + 700
        let roots: [UInt64: UInt32] = [perPage: 0, perPage + 1: 7, perPage + 300: 0x0102_0304, limit - 1: UInt32.max - 1]
        let payload = TablePage.encode(pageIndex: 1, blobIDLimit: limit) { roots[$0.rawValue] }
        XCTAssertEqual(payload.count, ArrayPage.payloadBytes)
        XCTAssertEqual(Array(payload[0..<4]), [1, 0, 0, 0], "root 0 is stored as 1: 0 means no blob")
        XCTAssertEqual(Array(payload[(300 * 4)..<(301 * 4)]), [0x05, 0x03, 0x02, 0x01], "root + 1, little-endian")
        let decoded = TablePage.decode(payload[...], pageIndex: 1, blobIDLimit: limit)
        XCTAssertEqual(decoded.map(\.id.rawValue), roots.keys.sorted())
        XCTAssertEqual(decoded.map(\.root), roots.keys.sorted().map { roots[$0]! })
        var past = payload
        past[700 * 4] = 9
        XCTAssertEqual(TablePage.decode(past[...], pageIndex: 1, blobIDLimit: limit).count, roots.count,
                       "an entry at the id limit is not read")
        XCTAssertTrue(TablePage.decode(payload[...], pageIndex: 1, blobIDLimit: perPage).isEmpty)

        // An entry has no check of its own: a damaged one is caught by its page's checksum.
        var page = ArrayPage.encode(kind: .table, checkpointSequence: 3, pageIndex: 1, payload: payload[...])
        XCTAssertEqual(Array(try ArrayPage.decode(page[...], kind: .table, pageIndex: 1, offset: 0).payload), payload)
        page[ArrayPage.headerBytes + 300 * 4] ^= 0x10
        XCTAssertThrowsError(try ArrayPage.decode(page[...], kind: .table, pageIndex: 1, offset: 0)) { error in
            guard case .badChecksum = (error as? FormatError)?.problem else { return XCTFail("\(error)") }
        }
    }

    func testBitmapIsAValueAndItsPagesAreTheOnDiskForm() {
        var a = Bitmap(count: 100_000)
        a.set(0); a.set(63); a.set(64); a.set(99_999)
        var b = a
        b.clear(63)
        b.set(70_000)
        XCTAssertTrue(a[63], "a copy's change does not reach the original")
        XCTAssertFalse(a[70_000])
        XCTAssertFalse(b[63])
        XCTAssertNotEqual(a, b)
        b.set(63); b.clear(70_000)
        XCTAssertEqual(a, b, "equal bits, different storage")
        XCTAssertEqual(a.setCount, 4)
        XCTAssertEqual(a.firstClear(from: 63), 65)
        XCTAssertEqual(a.firstClear(from: 99_999), 1, "wraps around")
        let bytes = a.bytes()
        XCTAssertEqual(bytes.count, 12_500)
        XCTAssertEqual(Array(bytes[0..<9]), [0x01, 0, 0, 0, 0, 0, 0, 0x80, 0x01])
        XCTAssertEqual(bytes[12_499], 0x80)
        XCTAssertEqual(Bitmap(count: 100_000, bytes: bytes[...]), a, "decodes to the same bits")
        XCTAssertEqual(Bitmap(count: 100_000, bytes: bytes[...]).setCount, 4)
        var c = a
        c.clear(64); c.set(65); c.set(66); c.set(99_998)
        let (onlyA, onlyC) = a.differences(from: c, listing: 2)
        XCTAssertEqual(onlyA.count, 1); XCTAssertEqual(onlyA.first, [64])
        XCTAssertEqual(onlyC.count, 3); XCTAssertEqual(onlyC.first, [65, 66], "the first two, in order")
        XCTAssertEqual(a.differences(from: a, listing: 5).onlyHere.count, 0)
        let ragged = Bitmap(count: 70, bytes: [UInt8](repeating: 0xFF, count: 12)[2...])
        XCTAssertEqual(ragged.setCount, 70, "bits past the count are ignored")
        XCTAssertNil(ragged.firstClear())
        let perPage = ArrayPage.payloadBytes
        let pages = (12_500 + perPage - 1) / perPage
        let joined = (0..<pages).flatMap { a.pageBytes($0) }
        XCTAssertTrue(Array(joined.prefix(12_500)) == bytes, "the pages hold the on-disk bytes in order")
        XCTAssertTrue(joined.dropFirst(12_500).allSatisfy { $0 == 0 }, "zeros after the last bit")
        XCTAssertTrue(a.pageBytes(pages) == [UInt8](repeating: 0, count: perPage), "past the end: zeros")
        // A 15 TiB device's cluster bits cost nothing until set (calloc's untouched pages).
        var large = Bitmap(count: 4_000_000_000)
        large.set(3_999_999_999)
        XCTAssertEqual(large.firstClear(from: 3_999_999_999), 0)
        XCTAssertEqual(large.setCount, 1)
    }

    /// Runs (what a discard holds) set and clear a word at a time, across word and page
    /// boundaries, as bit-by-bit would; the searches that find free runs stop at a limit.
    func testBitmapRunsMatchBitByBit() {
        let bitsPerPage = UInt64(BitmapPage.bitsPerPage)
        for (first, count) in [(0, 1), (0, 64), (1, 63), (63, 2), (5, 200), (bitsPerPage - 3, 70), (100, 3 * bitsPerPage)] as [(UInt64, UInt64)] {
            var runs = Bitmap(count: 4 * bitsPerPage)
            var bits = runs
            _ = runs.takeChangedPages()
            runs.set(run: first, count: count)
            for bit in first..<(first + count) { bits.set(bit) }
            XCTAssertEqual(runs, bits, "set \(first)+\(count)")
            XCTAssertEqual(runs.setCount, count)
            XCTAssertEqual(runs.takeChangedPages(), Array(Int(first / bitsPerPage)...Int((first + count - 1) / bitsPerPage)))
            XCTAssertEqual(runs.firstSet(from: 0, before: runs.count), first)
            XCTAssertEqual(runs.firstClear(from: first, before: runs.count), first + count < runs.count ? first + count : nil)
            XCTAssertNil(runs.firstSet(from: 0, before: first), "none before the run")
            XCTAssertNil(runs.firstClear(from: first, before: first + count), "none inside it")
            runs.clear(run: first, count: count)
            XCTAssertEqual(runs.setCount, 0)
            XCTAssertEqual(runs, Bitmap(count: 4 * bitsPerPage))
        }
    }

    /// Reserved bytes are checked eight at a time where aligned: a non-zero byte at any
    /// offset, from any alignment of the structure in memory, is found and named exactly.
    func testReservedBytesNameTheFirstNonZeroByteAtEveryOffset() {
        let backing = [UInt8](repeating: 0, count: 96)
        for shift in 0..<8 {
            for bad in 3..<61 {
                var bytes = backing
                bytes[shift + bad] = 0x40
                bytes[shift + 62] = 0x01  // outside the checked range, later: not the one named
                let reader = ByteReader(bytes[shift..<(shift + 64)], structure: "test", base: 1000)
                XCTAssertNoThrow(try reader.requireZero(0..<bad))
                XCTAssertThrowsError(try reader.requireZero(3..<61)) {
                    XCTAssertEqual($0 as? FormatError, FormatError("test", offset: 1000 + UInt64(bad), .reservedNotZero),
                                   "shift \(shift), byte \(bad)")
                }
            }
            XCTAssertNoThrow(try ByteReader(backing[shift..<(shift + 64)], structure: "test", base: 0).requireZero(0..<64))
        }
    }
}
