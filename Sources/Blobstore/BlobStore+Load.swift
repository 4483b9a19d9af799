import Bdev
import Env

// Making a store: format on an empty device, load (the last checkpoint, then the replay
// of the log after it).
extension BlobStore {
    // MARK: - Format

    /// Lays out and writes an empty store on the whole device, and returns it loaded;
    /// `unload()` marks it clean (what mkfs does).
    public static func format(_ io: BdevSyncIO, options: Options = Options()) throws(BlobStoreError) -> BlobStore {
        let geometry = io.geometry
        let devicePages = geometry.capacityBytes / UInt64(pageBytes)
        let cluster = options.clusterSizeBytes
        guard cluster >= pageBytes, cluster <= 1 << 20, cluster & (cluster - 1) == 0 else {
            throw .invalidArgument("cluster size \(cluster): a power of two from 4 KiB to 1 MiB")
        }
        let clusterPages = UInt64(cluster / pageBytes)
        // Default log: a sixty-fourth of the device, 256 KiB to 64 MiB. Longer logs mean
        // fewer checkpoints and longer replays after a crash (replay time is linear in it).
        let logPages = options.logPages ?? min(max(devicePages / 64, 64), 16384)
        guard Self.logPagesRange.contains(logPages) else {
            throw .invalidArgument("a log of \(logPages) pages: 2 to 1048576 pages (4 GiB)")
        }
        let pagesInClusters = options.metadataPagesInClusters ?? (cluster == pageBytes)
        guard !pagesInClusters || cluster == pageBytes else {
            throw .invalidArgument("metadata pages in clusters need 4 KiB clusters (cluster size \(cluster))")
        }
        // Defaults: metadata pages for a sixty-fourth of the device when more can go to data
        // clusters, else an eighth, up to 4 Mi pages (16 GiB); blob ids: half the device's
        // pages with metadata pages in clusters, else one per metadata page, up to 16 Mi
        // (`defaultBlobIDLimit`).
        // Without that feature many small blobs need more: see Options.
        let metadataPages = options.metadataPages ?? min(max(devicePages / (pagesInClusters ? 64 : 8), 64), 1 << 22)
        let idLimit = options.blobIDLimit
            ?? defaultBlobIDLimit(devicePages: devicePages, metadataPages: metadataPages, pagesInClusters: pagesInClusters)
        let tablePages = (idLimit + UInt64(TablePage.entriesPerPage) - 1) / UInt64(TablePage.entriesPerPage)
        let clusterBound = devicePages / clusterPages
        let bitmapPages = BitmapPage.pages(forBits: clusterBound) + BitmapPage.pages(forBits: metadataPages)
            + BitmapPage.pages(forBits: idLimit)
        let log = SuperBlock.Region(startPage: 2, pageCount: logPages)
        let table = SuperBlock.Region(startPage: log.endPage, pageCount: tablePages)
        let bitmaps = SuperBlock.Region(startPage: table.startPage + 2 * tablePages, pageCount: bitmapPages)
        let metadata = SuperBlock.Region(startPage: bitmaps.startPage + 2 * bitmapPages, pageCount: metadataPages)
        let dataStart = (metadata.endPage + clusterPages - 1) / clusterPages * clusterPages
        guard metadata.endPage <= devicePages else {
            throw .noSpace("a \(geometry.capacityBytes)-byte device (\(devicePages) pages) cannot hold the metadata regions: \(metadata.endPage) pages (log \(logPages), blob table 2×\(tablePages), bitmaps 2×\(bitmapPages), metadata pages \(metadataPages))")
        }
        guard dataStart < devicePages, (devicePages - dataStart) / clusterPages > 0 else {
            throw .noSpace("a \(geometry.capacityBytes)-byte device holds the metadata regions but no cluster")
        }
        var generator = SystemRandomNumberGenerator()
        var block = SuperBlock(
            sequence: 1, storeID: (generator.next(), generator.next()), blockSizeBytes: UInt32(geometry.blockSizeBytes),
            clusterSizeBytes: UInt32(cluster), isClean: true, devicePages: devicePages, log: log, table: table,
            bitmaps: bitmaps, metadataPages: metadata, dataStartPage: dataStart,
            clusterCount: (devicePages - dataStart) / clusterPages, blobIDLimit: idLimit, activeCopy: 0,
            checkpointLSN: 0, logTailSequence: 0, superBlobID: nil)
        if pagesInClusters { block.incompatibleFeatures |= SuperBlock.Features.metadataPagesInClusters }
        block.metadataPagesInClusters = 0
        block.incompatibleFeatures |= SuperBlock.Features.clones
        let store = BlobStore(io: io, superBlock: block)
        try store.writeTableAndBitmaps(copy: 0, chains: [:], checkpointSequence: 1)
        try store.flush()
        // Both slots: an older store's super block must not outlive the format.
        for sequence in [UInt64(1), 2] {
            block.sequence = sequence
            try store.writePages(at: UInt64(block.slot), block.encode())
        }
        try store.flush()
        store.superBlock = block
        // The returned store is in use: a crash from here on must read as unclean.
        try store.checkpoint(clean: false)
        return store
    }

