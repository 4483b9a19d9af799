/// Several metadata changes committed as one transaction of the metadata log: after a
/// crash either all of them are present or none. The file system builds each namespace
/// change (create, link, rename, unlink...) as one.
///
/// Records are checked as they are added, against the store as the earlier records of
/// the same transaction leave it, so that applying them after the commit cannot fail.
public struct BlobTransaction {
    unowned let store: BlobStore
    var records: [LogRecord] = []
    var created: Set<BlobID> = []
    var deleted: Set<BlobID> = []
    /// What the earlier records of this transaction make of parent links, clone sets and
    /// sizes (BlobStore+Clones.swift): the clone records are checked against them.
    var parents: [BlobID: BlobID?] = [:]
    var cloneSets: [BlobID: Set<BlobID>] = [:]
    var sizes: [BlobID: UInt64] = [:]
    var snapshotsMade: Set<BlobID> = []

    init(store: BlobStore) { self.store = store }

    public var isEmpty: Bool { records.isEmpty }

    func exists(_ id: BlobID) -> Bool {
        !deleted.contains(id) && (created.contains(id) || store.blobs[id] != nil)
    }

    func require(_ id: BlobID) throws(BlobStoreError) {
        guard exists(id) else { throw .noSuchBlob(id) }
    }

    /// A new, empty blob of `clusterCount` thin clusters; its id is usable in later records.
    public mutating func createBlob(clusterCount: UInt64 = 0) throws(BlobStoreError) -> BlobID {
        let id = try newBlobID()
        records.append(.createBlob(id: id))
        if clusterCount > 0 { records.append(.resizeBlob(id: id, clusterCount: clusterCount)) }
        sizes[id] = clusterCount
        return id
    }

    /// A blob id free in the store and not used by this transaction, taken.
    mutating func newBlobID() throws(BlobStoreError) -> BlobID {
        var candidate = store.blobIDs.firstClear(from: 0).map(BlobID.init(rawValue:))
        while let id = candidate, created.contains(id) || deleted.contains(id) {
            candidate = store.blobIDs.firstClear(from: id.rawValue + 1).map(BlobID.init(rawValue:))
        }
        guard let id = candidate else { throw .noSpace("all \(store.superBlock.blobIDLimit) blob ids are in use") }
        created.insert(id)
        return id
    }

    /// Deletes a blob; a snapshot with clones is refused (`BlobStore.deleteBlob` merges one).
    public mutating func deleteBlob(_ id: BlobID) throws(BlobStoreError) {
        try require(id)
        let clones = clonesInTransaction(id)
        guard clones.isEmpty else { throw .hasClones(blob: id, count: clones.count) }
        link(id, to: nil)
        created.remove(id)
        deleted.insert(id)
        records.append(.deleteBlob(id: id))
    }

    public mutating func resizeBlob(_ id: BlobID, clusterCount: UInt64) throws(BlobStoreError) {
        try require(id)
        guard clusterCount <= UInt64(UInt32.max) * 16 else { throw .invalidArgument("blob size \(clusterCount) clusters") }
        guard !isSnapshotInTransaction(id) else { throw .snapshotReadOnly(id) }
        sizes[id] = clusterCount
        records.append(.resizeBlob(id: id, clusterCount: clusterCount))
    }

    /// Releases blob clusters [clusterIndex, clusterIndex + count). They read as zeros
    /// after: in a clone the range must reach the end of what the parent backs, whose
    /// backed count it lowers (a hole inside it needs zeros written: `BlobStore.unmap`).
    public mutating func unmap(_ id: BlobID, clusterIndex: UInt64, count: UInt32) throws(BlobStoreError) {
        try require(id)
        guard count > 0 else { return }
        guard !isSnapshotInTransaction(id) else { throw .snapshotReadOnly(id) }
        records.append(.unmapClusters(id: id, clusterIndex: clusterIndex, count: count))
        guard let blob = store.blobs[id], !created.contains(id), let parent = blob.parent, clusterIndex < blob.backedClusters else { return }
        guard parents[id] == nil else {
            throw .invalidArgument("blob \(id): unmap after its parent changed in the same transaction")
        }
        guard clusterIndex + UInt64(count) >= blob.backedClusters else {
            throw .invalidArgument("blob \(id): unmap of clusters \(clusterIndex)+\(count) inside what its parent backs (\(blob.backedClusters))")
        }
        records.append(.setParent(id: id, parent: parent, backedClusters: clusterIndex))
    }

    public mutating func setXattr(_ id: BlobID, name: String, value: [UInt8], isInternal: Bool = false) throws(BlobStoreError) {
        try require(id)
        try BlobStore.validateXattr(name, value)
        records.append(.setXattr(id: id, internal: isInternal, name: name, value: value))
    }

    public mutating func removeXattr(_ id: BlobID, name: String, isInternal: Bool = false) throws(BlobStoreError) {
        try require(id)
        records.append(.removeXattr(id: id, internal: isInternal, name: name))
    }

    public mutating func setSuperBlob(_ id: BlobID?) throws(BlobStoreError) {
        if let id { try require(id) }
        records.append(.setSuperBlob(id: id))
    }
}

extension BlobStore {
    /// Builds a transaction with `body` and commits it (one log write and flush); nothing
    /// is committed when `body` throws.
    @discardableResult
    public func transaction<T>(_ body: (inout BlobTransaction) throws(BlobStoreError) -> T) throws(BlobStoreError) -> T {
        var transaction = BlobTransaction(store: self)
        let result = try body(&transaction)
        if !transaction.records.isEmpty { try commit(transaction.records) }
        return result
    }

    /// Pages of the metadata page region.
    public var metadataPageCount: UInt64 { superBlock.metadataPages.pageCount }
    /// Free pages of the metadata page region.
    public var freeRegionMetadataPageCount: UInt64 { metadataPageBits.count - metadataPageBits.setCount }
    /// Metadata pages a checkpoint can still take: free pages of the region, plus free
    /// clusters when metadata pages may use them.
    public var freeMetadataPageCount: UInt64 {
        let region = freeRegionMetadataPageCount
        guard superBlock.hasMetadataPagesInClusters else { return region }
        return region + min(clusters.count - clusters.setCount, superBlock.metadataPageIDLimit - superBlock.metadataPages.pageCount)
    }

    /// A bound on the metadata pages the next checkpoint takes (it writes every changed
    /// chain to fresh pages before the old ones are free): the changed blobs' chains, one
    /// page each more, the log since the checkpoint (what the chains can have grown by),
    /// and 64 to spare. The file system stops making inodes before free metadata pages
    /// fall under it.
    public var checkpointPagesNeeded: UInt64 { dirtyChainPages + logPagesInUse + 64 }

    /// Clusters blob data may not take: with metadata pages in clusters, those that the
    /// next checkpoint may need beyond the region's free pages, so that a checkpoint — and
    /// with it every commit once the log is full, and unmount — never runs out of pages.
    public var metadataClusterReserve: UInt64 {
        guard superBlock.hasMetadataPagesInClusters else { return 0 }
        let needed = checkpointPagesNeeded
        let regionFree = freeRegionMetadataPageCount
        return needed > regionFree ? needed - regionFree : 0
    }
    public var blobCount: Int { blobs.count }
    public var blobIDLimit: UInt64 { superBlock.blobIDLimit }
}

extension BlobStore {
    /// The sequence number the next log record will get: grows for the store's lifetime
    /// (the file system draws inode generations from it).
    public var logSequence: UInt64 { metadataLog.nextLSN }
}
