import Bdev
import Env

extension BlobStore {
    /// Writes changed blobs to fresh metadata pages, the table and bitmaps to the
    /// inactive copy, flushes, then switches the super block and flushes again. The log
    /// before `metadataLog.head` is no longer needed afterwards.
    public func checkpoint(clean: Bool = false) throws(BlobStoreError) {
        guard !isReadOnly else { throw .readOnly }
        // The chains it copies and adopts must stay those of the blobs in memory.
        blobs.suspendEviction()
        defer { blobs.resumeEviction() }
        var chains = durableChains
        var superseded: [UInt32] = []
        let sequence = superBlock.sequence + 1
        // Pages handed out by this checkpoint: returned if it fails before the switch.
        var allocation = CheckpointAllocation()
        var switched = false
        // Deferred transactions are in the state this checkpoint writes, and the data under
        // them is durable at its flush: they need no log. Back in the queue if it fails.
        let deferred = metadataLog.takePending()
        metadataLog.pendingNeedsDataFlush = false
        defer {
            if !switched {
                allocation.pages.forEach { metadataPageBits.clear($0) }
                allocation.clusters.forEach { clusters.clear($0) }
                requeue(deferred, dataFlush: true)
            }
        }
        try writeChains(sequence: sequence, chains: &chains, superseded: &superseded, allocation: &allocation)
        let copy = 1 - superBlock.activeCopy
        // The persisted bitmaps are the ones after this checkpoint: superseded chains are
        // free in them (their pages stay allocated in memory until the switch).
        var persisted = metadataPageBits
        var supersededClusters: [UInt64] = []
        for page in superseded {
            if let cluster = superBlock.metadataPageCluster(page) { supersededClusters.append(cluster) } else { persisted.clear(UInt64(page)) }
        }
        let changed = try writeTableAndBitmaps(copy: copy, chains: chains, metadataBits: persisted,
                                               freeClusters: supersededClusters, checkpointSequence: sequence, announce: true)
        try flush()
        let inClusters = metadataPagesInClusterCount + UInt64(allocation.clusters.count) - UInt64(supersededClusters.count)
        let next = try switchSuperBlock(sequence: sequence, copy: copy, clean: clean, changed: changed,
                                        metadataPagesInClusters: inClusters)
        switched = true
        adoptCheckpoint(next, chains: chains, metadataBits: persisted, superseded: superseded,
                        supersededClusters: supersededClusters)
    }

    /// What one checkpoint has handed out for its chains, in order (returned if it fails
    /// before its switch), and where its next search for a free page or cluster starts.
    struct CheckpointAllocation {
        var pages: [UInt64] = []
        var clusters: [UInt64] = []
        var pageCursor: UInt64 = 0
        var clusterCursor: UInt64 = 0
    }