    // MARK: - Load

    /// Both super block slots, each decoded or the reason it is not (load and salvage
    /// choose from them).
    static func readSuperBlockSlots(_ io: BdevSyncIO) throws(BlobStoreError) -> [Result<SuperBlock, FormatError>] {
        let raw = try readPages(io, at: 0, count: 2)
        return (0..<2).map { slot in
            let bytes = raw[(slot * pageBytes)..<((slot + 1) * pageBytes)]
            do throws(FormatError) {
                return .success(try SuperBlock.decode(bytes, offset: UInt64(slot * pageBytes)))
            } catch { return .failure(error) }
        }
    }

    /// Loads the store. `readOnly`: the replay happens in memory only — nothing is
    /// written (no checkpoint, the clean flag untouched) and every change is refused;
    /// what offline inspection (blobcli) and checks use.
    /// `rewriteArrays`: the checkpoints after the load write both copies of the table and
    /// bitmaps whole (repair), instead of the pages that differ from what the last
    /// checkpoint recorded.
    public static func load(_ io: BdevSyncIO, readOnly: Bool = false,
                            rewriteArrays: Bool = false) throws(BlobStoreError) -> (BlobStore, LoadReport) {
        let decoded = try readSuperBlockSlots(io)
        guard let (slot, block) = SuperBlock.current(decoded) else {
            guard case let .failure(first) = decoded[0], case let .failure(second) = decoded[1] else {
                throw .corrupt("no regular super block: one slot holds only the announcement of a checkpoint, the other does not decode")
            }
            throw .noSuperBlock(slot0: first, slot1: second)
        }
        guard Int(block.blockSizeBytes) == io.geometry.blockSizeBytes else {
            throw .geometry("store formatted with \(block.blockSizeBytes)-byte blocks; the device has \(io.geometry.blockSizeBytes)")
        }
        // (Decoding bounds devicePages by SuperBlock.devicePagesMax: the product fits.)
        guard block.devicePages <= io.geometry.capacityBytes / UInt64(pageBytes) else {
            throw .geometry("store of \(block.devicePages) pages on a device of \(io.geometry.capacityBytes) bytes (truncated image?)")
        }
        if let error = block.bitmapRegionError(slotOffset: UInt64(slot * pageBytes)) { throw .format(error) }
        let store = BlobStore(io: io, superBlock: block)
        try store.loadCheckpoint()
        if store.blobs.allRead { try store.rebuildCloneIndex() } else { store.clonesComplete = false }
        store.knowArrayCopies(otherSlot: try? decoded[1 - slot].get(), rewrite: readOnly || rewriteArrays)
        let scan = LogScanner.scan(tailSequence: block.logTailSequence, logPages: block.log.pageCount,
                                   storeTag: block.storeID.0, firstLSN: block.checkpointLSN + 1) { sequence in
            let page = block.log.startPage + sequence % block.log.pageCount
            return (try store.readPages(at: page, count: 1), page * UInt64(pageBytes))
        }
        for transaction in scan.transactions {
            for logged in transaction {
                do { try store.apply(logged.record, replaying: true) } catch {
                    // A chain the record needed and could not read says more than the record's complaint.
                    throw store.chainReadFailure ?? error
                }
            }
        }
        if let failure = store.chainReadFailure { throw failure }
        store.metadataLog.head = scan.endSequence
        store.metadataLog.nextLSN = scan.nextLSN
        store.lastScan = scan
        if readOnly {
            store.isReadOnly = true
        } else {
            // A checkpoint now makes the replayed state the durable one and marks the store in use.
            try store.checkpoint(clean: false)
        }
        return (store, LoadReport(superBlockSlot: block.slot, wasClean: block.isClean,
                                  replayedTransactions: scan.transactions.count,
                                  discardedRecords: scan.uncommittedRecords, logStop: scan.stop))
    }

