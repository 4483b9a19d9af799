/// Blob metadata and the chain of metadata pages that holds it: FORMAT.md, sections
/// "Metadata page" and "Descriptors".

/// A run of clusters: blob clusters `[clusterIndex, clusterIndex + count)` live at
/// device clusters `[firstCluster, firstCluster + count)`. Unmapped clusters have no
/// extent (thin provisioning: they read as zeros).
public struct Extent: Equatable, Hashable, Sendable {
    public var clusterIndex: UInt64
    public var count: UInt32
    public var firstCluster: UInt64

    public init(clusterIndex: UInt64, count: UInt32, firstCluster: UInt64) {
        self.clusterIndex = clusterIndex
        self.count = count
        self.firstCluster = firstCluster
    }
}

/// The three classes of blob flags (SPDK's): an unknown bit set in `invalid` makes the
/// blob unopenable, in `readOnlyData` its data read-only, in `readOnlyMetadata` its
/// metadata read-only.
public struct BlobFlags: Equatable, Sendable {
    public var invalid: UInt64 = 0
    public var readOnlyData: UInt64 = 0
    public var readOnlyMetadata: UInt64 = 0
    public init(invalid: UInt64 = 0, readOnlyData: UInt64 = 0, readOnlyMetadata: UInt64 = 0) {
        self.invalid = invalid
        self.readOnlyData = readOnlyData
        self.readOnlyMetadata = readOnlyMetadata
    }

    /// Read-only-data bit 0: the blob is a snapshot (its clusters are shared with its
    /// clones; writes, unmaps and resizes are refused).
    public static let snapshot: UInt64 = 1 << 0
}

public struct BlobMetadata: Equatable, Sendable {
    public var id: BlobID
    public var clusterCount: UInt64
    public var flags: BlobFlags
    /// Sorted by clusterIndex, not overlapping.
    public var extents: [Extent]
    /// Names unique per class.
    public var xattrs: XattrList
    public var internalXattrs: XattrList
    /// The snapshot this blob is a clone of (nil: none). Blob clusters below
    /// `backedClusters` that the blob does not map read from the parent (and, where the
    /// parent maps nothing either, from its parent, up the chain); the others read as zeros.
    public var parent: BlobID?
    /// How many leading blob clusters the parent backs (0 without a parent): a shrink
    /// lowers it, so clusters cut off and grown again read as zeros, not as the parent's.
    public var backedClusters: UInt64

    public init(id: BlobID, clusterCount: UInt64 = 0, flags: BlobFlags = BlobFlags(), extents: [Extent] = [],
                xattrs: XattrList = [], internalXattrs: XattrList = [], parent: BlobID? = nil, backedClusters: UInt64 = 0) {
        self.id = id
        self.clusterCount = clusterCount
        self.flags = flags
        self.extents = extents
        self.xattrs = xattrs
        self.internalXattrs = internalXattrs
        self.parent = parent
        self.backedClusters = backedClusters
    }

    /// A snapshot: its data is read-only (`BlobFlags.snapshot`).
    public var isSnapshot: Bool { flags.readOnlyData & BlobFlags.snapshot != 0 }

    public static func == (lhs: BlobMetadata, rhs: BlobMetadata) -> Bool {
        lhs.id == rhs.id && lhs.clusterCount == rhs.clusterCount && lhs.flags == rhs.flags && lhs.extents == rhs.extents
            && lhs.parent == rhs.parent && lhs.backedClusters == rhs.backedClusters
            && lhs.xattrs.sameContents(as: rhs.xattrs) && lhs.internalXattrs.sameContents(as: rhs.internalXattrs)
    }
}

public enum MetadataPage {
    public static let magic: UInt32 = 0x5044_4D42  // "BMDP"
    public static let headerBytes = 40
    public static let noNextPage = UInt32.max
    static let pageBytes = SuperBlock.pageBytes
    /// Longest xattr name, and longest name and value together: they must fit one
    /// descriptor and one log record. (Names reach 511 bytes so that the file system can
    /// key a directory entry by any 255-byte file name, hex-encoded when not UTF-8.)
    public static let xattrNameBytesMax = 511
    public static let xattrBytesMax = LogPage.recordPayloadBytesMax - 13
    public static let xattrValueBytesMax = xattrBytesMax - 1
    /// Largest blob, in clusters (what resizing accepts): blob offsets in bytes fit a UInt64
    /// for every cluster size, and extents ending within it never overflow.
    public static let blobClustersMax = UInt64(UInt32.max) * 16

    enum DescriptorType: UInt8 {
        case blobInfo = 1
        case extents = 2
        case xattr = 3
        case internalXattr = 4
        case parent = 5
    }

