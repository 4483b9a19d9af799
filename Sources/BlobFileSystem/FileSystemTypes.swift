#if canImport(Glibc)
import Glibc
#endif
import Blobstore

/// Who asks: the calling process's credentials (FUSE passes them with each request).
public struct Caller: Sendable {
    public var uid: UInt32
    public var gid: UInt32
    public init(uid: UInt32, gid: UInt32) {
        self.uid = uid
        self.gid = gid
    }
    public static let root = Caller(uid: 0, gid: 0)
}

/// An inode number as the kernel knows it (the FUSE node id; `root` is 1). The inode is
/// held by blob `blobID`, the number less one (FORMAT.md, "File system"). A type of its
/// own, after swift-system's RawRepresentable wrappers (as the store's `BlobID` is), so
/// that an inode number and a blob id cannot be mixed up; no integer literals
/// either (`inode(0)` read as inode 0 where blob 0 was meant once).
public struct InodeNumber: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    /// The inode of the blob `id`.
    public init(blob id: BlobID) { rawValue = id.rawValue + 1 }
    public static let root = InodeNumber(1)
    /// The blob that holds the inode.
    public var blobID: BlobID { BlobID(rawValue: rawValue - 1) }
    public var description: String { String(rawValue) }
    public static func < (a: InodeNumber, b: InodeNumber) -> Bool { a.rawValue < b.rawValue }
}

extension BlobID {
    /// The root directory's blob: the store's super blob, marked `fs` (FORMAT.md, "File system").
    public static let rootDirectory = InodeNumber.root.blobID
}

/// An inode's number and attributes, as `stat` wants them.
public struct Attributes: Sendable {
    public var ino: InodeNumber
    public var attributes: InodeAttributes
    /// Bytes of allocated clusters (st_blocks * 512).
    public var allocatedBytes: UInt64
    public var blockSize: UInt32
}

/// One entry of a directory listing.
public struct DirectoryEntry: Sendable {
    public var name: [UInt8]
    public var ino: InodeNumber
    public var type: UInt32
    public init(name: [UInt8], ino: InodeNumber, type: UInt32) {
        self.name = name
        self.ino = ino
        self.type = type
    }
}

/// Changes `setattr` applies; nil leaves a field alone.
public struct AttributeChanges: Sendable {
    public enum Time: Sendable {
        case now
        case ns(Int64)
    }
    public var mode: UInt32?
    public var uid: UInt32?
    public var gid: UInt32?
    public var size: UInt64?
    public var atime: Time?
    public var mtime: Time?
    public var ctime: Int64?
    /// Drop set-user-ID, and set-group-ID where group-execute is set: what Linux does on
    /// a write or truncate by a caller without CAP_FSETID (the kernel asks for it with
    /// FUSE_HANDLE_KILLPRIV_V2's flags).
    public var dropSetID: Bool
    public init(mode: UInt32? = nil, uid: UInt32? = nil, gid: UInt32? = nil, size: UInt64? = nil, atime: Time? = nil,
                mtime: Time? = nil, ctime: Int64? = nil, dropSetID: Bool = false) {
        self.dropSetID = dropSetID
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.atime = atime
        self.mtime = mtime
        self.ctime = ctime
    }
}

public struct FileSystemStatistics: Sendable {
    public var blockSize: UInt64
    public var blocks: UInt64
    public var freeBlocks: UInt64
    public var files: UInt64
    public var freeFiles: UInt64
    public var nameMax: UInt64
}