    /// After `loadCheckpoint`, before the replay: what both copies of the table and
    /// bitmaps hold, as far as the checkpoint says. The active copy holds the table just
    /// read and the bitmaps the chains give (what that checkpoint wrote); the other copy
    /// the same except the pages the checkpoint recorded as changed, and those a later
    /// checkpoint announced in the other slot and may have written before a crash
    /// stopped it. Without a record, or with the other slot unreadable (a torn
    /// announcement or super block), the other copy is unknown and the next checkpoint
    /// writes it whole. `rewrite`: both copies unknown (repair).
    private func knowArrayCopies(otherSlot: SuperBlock?, rewrite: Bool) {
        // Loading set every bit: none of that is a change.
        _ = clusters.takeChangedPages()
        _ = metadataPageBits.takeChangedPages()
        _ = blobIDs.takeChangedPages()
        copyDifferences = [:]
        guard !rewrite else { return }
        let active = superBlock.activeCopy
        copyDifferences[ArrayCopyKey(kind: .table, copy: active)] = []
        copyDifferences[ArrayCopyKey(kind: .bitmap, copy: active)] = []
        guard let changed = Self.inactiveCopyDifferences(superBlock, otherSlot: otherSlot) else { return }
        let tablePages = superBlock.table.pageCount
        copyDifferences[ArrayCopyKey(kind: .table, copy: 1 - active)] = Set(changed.filter { UInt64($0) < tablePages }.map { Int($0) })
        copyDifferences[ArrayCopyKey(kind: .bitmap, copy: 1 - active)] = Set(changed.filter { UInt64($0) >= tablePages }
            .map { Int(UInt64($0) - tablePages) })
    }

    /// The pages (table pages, then bitmap pages after them, as in the super block's list)
    /// in which the inactive copy may differ from the active one of `block`, given what
    /// the other slot holds; nil when that is unknown. See `knowArrayCopies`.
    static func inactiveCopyDifferences(_ block: SuperBlock, otherSlot: SuperBlock?) -> [UInt32]? {
        guard var changed = block.changedSincePrevious, let otherSlot else { return nil }
        if otherSlot.isCheckpointIntent {
            guard otherSlot.sequence == block.sequence + 1, let announced = otherSlot.changedSincePrevious else { return nil }
            changed += announced
        } else {
            guard otherSlot.sequence < block.sequence else { return nil }
        }
        return changed
    }

    /// Reads the active table. When the super block records how many metadata pages live
    /// in data clusters (every checkpoint since the field exists does), the bitmaps are
    /// read too and no chain is: each blob's chain is read when the blob is first used
    /// (`BlobCache`), so a clean load of a million blobs reads a few MiB, not a million
    /// pages. Otherwise (a store last written before the field existed) every chain is
    /// read now and the bitmaps are derived from them, as before.
    private func loadCheckpoint() throws(BlobStoreError) {
        let copyStart = superBlock.table.startPage + UInt64(superBlock.activeCopy) * superBlock.table.pageCount
        let tableBytes = try readPages(at: copyStart, count: superBlock.table.pageCount)
        var roots: [(id: BlobID, root: UInt32)] = []
        for pageIndex in 0..<Int(superBlock.table.pageCount) {
            let page: ArraySlice<UInt8>
            do {
                page = try ArrayPage.decode(tableBytes[(pageIndex * Self.pageBytes)..<((pageIndex + 1) * Self.pageBytes)],
                                            kind: .table, pageIndex: UInt32(pageIndex),
                                            offset: (copyStart + UInt64(pageIndex)) * UInt64(Self.pageBytes)).payload
            } catch { throw .format(error) }
            roots += TablePage.decode(page, pageIndex: pageIndex, blobIDLimit: superBlock.blobIDLimit)
        }
        for (id, root) in roots { blobs.noteUnread(id, root: root) }
        // The old load: every chain read, the bitmaps (empty until now) derived from them.
        func deriveBitmaps() throws(BlobStoreError) {
            clusters = Bitmap(count: superBlock.clusterCount)
            metadataPageBits = Bitmap(count: superBlock.metadataPages.pageCount)
            blobIDs = Bitmap(count: superBlock.blobIDLimit)
            for (id, _) in roots { blobIDs.set(id.rawValue) }
            try readEveryChain(deriving: true)
        }
        guard let inClusters = superBlock.metadataPagesInClusters else { return try deriveBitmaps() }
        try readBitmaps()
        guard blobIDs.setCount == UInt64(roots.count), roots.allSatisfy({ blobIDs[$0.id.rawValue] }) else {
            // The table and the id bitmap disagree (a damaged store): trust neither bitmap.
            Log.logger("blobstore").warning("the blob table names \(roots.count) blobs, the blob-id bitmap \(blobIDs.setCount) (different ids): reading every chain to rebuild the bitmaps")
            return try deriveBitmaps()
        }
        metadataPagesInClusterCount = inClusters
    }

