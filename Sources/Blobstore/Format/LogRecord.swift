/// The metadata log: FORMAT.md, sections "Log page" and "Log records". Pages are only
/// ever appended (a commit never rewrites a page that holds committed records), so a
/// torn write can only damage records whose transaction was never acknowledged.

/// One metadata change. Records are redo records: replaying a committed transaction on
/// the state of the checkpoint it follows yields the state after it.
public enum LogRecord: Equatable, Sendable {
    case createBlob(id: BlobID)
    case deleteBlob(id: BlobID)
    case resizeBlob(id: BlobID, clusterCount: UInt64)
    case mapExtent(id: BlobID, extent: Extent)
    case unmapClusters(id: BlobID, clusterIndex: UInt64, count: UInt32)
    case setXattr(id: BlobID, internal: Bool, name: String, value: [UInt8])
    case removeXattr(id: BlobID, internal: Bool, name: String)
    case setFlags(id: BlobID, flags: BlobFlags)
    case setSuperBlob(id: BlobID?)
    /// Blob `snapshot` (a free id) is created with blob `id`'s size, clusters, parent and
    /// backed count, as a snapshot (read-only data); `id` keeps its size, xattrs and flags,
    /// maps nothing, and becomes its clone (parent `snapshot`, every cluster backed).
    case snapshot(id: BlobID, snapshot: BlobID)
    /// Blob `id` becomes a clone of `parent` (nil: of nothing), its first `backedClusters`
    /// clusters backed by it.
    case setParent(id: BlobID, parent: BlobID?, backedClusters: UInt64)
    /// Snapshot `id`, whose only clone is `child`, is deleted: the clusters the child reads
    /// from it move to the child, the others are released, and the child takes its parent.
    case mergeIntoChild(id: BlobID, child: BlobID)
    /// Ends a transaction of `recordCount` records (the commit included).
    case commit(recordCount: UInt32)

    var typeCode: UInt8 {
        switch self {
        case .createBlob: 1
        case .deleteBlob: 2
        case .resizeBlob: 3
        case .mapExtent: 4
        case .unmapClusters: 5
        case .setXattr: 6
        case .removeXattr: 7
        case .setFlags: 8
        case .setSuperBlob: 9
        case .snapshot: 10
        case .setParent: 11
        case .mergeIntoChild: 12
        case .commit: 0xFF
        }
    }

    /// The blob a record changes (nil for store-wide records).
    public var blobID: BlobID? {
        switch self {
        case let .createBlob(id), let .deleteBlob(id), let .resizeBlob(id, _), let .mapExtent(id, _),
             let .unmapClusters(id, _, _), let .setXattr(id, _, _, _), let .removeXattr(id, _, _), let .setFlags(id, _),
             let .snapshot(id, _), let .setParent(id, _, _), let .mergeIntoChild(id, _):
            id
        case .setSuperBlob, .commit: nil
        }
    }

    /// The second blob a record changes: the new snapshot, the child a snapshot merges into.
    public var otherBlobID: BlobID? {
        switch self {
        case let .snapshot(_, other), let .mergeIntoChild(_, other): other
        default: nil
        }
    }

    /// The bytes `encodePayload` writes, counted without encoding: a commit sizes each
    /// record two or three times (`LogPage.encodedBytes`), and an encoding allocates and
    /// zeroes a page-sized buffer.
    var payloadBytes: Int {
        switch self {
        case .createBlob, .deleteBlob, .setSuperBlob: 8
        case .resizeBlob: 16
        case .mapExtent: 28
        case .unmapClusters: 20
        case let .setXattr(_, _, name, value): 13 + name.utf8.count + value.count
        case let .removeXattr(_, _, name): 11 + name.utf8.count
        case .setFlags: 32
        case .snapshot, .mergeIntoChild: 16
        case .setParent: 24
        case .commit: 4
        }
    }

    func encodePayload() -> [UInt8] {
        var writer = ByteWriter(count: payloadBytes)
        switch self {
        case let .createBlob(id), let .deleteBlob(id):
            writer.blobID(id)
        case let .resizeBlob(id, count):
            writer.blobID(id); writer.u64(count)
        case let .mapExtent(id, extent):
            writer.blobID(id); writer.u64(extent.clusterIndex); writer.u32(extent.count); writer.u64(extent.firstCluster)
        case let .unmapClusters(id, index, count):
            writer.blobID(id); writer.u64(index); writer.u32(count)
        case let .setXattr(id, isInternal, name, value):
            let nameBytes = Array(name.utf8)
            writer.blobID(id); writer.u8(isInternal ? 1 : 0); writer.u16(UInt16(nameBytes.count)); writer.u16(UInt16(value.count))
            writer.raw(nameBytes); writer.raw(value)
        case let .removeXattr(id, isInternal, name):
            let nameBytes = Array(name.utf8)
            writer.blobID(id); writer.u8(isInternal ? 1 : 0); writer.u16(UInt16(nameBytes.count)); writer.raw(nameBytes)
        case let .setFlags(id, flags):
            writer.blobID(id); writer.u64(flags.invalid); writer.u64(flags.readOnlyData); writer.u64(flags.readOnlyMetadata)
        case let .setSuperBlob(id):
            writer.blobID(id)
        case let .snapshot(id, other), let .mergeIntoChild(id, other):
            writer.blobID(id); writer.blobID(other)
        case let .setParent(id, parent, backed):
            writer.blobID(id); writer.blobID(parent); writer.u64(backed)
        case let .commit(count):
            writer.u32(count)
        }
        precondition(writer.position == writer.bytes.count, "payloadBytes counts what encodePayload writes")
        return writer.bytes
    }

