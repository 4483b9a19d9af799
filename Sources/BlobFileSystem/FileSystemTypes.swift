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

/// An inode's number and attributes, as `stat` wants them.
public struct Attributes: Sendable {
    public var ino: UInt64
    public var attributes: InodeAttributes
    /// Bytes of allocated clusters (st_blocks * 512).
    public var allocatedBytes: UInt64
    public var blockSize: UInt32
}

/// One entry of a directory listing.
public struct DirectoryEntry: Sendable {
    public var name: [UInt8]
    public var ino: UInt64
    public var type: UInt32
    public init(name: [UInt8], ino: UInt64, type: UInt32) {
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
    public init(mode: UInt32? = nil, uid: UInt32? = nil, gid: UInt32? = nil, size: UInt64? = nil, atime: Time? = nil,
                mtime: Time? = nil, ctime: Int64? = nil) {
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
