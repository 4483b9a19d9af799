/// The super block: FORMAT.md, section "Super block". Two slots, pages 0 and 1; each
/// write goes to slot `sequence % 2`, so a torn write leaves the other slot valid, and
/// the valid slot with the higher sequence is current.
public struct SuperBlock: Equatable, Sendable {
    public static let magic: UInt64 = 0x524F_5453_424F_4C42  // "BLOBSTOR" little-endian
    public static let version: UInt32 = 1
    public static let pageBytes = 4096
    public static let slotCount = 2
    /// Largest store: its size in bytes must be a UInt64.
    public static let devicePagesMax = UInt64.max / UInt64(pageBytes)
    /// Sequences and LSNs count up by one per write or record from 0: a value beyond this
    /// (never reached: 2^62 writes) is damage, and rejecting it keeps `+ 1` and
    /// `+ log pages` from overflowing.
    public static let sequenceMax: UInt64 = 1 << 62
    static let checksumOffset = 4092

    /// Feature bits this code understands, per class (the classes exist so that
    /// snapshots, clones and compression can be added without breaking old readers).
    public static let knownIncompatible: UInt64 = Features.metadataPagesInClusters | Features.arraysAfterData | Features.clones
    public static let knownReadOnlyData: UInt64 = 0
    public static let knownReadOnlyMetadata: UInt64 = 0

    public struct Region: Equatable, Sendable {
        public var startPage: UInt64
        public var pageCount: UInt64
        public init(startPage: UInt64, pageCount: UInt64) {
            self.startPage = startPage
            self.pageCount = pageCount
        }
        public var endPage: UInt64 { startPage + pageCount }
    }

    public enum Features {
        /// Incompatible: metadata page ids past the metadata page region name data
        /// clusters (id = region pages + cluster), allocated when the region is full.
        /// Only with 4 KiB clusters (one page each). FORMAT.md, "Metadata pages".
        public static let metadataPagesInClusters: UInt64 = 1 << 0
        /// Incompatible: the blob table and bitmap copies lie after the data clusters (an
        /// online grow put them there); the pages between the log and the metadata page
        /// region are unused. FORMAT.md, "Online grow".
        public static let arraysAfterData: UInt64 = 1 << 1
        /// Incompatible: blobs may be snapshots and clones (the parent descriptor, log
        /// records 10-12; a reader without them would take a clone's shared clusters for
        /// holes and stop replay at the first such record). Set at format, or by the first
        /// snapshot or clone of an older store. FORMAT.md, "Snapshots and clones".
        public static let clones: UInt64 = 1 << 2
    }

    public var incompatibleFeatures: UInt64 = 0
    public var readOnlyDataFeatures: UInt64 = 0
    public var readOnlyMetadataFeatures: UInt64 = 0
    public var sequence: UInt64
    public var storeID: (UInt64, UInt64)
    public var blockSizeBytes: UInt32
    public var clusterSizeBytes: UInt32
    public var isClean: Bool
    /// State flag bit 1: not a checkpoint but the announcement of one (sequence: the
    /// checkpoint's), written to the other slot before the checkpoint overwrites pages of
    /// the inactive table and bitmap copy; `changedSincePrevious` lists those pages (nil:
    /// any). Never current: a load uses it to know which pages of that copy a checkpoint
    /// interrupted by a crash may have written.
    public var isCheckpointIntent = false
    public var devicePages: UInt64
    public var log: Region
    /// One copy; the second copy follows the first.
    public var table: Region
    public var bitmaps: Region
    public var metadataPages: Region
    public var dataStartPage: UInt64
    public var clusterCount: UInt64
    public var blobIDLimit: UInt64
    /// Whether `id` is below the id limit: it has a table entry and a bit in the blob-id bitmap.
    public func covers(_ id: BlobID) -> Bool { id.rawValue < blobIDLimit }
    public var activeCopy: UInt8
    public var checkpointLSN: UInt64
    public var logTailSequence: UInt64
    public var superBlobID: BlobID?
    /// Pages of the table and bitmap copies (table pages first, then bitmap pages, by
    /// index within a copy) whose payload this checkpoint's copy has and the other copy
    /// has not; nil: not recorded (then the other copy is unknown). Lets the first
    /// checkpoint after a load write only what differs, not both arrays whole.
    public var changedSincePrevious: [UInt32]?
    /// How many metadata pages the checkpoint's chains keep in data clusters; nil: not
    /// recorded (a store written before the field existed). With it, a load knows the
    /// count without reading every chain (`BlobStore+Load`, chains read on demand).
    public var metadataPagesInClusters: UInt64?
    /// What fits the slot after the fixed fields.
    public static let changedPagesMax = (checksumOffset - 212) / 4

    public static func == (lhs: SuperBlock, rhs: SuperBlock) -> Bool {
        lhs.encode() == rhs.encode()
    }