    static let extentBytes = 20
    static let extentsPerDescriptorMax = (pageBytes - headerBytes - 4 - 2) / extentBytes

    /// The descriptors of `blob`, each as bytes (type, reserved, length, payload).
    static func descriptors(of blob: BlobMetadata) -> [[UInt8]] {
        var result: [[UInt8]] = []
        var info = ByteWriter(count: 4 + 32)
        info.u8(DescriptorType.blobInfo.rawValue); info.u8(0); info.u16(32)
        info.u64(blob.clusterCount)
        info.u64(blob.flags.invalid); info.u64(blob.flags.readOnlyData); info.u64(blob.flags.readOnlyMetadata)
        result.append(info.bytes)
        if let parent = blob.parent {
            var writer = ByteWriter(count: 4 + 16)
            writer.u8(DescriptorType.parent.rawValue); writer.u8(0); writer.u16(16)
            writer.blobID(parent); writer.u64(blob.backedClusters)
            result.append(writer.bytes)
        }
        var start = 0
        while start < blob.extents.count {
            let chunk = blob.extents[start..<min(blob.extents.count, start + extentsPerDescriptorMax)]
            let payload = 2 + chunk.count * extentBytes
            var writer = ByteWriter(count: 4 + payload)
            writer.u8(DescriptorType.extents.rawValue); writer.u8(0); writer.u16(UInt16(payload))
            writer.u16(UInt16(chunk.count))
            for extent in chunk {
                writer.u64(extent.clusterIndex); writer.u32(extent.count); writer.u64(extent.firstCluster)
            }
            result.append(writer.bytes)
            start += chunk.count
        }
        for (type, list) in [(DescriptorType.xattr, blob.xattrs), (.internalXattr, blob.internalXattrs)] {
            for (name, value) in list {
                let nameBytes = Array(name.utf8)
                precondition(nameBytes.count <= xattrNameBytesMax && nameBytes.count + value.count <= xattrBytesMax,
                             "xattr \(name) too large for a descriptor")
                let payload = 4 + nameBytes.count + value.count
                var writer = ByteWriter(count: 4 + payload)
                writer.u8(type.rawValue); writer.u8(0); writer.u16(UInt16(payload))
                writer.u16(UInt16(nameBytes.count)); writer.u16(UInt16(value.count))
                writer.raw(nameBytes); writer.raw(value)
                result.append(writer.bytes)
            }
        }
        return result
    }

    /// Descriptors packed into pages (first-fit in order): how many pages the chain needs.
    public static func pagesNeeded(for blob: BlobMetadata) -> Int {
        pack(descriptors(of: blob)).count
    }

    private static func pack(_ descriptors: [[UInt8]]) -> [[[UInt8]]] {
        var pages: [[[UInt8]]] = [[]]
        var used = 0
        for descriptor in descriptors {
            if used + descriptor.count > pageBytes - headerBytes {
                pages.append([])
                used = 0
            }
            pages[pages.count - 1].append(descriptor)
            used += descriptor.count
        }
        return pages
    }

    /// Encodes `blob` into a chain on the pages `pageIDs` (exactly `pagesNeeded` of them).
    public static func encodeChain(_ blob: BlobMetadata, pageIDs: [UInt32], checkpointSequence: UInt64) -> [[UInt8]] {
        let pages = pack(descriptors(of: blob))
        precondition(pages.count == pageIDs.count, "chain of \(pages.count) pages given \(pageIDs.count) ids")
        return pages.enumerated().map { index, descriptors in
            var writer = ByteWriter(count: pageBytes)
            writer.u32(magic)
            writer.u32(0)  // checksum, sealed below
            writer.blobID(blob.id)
            writer.u32(UInt32(index))
            writer.u32(index + 1 < pageIDs.count ? pageIDs[index + 1] : noNextPage)
            writer.u64(checkpointSequence)
            writer.u16(UInt16(descriptors.reduce(0) { $0 + $1.count }))
            writer.u16(UInt16(descriptors.count))
            writer.u32(0)
            for descriptor in descriptors { writer.raw(descriptor) }
            writer.sealChecksum(over: 8..<pageBytes, at: 4)
            return writer.bytes
        }
    }

    /// One decoded page of a chain.
    public struct Page: Sendable {
        public var blobID: BlobID
        public var chainIndex: UInt32
        public var nextPage: UInt32?
        public var checkpointSequence: UInt64
        fileprivate var descriptors: [(type: UInt8, payload: [UInt8], offset: Int)]
    }