    static func decode(type: UInt8, payload: [UInt8], structure: String, offset: UInt64) throws(FormatError) -> LogRecord {
        var reader = ByteReader(payload[...], structure: structure, base: offset)
        let record: LogRecord
        switch type {
        case 1: record = .createBlob(id: try reader.blobID())
        case 2: record = .deleteBlob(id: try reader.blobID())
        // Ranges are checked here so that replay can add without overflow: no blob exceeds
        // MetadataPage.blobClustersMax clusters, no device cluster number wraps.
        case 3:
            let id = try reader.blobID()
            let count = try reader.u64()
            guard count <= MetadataPage.blobClustersMax else {
                throw reader.error(.invalidField(name: "blob size (clusters)", value: count), at: 8)
            }
            record = .resizeBlob(id: id, clusterCount: count)
        case 4:
            let id = try reader.blobID()
            let extent = Extent(clusterIndex: try reader.u64(), count: try reader.u32(), firstCluster: try reader.u64())
            guard extent.count > 0 else { throw reader.error(.invalidField(name: "extent length", value: 0), at: 16) }
            guard extent.clusterIndex <= MetadataPage.blobClustersMax,
                  UInt64(extent.count) <= MetadataPage.blobClustersMax - extent.clusterIndex else {
                throw reader.error(.invalidField(name: "extent cluster index", value: extent.clusterIndex), at: 8)
            }
            guard UInt64(extent.count) <= UInt64.max - extent.firstCluster else {
                throw reader.error(.invalidField(name: "extent first cluster", value: extent.firstCluster), at: 20)
            }
            record = .mapExtent(id: id, extent: extent)
        case 5:
            let id = try reader.blobID()
            let index = try reader.u64()
            let count = try reader.u32()
            guard count > 0, index <= MetadataPage.blobClustersMax, UInt64(count) <= MetadataPage.blobClustersMax - index else {
                throw reader.error(.invalidField(name: "unmap range at cluster index", value: index), at: 8)
            }
            record = .unmapClusters(id: id, clusterIndex: index, count: count)
        case 6, 7:
            let id = try reader.blobID()
            let isInternal = try reader.u8()
            guard isInternal <= 1 else { throw reader.error(.invalidField(name: "xattr class", value: UInt64(isInternal))) }
            let nameLength = Int(try reader.u16())
            let valueLength = type == 6 ? Int(try reader.u16()) : 0
            // A name the metadata pages can hold (a checkpoint encodes what replay applied).
            guard nameLength <= MetadataPage.xattrNameBytesMax else {
                throw reader.error(.invalidField(name: "xattr name length", value: UInt64(nameLength)), at: 9)
            }
            guard nameLength > 0, let name = String(validating: try reader.raw(nameLength), as: UTF8.self) else {
                throw reader.error(.invalidField(name: "xattr name", value: UInt64(nameLength)))
            }
            guard nameLength + valueLength <= MetadataPage.xattrBytesMax else {
                throw reader.error(.invalidField(name: "xattr size", value: UInt64(nameLength + valueLength)), at: 9)
            }
            record = type == 6
                ? .setXattr(id: id, internal: isInternal == 1, name: name, value: try reader.raw(valueLength))
                : .removeXattr(id: id, internal: isInternal == 1, name: name)
        case 8:
            record = .setFlags(id: try reader.blobID(), flags: BlobFlags(invalid: try reader.u64(), readOnlyData: try reader.u64(),
                                                                      readOnlyMetadata: try reader.u64()))
        case 9:
            record = .setSuperBlob(id: try reader.optionalBlobID())
        case 10, 12:
            let id = try reader.blobID()
            let other = try reader.blobID()
            guard other != id else {
                throw reader.error(.invalidField(name: "second blob id (the same blob)", value: other.rawValue), at: 8)
            }
            record = type == 10 ? .snapshot(id: id, snapshot: other) : .mergeIntoChild(id: id, child: other)
        case 11:
            let id = try reader.blobID()
            let parentField = try reader.u64()  // all ones: no parent (`ByteWriter.blobID`)
            let parent = parentField == UInt64.max ? nil : BlobID(rawValue: parentField)
            let backed = try reader.u64()
            guard parentField != id.rawValue else {
                throw reader.error(.invalidField(name: "parent (the blob itself)", value: parentField), at: 8)
            }
            guard backed <= MetadataPage.blobClustersMax else {
                throw reader.error(.invalidField(name: "backed clusters", value: backed), at: 16)
            }
            guard parent != nil || backed == 0 else {
                throw reader.error(.invalidField(name: "backed clusters without a parent", value: backed), at: 16)
            }
            record = .setParent(id: id, parent: parent, backedClusters: backed)
        case 0xFF:
            let count = try reader.u32()
            guard count > 0 else { throw reader.error(.invalidField(name: "commit record count", value: 0)) }
            record = .commit(recordCount: count)
        default:
            throw reader.error(.invalidField(name: "record type", value: UInt64(type)))
        }
        guard reader.remaining == 0 else {
            throw reader.error(.invalidField(name: "record length", value: UInt64(payload.count)))
        }
        return record
    }
}