    public init(sequence: UInt64, storeID: (UInt64, UInt64), blockSizeBytes: UInt32, clusterSizeBytes: UInt32,
                isClean: Bool, devicePages: UInt64, log: Region, table: Region, bitmaps: Region,
                metadataPages: Region, dataStartPage: UInt64, clusterCount: UInt64, blobIDLimit: UInt64,
                activeCopy: UInt8, checkpointLSN: UInt64, logTailSequence: UInt64, superBlobID: BlobID?) {
        self.sequence = sequence
        self.storeID = storeID
        self.blockSizeBytes = blockSizeBytes
        self.clusterSizeBytes = clusterSizeBytes
        self.isClean = isClean
        self.devicePages = devicePages
        self.log = log
        self.table = table
        self.bitmaps = bitmaps
        self.metadataPages = metadataPages
        self.dataStartPage = dataStartPage
        self.clusterCount = clusterCount
        self.blobIDLimit = blobIDLimit
        self.activeCopy = activeCopy
        self.checkpointLSN = checkpointLSN
        self.logTailSequence = logTailSequence
        self.superBlobID = superBlobID
    }

    public var slot: Int { Int(sequence % UInt64(Self.slotCount)) }
    public var clusterPages: UInt64 { UInt64(clusterSizeBytes) / UInt64(Self.pageBytes) }

    public func encode() -> [UInt8] {
        var writer = ByteWriter(count: Self.pageBytes)
        writer.u64(Self.magic)
        writer.u32(Self.version)
        writer.u32(0)  // reserved
        writer.u64(incompatibleFeatures)
        writer.u64(readOnlyDataFeatures)
        writer.u64(readOnlyMetadataFeatures)
        writer.u64(sequence)
        writer.u64(storeID.0)
        writer.u64(storeID.1)
        writer.u32(blockSizeBytes)
        writer.u32(UInt32(Self.pageBytes))
        writer.u32(clusterSizeBytes)
        writer.u32((isClean ? 1 : 0) | (isCheckpointIntent ? 2 : 0))
        writer.u64(devicePages)
        for region in [log, table, bitmaps, metadataPages] {
            writer.u64(region.startPage)
            writer.u64(region.pageCount)
        }
        writer.u64(dataStartPage)
        writer.u64(clusterCount)
        writer.u64(blobIDLimit)
        writer.u8(activeCopy)
        let inClusters = metadataPagesInClusters.map { $0 + 1 } ?? 0  // 0: not recorded
        for byte in 0..<7 { writer.u8(UInt8(truncatingIfNeeded: inClusters >> (8 * UInt64(byte)))) }
        writer.u64(checkpointLSN)
        writer.u64(logTailSequence)
        writer.blobID(superBlobID)
        if let changed = changedSincePrevious, changed.count <= Self.changedPagesMax {
            writer.u32(UInt32(changed.count + 1))
            for page in changed { writer.u32(page) }
        }
        writer.sealChecksum(over: 0..<Self.checksumOffset, at: Self.checksumOffset)
        return writer.bytes
    }