    /// Encodes each changed blob's chain into fresh pages (`chains` takes them,
    /// `superseded` the old ones) and writes them, in runs of consecutive pages (fresh
    /// pages are handed out in order, so a checkpoint of many small blobs is a few large
    /// writes).
    private func writeChains(sequence: UInt64, chains: inout [BlobID: [UInt32]], superseded: inout [UInt32],
                             allocation: inout CheckpointAllocation) throws(BlobStoreError) {
        let region = superBlock.metadataPages.pageCount
        let clustersForPages = superBlock.metadataPageIDLimit - region
        var pending: [(page: UInt32, bytes: [UInt8])] = []
        for id in dirtyBlobs.sorted() {
            if let old = chains[id] { superseded.append(contentsOf: old) }
            chains[id] = nil
            guard let blob = blobs[id] else { continue }
            let count = MetadataPage.pagesNeeded(for: blob)
            var pages: [UInt32] = []
            for _ in 0..<count {
                guard let page = allocateCheckpointPage(&allocation) else {
                    throw .noSpace("no free metadata page for blob \(id) (\(region) in the region"
                        + (clustersForPages > 0 ? ", no free cluster)" : ")"))
                }
                pages.append(page)
            }
            let encoded = MetadataPage.encodeChain(blob, pageIDs: pages, checkpointSequence: sequence)
            assert(decodesTo(blob, encoded, pageIDs: pages), "blob \(id): the chain written decodes to the blob")
            for (page, bytes) in zip(pages, encoded) { pending.append((page, bytes)) }
            chains[id] = pages
        }
        // Clusters released by a commit not yet flushed must not receive metadata pages
        // before that release is durable (as for blob data).
        if !allocation.clusters.isEmpty { try prepareToReuseReleasedClusters() }
        pending.sort { $0.page < $1.page }
        var runStart = 0
        while runStart < pending.count {
            let address = superBlock.metadataPageAddress(pending[runStart].page)
            var runEnd = runStart + 1
            while runEnd < pending.count, runEnd - runStart < 256,
                  superBlock.metadataPageAddress(pending[runEnd].page) == address + UInt64(runEnd - runStart) { runEnd += 1 }
            var run: [UInt8] = []
            run.reserveCapacity((runEnd - runStart) * Self.pageBytes)
            for index in runStart..<runEnd { run += pending[index].bytes }
            try writePages(at: address, run)
            runStart = runEnd
        }
    }

    /// Debug builds: `chain` (pages `pageIDs`) decodes to `blob`.
    private func decodesTo(_ blob: BlobMetadata, _ chain: [[UInt8]], pageIDs: [UInt32]) -> Bool {
        let offsets = pageIDs.map { superBlock.metadataPageAddress($0) * UInt64(Self.pageBytes) }
        var pages: [MetadataPage.Page] = []
        for (index, bytes) in chain.enumerated() {
            guard let page = try? MetadataPage.decodePage(bytes[...], offset: offsets[index], pageID: pageIDs[index]) else { return false }
            pages.append(page)
        }
        let decoded = try? MetadataPage.decodeBlob(pages, pageIDs: pageIDs, offsets: offsets, clusterLimit: superBlock.clusterCount)
        return decoded == blob
    }

    /// A free metadata page for a checkpoint's chains: the region's first, then (with the
    /// feature) a data cluster. Set in memory and noted in `allocation`.
    private func allocateCheckpointPage(_ allocation: inout CheckpointAllocation) -> UInt32? {
        let region = superBlock.metadataPages.pageCount
        let clustersForPages = superBlock.metadataPageIDLimit - region
        if let free = metadataPageBits.firstClear(from: allocation.pageCursor) {
            metadataPageBits.set(free)
            allocation.pages.append(free)
            allocation.pageCursor = free + 1
            return UInt32(free)
        }
        guard clustersForPages > 0 else { return nil }
        // Clusters held for discard and not yet submitted are free: a checkpoint that
        // needs them takes them back rather than fail.
        if clusters.firstClear(from: allocation.clusterCursor) == nil { giveUpDiscardHolds() }
        // Each skip passes one excluded cluster or extent (twice at most, wrapping around).
        let skipsMax = 2 * (clustersBeingMapped.count + releases.unlogged.count) + 1
        var cursor = allocation.clusterCursor
        var found: UInt64?
        for _ in 0...skipsMax {
            guard let free = clusters.firstClear(from: cursor), free < clustersForPages else { return nil }
            guard let next = clusterSkippedByCheckpoint(free) else {
                found = free
                break
            }
            cursor = next
        }
        guard let free = found else { return nil }
        precondition(!clustersBeingMapped.contains(free), "a checkpoint puts no metadata page in a cluster a write has chosen")
        clusters.set(free)
        allocation.clusters.append(free)
        allocation.clusterCursor = free + 1
        return UInt32(region + free)
    }

