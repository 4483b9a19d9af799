/// Pages of the blob table and of the allocation bitmaps: FORMAT.md, section "Blob table and
/// bitmap pages". Both are arrays split over checksummed pages; each checkpoint writes
/// the changed pages into the copy that is not active, then switches copies in the
/// super block.
public enum ArrayPageKind: UInt32, Sendable {
    case table = 0x4C42_5442  // "BTBL"
    case bitmap = 0x504D_4242  // "BBMP"

    var name: String { self == .table ? "blob table page" : "bitmap page" }
}

public enum ArrayPage {
    public static let headerBytes = 24
    public static let payloadBytes = SuperBlock.pageBytes - headerBytes

    public static func encode(kind: ArrayPageKind, checkpointSequence: UInt64, pageIndex: UInt32,
                              payload: ArraySlice<UInt8>) -> [UInt8] {
        precondition(payload.count <= payloadBytes)
        var writer = ByteWriter(count: SuperBlock.pageBytes)
        writer.u32(kind.rawValue)
        writer.u32(0)
        writer.u64(checkpointSequence)
        writer.u32(pageIndex)
        writer.u32(0)
        writer.raw(payload)
        writer.sealChecksum(over: 8..<SuperBlock.pageBytes, at: 4)
        return writer.bytes
    }

    /// The payload of a valid page whose index is `pageIndex`.
    public static func decode(_ bytes: ArraySlice<UInt8>, kind: ArrayPageKind, pageIndex: UInt32,
                              offset: UInt64) throws(FormatError) -> (checkpointSequence: UInt64, payload: ArraySlice<UInt8>) {
        var reader = ByteReader(bytes, structure: "\(kind.name) \(pageIndex)", base: offset)
        guard bytes.count >= SuperBlock.pageBytes else {
            throw reader.error(.truncated(needed: SuperBlock.pageBytes, available: bytes.count))
        }
        let magic = try reader.u32()
        guard magic == kind.rawValue else { throw reader.error(.badMagic(found: UInt64(magic)), at: 0) }
        try reader.verifyChecksum(over: 8..<SuperBlock.pageBytes, at: 4)
        _ = try reader.u32()
        let checkpoint = try reader.u64()
        let index = try reader.u32()
        guard index == pageIndex else { throw reader.error(.invalidField(name: "page index", value: UInt64(index)), at: 16) }
        try reader.requireZero(20..<24)
        let start = bytes.startIndex + headerBytes
        return (checkpoint, bytes[start..<(start + payloadBytes)])
    }
}

/// Blob table: entry `id` holds the blob's root metadata page + 1 (0: no blob), a u32
/// little-endian at byte `(id % entriesPerPage) * entryBytes` of page `id / entriesPerPage`'s
/// payload. Entries at or past the blob id limit are zero when written and ignored when
/// read. An entry carries no check of its own: the page checksum (`ArrayPage`) covers it.
public enum TablePage {
    public static let entryBytes = 4
    public static let entriesPerPage = ArrayPage.payloadBytes / entryBytes

    /// The table page that holds blob `id`'s entry.
    public static func pageIndex(of id: BlobID) -> Int { Int(id.rawValue / UInt64(entriesPerPage)) }

    /// The payload of table page `pageIndex`: for each id below `blobIDLimit` on it, the
    /// first page of its chain (`root`; nil: no blob).
    public static func encode(pageIndex: Int, blobIDLimit: UInt64, root: (BlobID) -> UInt32?) -> [UInt8] {
        var payload = [UInt8](repeating: 0, count: ArrayPage.payloadBytes)
        for entry in 0..<entriesPerPage {
            let id = UInt64(pageIndex) * UInt64(entriesPerPage) + UInt64(entry)
            guard id < blobIDLimit else { break }
            guard let root = root(BlobID(rawValue: id)) else { continue }
            precondition(root < UInt32.max, "blob \(id): root page \(root) has no table entry")
            let value = root + 1
            for byte in 0..<entryBytes { payload[entry * entryBytes + byte] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(byte))) }
        }
        return payload
    }

    /// The blobs of table page `pageIndex`'s payload (`ArrayPage.decode`'s), by id, with
    /// the first page of their chain; entries at or past `blobIDLimit` are not read.
    public static func decode(_ payload: ArraySlice<UInt8>, pageIndex: Int, blobIDLimit: UInt64) -> [(id: BlobID, root: UInt32)] {
        precondition(payload.count >= ArrayPage.payloadBytes)
        var roots: [(id: BlobID, root: UInt32)] = []
        for entry in 0..<entriesPerPage {
            let id = UInt64(pageIndex) * UInt64(entriesPerPage) + UInt64(entry)
            guard id < blobIDLimit else { break }
            let at = payload.startIndex + entry * entryBytes
            let value = UInt32(payload[at]) | UInt32(payload[at + 1]) << 8 | UInt32(payload[at + 2]) << 16
                | UInt32(payload[at + 3]) << 24
            if value != 0 { roots.append((BlobID(rawValue: id), value - 1)) }
        }
        return roots
    }
}

/// Bitmaps: bit `i` of a section is in byte `i / 8`, bit `i % 8`, spread over pages of
/// `bitsPerPage` bits.
public enum BitmapPage {
    public static let bitsPerPage = ArrayPage.payloadBytes * 8

    public static func pages(forBits bits: UInt64) -> UInt64 {
        (bits + UInt64(bitsPerPage) - 1) / UInt64(bitsPerPage)
    }
}