    /// Decodes and validates one slot. `offset` is the slot's byte offset on the device.
    public static func decode(_ bytes: ArraySlice<UInt8>, offset: UInt64) throws(FormatError) -> SuperBlock {
        var reader = ByteReader(bytes, structure: "super block", base: offset)
        guard bytes.count >= pageBytes else { throw reader.error(.truncated(needed: pageBytes, available: bytes.count)) }
        let magic = try reader.u64()
        guard magic == Self.magic else { throw reader.error(.badMagic(found: magic), at: 0) }
        try reader.verifyChecksum(over: 0..<checksumOffset, at: checksumOffset)
        let version = try reader.u32()
        guard version == Self.version else { throw reader.error(.unsupportedVersion(version), at: 8) }
        try reader.requireZero(12..<16)
        _ = try reader.u32()
        let incompatible = try reader.u64()
        guard incompatible & ~knownIncompatible == 0 else {
            throw reader.error(.unknownIncompatibleFeatures(incompatible & ~knownIncompatible), at: 16)
        }
        let readOnlyData = try reader.u64()
        let readOnlyMetadata = try reader.u64()
        let sequence = try reader.u64()
        let storeID = (try reader.u64(), try reader.u64())
        let blockSize = try reader.u32()
        guard blockSize == 512 || blockSize == 4096 else {
            throw reader.error(.invalidField(name: "block size", value: UInt64(blockSize)), at: 64)
        }
        let pageSize = try reader.u32()
        guard pageSize == UInt32(pageBytes) else {
            throw reader.error(.invalidField(name: "page size", value: UInt64(pageSize)), at: 68)
        }
        let clusterSize = try reader.u32()
        guard clusterSize >= UInt32(pageBytes), clusterSize <= 1 << 20, clusterSize & (clusterSize - 1) == 0 else {
            throw reader.error(.invalidField(name: "cluster size", value: UInt64(clusterSize)), at: 72)
        }
        let flags = try reader.u32()
        guard flags & ~3 == 0 else { throw reader.error(.invalidField(name: "state flags", value: UInt64(flags)), at: 76) }
        let devicePages = try reader.u64()
        var regions: [Region] = []
        for _ in 0..<4 { regions.append(Region(startPage: try reader.u64(), pageCount: try reader.u64())) }
        let dataStart = try reader.u64()
        let clusterCount = try reader.u64()
        let blobIDLimit = try reader.u64()
        let activeCopy = try reader.u8()
        guard activeCopy <= 1 else { throw reader.error(.invalidField(name: "active copy", value: UInt64(activeCopy)), at: 176) }
        var inClustersField: UInt64 = 0
        for byte in 0..<7 { inClustersField |= UInt64(try reader.u8()) << (8 * UInt64(byte)) }
        guard inClustersField == 0 || inClustersField - 1 <= clusterCount else {
            throw reader.error(.invalidField(name: "metadata pages in clusters", value: inClustersField - 1), at: 177)
        }
        let checkpointLSN = try reader.u64()
        let logTail = try reader.u64()
        let superBlob = try reader.optionalBlobID()
        let changedField = try reader.u32()
        guard changedField <= UInt32(changedPagesMax) + 1 else {
            throw reader.error(.invalidField(name: "changed array pages", value: UInt64(changedField)), at: 208)
        }
        var changed: [UInt32]?
        if changedField > 0 {
            changed = []
            for _ in 0..<Int(changedField - 1) { changed!.append(try reader.u32()) }
        }
        try reader.requireZero(reader.position..<checksumOffset)
        let block = SuperBlock(
            sequence: sequence, storeID: storeID, blockSizeBytes: blockSize, clusterSizeBytes: clusterSize,
            isClean: flags & 1 == 1, devicePages: devicePages, log: regions[0], table: regions[1], bitmaps: regions[2],
            metadataPages: regions[3], dataStartPage: dataStart, clusterCount: clusterCount, blobIDLimit: blobIDLimit,
            activeCopy: activeCopy, checkpointLSN: checkpointLSN, logTailSequence: logTail,
            superBlobID: superBlob)
        var copy = block
        copy.incompatibleFeatures = incompatible
        copy.isCheckpointIntent = flags & 2 != 0
        copy.changedSincePrevious = changed
        copy.metadataPagesInClusters = inClustersField == 0 ? nil : inClustersField - 1
        copy.readOnlyDataFeatures = readOnlyData
        copy.readOnlyMetadataFeatures = readOnlyMetadata
        try copy.validateGeometry(reader)
        for (name, value, at) in [("sequence", sequence, 40), ("checkpoint LSN", checkpointLSN, 184),
                                  ("log tail sequence", logTail, 192)] where value > sequenceMax {
            throw reader.error(.invalidField(name: name, value: value), at: at)
        }
        return copy
    }

    /// Regions in order, inside the device, not overlapping; the data region holds the clusters.
    private func validateGeometry(_ reader: ByteReader) throws(FormatError) {
        guard devicePages <= Self.devicePagesMax else {
            throw reader.error(.invalidField(name: "device pages", value: devicePages), at: 80)
        }
        func doubled(_ region: Region, _ name: String, _ at: Int) throws(FormatError) -> Region {
            let (pages, overflow) = region.pageCount.multipliedReportingOverflow(by: 2)
            guard !overflow else { throw reader.error(.invalidField(name: name + " pages", value: region.pageCount), at: at + 8) }
            return Region(startPage: region.startPage, pageCount: pages)
        }
        let logEntry = ("log region", log, 88)
        let tableEntry = ("blob table region", try doubled(table, "blob table region", 104), 104)
        let bitmapEntry = ("bitmap region", try doubled(bitmaps, "bitmap region", 120), 120)
        let metadataEntry = ("metadata page region", metadataPages, 136)
        // In order, each after the one before: the format's layout, or a grown store's with
        // the table and bitmaps after the data clusters.
        var next = UInt64(Self.slotCount)
        func follow(_ regions: [(String, Region, Int)]) throws(FormatError) {
            for (name, region, at) in regions {
                let (end, overflow) = region.startPage.addingReportingOverflow(region.pageCount)
                guard region.startPage >= next, region.pageCount > 0, !overflow, end <= devicePages else {
                    throw reader.error(.invalidField(name: name + " start", value: region.startPage), at: at)
                }
                next = end
            }
        }
        func followData() throws(FormatError) {
            let (dataPages, overflow) = clusterCount.multipliedReportingOverflow(by: clusterPages)
            let (dataEnd, endOverflow) = dataStartPage.addingReportingOverflow(dataPages)
            guard dataStartPage >= next, !overflow, !endOverflow, dataEnd <= devicePages else {
                throw reader.error(.invalidField(name: "cluster count", value: clusterCount), at: 160)
            }
            next = dataEnd
        }
        if hasArraysAfterData {
            try follow([logEntry, metadataEntry])
            try followData()
            try follow([tableEntry, bitmapEntry])
        } else {
            try follow([logEntry, tableEntry, bitmapEntry, metadataEntry])
            try followData()
        }
        let (entries, entriesOverflow) = table.pageCount.multipliedReportingOverflow(by: UInt64(TablePage.entriesPerPage))
        guard blobIDLimit > 0, !entriesOverflow, blobIDLimit <= entries else {
            throw reader.error(.invalidField(name: "blob id limit", value: blobIDLimit), at: 168)
        }
        // Metadata page ids are 32-bit: 0xFFFFFFFF ends a chain, and a table entry holds id + 1.
        guard metadataPages.pageCount < UInt64(UInt32.max) else {
            throw reader.error(.invalidField(name: "metadata page region pages", value: metadataPages.pageCount), at: 144)
        }
        let arrayPages = table.pageCount + bitmaps.pageCount
        if let changed = changedSincePrevious, let index = changed.firstIndex(where: { UInt64($0) >= arrayPages }) {
            throw reader.error(.invalidField(name: "changed array page", value: UInt64(changed[index])), at: 212 + 4 * index)
        }
        guard !hasMetadataPagesInClusters || clusterSizeBytes == UInt32(Self.pageBytes) else {
            throw reader.error(.invalidField(name: "cluster size (metadata pages in clusters need 4096)",
                                             value: UInt64(clusterSizeBytes)), at: 72)
        }
    }