/// A record as stored: its log sequence number and transaction.
public struct LoggedRecord: Equatable, Sendable {
    public var lsn: UInt64
    public var transaction: UInt64
    public var record: LogRecord

    public init(lsn: UInt64, transaction: UInt64, record: LogRecord) {
        self.lsn = lsn
        self.transaction = transaction
        self.record = record
    }
}

public enum LogPage {
    public static let magic: UInt32 = 0x474F_4C42  // "BLOG"
    public static let headerBytes = 32
    public static let recordHeaderBytes = 24
    static let pageBytes = SuperBlock.pageBytes
    public static let recordPayloadBytesMax = pageBytes - headerBytes - recordHeaderBytes

    /// Encoded size of a record.
    public static func encodedBytes(_ record: LogRecord) -> Int {
        recordHeaderBytes + record.payloadBytes
    }

    /// One page holding `records` (which must fit: see `encodedBytes`).
    public static func encode(sequence: UInt64, storeTag: UInt64, records: [LoggedRecord]) -> [UInt8] {
        var writer = ByteWriter(count: pageBytes)
        writer.u32(magic)
        writer.u32(0)  // checksum
        writer.u64(sequence)
        writer.u64(storeTag)
        writer.u16(0)  // used bytes, set below
        writer.u16(UInt16(records.count))
        writer.u32(0)
        for logged in records {
            let payload = logged.record.encodePayload()
            let start = writer.position
            writer.u32(0)
            writer.u16(UInt16(payload.count))
            writer.u8(logged.record.typeCode)
            writer.u8(0)
            writer.u64(logged.lsn)
            writer.u64(logged.transaction)
            writer.raw(payload)
            writer.sealChecksum(over: (start + 4)..<writer.position, at: start)
        }
        let used = writer.position - headerBytes
        writer.seek(24)
        writer.u16(UInt16(used))
        writer.sealChecksum(over: 8..<pageBytes, at: 4)
        return writer.bytes
    }

    public struct Decoded: Equatable, Sendable {
        public var sequence: UInt64
        public var storeTag: UInt64
        public var records: [LoggedRecord]
    }

    /// Decodes and validates one page; `offset` is its device byte offset.
    public static func decode(_ bytes: ArraySlice<UInt8>, offset: UInt64) throws(FormatError) -> Decoded {
        var reader = ByteReader(bytes, structure: "log page", base: offset)
        guard bytes.count >= pageBytes else { throw reader.error(.truncated(needed: pageBytes, available: bytes.count)) }
        let found = try reader.u32()
        guard found == magic else { throw reader.error(.badMagic(found: UInt64(found)), at: 0) }
        try reader.verifyChecksum(over: 8..<pageBytes, at: 4)
        _ = try reader.u32()
        let sequence = try reader.u64()
        let storeTag = try reader.u64()
        let used = Int(try reader.u16())
        let count = Int(try reader.u16())
        try reader.requireZero(28..<32)
        _ = try reader.u32()
        guard used <= pageBytes - headerBytes else {
            throw reader.error(.invalidField(name: "used bytes", value: UInt64(used)), at: 24)
        }
        var records: [LoggedRecord] = []
        for index in 0..<count {
            let start = reader.position
            guard start + recordHeaderBytes <= headerBytes + used else {
                throw reader.error(.invalidField(name: "record count", value: UInt64(count)), at: 26)
            }
            let structure = "log page \(sequence) record \(index)"
            var header = ByteReader(bytes, structure: structure, base: offset)
            try header.seek(start)
            _ = try header.u32()
            let length = Int(try header.u16())
            guard start + recordHeaderBytes + length <= headerBytes + used else {
                throw header.error(.invalidField(name: "record length", value: UInt64(length)), at: start + 4)
            }
            try header.verifyChecksum(over: (start + 4)..<(start + recordHeaderBytes + length), at: start)
            let type = try header.u8()
            _ = try header.u8()
            let lsn = try header.u64()
            let transaction = try header.u64()
            let payload = try header.raw(length)
            let record = try LogRecord.decode(type: type, payload: payload, structure: structure,
                                              offset: offset + UInt64(start + recordHeaderBytes))
            records.append(LoggedRecord(lsn: lsn, transaction: transaction, record: record))
            try reader.seek(start + recordHeaderBytes + length)
        }
        guard reader.position == headerBytes + used else {
            throw reader.error(.invalidField(name: "used bytes", value: UInt64(used)), at: 24)
        }
        try reader.requireZero((headerBytes + used)..<pageBytes)
        return Decoded(sequence: sequence, storeTag: storeTag, records: records)
    }
}
