#if canImport(Glibc)
import Glibc
#endif
import Blobstore

/// The attributes of one inode, kept in its blob's internal xattr "i" (FORMAT.md, "File
/// system"). Little-endian, 80 bytes.
public struct InodeAttributes: Equatable, Sendable {
    public var mode: UInt32
    public var uid: UInt32
    public var gid: UInt32
    public var nlink: UInt32
    public var size: UInt64
    public var atimeNs: Int64
    public var mtimeNs: Int64
    public var ctimeNs: Int64
    public var birthNs: Int64
    /// Distinguishes the inodes that reuse one blob id over time (FUSE's generation).
    public var generation: UInt64
    public var rdev: UInt32
    /// A directory's parent (directories have exactly one); blob 0 for other inodes.
    public var parent: BlobID

    static let encodedBytes = 80
    static let version: UInt32 = 1

    public init(mode: UInt32, uid: UInt32, gid: UInt32, nlink: UInt32 = 1, size: UInt64 = 0, timeNs: Int64,
                generation: UInt64, rdev: UInt32 = 0) {
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = nlink
        self.size = size
        atimeNs = timeNs
        mtimeNs = timeNs
        ctimeNs = timeNs
        birthNs = timeNs
        self.generation = generation
        self.rdev = rdev
        parent = BlobID(rawValue: 0)
    }

    public var type: UInt32 { mode & UInt32(S_IFMT) }
    public var isDirectory: Bool { type == UInt32(S_IFDIR) }
    public var isRegular: Bool { type == UInt32(S_IFREG) }
    public var isSymlink: Bool { type == UInt32(S_IFLNK) }

    func encode() -> [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(Self.encodedBytes)
        func put<T: FixedWidthInteger>(_ value: T) {
            var little = value.littleEndian
            withUnsafeBytes(of: &little) { bytes.append(contentsOf: $0) }
        }
        put(Self.version); put(mode); put(uid); put(gid); put(nlink); put(rdev)
        put(size); put(atimeNs); put(mtimeNs); put(ctimeNs); put(birthNs); put(generation); put(parent.rawValue)
        return bytes
    }

    static func decode(_ bytes: [UInt8]) -> InodeAttributes? {
        guard bytes.count == encodedBytes else { return nil }
        var at = 0
        func get<T: FixedWidthInteger>(_: T.Type) -> T {
            var value: T = 0
            withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: bytes[at..<(at + MemoryLayout<T>.size)]) }
            at += MemoryLayout<T>.size
            return T(littleEndian: value)
        }
        guard get(UInt32.self) == version else { return nil }
        let mode = get(UInt32.self), uid = get(UInt32.self), gid = get(UInt32.self), nlink = get(UInt32.self)
        let rdev = get(UInt32.self)
        var attributes = InodeAttributes(mode: mode, uid: uid, gid: gid, nlink: nlink, size: get(UInt64.self), timeNs: 0,
                                         generation: 0, rdev: rdev)
        attributes.atimeNs = get(Int64.self)
        attributes.mtimeNs = get(Int64.self)
        attributes.ctimeNs = get(Int64.self)
        attributes.birthNs = get(Int64.self)
        attributes.generation = get(UInt64.self)
        attributes.parent = BlobID(rawValue: get(UInt64.self))
        return attributes
    }
}

/// Names of the internal xattrs the file system keeps on blobs.
enum Key {
    /// Inode attributes.
    static let inode = "i"
    /// A symlink's target.
    static let symlink = "l"
    /// A symlink target longer than one piece continues in "l1", "l2" ...
    static let symlinkPieceBytes = 2048
    static func symlinkPiece(_ index: Int) -> String { index == 0 ? symlink : symlink + String(index) }
    /// On the root: the file system's identity and next generation.
    static let superInfo = "fs"
    /// On the root: "o" + blob id of an unlinked inode still open (deleted at release or at mount).
    static let orphanPrefix = "o"
    static func orphan(_ id: BlobID) -> String { orphanPrefix + String(id.rawValue) }
    /// The blob of an orphan key, nil for other keys.
    static func orphanID(_ key: String) -> BlobID? {
        guard key.hasPrefix(orphanPrefix), let raw = UInt64(key.dropFirst(orphanPrefix.count)) else { return nil }
        return BlobID(rawValue: raw)
    }
    /// On a snapshot blob that holds data files share (no inode; FileSystem+Clones.swift).
    static let sharedData = "s"

    /// A directory entry: "d" + the name when it is UTF-8 (names compare as bytes), else
    /// "x" + the name in hex. The value is the child's blob id (8 bytes) and its type (1).
    static func entry<Name: Collection<UInt8>>(_ name: Name) -> String {
        // A key of up to 15 bytes is a small string: a lookup of a short name allocates nothing.
        if let text = String(validating: name, as: UTF8.self) { return "d" + text }
        let digits = Array("0123456789abcdef".utf8)
        var hex = [UInt8(ascii: "x")]
        for byte in name { hex.append(digits[Int(byte >> 4)]); hex.append(digits[Int(byte & 15)]) }
        return String(decoding: hex, as: UTF8.self)
    }

    /// The file name of a directory-entry key, nil for other keys.
    static func entryName(_ key: String) -> [UInt8]? {
        var utf8 = key.utf8[...]
        guard let first = utf8.popFirst() else { return nil }
        if first == UInt8(ascii: "d") { return Array(utf8) }
        guard first == UInt8(ascii: "x"), utf8.count % 2 == 0 else { return nil }
        var name: [UInt8] = []
        var iterator = utf8.makeIterator()
        func nibble(_ c: UInt8) -> UInt8 { c >= 97 ? c - 87 : c - 48 }
        while let high = iterator.next(), let low = iterator.next() { name.append(nibble(high) << 4 | nibble(low)) }
        return name
    }

    static func entryValue(id: BlobID, type: UInt32) -> [UInt8] {
        var bytes = withUnsafeBytes(of: id.rawValue.littleEndian) { Array($0) }
        bytes.append(UInt8(truncatingIfNeeded: type >> 12))
        return bytes
    }

    static func decodeEntry(_ value: [UInt8]) -> (id: BlobID, type: UInt32)? {
        guard value.count == 9 else { return nil }
        var raw: UInt64 = 0
        for index in 0..<8 { raw |= UInt64(value[index]) << (8 * UInt64(index)) }
        return (BlobID(rawValue: raw), UInt32(value[8]) << 12)
    }
}

/// Wall-clock time in nanoseconds since the epoch, at the clock tick (CLOCK_REALTIME_COARSE:
/// what the kernel stamps files with, no finer than a few ms; a vDSO read).
func coarseRealtimeNs() -> Int64 {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME_COARSE, &now)
    return Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec)
}

/// Wall-clock time in nanoseconds since the epoch.
func realtimeNs() -> Int64 {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec)
}