    /// The current super block of decoded slots: the regular one (not an intent) with the
    /// higher sequence.
    public static func current(_ slots: [Result<SuperBlock, FormatError>]) -> (slot: Int, block: SuperBlock)? {
        var best: (slot: Int, block: SuperBlock)?
        for (slot, result) in slots.enumerated() {
            guard case let .success(block) = result, !block.isCheckpointIntent else { continue }
            if best == nil || block.sequence > best!.block.sequence { best = (slot, block) }
        }
        return best
    }

    /// Metadata pages may live in data clusters (`Features.metadataPagesInClusters`).
    public var hasMetadataPagesInClusters: Bool { incompatibleFeatures & Features.metadataPagesInClusters != 0 }

    /// The table and bitmaps lie after the data clusters (`Features.arraysAfterData`).
    public var hasArraysAfterData: Bool { incompatibleFeatures & Features.arraysAfterData != 0 }

    /// One past the last page of any region (the arrays' end in a grown store).
    public var regionsEndPage: UInt64 {
        max(metadataPages.endPage, bitmaps.startPage + 2 * bitmaps.pageCount, table.startPage + 2 * table.pageCount)
    }

    /// One past the largest metadata page id: the region's pages, then (with the feature)
    /// one per cluster, below 0xFFFFFFFF (the end of a chain; a table entry holds id + 1).
    public var metadataPageIDLimit: UInt64 {
        let region = metadataPages.pageCount
        guard hasMetadataPagesInClusters else { return region }
        return region + min(clusterCount, UInt64(UInt32.max) - region)
    }

    /// The data cluster holding metadata page `id`, nil for a page of the region.
    @inline(__always)
    public func metadataPageCluster(_ id: UInt32) -> UInt64? {
        UInt64(id) < metadataPages.pageCount ? nil : UInt64(id) - metadataPages.pageCount
    }

    /// Device page of metadata page `id` (below `metadataPageIDLimit`).
    @inline(__always)
    public func metadataPageAddress(_ id: UInt32) -> UInt64 {
        guard let cluster = metadataPageCluster(id) else { return metadataPages.startPage + UInt64(id) }
        return dataStartPage + cluster  // one page per cluster
    }

    /// Pages one bitmap copy needs for the three bitmaps (no overflow: decoding bounds the
    /// counts by the device).
    public var bitmapPagesNeeded: UInt64 {
        BitmapPage.pages(forBits: clusterCount) + BitmapPage.pages(forBits: metadataPages.pageCount)
            + BitmapPage.pages(forBits: blobIDLimit)
    }

    /// nil when each bitmap copy holds the three bitmaps; else the error naming the field of
    /// the slot at `slotOffset`. Loading and the verifier check it before reading a bitmap.
    public func bitmapRegionError(slotOffset: UInt64) -> FormatError? {
        let needed = bitmapPagesNeeded
        guard bitmaps.pageCount < needed else { return nil }
        return FormatError("super block", offset: slotOffset + 128,
                           .invalidField(name: "bitmap region pages (\(needed) needed)", value: bitmaps.pageCount))
    }
}
