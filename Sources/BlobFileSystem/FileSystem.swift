#if canImport(Glibc)
import Glibc
#endif
import Blobstore

/// A POSIX file system on a blob store (FORMAT.md, "File system"): an inode is a blob,
/// its attributes an internal xattr, a directory's entries internal xattrs of its blob
/// (an O(1) lookup by name), file data the blob's clusters. Every namespace change is
/// one blob-store transaction, so after a crash it is all there or not at all.
///
/// Not thread-safe: one thread owns it (the FUSE front end runs it on the blob store's
/// metadata reactor). It never imports FUSE; inode numbers are blob id + 1 (the root,
/// blob 0, is inode 1 as FUSE wants).
public final class FileSystem {
    public static let rootIno: InodeNumber = .root
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
    var inodes: [BlobID: Inode] = [:]
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
        root.parent = .rootDirectory
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                let id = try tx.createBlob()
                precondition(id == .rootDirectory, "a fresh store hands out blob 0 first")
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
        guard store.superBlobID == .rootDirectory, store.xattr(.rootDirectory, name: Key.superInfo, isInternal: true) == magic else {
            throw FSError(EINVAL, "no blobfs file system on this blob store (the super blob is not a blobfs root)")
        }
        let fs = FileSystem(store: store)
        _ = try fs.inode(blob: .rootDirectory)
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
        guard let root = store.blob(.rootDirectory) else { return }
        let orphans = root.internalXattrs.compactMap { entry -> BlobID? in
            entry.name != Key.superInfo ? Key.orphanID(entry.name) : nil
        }
        for id in orphans where (inodes[id]?.opens ?? 0) == 0 && (inodes[id]?.lookups ?? 0) == 0 {
            try storeCall {
                try store.transaction { tx throws(BlobStoreError) in
                    if store.blob(id) != nil { try deleteFileBlob(&tx, id) }
                    try tx.removeXattr(.rootDirectory, name: Key.orphan(id), isInternal: true)
                }
            }
            inodes[id] = nil
        }
    }

    // MARK: - Inodes


    /// The inode held by blob `id`, read into the cache if it is not there.
    func inode(blob id: BlobID) throws(FSError) -> Inode {
        if let cached = inodes[id] { return cached }
        guard let value = store.xattr(id, name: Key.inode, isInternal: true) else {
            throw FSError(ENOENT, "no inode \(InodeNumber(blob: id))")
        }
        guard let attributes = InodeAttributes.decode(value) else {
            throw FSError(EIO, "inode \(InodeNumber(blob: id)): attributes unreadable (\(value.count) bytes)")
        }
        let inode = Inode(attributes)
        inodes[id] = inode
        return inode
    }

    /// The inode numbered `ino` (ENOENT past the blob ids the store can hold).
    func inode(_ ino: InodeNumber) throws(FSError) -> Inode {
        guard ino.rawValue >= 1, ino.rawValue <= store.blobIDLimit else { throw FSError(ENOENT, "inode \(ino)") }
        return try inode(blob: ino.blobID)
    }

    func attributes(_ id: BlobID, _ inode: Inode) -> Attributes {
        inode.timesObserved = true
        // Shared clusters count in every file that reads them, as on XFS and btrfs: a copy
        // does not look sparse (cp then copies it with copy_file_range, sharing again).
        let allocated = store.dataClusterCount(id)
        return Attributes(ino: InodeNumber(blob: id), attributes: inode.attributes, allocatedBytes: allocated * clusterBytes,
                          blockSize: UInt32(clusterBytes))
    }

    /// Persists the attributes of every inode changed only in memory (one transaction).
    public func writeBack() throws(FSError) {
        var updates = InodeUpdates()
        for (id, inode) in inodes where inode.dirty && store.blob(id) != nil { _ = updates.stage(id, inode) }
        guard !updates.isEmpty else { return }
        try storeCall { try store.transaction { tx throws(BlobStoreError) in try updates.write(into: &tx) } }
        updates.settle()
    }

    var hasDirtyInodes: Bool { inodes.values.contains { $0.dirty } }

    /// Inodes whose attributes changed only in memory, and inodes held in memory.
    public var dirtyInodeCount: Int { inodes.values.reduce(0) { $0 + ($1.dirty ? 1 : 0) } }
    public var cachedInodeCount: Int { inodes.count }

    /// Something only in memory or not yet flushed: the write-back has work.
    public var needsWriteBack: Bool { store.hasUnflushedCommits || hasDirtyInodes }

    func checkName(_ name: [UInt8]) throws(FSError) {
        guard !name.isEmpty, !name.contains(0), !name.contains(UInt8(ascii: "/")) else {
            throw FSError(EINVAL, "invalid file name")
        }
        guard name.count <= Self.nameBytesMax else { throw FSError(ENAMETOOLONG, "\(name.count)-byte name") }
    }

    func directory(ino: InodeNumber) throws(FSError) -> (BlobID, Inode) {
        let inode = try inode(ino)
        guard inode.attributes.isDirectory else { throw FSError(ENOTDIR, "inode \(ino)") }
        return (ino.blobID, inode)
    }

    func entry<Name: Collection<UInt8>>(in directoryID: BlobID, _ name: Name) -> (id: BlobID, type: UInt32)? {
        store.xattr(directoryID, name: Key.entry(name), isInternal: true).flatMap(Key.decodeEntry)
    }

    /// Room for one more inode: a blob id and enough free metadata pages that the next
    /// checkpoint can still write every changed chain (`checkpointPagesNeeded`) and a
    /// sixteenth of the region is held back.
    func reserveInode() throws(FSError) {
        guard UInt64(store.blobCount) < store.blobIDLimit else { throw FSError(ENOSPC, "no free inode") }
        guard store.freeMetadataPageCount > max(store.metadataPageCount / 16 + 8, store.checkpointPagesNeeded + 8) else {
            throw FSError(ENOSPC, "metadata pages exhausted (\(store.freeMetadataPageCount) free)")
        }
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