    /// The active copy of the three bitmaps, as the last checkpoint wrote them.
    private func readBitmaps() throws(BlobStoreError) {
        let start = superBlock.bitmaps.startPage + UInt64(superBlock.activeCopy) * superBlock.bitmaps.pageCount
        let (bitmaps, errors) = PersistedBitmaps.decode(try readPages(at: start, count: superBlock.bitmaps.pageCount), at: start, superBlock)
        guard let bitmaps else { throw .format(errors[0]) }
        clusters = bitmaps.clusters
        metadataPageBits = bitmaps.metadataPages
        blobIDs = bitmaps.blobIDs
    }

    /// Reads every chain not read yet, batched: before walking every blob (a listing, a
    /// file-system check), far faster than reading them one by one on first use.
    /// A read that fails leaves the store refusing changes, as one on first use does.
    public func readAllChains() throws(BlobStoreError) {
        do { try readEveryChain() } catch {
            chainReadFailed(error, "the blobs' metadata chains")
            throw error
        }
    }

    /// Reads the chains of those of `ids` not read yet, in one batch (all their pages of
    /// each walk step in flight at once): a blob's first use (`BlobCache.reader`), and a
    /// caller about to use many blobs (a directory listing with attributes, a lookup's
    /// read-ahead) instead of one read after another. A chain that cannot be read, or that
    /// the bitmaps say is not there, makes the store refuse changes (`chainReadFailed`).
    public func readChainsAhead(of ids: some Sequence<BlobID>) {
        let batch = ids.compactMap { id in blobs.unreadRoot(id).map { (id: id, root: $0) } }
        do { try readIntoCache(batch, deriving: false) } catch {
            chainReadFailed(error, batch.count == 1 ? "the metadata of blob \(batch[0].id)" : "the metadata of \(batch.count) blobs")
        }
    }

    /// Reads the chain of every blob not read yet. `deriving`: the bitmaps are built from
    /// the chains (and a page or cluster owned twice is refused); else each chain is
    /// checked against the bitmaps read at load, and then that no cluster has two owners.
    func readEveryChain(deriving: Bool = false) throws(BlobStoreError) {
        guard !blobs.allRead else { return }
        // Every blob in memory at once (what the caller walks next); a cache limit
        // applies again after (`resumeEviction`).
        blobs.suspendEviction()
        defer { blobs.resumeEviction() }
        try readIntoCache(blobs.unreadIDs.sorted().map { (id: $0, root: blobs.unreadRoot($0)!) }, deriving: deriving)
        if !deriving { try checkSingleOwners() }
    }

    /// Reads `batch`'s chains `chainReadBatch` blobs at a time (`readChains`: every page
    /// of a batch's walk step in flight at once, so many small blobs are read at the
    /// device's queue depth), accounts each one (`account`) and puts it in the cache.
    private func readIntoCache(_ batch: [(id: BlobID, root: UInt32)], deriving: Bool) throws(BlobStoreError) {
        guard !batch.isEmpty else { return }
        let buffer: DMABuffer
        do { buffer = try DMABuffer.allocate(bytes: min(batch.count, Self.chainReadBatch) * Self.pageBytes) } catch {
            throw .device(.system(error))
        }
        for start in stride(from: 0, to: batch.count, by: Self.chainReadBatch) {
            for (blob, chain) in try readChains(batch[start..<min(batch.count, start + Self.chainReadBatch)], buffer: buffer) {
                try account(blob, chain: chain, deriving: deriving)
                blobs.noteRead(blob)
                durableChains[blob.id] = chain
            }
        }
    }