    /// Not for metadata pages: clusters a write has chosen, and clusters released by the
    /// transactions a checkpoint holds (their release is durable only at its switch; a
    /// crash before it leaves them with their old owner). Returns where to look next (nil:
    /// `cluster` may be taken).
    private func clusterSkippedByCheckpoint(_ cluster: UInt64) -> UInt64? {
        if clustersBeingMapped.contains(cluster) { return cluster + 1 }
        for extent in releases.unlogged where cluster >= extent.firstCluster && cluster - extent.firstCluster < UInt64(extent.count) {
            return extent.firstCluster + UInt64(extent.count)
        }
        return nil
    }

    /// Writes the super block of checkpoint `sequence` (table and bitmaps in `copy`, the
    /// log from `metadataLog.head` on) to its slot and flushes: the checkpoint's switch.
    private func switchSuperBlock(sequence: UInt64, copy: UInt8, clean: Bool, changed: [UInt32]?,
                                  metadataPagesInClusters: UInt64) throws(BlobStoreError) -> SuperBlock {
        precondition(sequence == superBlock.sequence + 1 && copy == 1 - superBlock.activeCopy,
                     "a checkpoint is the next one, into the inactive copy")
        precondition(metadataLog.nextLSN - 1 >= superBlock.checkpointLSN && metadataLog.head >= superBlock.logTailSequence,
                     "a checkpoint's LSN and log tail never move back")
        var next = superBlock
        next.sequence = sequence
        next.activeCopy = copy
        next.checkpointLSN = metadataLog.nextLSN - 1
        next.logTailSequence = metadataLog.head
        next.isClean = clean
        next.changedSincePrevious = changed.flatMap { $0.count <= SuperBlock.changedPagesMax ? $0 : nil }
        next.metadataPagesInClusters = metadataPagesInClusters
        let encoded = next.encode()
        assert((try? SuperBlock.decode(encoded[...], offset: UInt64(next.slot) * UInt64(Self.pageBytes))) == next,
               "the super block written decodes to the one meant")
        try writePages(at: UInt64(next.slot), encoded)
        try flush()
        return next
    }

    /// The state after the switch to `next`: its chains and persisted metadata bitmap are
    /// the durable ones, every release so far is durable, superseded chains are free.
    private func adoptCheckpoint(_ next: SuperBlock, chains: [BlobID: [UInt32]], metadataBits: Bitmap, superseded: [UInt32],
                                 supersededClusters: [UInt64]) {
        releases.unlogged = []
        let oldTailSequence = superBlock.logTailSequence
        superBlock = next
        durableChains = chains
        metadataPageBits = metadataBits
        _ = metadataPageBits.takeChangedPages()  // noted by writeTableAndBitmaps
        // Everything applied so far is in this checkpoint, durable since its switch.
        releasesBecameDurable(through: releases.epoch)
        for cluster in supersededClusters { returnReleased(Extent(clusterIndex: 0, count: 1, firstCluster: cluster), epoch: releases.epoch) }
        if discardsReleasedClusters {
            discardAfterCheckpoint(oldTailSequence: oldTailSequence,
                                   supersededRegionPages: superseded.filter { superBlock.metadataPageCluster($0) == nil })
        }
        metadataPagesInClusterCount = next.metadataPagesInClusters ?? 0
        dirtyBlobs = []
        countedDirty = []
        dirtyChainPages = 0
        checkpointCount += 1
        lastCheckpointNs = MonotonicClock.nowNs()
        precondition(metadataLog.pending.isEmpty, "a checkpoint holds every deferred transaction")
        precondition(durableChains.count == blobs.readCount, "after a checkpoint every blob read has a durable chain")
        precondition(blobIDs.setCount == UInt64(blobs.count), "a blob id is in use exactly while its blob exists")
    }