    /// Decodes and validates one page. `offset`: its byte offset on the device.
    public static func decodePage(_ bytes: ArraySlice<UInt8>, offset: UInt64, pageID: UInt32) throws(FormatError) -> Page {
        var reader = ByteReader(bytes, structure: "metadata page \(pageID)", base: offset)
        guard bytes.count >= pageBytes else { throw reader.error(.truncated(needed: pageBytes, available: bytes.count)) }
        let found = try reader.u32()
        guard found == magic else { throw reader.error(.badMagic(found: UInt64(found)), at: 0) }
        try reader.verifyChecksum(over: 8..<pageBytes, at: 4)
        _ = try reader.u32()
        let blobID = try reader.blobID()
        let chainIndex = try reader.u32()
        let next = try reader.u32()
        let checkpoint = try reader.u64()
        let used = Int(try reader.u16())
        let count = Int(try reader.u16())
        try reader.requireZero(36..<40)
        _ = try reader.u32()
        guard used <= pageBytes - headerBytes else {
            throw reader.error(.invalidField(name: "descriptor bytes", value: UInt64(used)), at: 32)
        }
        var descriptors: [(type: UInt8, payload: [UInt8], offset: Int)] = []
        for _ in 0..<count {
            let at = reader.position
            guard reader.position + 4 <= headerBytes + used else {
                throw reader.error(.invalidField(name: "descriptor count", value: UInt64(count)), at: 34)
            }
            let type = try reader.u8()
            _ = try reader.u8()
            let length = Int(try reader.u16())
            guard reader.position + length <= headerBytes + used else {
                throw reader.error(.invalidField(name: "descriptor length", value: UInt64(length)), at: at + 2)
            }
            descriptors.append((type, try reader.raw(length), at))
        }
        guard reader.position == headerBytes + used else {
            throw reader.error(.invalidField(name: "descriptor bytes", value: UInt64(used)), at: 32)
        }
        try reader.requireZero((headerBytes + used)..<pageBytes)
        return Page(blobID: blobID, chainIndex: chainIndex, nextPage: next == noNextPage ? nil : next,
                    checkpointSequence: checkpoint, descriptors: descriptors)
    }

    /// Rebuilds a blob from its decoded pages, in chain order. `offsets`: each page's
    /// device offset, for error messages. `clusterLimit`: the store's cluster count; an
    /// extent must end within it. Every field is checked here, once: a blob that decodes
    /// can be re-encoded, and its extents' ends do not overflow.
    public static func decodeBlob(_ pages: [Page], pageIDs: [UInt32], offsets: [UInt64],
                                  clusterLimit: UInt64 = UInt64.max) throws(FormatError) -> BlobMetadata {
        guard let first = pages.first else { throw FormatError("metadata chain", offset: 0, .truncated(needed: 1, available: 0)) }
        var blob = BlobMetadata(id: first.blobID)
        var sawInfo = false
        var sawParent = false
        for (index, page) in pages.enumerated() {
            let name = "metadata page \(pageIDs[index])"
            guard page.blobID == first.blobID else {
                throw FormatError(name, offset: offsets[index] + 8, .invalidField(name: "blob id", value: page.blobID.rawValue))
            }
            guard page.chainIndex == UInt32(index) else {
                throw FormatError(name, offset: offsets[index] + 16,
                                  .sequenceGap(expected: UInt64(index), found: UInt64(page.chainIndex)))
            }
            for descriptor in page.descriptors {
                var reader = ByteReader(descriptor.payload[...], structure: name,
                                        base: offsets[index] + UInt64(descriptor.offset) + 4)
                switch DescriptorType(rawValue: descriptor.type) {
                case .blobInfo:
                    guard !sawInfo, descriptor.payload.count == 32 else {
                        throw reader.error(.invalidField(name: "blob info descriptor", value: UInt64(descriptor.payload.count)))
                    }
                    sawInfo = true
                    blob.clusterCount = try reader.u64()
                    guard blob.clusterCount <= blobClustersMax else {
                        throw reader.error(.invalidField(name: "blob size (clusters)", value: blob.clusterCount), at: 0)
                    }
                    blob.flags = BlobFlags(invalid: try reader.u64(), readOnlyData: try reader.u64(),
                                           readOnlyMetadata: try reader.u64())
                case .parent:
                    guard !sawParent, descriptor.payload.count == 16 else {
                        throw reader.error(.invalidField(name: "parent descriptor", value: UInt64(descriptor.payload.count)))
                    }
                    sawParent = true
                    let parent = try reader.blobID()
                    guard parent != first.blobID else {
                        throw reader.error(.invalidField(name: "parent (the blob itself)", value: parent.rawValue), at: 0)
                    }
                    blob.parent = parent
                    blob.backedClusters = try reader.u64()
                case .extents:
                    try decodeExtents(&reader, payloadBytes: descriptor.payload.count, clusterLimit: clusterLimit, into: &blob)
                case .xattr, .internalXattr:
                    try decodeXattr(&reader, payloadBytes: descriptor.payload.count,
                                    isInternal: descriptor.type == DescriptorType.internalXattr.rawValue, into: &blob)
                case nil:
                    throw FormatError(name, offset: offsets[index] + UInt64(descriptor.offset),
                                      .invalidField(name: "descriptor type", value: UInt64(descriptor.type)))
                }
            }
        }
        guard sawInfo else {
            throw FormatError("metadata page \(pageIDs[0])", offset: offsets[0], .invalidField(name: "missing blob info", value: 0))
        }
        if blob.backedClusters > blob.clusterCount {
            throw FormatError("metadata page \(pageIDs[0])", offset: offsets[0],
                              .invalidField(name: "parent backs clusters beyond the blob size", value: blob.backedClusters))
        }
        if let last = blob.extents.last, last.clusterIndex + UInt64(last.count) > blob.clusterCount {
            throw FormatError("metadata page \(pageIDs[0])", offset: offsets[0],
                              .invalidField(name: "extent beyond blob size", value: last.clusterIndex))
        }
        return blob
    }

