/// A blob's id: its index in the blob table and in the blob-id bitmap (FORMAT.md, "Blob
/// table and bitmap pages"). A type of its own, after swift-system's RawRepresentable
/// wrappers, so that a blob id cannot be mixed up with a cluster index, a page number or
/// an inode number (the file system's `InodeNumber`, which is the blob id plus one). No
/// integer literals: a bare number where an id is wanted says so with `BlobID(rawValue:)`.
///
/// On disk an id is its `rawValue`, a little-endian u64: the codecs in Format/ cross to it
/// (`ByteWriter.blobID`, `ByteReader.blobID`), and inside the store only the blob-id
/// bitmap, indexed by it, does too.
public struct BlobID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public var description: String { String(rawValue) }
    public static func < (a: BlobID, b: BlobID) -> Bool { a.rawValue < b.rawValue }
}