    /// With every chain read: no cluster is mapped by two blobs or holds a metadata page
    /// and a blob's data (what a load that derives the bitmaps refuses; checking each
    /// chain against the bitmaps read at load cannot see it).
    private func checkSingleOwners() throws(BlobStoreError) {
        var owned = Bitmap(count: superBlock.clusterCount)
        for (id, chain) in durableChains {
            for page in chain {
                guard let cluster = superBlock.metadataPageCluster(page) else { continue }
                guard !owned[cluster] else { throw .corrupt("metadata page \(page) (cluster \(cluster)) of blob \(id) is owned twice") }
                owned.set(cluster)
            }
        }
        for (id, blob) in blobs {
            for extent in blob.extents {
                for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) where cluster < owned.count {
                    guard !owned[cluster] else { throw .corrupt("cluster \(cluster) is owned twice (blob \(id) and another)") }
                    owned.set(cluster)
                }
            }
        }
    }

    /// A chain read after the load failed: the store takes no more changes (a blob it
    /// cannot read must not look absent to a change), logged once; the load that replays
    /// the log, `blobcli fsck` and `fsck --repair` say what is wrong.
    func chainReadFailed(_ error: BlobStoreError, _ what: String) {
        if chainReadFailure == nil {
            chainReadFailure = error
            Log.logger("blobstore").error("reading \(what) failed (\(error)): the store takes no more changes; check it with blobcli fsck")
        }
        if deviceFailure == nil { deviceFailure = "reading \(what): \(error)" }
        isReadOnly = true
    }

    /// Blobs whose chains a load reads together (and pages per batched read: 1 MiB).
    static let chainReadBatch = 256

    /// `deriving`: marks a blob's metadata pages and clusters in use, refusing double
    /// owners (bitmaps built from the chains). Else checks that the bitmaps read at load
    /// have them in use.
    private func account(_ blob: BlobMetadata, chain: [UInt32], deriving: Bool) throws(BlobStoreError) {
        for page in chain {
            if let cluster = superBlock.metadataPageCluster(page) {
                if !deriving {
                    guard clusters[cluster] else { throw .corrupt("blob \(blob.id): metadata page \(page) is in cluster \(cluster), free in the bitmap") }
                    continue
                }
                guard !clusters[cluster] else { throw .corrupt("metadata page \(page) (cluster \(cluster)) is owned twice") }
                clusters.set(cluster)
                metadataPagesInClusterCount += 1
                continue
            }
            if !deriving {
                guard metadataPageBits[UInt64(page)] else { throw .corrupt("blob \(blob.id): metadata page \(page) is free in the bitmap") }
                continue
            }
            guard !metadataPageBits[UInt64(page)] else { throw .corrupt("metadata page \(page) is in two chains") }
            metadataPageBits.set(UInt64(page))
        }
        for extent in blob.extents {
            for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) {
                guard cluster < superBlock.clusterCount else { throw .corrupt("blob \(blob.id) maps cluster \(cluster) beyond the device") }
                if !deriving {
                    guard clusters[cluster] else { throw .corrupt("blob \(blob.id) maps cluster \(cluster), free in the bitmap") }
                    continue
                }
                guard !clusters[cluster] else { throw .corrupt("cluster \(cluster) is owned twice (blob \(blob.id) and another)") }
                clusters.set(cluster)
            }
        }
    }

    /// One blob's chain as a walk reads it.
    private struct ChainWalk {
        let id: BlobID
        var pages: [MetadataPage.Page] = []
        var ids: [UInt32] = []
        var next: UInt32?
    }

    /// Walks the chains of `roots` together: each step reads the next page of every
    /// unfinished chain, up to `chainReadBatch` pages in flight (`readScattered`). A chain
    /// ends at a page whose index in it is not the next one (a loop comes back to an
    /// earlier page: decodeBlob names it); a chain longer than there are pages is refused.
    private func readChains(_ roots: ArraySlice<(id: BlobID, root: UInt32)>,
                            buffer: borrowing DMABuffer) throws(BlobStoreError) -> [(BlobMetadata, [UInt32])] {
        var walks = roots.map { ChainWalk(id: $0.id, next: $0.root) }
        while true {
            var step: [Int] = []
            for (index, walk) in walks.enumerated() {
                guard let pageID = walk.next else { continue }
                guard UInt64(pageID) < superBlock.metadataPageIDLimit, UInt64(walk.ids.count) < superBlock.metadataPageIDLimit else {
                    throw .corrupt("blob \(walk.id): metadata chain points at page \(pageID), outside the metadata pages or looping")
                }
                step.append(index)
            }
            if step.isEmpty { break }
            for part in stride(from: 0, to: step.count, by: Self.chainReadBatch) {
                let indices = step[part..<min(step.count, part + Self.chainReadBatch)]
                let bytes = try Self.readMetadataPages(io, superBlock, indices.map { walks[$0].next! }, buffer: buffer)
                for (slot, index) in indices.enumerated() {
                    let pageID = walks[index].next!
                    do {
                        let decoded = try MetadataPage.decodePage(bytes[(slot * Self.pageBytes)..<((slot + 1) * Self.pageBytes)],
                                                                  offset: superBlock.metadataPageAddress(pageID) * UInt64(Self.pageBytes),
                                                                  pageID: pageID)
                        // A page out of order (a loop comes back to one) ends the walk: decodeBlob names it.
                        walks[index].next = decoded.chainIndex == UInt32(truncatingIfNeeded: walks[index].pages.count)
                            ? decoded.nextPage : nil
                        walks[index].pages.append(decoded)
                        walks[index].ids.append(pageID)
                    } catch { throw .format(error) }
                }
            }
        }
        var result: [(BlobMetadata, [UInt32])] = []
        result.reserveCapacity(walks.count)
        for walk in walks { result.append((try decodeChain(walk.pages, ids: walk.ids, expectedID: walk.id), walk.ids)) }
        return result
    }

    /// Metadata pages `pageIDs` of the store `block` describes, read through `buffer` with
    /// every read in flight at once (up to the queue depth): their bytes, in order. A page
    /// beyond the device is an error before anything is read.
    static func readMetadataPages(_ io: BdevSyncIO, _ block: SuperBlock, _ pageIDs: [UInt32],
                                  buffer: borrowing DMABuffer) throws(BlobStoreError) -> [UInt8] {
        let blocksPerPage = UInt64(pageBytes / io.geometry.blockSizeBytes)
        let devicePages = io.geometry.capacityBytes / UInt64(pageBytes)
        let addresses = pageIDs.map { block.metadataPageAddress($0) }
        if let outside = addresses.first(where: { $0 >= devicePages }) {
            throw .device(.outOfRange(offsetBlocks: outside &* blocksPerPage, countBlocks: blocksPerPage,
                                      blockCount: devicePages * blocksPerPage))
        }
        do { try io.readScattered(into: buffer, offsets: addresses.lazy.map { $0 * blocksPerPage }, countBlocks: blocksPerPage) } catch {
            throw .device(error)
        }
        return buffer.bytes(count: addresses.count * pageBytes)
    }

    /// A chain's pages, decoded into the blob they describe, which must be `expectedID`.
    private func decodeChain(_ pages: [MetadataPage.Page], ids: [UInt32], expectedID: BlobID) throws(BlobStoreError) -> BlobMetadata {
        let blob: BlobMetadata
        do {
            blob = try MetadataPage.decodeBlob(pages, pageIDs: ids, offsets: ids.map {
                superBlock.metadataPageAddress($0) * UInt64(Self.pageBytes)
            }, clusterLimit: superBlock.clusterCount)
        } catch { throw .format(error) }
        guard blob.id == expectedID else { throw .corrupt("blob table entry \(expectedID) names the chain of blob \(blob.id)") }
        return blob
    }

    /// Writes a clean checkpoint; the store object must not be used afterwards.
    public func unload() throws(BlobStoreError) {
        try checkpoint(clean: true)
    }
}
