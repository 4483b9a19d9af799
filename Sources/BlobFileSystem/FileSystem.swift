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

/// A POSIX file system on a blob store (FORMAT.md, "File system"): an inode is a blob,
/// its attributes an internal xattr, a directory's entries internal xattrs of its blob
/// (an O(1) lookup by name), file data the blob's clusters. Every namespace change is
/// one blob-store transaction, so after a crash it is all there or not at all.
///
/// Not thread-safe: one thread owns it (the FUSE front end runs it on the blob store's
/// metadata reactor). It never imports FUSE; inode numbers are blob id + 1 (the root,
/// blob 0, is inode 1 as FUSE wants).
public final class FileSystem {
    public static let rootIno: UInt64 = 1
    public static let nameBytesMax = 255
    /// PATH_MAX - 1: the longest symlink target Linux passes (ext4 and tmpfs take it too).
    public static let symlinkBytesMax = 4095
    static let magic = Array("blobfs-fs 1".utf8)

    final class Inode {
        var attributes: InodeAttributes
        /// Attributes changed in memory and not yet in the log (size, times after I/O).
        var dirty = false
        /// Times the size grew in memory, and how many of those growths had their data
        /// flushed: an fsync commits a grown size only after the data under it is durable.
        var sizeGrowths: UInt64 = 0
        var sizeGrowthsFlushed: UInt64 = 0
        /// FUSE lookup count: the kernel may name this inode until it forgets it.
        var lookups: UInt64 = 0
        var opens = 0
        /// The times were handed out (`attributes`) since they last changed: the next data
        /// write must change them visibly (`stampDataWrite`).
        var timesObserved = true
        init(_ attributes: InodeAttributes) { self.attributes = attributes }
    }

    public let store: BlobStore
    var inodes: [UInt64: Inode] = [:]
    /// Clusters held back for the kernel's page cache (`writebackReserveBytes`).
    private(set) var writebackReserveClusters: UInt64 = 0
    /// Directory listings handed out by `openDirectory`, by handle.
    var listings: [UInt64: [DirectoryEntry]] = [:]
    var nextListing: UInt64 = 1
    let clusterBytes: UInt64
    let unitBytes: UInt64

    private init(store: BlobStore) {
        self.store = store
        clusterBytes = UInt64(store.clusterSizeBytes)
        unitBytes = UInt64(store.ioUnitBytes)
    }

    // MARK: - Format and mount