    /// `freeClusters`: clusters still set in memory that the persisted bitmap shows free
    /// (superseded metadata pages in clusters). Writes the pages of the copy that differ
    /// from the state (all of them when the copy is unknown). `announce`: first write the
    /// announcement of checkpoint `checkpointSequence` (the pages it will write) to the
    /// other super block slot and flush (see `SuperBlock.isCheckpointIntent`). Returns
    /// the pages of this copy (table pages, then bitmap pages) that may differ from the
    /// other copy, nil when that copy is unknown.
    @discardableResult
    func writeTableAndBitmaps(copy: UInt8, chains: [BlobID: [UInt32]], metadataBits: Bitmap? = nil,
                              freeClusters: [UInt64] = [], checkpointSequence: UInt64,
                              announce: Bool = false) throws(BlobStoreError) -> [UInt32]? {
        let block = superBlock
        let layout = BitmapLayout(block)
        var metadataBits = metadataBits ?? metadataPageBits
        // What changed since the last checkpoint differs from both copies.
        let tableKeys = [ArrayCopyKey(kind: .table, copy: 0), ArrayCopyKey(kind: .table, copy: 1)]
        let bitmapKeys = [ArrayCopyKey(kind: .bitmap, copy: 0), ArrayCopyKey(kind: .bitmap, copy: 1)]
        let tableChanges = Set(dirtyBlobs.map(TablePage.pageIndex(of:)))
        // Clusters set in memory that the persisted bitmap shows free, by bitmap page: the
        // given ones, quarantined ones, and those held for discard.
        var clusterMasks: [Int: [ClusterRun]] = [:]
        func mask(_ run: ClusterRun) {
            var first = run.first
            while first < run.end {
                let page = layout.page(ofCluster: first)
                let pageEnd = UInt64(page + 1) * UInt64(BitmapPage.bitsPerPage)
                let piece = ClusterRun(first: first, count: min(run.end, pageEnd) - first)
                clusterMasks[page, default: []].append(piece)
                first = piece.end
            }
        }
        for cluster in freeClusters { mask(ClusterRun(first: cluster, count: 1)) }
        for entry in releases.quarantine { for extent in entry.extents { mask(ClusterRun(extent)) } }
        for run in discards.allRuns { mask(run) }
        var bitmapChanges = Set(clusters.takeChangedPages())
        bitmapChanges.formUnion(clusterMasks.keys)
        bitmapChanges.formUnion(metadataBits.takeChangedPages().map { layout.metadataStart + $0 })
        _ = metadataPageBits.takeChangedPages()  // the same pages (metadataBits is its copy, less superseded chains)
        bitmapChanges.formUnion(blobIDs.takeChangedPages().map { layout.idStart + $0 })
        for key in tableKeys where copyDifferences[key] != nil { copyDifferences[key]!.formUnion(tableChanges) }
        for key in bitmapKeys where copyDifferences[key] != nil { copyDifferences[key]!.formUnion(bitmapChanges) }

        let tableKey = ArrayCopyKey(kind: .table, copy: copy), bitmapKey = ArrayCopyKey(kind: .bitmap, copy: copy)
        let tableWrites = copyDifferences[tableKey].map { $0.sorted() } ?? Array(0..<Int(block.table.pageCount))
        let bitmapWrites = copyDifferences[bitmapKey].map { $0.sorted() } ?? Array(0..<Int(block.bitmaps.pageCount))
        let tablePages = UInt32(block.table.pageCount)
        if announce && !(tableWrites.isEmpty && bitmapWrites.isEmpty) {
            var intent = block
            intent.sequence = checkpointSequence
            intent.isCheckpointIntent = true
            let pages = tableWrites.map { UInt32($0) } + bitmapWrites.map { tablePages + UInt32($0) }
            intent.changedSincePrevious = pages.count <= SuperBlock.changedPagesMax ? pages : nil
            try writePages(at: UInt64(intent.slot), intent.encode())
            try flush()
        }
        copyDifferences[tableKey] = nil  // unknown until every write below succeeded
        try writeArrayPages(tableWrites, kind: .table, sequence: checkpointSequence,
                            at: block.table.startPage + UInt64(copy) * block.table.pageCount) { page in
            // A blob whose chain was never read keeps the chain the table named at load.
            let payload = TablePage.encode(pageIndex: page, blobIDLimit: block.blobIDLimit) { chains[$0]?[0] ?? blobs.unreadRoot($0) }
            assert(TablePage.decode(payload[...], pageIndex: page, blobIDLimit: block.blobIDLimit)
                .allSatisfy { (chains[$0.id]?[0] ?? blobs.unreadRoot($0.id)) == $0.root },
                   "table page \(page) decodes to the chains' first pages")
            return payload
        }
        copyDifferences[tableKey] = []
        copyDifferences[bitmapKey] = nil
        try writeArrayPages(bitmapWrites, kind: .bitmap, sequence: checkpointSequence,
                            at: block.bitmaps.startPage + UInt64(copy) * block.bitmaps.pageCount) { page in
            if page < layout.metadataStart {
                var payload = clusters.pageBytes(page)
                for run in clusterMasks[page] ?? [] {
                    for cluster in run.first..<run.end {
                        let bit = Int(cluster - UInt64(page) * UInt64(BitmapPage.bitsPerPage))
                        payload[bit / 8] &= ~(1 << UInt8(bit % 8))
                    }
                }
                return payload
            }
            if page < layout.idStart { return metadataBits.pageBytes(page - layout.metadataStart) }
            if page < layout.end { return blobIDs.pageBytes(page - layout.idStart) }
            return [UInt8](repeating: 0, count: ArrayPage.payloadBytes)
        }
        copyDifferences[bitmapKey] = []
        let otherTable = copyDifferences[tableKeys[1 - Int(copy)]], otherBitmap = copyDifferences[bitmapKeys[1 - Int(copy)]]
        guard let otherTable, let otherBitmap else { return nil }
        return otherTable.sorted().map { UInt32($0) } + otherBitmap.sorted().map { tablePages + UInt32($0) }
    }

