import XCTest
import Bdev
import BdevMalloc
import Env
@testable import Blobstore

/// A small store on a malloc bdev that a test populates, damages on purpose and inspects
/// the way blobcli does (Verifier, read-only load, the Inspect layer, StoreRepair).
final class TestImage {
    /// 8 MiB, 4 KiB clusters, a 16-page log: every structure exists and is small.
    static let options = BlobStore.Options(clusterSizeBytes: 4096, logPages: 16, metadataPages: 128, blobIDLimit: 128)
    static let pageBytes = SuperBlock.pageBytes

    let bdev: Bdev
    let reactor: Reactor
    let blocksPerPage: UInt64
    /// Blob ids made by `populated`: a data blob, a blob with xattrs, an empty one.
    var blobs: [BlobID] = []

    init(megabytes: UInt64 = 8, blockSize: Int = 4096) throws {
        bdev = Bdev(backend: try MallocBdev(blockCount: (megabytes << 20) / UInt64(blockSize), blockSizeBytes: blockSize))
        reactor = try Reactor()
        blocksPerPage = UInt64(Self.pageBytes / blockSize)
    }

    /// Runs `body` with a fresh synchronous channel to the device.
    func with<T>(_ body: (BdevSyncIO) throws -> T) throws -> T {
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        return try body(io)
    }

    /// Formats, runs `populate`, and leaves the store clean (`unload`) or as a crash would
    /// (`clean: false`: committed transactions in the log after the last checkpoint).
    @discardableResult
    func format(clean: Bool = true, _ populate: (BlobStore) throws -> Void = { _ in }) throws -> TestImage {
        try with { io in
            let store = try BlobStore.format(io, options: Self.options)
            try populate(store)
            if clean { try store.unload() }
        }
        return self
    }

    /// A store with three blobs: 3 clusters of data (one a hole), xattrs, an empty blob.
    static func populated(clean: Bool = true, blockSize: Int = 4096) throws -> TestImage {
        let image = try TestImage(blockSize: blockSize)
        try image.format(clean: clean) { store in
            let unit = store.ioUnitBytes
            let data = try store.createBlob(clusterCount: 4, xattrs: [("name", Array("data".utf8))])
            try store.write(blob: data, offsetUnits: 0, data: (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7) })
            try store.write(blob: data, offsetUnits: UInt64(3 * 4096 / unit), data: [UInt8](repeating: 0xAB, count: 4096))
            let tagged = try store.createBlob(clusterCount: 1, xattrs: [("colour", Array("blue".utf8))])
            try store.setXattr(tagged, name: "i", value: [UInt8](repeating: 1, count: 80), isInternal: true)
            try store.write(blob: tagged, offsetUnits: 0, data: [UInt8](repeating: 0x5A, count: 4096))
            let empty = try store.createBlob()
            try store.setSuperBlob(tagged)
            image.blobs = [data, tagged, empty]
        }
        return image
    }

    // MARK: - Pages

    func page(_ page: UInt64, count: UInt64 = 1) throws -> [UInt8] {
        try with { try $0.readBytes(offsetBlocks: page * blocksPerPage, countBlocks: count * blocksPerPage) }
    }

    func write(page: UInt64, _ bytes: [UInt8]) throws {
        try with { try $0.writeBytes(bytes, offsetBlocks: page * blocksPerPage) }
    }

    func edit(page: UInt64, _ change: (inout [UInt8]) throws -> Void) throws {
        var bytes = try self.page(page)
        try change(&bytes)
        try write(page: page, bytes)
    }

    var pageCount: UInt64 { bdev.geometry.capacityBytes / UInt64(Self.pageBytes) }

    func snapshot() throws -> [UInt8] { try page(0, count: pageCount) }

    func restore(_ bytes: [UInt8]) throws { try write(page: 0, bytes) }

    /// The current super block (the valid slot with the higher sequence).
    func superBlock() throws -> SuperBlock {
        try with { try SuperBlockSlots.read($0).requireCurrent().block }
    }

    /// Device page of metadata page `id`, and the first page of `blob`'s chain.
    func metadataPage(_ id: UInt32) throws -> UInt64 { try superBlock().metadataPages.startPage + UInt64(id) }

    func chain(of blob: BlobID) throws -> [UInt32] {
        try with { io in
            let (store, _) = try BlobStore.load(io, readOnly: true)
            return store.chainPages(blob).map(\.pageID)
        }
    }

    // MARK: - Checksums

    static func reseal(_ bytes: inout [UInt8], over range: Range<Int>, at: Int) {
        let crc = bytes[range].withUnsafeBytes { CRC32C.checksum($0) }
        for index in 0..<4 { bytes[at + index] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(index))) }
    }

    /// Recomputes the CRCs of whatever structure `bytes` (one page) holds, so that an edit
    /// reaches the field checks behind the checksum.
    static func resealPage(_ bytes: inout [UInt8]) {
        let magic32 = UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24
        switch magic32 {
        case LogPage.magic:
            // Every record's CRC, as far as the lengths lead, then the page's.
            let used = Int(bytes[24]) | Int(bytes[25]) << 8
            var at = LogPage.headerBytes
            while at + LogPage.recordHeaderBytes <= min(LogPage.headerBytes + used, pageBytes) {
                let length = Int(bytes[at + 4]) | Int(bytes[at + 5]) << 8
                let end = at + LogPage.recordHeaderBytes + length
                guard end <= pageBytes else { break }
                reseal(&bytes, over: (at + 4)..<end, at: at)
                at = end
            }
            reseal(&bytes, over: 8..<pageBytes, at: 4)
        case MetadataPage.magic, ArrayPageKind.table.rawValue, ArrayPageKind.bitmap.rawValue:
            reseal(&bytes, over: 8..<pageBytes, at: 4)
        default:
            if bytes[0..<8].elementsEqual(withUnsafeBytes(of: SuperBlock.magic.littleEndian, Array.init)) {
                reseal(&bytes, over: 0..<4092, at: 4092)
            }
        }
    }

    /// Puts `records` as one transaction on the log page replay reads next (the tail after
    /// a clean unload), with valid CRCs: what a crafted or hostile log looks like.
    func appendTransaction(_ records: [LogRecord], commit: Bool = true) throws {
        let block = try superBlock()
        let first = block.checkpointLSN + 1
        let all = commit ? records + [.commit(recordCount: UInt32(records.count + 1))] : records
        let logged = all.enumerated().map { LoggedRecord(lsn: first + UInt64($0), transaction: first, record: $1) }
        let page = LogPage.encode(sequence: block.logTailSequence, storeTag: block.storeID.0, records: logged)
        try write(page: block.log.startPage + block.logTailSequence % block.log.pageCount, page)
    }
}

/// Fails the test unless `text` names each of `parts`.
func XCTAssertMentions(_ text: String, _ parts: String..., file: StaticString = #filePath, line: UInt = #line) {
    for part in parts where !text.contains(part) {
        XCTFail("\"\(text)\" does not mention \"\(part)\"", file: file, line: line)
    }
}