    /// Makes an empty file system on a freshly formatted store: the root directory is
    /// blob 0 and the store's super blob.
    public static func format(_ store: BlobStore, rootMode: UInt32 = 0o755, owner: Caller = .root) throws(FSError) -> FileSystem {
        guard store.blobCount == 0 else { throw FSError(EEXIST, "the blob store already holds \(store.blobCount) blobs") }
        let now = realtimeNs()
        var root = InodeAttributes(mode: UInt32(S_IFDIR) | (rootMode & 0o7777), uid: owner.uid, gid: owner.gid, nlink: 2,
                                   timeNs: now, generation: 1)
        root.parent = 0
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                let id = try tx.createBlob()
                precondition(id == 0, "a fresh store hands out blob 0 first")
                try tx.setXattr(id, name: Key.superInfo, value: magic, isInternal: true)
                try tx.setXattr(id, name: Key.inode, value: root.encode(), isInternal: true)
                try tx.setSuperBlob(id)
            }
        }
        return try mount(store)
    }

    /// Opens the file system on a loaded store; inodes unlinked while open before a
    /// crash are deleted now.
    public static func mount(_ store: BlobStore) throws(FSError) -> FileSystem {
        guard store.superBlobID == 0, store.xattr(0, name: Key.superInfo, isInternal: true) == magic else {
            throw FSError(EINVAL, "no blobfs file system on this blob store (the super blob is not a blobfs root)")
        }
        let fs = FileSystem(store: store)
        _ = try fs.inode(0)
        // A read-only store (offline inspection) is looked at as it is: orphans stay.
        guard !store.isReadOnly else { return fs }
        // Namespace changes are durable at fsync/sync (and within a second: the
        // service's write-back), not each on its own flush.
        store.deferCommitFlush = true
        // A failed device write or flush: every later write gets EROFS, none hangs.
        store.readOnlyOnDeviceError = true
        try fs.deleteOrphans()
        return fs
    }

    /// Writes back what is only in memory and deletes unlinked inodes; the store stays
    /// loaded (the caller unloads it).
    public func unmount() throws(FSError) {
        try writeBack()
        for (id, inode) in inodes { inode.lookups = 0; inode.opens = 0; _ = id }
        try deleteOrphans()
        try storeCall { try store.sync() }
    }

    private func deleteOrphans() throws(FSError) {
        guard let root = store.blob(0) else { return }
        let orphans = root.internalXattrs.compactMap { entry -> UInt64? in
            guard entry.name.hasPrefix(Key.orphanPrefix), entry.name != Key.superInfo else { return nil }
            return UInt64(entry.name.dropFirst(Key.orphanPrefix.count))
        }
        for id in orphans where (inodes[id]?.opens ?? 0) == 0 && (inodes[id]?.lookups ?? 0) == 0 {
            try storeCall {
                try store.transaction { tx throws(BlobStoreError) in
                    if store.blob(id) != nil { try tx.deleteBlob(id) }
                    try tx.removeXattr(0, name: Key.orphanPrefix + String(id), isInternal: true)
                }
            }
            inodes[id] = nil
        }
    }

    // MARK: - Inodes

    static func blobID(_ ino: UInt64) -> UInt64 { ino - 1 }
    static func ino(_ id: UInt64) -> UInt64 { id + 1 }

    func inode(_ id: UInt64) throws(FSError) -> Inode {
        if let cached = inodes[id] { return cached }
        guard let value = store.xattr(id, name: Key.inode, isInternal: true) else {
            throw FSError(ENOENT, "no inode \(Self.ino(id))")
        }
        guard let attributes = InodeAttributes.decode(value) else {
            throw FSError(EIO, "inode \(Self.ino(id)): attributes unreadable (\(value.count) bytes)")
        }
        let inode = Inode(attributes)
        inodes[id] = inode
        return inode
    }

    func inode(ino: UInt64) throws(FSError) -> Inode {
        guard ino >= 1, ino <= store.blobIDLimit else { throw FSError(ENOENT, "inode \(ino)") }
        return try inode(Self.blobID(ino))
    }

    func attributes(_ id: UInt64, _ inode: Inode) -> Attributes {
        inode.timesObserved = true
        let allocated = store.blob(id).map { $0.extents.reduce(UInt64(0)) { $0 + UInt64($1.count) } } ?? 0
        return Attributes(ino: Self.ino(id), attributes: inode.attributes, allocatedBytes: allocated * clusterBytes,
                          blockSize: UInt32(clusterBytes))
    }

    /// Persists the attributes of every inode changed only in memory (one transaction).
    public func writeBack() throws(FSError) {
        let dirty = inodes.filter { $0.value.dirty && store.blob($0.key) != nil }
        guard !dirty.isEmpty else { return }
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                for (id, inode) in dirty {
                    try tx.setXattr(id, name: Key.inode, value: inode.attributes.encode(), isInternal: true)
                }
            }
        }
        for (_, inode) in dirty { inode.dirty = false }
    }

    var hasDirtyInodes: Bool { inodes.values.contains { $0.dirty } }

    /// Inodes whose attributes changed only in memory, and inodes held in memory.
    public var dirtyInodeCount: Int { inodes.values.reduce(0) { $0 + ($1.dirty ? 1 : 0) } }
    public var cachedInodeCount: Int { inodes.count }

    /// Something only in memory or not yet flushed: the write-back has work.
    public var needsWriteBack: Bool { store.hasUnflushedCommits || hasDirtyInodes }

    private func checkName(_ name: [UInt8]) throws(FSError) {
        guard !name.isEmpty, !name.contains(0), !name.contains(UInt8(ascii: "/")) else {
            throw FSError(EINVAL, "invalid file name")
        }
        guard name.count <= Self.nameBytesMax else { throw FSError(ENAMETOOLONG, "\(name.count)-byte name") }
    }

    private func directory(ino: UInt64) throws(FSError) -> (UInt64, Inode) {
        let inode = try inode(ino: ino)
        guard inode.attributes.isDirectory else { throw FSError(ENOTDIR, "inode \(ino)") }
        return (Self.blobID(ino), inode)
    }

    private func entry<Name: Collection<UInt8>>(in directoryID: UInt64, _ name: Name) -> (id: UInt64, type: UInt32)? {
        store.xattr(directoryID, name: Key.entry(name), isInternal: true).flatMap(Key.decodeEntry)
    }

    /// Room for one more inode: a blob id and enough free metadata pages that the next
    /// checkpoint can still write every changed chain (`checkpointPagesNeeded`) and a
    /// sixteenth of the region is held back.
    private func reserveInode() throws(FSError) {
        guard UInt64(store.blobCount) < store.blobIDLimit else { throw FSError(ENOSPC, "no free inode") }
        guard store.freeMetadataPageCount > max(store.metadataPageCount / 16 + 8, store.checkpointPagesNeeded + 8) else {
            throw FSError(ENOSPC, "metadata pages exhausted (\(store.freeMetadataPageCount) free)")
        }
    }

    // MARK: - Lookup

    public func lookup(parent: UInt64, name: [UInt8]) throws(FSError) -> Attributes {
        try lookup(parent: parent, nameBytes: name)
    }

    /// `lookup` of a name given as bytes (the FUSE request's own buffer: no copy).
    public func lookup<Name: Collection<UInt8>>(parent: UInt64, nameBytes name: Name) throws(FSError) -> Attributes {
        let (directoryID, _) = try directory(ino: parent)
        guard name.count <= Self.nameBytesMax else { throw FSError(ENAMETOOLONG) }
        guard let found = entry(in: directoryID, name) else { throw FSError(ENOENT) }
        let inode = try inode(found.id)
        inode.lookups += 1
        return attributes(found.id, inode)
    }

    /// The kernel dropped `count` references to `ino`.
    public func forget(ino: UInt64, count: UInt64) {
        let id = Self.blobID(ino)
        guard let inode = inodes[id] else { return }
        inode.lookups -= min(inode.lookups, count)
        releaseIfUnused(id, inode)
    }

    public func getAttributes(ino: UInt64) throws(FSError) -> Attributes {
        let inode = try inode(ino: ino)
        return attributes(Self.blobID(ino), inode)
    }

    // MARK: - Creating

    /// Creates a regular file, directory, symlink, FIFO, socket or device node.
    public func make(parent: UInt64, name: [UInt8], mode: UInt32, rdev: UInt32 = 0, symlinkTarget: [UInt8]? = nil,
                     caller: Caller) throws(FSError) -> Attributes {
        try checkName(name)
        let (directoryID, directory) = try directory(ino: parent)
        guard entry(in: directoryID, name) == nil else { throw FSError(EEXIST) }
        try reserveInode()
        if let symlinkTarget {
            guard !symlinkTarget.isEmpty, symlinkTarget.count <= Self.symlinkBytesMax else {
                throw FSError(ENAMETOOLONG, "\(symlinkTarget.count)-byte symlink target")
            }
        }
        let now = realtimeNs()
        var mode = mode
        var gid = caller.gid
        let isDirectory = mode & UInt32(S_IFMT) == UInt32(S_IFDIR)
        if directory.attributes.mode & UInt32(S_ISGID) != 0 {
            gid = directory.attributes.gid
            if isDirectory { mode |= UInt32(S_ISGID) }
        } else if !isDirectory, mode & UInt32(S_ISGID) != 0, caller.uid != 0, caller.gid != gid {
            mode &= ~UInt32(S_ISGID)
        }
        var attributes = InodeAttributes(mode: mode, uid: caller.uid, gid: gid, nlink: isDirectory ? 2 : 1,
                                         size: UInt64(symlinkTarget?.count ?? 0), timeNs: now,
                                         generation: store.logSequence, rdev: rdev)
        if isDirectory { attributes.parent = directoryID }
        var parentAttributes = directory.attributes
        parentAttributes.mtimeNs = now
        parentAttributes.ctimeNs = now
        if isDirectory { parentAttributes.nlink += 1 }
        let id = try storeCall {
            try store.transaction { tx throws(BlobStoreError) -> UInt64 in
                let id = try tx.createBlob()
                try tx.setXattr(id, name: Key.inode, value: attributes.encode(), isInternal: true)
                if let symlinkTarget {
                    // In pieces that each fit a log record: "l", then "l1", "l2" ...
                    for (index, start) in stride(from: 0, to: symlinkTarget.count, by: Key.symlinkPieceBytes).enumerated() {
                        let piece = Array(symlinkTarget[start..<min(start + Key.symlinkPieceBytes, symlinkTarget.count)])
                        try tx.setXattr(id, name: Key.symlinkPiece(index), value: piece, isInternal: true)
                    }
                }
                try tx.setXattr(directoryID, name: Key.entry(name), value: Key.entryValue(id: id, type: attributes.type),
                                isInternal: true)
                try tx.setXattr(directoryID, name: Key.inode, value: parentAttributes.encode(), isInternal: true)
                return id
            }
        }
        directory.attributes = parentAttributes
        directory.dirty = false
        let inode = Inode(attributes)
        inode.lookups = 1
        inodes[id] = inode
        return self.attributes(id, inode)
    }

    public func readSymlink(ino: UInt64) throws(FSError) -> [UInt8] {
        let inode = try inode(ino: ino)
        guard inode.attributes.isSymlink else { throw FSError(EINVAL, "not a symlink") }
        let id = Self.blobID(ino)
        guard var target = store.xattr(id, name: Key.symlink, isInternal: true) else {
            throw FSError(EIO, "symlink \(ino) has no target")
        }
        var index = 1
        while let piece = store.xattr(id, name: Key.symlinkPiece(index), isInternal: true) {
            target += piece
            index += 1
        }
        return target
    }

    public func link(ino: UInt64, newParent: UInt64, newName: [UInt8]) throws(FSError) -> Attributes {
        try checkName(newName)
        let id = Self.blobID(ino)
        let inode = try inode(ino: ino)
        guard !inode.attributes.isDirectory else { throw FSError(EPERM, "hard link to a directory") }
        guard inode.attributes.nlink < UInt32(Int32.max) else { throw FSError(EMLINK) }
        let (directoryID, directory) = try directory(ino: newParent)
        guard entry(in: directoryID, newName) == nil else { throw FSError(EEXIST) }
        try reserveInode()
        let now = realtimeNs()
        var attributes = inode.attributes
        attributes.nlink += 1
        attributes.ctimeNs = now
        var parentAttributes = directory.attributes
        parentAttributes.mtimeNs = now
        parentAttributes.ctimeNs = now
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.setXattr(directoryID, name: Key.entry(newName), value: Key.entryValue(id: id, type: attributes.type),
                                isInternal: true)
                try tx.setXattr(directoryID, name: Key.inode, value: parentAttributes.encode(), isInternal: true)
                try tx.setXattr(id, name: Key.inode, value: attributes.encode(), isInternal: true)
                if attributes.nlink == 1 { try tx.removeXattr(0, name: Key.orphanPrefix + String(id), isInternal: true) }
            }
        }
        inode.attributes = attributes
        inode.dirty = false
        directory.attributes = parentAttributes
        directory.dirty = false
        inode.lookups += 1
        return self.attributes(id, inode)
    }

    // MARK: - Removing

    private func isEmptyDirectory(_ id: UInt64) -> Bool {
        guard let blob = store.blob(id) else { return true }
        return !blob.internalXattrs.contains { Key.entryName($0.name) != nil }
    }

    /// Adds to `tx` what dropping one link of `id` takes: its attributes, and its deletion
    /// (or its orphan record while it is still open or known to the kernel).
    private func dropLink(_ tx: inout BlobTransaction, _ id: UInt64, _ inode: Inode, now: Int64,
                          attributes: inout InodeAttributes) throws(BlobStoreError) {
        if attributes.isDirectory {
            attributes.nlink = 0
        } else {
            attributes.nlink -= min(attributes.nlink, 1)
        }
        attributes.ctimeNs = now
        if attributes.nlink == 0 && inode.opens == 0 && inode.lookups == 0 {
            try tx.deleteBlob(id)
        } else {
            try tx.setXattr(id, name: Key.inode, value: attributes.encode(), isInternal: true)
            if attributes.nlink == 0 { try tx.setXattr(0, name: Key.orphanPrefix + String(id), value: [], isInternal: true) }
        }
    }

    private func settleDropped(_ id: UInt64, _ inode: Inode, _ attributes: InodeAttributes) {
        if store.blob(id) == nil {
            inodes[id] = nil
        } else {
            inode.attributes = attributes
            inode.dirty = false
        }
    }

    public func unlink(parent: UInt64, name: [UInt8]) throws(FSError) {
        try remove(parent: parent, name: name, directory: false)
    }

    public func removeDirectory(parent: UInt64, name: [UInt8]) throws(FSError) {
        try remove(parent: parent, name: name, directory: true)
    }

    private func remove(parent: UInt64, name: [UInt8], directory wantDirectory: Bool) throws(FSError) {
        let (directoryID, directory) = try directory(ino: parent)
        guard let found = entry(in: directoryID, name) else { throw FSError(ENOENT) }
        let child = try inode(found.id)
        if wantDirectory {
            guard child.attributes.isDirectory else { throw FSError(ENOTDIR) }
            guard isEmptyDirectory(found.id) else { throw FSError(ENOTEMPTY) }
        } else {
            guard !child.attributes.isDirectory else { throw FSError(EISDIR) }
        }
        let now = realtimeNs()
        var parentAttributes = directory.attributes
        parentAttributes.mtimeNs = now
        parentAttributes.ctimeNs = now
        if wantDirectory { parentAttributes.nlink -= 1 }
        var childAttributes = child.attributes
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.removeXattr(directoryID, name: Key.entry(name), isInternal: true)
                try tx.setXattr(directoryID, name: Key.inode, value: parentAttributes.encode(), isInternal: true)
                try dropLink(&tx, found.id, child, now: now, attributes: &childAttributes)
            }
        }
        directory.attributes = parentAttributes
        directory.dirty = false
        settleDropped(found.id, child, childAttributes)
    }

    /// Deletes an unlinked inode once nothing refers to it any more.
    func releaseIfUnused(_ id: UInt64, _ inode: Inode) {
        guard inode.opens == 0, inode.lookups == 0 else { return }
        if inode.attributes.nlink == 0, store.blob(id) != nil {
            do {
                try store.transaction { tx throws(BlobStoreError) in
                    try tx.deleteBlob(id)
                    try tx.removeXattr(0, name: Key.orphanPrefix + String(id), isInternal: true)
                }
            } catch {
                // Still an orphan on disk: the next mount deletes it.
                return
            }
        }
        if !inode.dirty { inodes[id] = nil }
    }

    // MARK: - Rename

    public struct RenameFlags: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let noReplace = RenameFlags(rawValue: 1)
        public static let exchange = RenameFlags(rawValue: 2)
    }

    public func rename(parent: UInt64, name: [UInt8], newParent: UInt64, newName: [UInt8],
                       flags: RenameFlags = []) throws(FSError) {
        try checkName(newName)
        guard flags.rawValue & ~3 == 0, flags != [.noReplace, .exchange] else { throw FSError(EINVAL, "rename flags") }
        let (fromID, fromDirectory) = try directory(ino: parent)
        let (toID, toDirectory) = try directory(ino: newParent)
        guard let source = entry(in: fromID, name) else { throw FSError(ENOENT) }
        let target = entry(in: toID, newName)
        let sourceInode = try inode(source.id)
        let now = realtimeNs()
        if flags.contains(.exchange) {
            guard let target else { throw FSError(ENOENT) }
            try exchange(fromID, fromDirectory, name, source, toID, toDirectory, newName, target, now: now)
            return
        }
        if let target {
            if flags.contains(.noReplace) { throw FSError(EEXIST) }
            if target.id == source.id { return }  // two links of one inode: nothing to do
            let targetInode = try inode(target.id)
            if sourceInode.attributes.isDirectory {
                guard targetInode.attributes.isDirectory else { throw FSError(ENOTDIR) }
                guard isEmptyDirectory(target.id) else { throw FSError(ENOTEMPTY) }
            } else if targetInode.attributes.isDirectory {
                throw FSError(EISDIR)
            }
        } else {
            try reserveInode()
        }
        let movesDirectory = sourceInode.attributes.isDirectory
        var fromAttributes = fromDirectory.attributes
        var toAttributes = toDirectory.attributes
        fromAttributes.mtimeNs = now; fromAttributes.ctimeNs = now
        toAttributes.mtimeNs = now; toAttributes.ctimeNs = now
        var sourceAttributes = sourceInode.attributes
        sourceAttributes.ctimeNs = now
        let targetInode = try target.map { (t) throws(FSError) in try inode(t.id) }
        var targetAttributes = targetInode?.attributes
        if movesDirectory && fromID != toID {
            fromAttributes.nlink -= 1
            toAttributes.nlink += 1
            sourceAttributes.parent = toID
        }
        if let targetAttributes, targetAttributes.isDirectory { toAttributes.nlink -= 1 }
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.removeXattr(fromID, name: Key.entry(name), isInternal: true)
                try tx.setXattr(toID, name: Key.entry(newName), value: Key.entryValue(id: source.id, type: source.type),
                                isInternal: true)
                if fromID == toID {
                    try tx.setXattr(toID, name: Key.inode, value: toAttributes.encode(), isInternal: true)
                } else {
                    try tx.setXattr(fromID, name: Key.inode, value: fromAttributes.encode(), isInternal: true)
                    try tx.setXattr(toID, name: Key.inode, value: toAttributes.encode(), isInternal: true)
                }
                try tx.setXattr(source.id, name: Key.inode, value: sourceAttributes.encode(), isInternal: true)
                if let target, let targetInode, var attributes = targetAttributes {
                    try dropLink(&tx, target.id, targetInode, now: now, attributes: &attributes)
                    targetAttributes = attributes
                }
            }
        }
        if fromID == toID {
            fromDirectory.attributes = toAttributes
        } else {
            fromDirectory.attributes = fromAttributes
            toDirectory.attributes = toAttributes
        }
        fromDirectory.dirty = false
        toDirectory.dirty = false
        sourceInode.attributes = sourceAttributes
        sourceInode.dirty = false
        if let target, let targetInode, let targetAttributes { settleDropped(target.id, targetInode, targetAttributes) }
    }

    private func exchange(_ fromID: UInt64, _ fromDirectory: Inode, _ name: [UInt8], _ source: (id: UInt64, type: UInt32),
                          _ toID: UInt64, _ toDirectory: Inode, _ newName: [UInt8], _ target: (id: UInt64, type: UInt32),
                          now: Int64) throws(FSError) {
        let sourceInode = try inode(source.id)
        let targetInode = try inode(target.id)
        var sourceAttributes = sourceInode.attributes
        var targetAttributes = targetInode.attributes
        sourceAttributes.ctimeNs = now
        targetAttributes.ctimeNs = now
        var fromAttributes = fromDirectory.attributes
        var toAttributes = toDirectory.attributes
        fromAttributes.mtimeNs = now; fromAttributes.ctimeNs = now
        toAttributes.mtimeNs = now; toAttributes.ctimeNs = now
        if fromID != toID {
            if sourceAttributes.isDirectory { sourceAttributes.parent = toID; fromAttributes.nlink -= 1; toAttributes.nlink += 1 }
            if targetAttributes.isDirectory { targetAttributes.parent = fromID; toAttributes.nlink -= 1; fromAttributes.nlink += 1 }
        }
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.setXattr(fromID, name: Key.entry(name), value: Key.entryValue(id: target.id, type: target.type),
                                isInternal: true)
                try tx.setXattr(toID, name: Key.entry(newName), value: Key.entryValue(id: source.id, type: source.type),
                                isInternal: true)
                if fromID == toID {
                    try tx.setXattr(fromID, name: Key.inode, value: fromAttributes.encode(), isInternal: true)
                } else {
                    try tx.setXattr(fromID, name: Key.inode, value: fromAttributes.encode(), isInternal: true)
                    try tx.setXattr(toID, name: Key.inode, value: toAttributes.encode(), isInternal: true)
                }
                if source.id != target.id {
                    try tx.setXattr(source.id, name: Key.inode, value: sourceAttributes.encode(), isInternal: true)
                    try tx.setXattr(target.id, name: Key.inode, value: targetAttributes.encode(), isInternal: true)
                }
            }
        }
        fromDirectory.attributes = fromAttributes
        if fromID != toID { toDirectory.attributes = toAttributes }
        fromDirectory.dirty = false
        toDirectory.dirty = false
        if source.id != target.id {
            sourceInode.attributes = sourceAttributes
            targetInode.attributes = targetAttributes
            sourceInode.dirty = false
            targetInode.dirty = false
        }
    }

    // MARK: - Attributes

    public func setAttributes(ino: UInt64, _ changes: AttributeChanges, caller: Caller) throws(FSError) -> Attributes {
        let id = Self.blobID(ino)
        let inode = try inode(ino: ino)
        let now = realtimeNs()
        if let size = changes.size {
            guard inode.attributes.isRegular else {
                throw FSError(inode.attributes.isDirectory ? EISDIR : EINVAL, "truncate of a non-regular file")
            }
            try truncate(id, inode, to: size)
        }
        var attributes = inode.attributes
        if let mode = changes.mode { attributes.mode = (attributes.mode & UInt32(S_IFMT)) | (mode & 0o7777) }
        if let uid = changes.uid { attributes.uid = uid }
        if let gid = changes.gid { attributes.gid = gid }
        if (changes.uid != nil || changes.gid != nil), !attributes.isDirectory, caller.uid != 0 {
            attributes.mode &= ~UInt32(S_ISUID)
            if attributes.mode & UInt32(S_IXGRP) != 0 { attributes.mode &= ~UInt32(S_ISGID) }
        }
        switch changes.atime {
        case .now?: attributes.atimeNs = now
        case let .ns(value)?: attributes.atimeNs = value
        case nil: break
        }
        switch changes.mtime {
        case .now?: attributes.mtimeNs = now
        case let .ns(value)?: attributes.mtimeNs = value
        case nil: break
        }
        attributes.ctimeNs = changes.ctime ?? now
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.setXattr(id, name: Key.inode, value: attributes.encode(), isInternal: true)
            }
        }
        inode.attributes = attributes
        inode.dirty = false
        return self.attributes(id, inode)
    }

    // MARK: - Directories

    /// A listing of the directory as it is now ("." and ".." first); `readDirectory`
    /// serves it by index, so entries added or removed meanwhile never make a listing skip
    /// or repeat one.
    public func openDirectory(ino: UInt64) throws(FSError) -> UInt64 {
        let (id, directory) = try directory(ino: ino)
        var entries = [DirectoryEntry(name: [UInt8(ascii: ".")], ino: ino, type: UInt32(S_IFDIR)),
                       DirectoryEntry(name: [UInt8(ascii: "."), UInt8(ascii: ".")],
                                      ino: Self.ino(directory.attributes.parent), type: UInt32(S_IFDIR))]
        if let blob = store.blob(id) {
            entries.reserveCapacity(blob.internalXattrs.count + 2)
            for (key, value) in blob.internalXattrs {
                guard let name = Key.entryName(key), let decoded = Key.decodeEntry(value) else { continue }
                entries.append(DirectoryEntry(name: name, ino: Self.ino(decoded.id), type: decoded.type))
            }
        }
        let handle = nextListing
        nextListing += 1
        listings[handle] = entries
        inode(id: id)?.opens += 1
        return handle
    }

    private func inode(id: UInt64) -> Inode? { inodes[id] }

    /// Entries of a listing from `offset` on, while `accept` takes them (it returns false
    /// when the reply is full). The offset of an entry's successor is its index + 1.
    public func readDirectory(handle: UInt64, offset: UInt64, _ accept: (DirectoryEntry, UInt64) -> Bool) throws(FSError) {
        guard let entries = listings[handle] else { throw FSError(EBADF, "directory handle \(handle)") }
        var index = Int(min(offset, UInt64(entries.count)))
        while index < entries.count, accept(entries[index], UInt64(index + 1)) { index += 1 }
    }

    /// The same as `readDirectory`, with each entry's attributes (one lookup each, as
    /// READDIRPLUS counts them; entries removed since the listing was taken are skipped).
    public func readDirectoryPlus(handle: UInt64, offset: UInt64, _ accept: (DirectoryEntry, Attributes?, UInt64) -> Bool) throws(FSError) {
        guard let entries = listings[handle] else { throw FSError(EBADF, "directory handle \(handle)") }
        var index = Int(min(offset, UInt64(entries.count)))
        while index < entries.count {
            let entry = entries[index]
            let isDot = index < 2
            guard isDot || store.blob(Self.blobID(entry.ino)) != nil,
                  let inode = try? inode(ino: entry.ino) else { index += 1; continue }
            guard accept(entry, isDot ? nil : attributes(Self.blobID(entry.ino), inode), UInt64(index + 1)) else { return }
            if !isDot { inode.lookups += 1 }
            index += 1
        }
    }

    public func releaseDirectory(ino: UInt64, handle: UInt64) {
        listings[handle] = nil
        let id = Self.blobID(ino)
        if let inode = inodes[id] {
            inode.opens -= min(inode.opens, 1)
            releaseIfUnused(id, inode)
        }
    }

    // MARK: - Extended attributes

    static let userXattrPrefixes = ["user.", "trusted.", "security."]

    private func checkXattrName(_ name: String) throws(FSError) {
        guard Self.userXattrPrefixes.contains(where: { name.hasPrefix($0) && name.utf8.count > $0.utf8.count }) else {
            throw FSError(EOPNOTSUPP, "xattr namespace of \(name)")
        }
        guard name.utf8.count <= 255 else { throw FSError(ERANGE, "xattr name longer than 255 bytes") }
    }

    public func setXattr(ino: UInt64, name: String, value: [UInt8], create: Bool, replace: Bool) throws(FSError) {
        try checkXattrName(name)
        let id = Self.blobID(ino)
        let inode = try inode(ino: ino)
        let exists = store.xattr(id, name: name) != nil
        if create && exists { throw FSError(EEXIST) }
        if replace && !exists { throw FSError(ENODATA) }
        guard name.utf8.count + value.count <= MetadataPage.xattrBytesMax else {
            throw FSError(E2BIG, "xattr name and value over \(MetadataPage.xattrBytesMax) bytes")
        }
        var attributes = inode.attributes
        attributes.ctimeNs = realtimeNs()
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.setXattr(id, name: name, value: value)
                try tx.setXattr(id, name: Key.inode, value: attributes.encode(), isInternal: true)
            }
        }
        inode.attributes = attributes
        inode.dirty = false
    }

    public func getXattr(ino: UInt64, name: String) throws(FSError) -> [UInt8] {
        _ = try inode(ino: ino)
        guard let value = store.xattr(Self.blobID(ino), name: name) else { throw FSError(ENODATA) }
        return value
    }

    /// The names of the user-visible xattrs; trusted.* only for a privileged caller (as
    /// the kernel's own file systems list them only to CAP_SYS_ADMIN).
    public func listXattrs(ino: UInt64, privileged: Bool = true) throws(FSError) -> [String] {
        _ = try inode(ino: ino)
        let names = store.blob(Self.blobID(ino))?.xattrs.map(\.name) ?? []
        return privileged ? names : names.filter { !$0.hasPrefix("trusted.") }
    }

    public func removeXattr(ino: UInt64, name: String) throws(FSError) {
        let id = Self.blobID(ino)
        let inode = try inode(ino: ino)
        guard store.xattr(id, name: name) != nil else { throw FSError(ENODATA) }
        var attributes = inode.attributes
        attributes.ctimeNs = realtimeNs()
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.removeXattr(id, name: name)
                try tx.setXattr(id, name: Key.inode, value: attributes.encode(), isInternal: true)
            }
        }
        inode.attributes = attributes
        inode.dirty = false
    }

    // MARK: - Whole file system

    /// Bytes the kernel's page cache may hold dirty for this mount (its writeback cache):
    /// they were accepted by write() and must find room when written back. Writes that
    /// are not write-back (direct writes, writes without the page cache), fallocate and
    /// `statistics()` leave that much free; write-back writes may use it.
    public var writebackReserveBytes: UInt64 {
        get { writebackReserveClusters * clusterBytes }
        set { writebackReserveClusters = (newValue + clusterBytes - 1) / clusterBytes }
    }

    /// Free data clusters as writers see them: what allocation may hand out, less the
    /// checkpoints' reserve and, unless `forWriteBack`, the write-back reserve.
    func freeClustersForWriting(forWriteBack: Bool = false) -> UInt64 {
        let free = store.freeClusterCount - min(store.freeClusterCount, store.metadataClusterReserve)
        return forWriteBack ? free : free - min(free, writebackReserveClusters)
    }

    /// Free bytes for a writer that is not write-back.
    public var freeBytesForWriting: UInt64 { freeClustersForWriting() * clusterBytes }

    public func statistics() -> FileSystemStatistics {
        FileSystemStatistics(blockSize: clusterBytes, blocks: store.clusterCount, freeBlocks: freeClustersForWriting(),
                             files: store.blobIDLimit, freeFiles: store.blobIDLimit - UInt64(store.blobCount),
                             nameMax: UInt64(Self.nameBytesMax))
    }

    /// Everything written so far durable: attributes written back, the device flushed.
    public func sync() throws(FSError) {
        try storeCall { try store.sync() }
        try writeBack()
        try storeCall { try store.sync() }
    }
}
