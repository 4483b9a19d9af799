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

/// Blob table: entry `id` holds the blob's root metadata page + 1 (0: no blob).
public enum TablePage {
    public static let entryBytes = 4
    public static let entriesPerPage = ArrayPage.payloadBytes / entryBytes
}

/// Bitmaps: bit `i` of a section is in byte `i / 8`, bit `i % 8`, spread over pages of
/// `bitsPerPage` bits.
public enum BitmapPage {
    public static let bitsPerPage = ArrayPage.payloadBytes * 8

    public static func pages(forBits bits: UInt64) -> UInt64 {
        (bits + UInt64(bitsPerPage) - 1) / UInt64(bitsPerPage)
    }
}