    /// Where the three bitmaps start in a bitmap copy, in pages.
    struct BitmapLayout {
        let metadataStart: Int
        let idStart: Int
        let end: Int
        init(_ block: SuperBlock) {
            metadataStart = Int(BitmapPage.pages(forBits: block.clusterCount))
            idStart = metadataStart + Int(BitmapPage.pages(forBits: block.metadataPages.pageCount))
            end = idStart + Int(BitmapPage.pages(forBits: block.blobIDLimit))
        }
        func page(ofCluster cluster: UInt64) -> Int { Int(cluster / UInt64(BitmapPage.bitsPerPage)) }
    }

    /// Writes `pages` (sorted) of one array copy, each payload from `payload`, in runs of
    /// consecutive pages.
    private func writeArrayPages(_ pages: [Int], kind: ArrayPageKind, sequence: UInt64, at start: UInt64,
                                 payload: (Int) -> [UInt8]) throws(BlobStoreError) {
        var index = 0
        while index < pages.count {
            var end = index + 1
            while end < pages.count, end - index < 256, pages[end] == pages[end - 1] + 1 { end += 1 }
            var run: [UInt8] = []
            run.reserveCapacity((end - index) * SuperBlock.pageBytes)
            for page in pages[index..<end] {
                let bytes = payload(page)
                let encoded = ArrayPage.encode(kind: kind, checkpointSequence: sequence, pageIndex: UInt32(page), payload: bytes[...])
                assert((try? ArrayPage.decode(encoded[...], kind: kind, pageIndex: UInt32(page), offset: 0))
                    .map { $0.checkpointSequence == sequence && $0.payload.elementsEqual(bytes) } == true,
                       "\(kind.name) \(page) decodes to what was encoded")
                run += encoded
            }
            try writePages(at: start + UInt64(pages[index]), run)
            index = end
        }
    }
}
