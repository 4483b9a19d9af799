import Blobstore

// Instant copies: copy_file_range of a whole file into an empty one shares its clusters
// through a blob-store snapshot instead of copying bytes (FORMAT.md, "File system",
// "Shared data"). The source's blob gives its clusters to a hidden snapshot blob (internal
// xattr `s`, no inode) and becomes its clone; the target becomes another clone. Each side
// copies a cluster the first time it writes it, so neither ever sees the other's writes.
// Deleting a file whose snapshot then has one clone left merges the snapshot into it;
// with none left, deletes it.
extension FileSystem {
    /// copy_file_range(2): `length` bytes at `inOffset` of `source` to `outOffset` of
    /// `target`; returns the bytes copied (0 at or past the end of the source). A whole
    /// file copied to offset 0 of an empty file is shared, in one transaction (`share`);
    /// anything else is copied, up to 8 MiB per call (the caller asks again for the rest).
    public func copyRange(from source: InodeNumber, offset inOffset: UInt64, to target: InodeNumber,
                          offset outOffset: UInt64, length: UInt64) throws(FSError) -> UInt64 {
        let (sourceID, sourceInode) = try regular(source)
        let (targetID, targetInode) = try regular(target)
        let size = sourceInode.attributes.size
        guard inOffset < size, length > 0 else { return 0 }
        if sourceID != targetID, inOffset == 0, outOffset == 0, length >= size, targetInode.attributes.size == 0,
           try share(sourceID, sourceInode, into: targetID, targetInode) {
            return size
        }
        let count = min(length, size - inOffset, Self.copyChunkBytes)
        let bytes = try read(ino: source, offset: inOffset, count: Int(count))
        guard !bytes.isEmpty else { return 0 }
        return UInt64(try write(ino: target, offset: outOffset, data: bytes))
    }

    /// Bytes a copy_file_range that cannot share copies per call.
    static let copyChunkBytes: UInt64 = 8 << 20

    /// Makes `targetID` (an empty file mapping nothing) a clone of a snapshot of
    /// `sourceID`, of the source's size. false when the blobs cannot share (the caller
    /// copies): the target maps clusters or has clones.
    private func share(_ sourceID: BlobID, _ sourceInode: Inode, into targetID: BlobID, _ targetInode: Inode) throws(FSError) -> Bool {
        guard let source = store.blob(sourceID), let target = store.blob(targetID), !source.isSnapshot, !target.isSnapshot,
              target.extents.isEmpty, store.clones(of: targetID).isEmpty, store.clones(of: sourceID).isEmpty else { return false }
        let size = sourceInode.attributes.size
        let clusters = (size + clusterBytes - 1) / clusterBytes
        let now = realtimeNs()
        try updateAttributes(targetID, targetInode, { attributes in
            attributes.size = size
            attributes.mtimeNs = now
            attributes.ctimeNs = now
        }, also: { (tx) throws(BlobStoreError) in
            // A source that maps nothing of its own already reads everything from shared
            // data: the target reads from the same.
            let snapshot: BlobID
            if source.extents.isEmpty, let parent = source.parent, store.xattr(parent, name: Key.sharedData, isInternal: true) != nil,
               source.backedClusters >= clusters {
                snapshot = parent
            } else {
                snapshot = try tx.snapshot(sourceID)
                try tx.setXattr(snapshot, name: Key.sharedData, value: [], isInternal: true)
            }
            // A target that was a copy before (truncated to nothing since) lets go of that data.
            try detachFromSharedData(&tx, targetID)
            let capacity = max(target.clusterCount, clusters)
            if capacity != target.clusterCount { try tx.resizeBlob(targetID, clusterCount: capacity) }
            try tx.setParent(targetID, parent: snapshot, backedClusters: min(clusters, tx.sizeInTransaction(snapshot)))
        })
        targetInode.sizeGrowths &+= 1
        precondition(targetInode.attributes.size == size && store.parent(of: targetID) != nil, "share: the target reads the source's clusters")
        return true
    }

    /// Adds to `tx` the deletion of a file's blob, and of the shared data it leaves that
    /// no file reads (or the merge of it into the one file that still does).
    func deleteFileBlob(_ tx: inout BlobTransaction, _ id: BlobID) throws(BlobStoreError) {
        try Self.deleteFileBlob(&tx, id, in: store)
    }

    static func deleteFileBlob(_ tx: inout BlobTransaction, _ id: BlobID, in store: BlobStore) throws(BlobStoreError) {
        let parent = tx.parentInTransaction(id)
        try tx.deleteBlob(id)
        try releaseSharedData(&tx, from: parent, in: store)
    }

    /// Adds to `tx` that file blob `id` reads nothing from shared data any more (it maps
    /// all it holds): its parent link goes, and the shared data with it when no file
    /// reads it (or merged into the one that still does).
    func detachFromSharedData(_ tx: inout BlobTransaction, _ id: BlobID) throws(BlobStoreError) {
        guard let parent = tx.parentInTransaction(id) else { return }
        try tx.setParent(id, parent: nil, backedClusters: 0)
        try Self.releaseSharedData(&tx, from: parent, in: store)
    }

    /// Shared data `parent` (and up its chain) that lost a reader in this transaction:
    /// deleted when nothing reads it, merged into the one clone that still does.
    static func releaseSharedData(_ tx: inout BlobTransaction, from parent: BlobID?, in store: BlobStore) throws(BlobStoreError) {
        var parent = parent
        while let snapshot = parent, store.xattr(snapshot, name: Key.sharedData, isInternal: true) != nil {
            let clones = tx.clonesInTransaction(snapshot)
            if clones.isEmpty {
                parent = tx.parentInTransaction(snapshot)
                try tx.deleteBlob(snapshot)
            } else {
                if clones.count == 1, let only = clones.first { try tx.mergeIntoChild(snapshot, child: only) }
                break
            }
        }
    }
}