    /// An extents descriptor: in order, non-empty, each within the largest blob and the device.
    private static func decodeExtents(_ reader: inout ByteReader, payloadBytes: Int, clusterLimit: UInt64,
                                      into blob: inout BlobMetadata) throws(FormatError) {
        let count = Int(try reader.u16())
        guard payloadBytes == 2 + count * extentBytes else {
            throw reader.error(.invalidField(name: "extent count", value: UInt64(count)), at: 0)
        }
        for _ in 0..<count {
            let at = reader.position
            let extent = Extent(clusterIndex: try reader.u64(), count: try reader.u32(),
                                firstCluster: try reader.u64())
            guard extent.count > 0 else { throw reader.error(.invalidField(name: "extent length", value: 0), at: at + 8) }
            // Ends checked without overflow: within the largest blob, within the device.
            guard extent.clusterIndex <= blobClustersMax, UInt64(extent.count) <= blobClustersMax - extent.clusterIndex else {
                throw reader.error(.invalidField(name: "extent cluster index", value: extent.clusterIndex), at: at)
            }
            guard extent.firstCluster <= clusterLimit, UInt64(extent.count) <= clusterLimit - extent.firstCluster else {
                throw reader.error(.invalidField(name: "extent of \(extent.count) clusters beyond the device (\(clusterLimit) clusters) at first cluster",
                                                 value: extent.firstCluster), at: at)
            }
            if let last = blob.extents.last, last.clusterIndex + UInt64(last.count) > extent.clusterIndex {
                throw reader.error(.invalidField(name: "extent order", value: extent.clusterIndex), at: at)
            }
            blob.extents.append(extent)
        }
    }

    /// An xattr descriptor (user-visible or internal): lengths within what a checkpoint and
    /// a log record can hold, a UTF-8 name, no name twice.
    private static func decodeXattr(_ reader: inout ByteReader, payloadBytes: Int, isInternal: Bool,
                                    into blob: inout BlobMetadata) throws(FormatError) {
        let nameLength = Int(try reader.u16())
        let valueLength = Int(try reader.u16())
        guard payloadBytes == 4 + nameLength + valueLength, nameLength > 0 else {
            throw reader.error(.invalidField(name: "xattr lengths", value: UInt64(nameLength)), at: 0)
        }
        // What the encoder (a checkpoint) and a log record can hold.
        guard nameLength <= xattrNameBytesMax else {
            throw reader.error(.invalidField(name: "xattr name length", value: UInt64(nameLength)), at: 0)
        }
        guard nameLength + valueLength <= xattrBytesMax else {
            throw reader.error(.invalidField(name: "xattr size", value: UInt64(nameLength + valueLength)), at: 2)
        }
        guard let name = String(validating: try reader.raw(nameLength), as: UTF8.self) else {
            throw reader.error(.invalidField(name: "xattr name (not UTF-8)", value: UInt64(nameLength)), at: 4)
        }
        let value = try reader.raw(valueLength)
        let unique = isInternal
            ? blob.internalXattrs.appendUnique(name, value) : blob.xattrs.appendUnique(name, value)
        guard unique else {
            throw reader.error(.invalidField(name: "xattr name repeated", value: UInt64(nameLength)), at: 4)
        }
    }
}
