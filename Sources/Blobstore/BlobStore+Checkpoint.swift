#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env

extension BlobStore {
    /// Writes changed blobs to fresh metadata pages, the table and bitmaps to the
    /// inactive copy, flushes, then switches the super block and flushes again. The log
    /// before `logHead` is no longer needed afterwards.
    public func checkpoint(clean: Bool = false) throws(BlobStoreError) {
        guard !isReadOnly else { throw .readOnly }
        var chains = durableChains
        var superseded: [UInt32] = []
        let sequence = superBlock.sequence + 1
        // Pages handed out by this checkpoint: returned if it fails before the switch.
        var allocatedPages: [UInt64] = []
        var allocatedClusters: [UInt64] = []
        var switched = false
        // Deferred transactions are in the state this checkpoint writes, and the data under
        // them is durable at its flush: they need no log. Back in the queue if it fails.
        let deferred = takePendingLog()
        pendingNeedsDataFlush = false
        defer {
            if !switched {
                allocatedPages.forEach { metadataPageBits.clear($0) }
                allocatedClusters.forEach { clusters.clear($0) }
                requeue(deferred, dataFlush: true)
            }
        }
        let region = superBlock.metadataPages.pageCount
        let clustersForPages = superBlock.metadataPageIDLimit - region
        // Not for metadata pages: clusters a write has chosen, and clusters released by the
        // transactions this checkpoint holds (their release is durable only at its switch;
        // a crash before it leaves them with their old owner). Returns where to look next.
        func skipping(_ cluster: UInt64) -> UInt64? {
            if clustersBeingMapped.contains(cluster) { return cluster + 1 }
            for extent in releasedUnlogged where cluster >= extent.firstCluster && cluster - extent.firstCluster < UInt64(extent.count) {
                return extent.firstCluster + UInt64(extent.count)
            }
            return nil
        }
        // Each skip passes one excluded cluster or extent (twice at most, wrapping around).
        let skipsMax = 2 * (clustersBeingMapped.count + releasedUnlogged.count) + 1
        var pageCursor: UInt64 = 0
        var clusterCursor: UInt64 = 0
        /// A free metadata page: the region's first, then (with the feature) a data cluster.
        func allocatePage() -> UInt32? {
            if let free = metadataPageBits.firstClear(from: pageCursor) {
                metadataPageBits.set(free)
                allocatedPages.append(free)
                pageCursor = free + 1
                return UInt32(free)
            }
            guard clustersForPages > 0 else { return nil }
            // Clusters held for discard and not yet submitted are free: a checkpoint that
            // needs them takes them back rather than fail.
            if clusters.firstClear(from: clusterCursor) == nil { giveUpDiscardHolds() }
            var cursor = clusterCursor
            var found: UInt64?
            for _ in 0...skipsMax {
                guard let free = clusters.firstClear(from: cursor), free < clustersForPages else { return nil }
                guard let next = skipping(free) else {
                    found = free
                    break
                }
                cursor = next
            }
            guard let free = found else { return nil }
            clusters.set(free)
            allocatedClusters.append(free)
            clusterCursor = free + 1
            return UInt32(region + free)
        }
        // New chains are written in runs of consecutive pages (fresh pages are handed out
        // in order, so a checkpoint of many small blobs is a few large writes).
        var pending: [(page: UInt32, bytes: [UInt8])] = []
        for id in dirtyBlobs.sorted() {
            if let old = chains[id] { superseded.append(contentsOf: old) }
            chains[id] = nil
            guard let blob = blobs[id] else { continue }
            let count = MetadataPage.pagesNeeded(for: blob)
            var pages: [UInt32] = []
            for _ in 0..<count {
                guard let page = allocatePage() else {
                    throw .noSpace("no free metadata page for blob \(id) (\(region) in the region"
                        + (clustersForPages > 0 ? ", no free cluster)" : ")"))
                }
                pages.append(page)
            }
            let encoded = MetadataPage.encodeChain(blob, pageIDs: pages, checkpointSequence: sequence)
            for (page, bytes) in zip(pages, encoded) { pending.append((page, bytes)) }
            chains[id] = pages
        }
        // Clusters released by a commit not yet flushed must not receive metadata pages
        // before that release is durable (as for blob data).
        if !allocatedClusters.isEmpty { try prepareToReuseReleasedClusters() }
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
        var next = superBlock
        next.sequence = sequence
        next.activeCopy = copy
        next.checkpointLSN = nextLSN - 1
        next.logTailSequence = logHead
        next.isClean = clean
        next.changedSincePrevious = changed.flatMap { $0.count <= SuperBlock.changedPagesMax ? $0 : nil }
        try writePages(at: UInt64(next.slot), next.encode())
        try flush()
        switched = true
        releasedUnlogged = []
        let oldTailSequence = superBlock.logTailSequence
        superBlock = next
        durableChains = chains
        metadataPageBits = persisted
        _ = metadataPageBits.takeChangedPages()  // noted by writeTableAndBitmaps
        // Everything applied so far is in this checkpoint, durable since its switch.
        releasesBecameDurable(through: releaseEpoch)
        for cluster in supersededClusters { returnReleased(Extent(clusterIndex: 0, count: 1, firstCluster: cluster), epoch: releaseEpoch) }
        if discardsReleasedClusters {
            discardAfterCheckpoint(oldTailSequence: oldTailSequence,
                                   supersededRegionPages: superseded.filter { superBlock.metadataPageCluster($0) == nil })
        }
        metadataPagesInClusterCount += UInt64(allocatedClusters.count)
        metadataPagesInClusterCount -= UInt64(supersededClusters.count)
        dirtyBlobs = []
        countedDirty = []
        dirtyChainPages = 0
        checkpointCount += 1
        lastCheckpointNs = MonotonicClock.nowNs()
    }

    /// `freeClusters`: clusters still set in memory that the persisted bitmap shows free
    /// (superseded metadata pages in clusters). Writes the pages of the copy that differ
    /// from the state (all of them when the copy is unknown). `announce`: first write the
    /// announcement of checkpoint `checkpointSequence` (the pages it will write) to the
    /// other super block slot and flush (see `SuperBlock.isCheckpointIntent`). Returns
    /// the pages of this copy (table pages, then bitmap pages) that may differ from the
    /// other copy, nil when that copy is unknown.
    @discardableResult
    func writeTableAndBitmaps(copy: UInt8, chains: [UInt64: [UInt32]], metadataBits: Bitmap? = nil,
                              freeClusters: [UInt64] = [], checkpointSequence: UInt64,
                              announce: Bool = false) throws(BlobStoreError) -> [UInt32]? {
        let block = superBlock
        let layout = BitmapLayout(block)
        var metadataBits = metadataBits ?? metadataPageBits
        // What changed since the last checkpoint differs from both copies.
        let tableKeys = [ArrayCopyKey(kind: .table, copy: 0), ArrayCopyKey(kind: .table, copy: 1)]
        let bitmapKeys = [ArrayCopyKey(kind: .bitmap, copy: 0), ArrayCopyKey(kind: .bitmap, copy: 1)]
        let perPage = UInt64(TablePage.entriesPerPage)
        let tableChanges = Set(dirtyBlobs.map { Int($0 / perPage) })
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
        for entry in quarantine { for extent in entry.extents { mask(ClusterRun(extent)) } }
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
            TablePage.encode(pageIndex: page, blobIDLimit: block.blobIDLimit) { chains[$0]?[0] }
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
                run += ArrayPage.encode(kind: kind, checkpointSequence: sequence, pageIndex: UInt32(page), payload: payload(page)[...])
            }
            try writePages(at: start + UInt64(pages[index]), run)
            index = end
        }
    }

    // MARK: - Log

    /// Makes `records` one transaction. Immediate mode: its log pages are written after
    /// the head and flushed, then it is applied. Deferred mode (`deferCommitFlush`): it is
    /// applied at once and its records wait in memory (`pendingLog`) until the next
    /// flush, sync or checkpoint, or until they fill `pendingLogLimit` bytes; the data of
    /// allocating writes under them is flushed before they are written (group commit: one
    /// flush for many allocating writes, none of their mappings ever on the device before
    /// their data). A log without room forces a checkpoint first.
    package func commit(_ records: [LogRecord]) throws(BlobStoreError) {
        guard !isReadOnly else { throw .readOnly }
        try refuseIfDeviceLost()
        try keepRoomForCheckpoint(records)
        let first = nextLSN
        let all = records + [.commit(recordCount: UInt32(records.count + 1))]
        let logged = all.enumerated().map { LoggedRecord(lsn: first + UInt64($0), transaction: first, record: $1) }
        let bytes = logged.reduce(0) { $0 + LogPage.encodedBytes($1.record) }
        guard UInt64(bytes / (Self.pageBytes - LogPage.headerBytes) + 2) < superBlock.log.pageCount else {
            throw .noSpace("a transaction of \(bytes) bytes of log records exceeds the log")
        }
        guard deferCommitFlush else {
            try writePendingLog()  // left by a deferred mode turned off: they come first
            try writeLog(logged, applied: false)
            nextLSN += UInt64(logged.count)
            for record in records { try apply(record, replaying: false) }
            return
        }
        nextLSN += UInt64(logged.count)
        pendingLog += logged
        pendingLogBytes += bytes
        hasUnflushedCommits = true
        commitEpoch += 1
        for record in records { try apply(record, replaying: false) }
        if pendingLogBytes >= Self.pendingLogLimit { try writePendingLog() }
    }

    /// Deferred mode: log record bytes held in memory before they are written.
    static let pendingLogLimit = 8 * (pageBytes - LogPage.headerBytes)

    /// Writes the deferred transactions to the log (not flushed), after a flush that makes
    /// the data of the allocating writes under them durable. A log without room for them
    /// takes a checkpoint instead, which holds them.
    func writePendingLog() throws(BlobStoreError) {
        guard !pendingLog.isEmpty else { return }
        if pendingNeedsDataFlush {
            do { try io.flush() } catch { throw deviceWriteFailed(error, "device flush") }
            pendingNeedsDataFlush = false
            openLogPage = nil  // durable now: not to be rewritten
        }
        // Taken out first: the flush an immediate-mode write ends with, or the checkpoint
        // a full log takes (which then holds them), must not write them again.
        let taken = takePendingLog()
        do {
            // Written (or held by a checkpoint): a flush now makes their releases durable.
            if try writeLog(taken.records, applied: true) { releasedUnlogged = [] }
        } catch {
            requeue(taken, dataFlush: false)
            throw error
        }
    }

    /// Empties the deferred queue, returning what it held.
    private func takePendingLog() -> (records: [LoggedRecord], bytes: Int, dataFlush: Bool) {
        defer {
            pendingLog = []
            pendingLogBytes = 0
        }
        return (pendingLog, pendingLogBytes, pendingNeedsDataFlush)
    }

    /// Puts back what `takePendingLog` returned (ahead of anything queued since) after
    /// the write or checkpoint meant for it failed: nothing of it is durable.
    private func requeue(_ taken: (records: [LoggedRecord], bytes: Int, dataFlush: Bool), dataFlush: Bool) {
        guard !taken.records.isEmpty else { return }
        pendingLog = taken.records + pendingLog
        pendingLogBytes += taken.bytes
        if dataFlush && taken.dataFlush { pendingNeedsDataFlush = true }
        // A flush in between covered none of their commits or releases.
        hasUnflushedCommits = true
        if !releasedUnlogged.isEmpty { releasedSinceFlush = true }
    }

    /// Writes `logged` after the log head, joining the open page in deferred mode, and
    /// flushes in immediate mode. Without room: a checkpoint, which holds records already
    /// `applied` (false returned: nothing to write); others are written after it.
    @discardableResult
    private func writeLog(_ logged: [LoggedRecord], applied: Bool) throws(BlobStoreError) -> Bool {
        // Deferred mode: the last page written since the last flush is still open, and
        // these records join it (the page is rewritten whole). It holds nothing a flush
        // has promised, so a torn rewrite loses only unflushed commits.
        let reopened = deferCommitFlush ? openLogPage : nil
        var pages: [[LoggedRecord]] = [reopened?.records ?? []]
        var used = reopened?.used ?? 0
        for record in logged {
            let size = LogPage.encodedBytes(record.record)
            if used + size > Self.pageBytes - LogPage.headerBytes {
                pages.append([])
                used = 0
            }
            pages[pages.count - 1].append(record)
            used += size
        }
        var firstSequence = logHead
        if let reopened {
            if pages[0].count == reopened.records.count {
                pages.removeFirst()  // nothing of these records fit: leave the page as it is
            } else {
                firstSequence = logHead - 1
            }
        }
        let newPages = UInt64(pages.count) - (logHead - firstSequence)
        let logPages = superBlock.log.pageCount
        if logHead + newPages - superBlock.logTailSequence > logPages {
            // The checkpoint flushes and closes the open page; deferred records are in it.
            try checkpoint()
            guard !applied else { return false }
            return try writeLog(logged, applied: false)
        }
        for (index, content) in pages.enumerated() {
            let sequence = firstSequence + UInt64(index)
            let bytes = LogPage.encode(sequence: sequence, storeTag: superBlock.storeID.0, records: content)
            try writePages(at: superBlock.log.startPage + sequence % logPages, bytes)
        }
        if deferCommitFlush {
            openLogPage = (pages[pages.count - 1], used)
        } else {
            try flush()
        }
        logHead = firstSequence + UInt64(pages.count)
        return true
    }

    /// What the durable chain of blob `id` costs a checkpoint that rewrites it: its pages
    /// and one more.
    func chainPagesEstimate(_ id: UInt64) -> UInt64 { UInt64(durableChains[id]?.count ?? 0) + 1 }

    /// A checkpoint must always find pages for the chains it rewrites (the old ones are
    /// free only after it), or a full log would stop every commit, and unloading. So when
    /// `records` could take the free metadata pages (region and clusters) below what the
    /// next checkpoint needs, checkpoint first, which frees the superseded chains; if
    /// there is still no room and the transaction frees nothing (no delete, resize, unmap
    /// or xattr removal), refuse it with no space before anything is written.
    private func keepRoomForCheckpoint(_ records: [LogRecord]) throws(BlobStoreError) {
        var added: UInt64 = 2  // the log pages this transaction may take
        var seen: Set<UInt64> = []
        var frees = false
        for record in records {
            switch record {
            case .deleteBlob, .resizeBlob, .unmapClusters, .removeXattr: frees = true
            default: break
            }
            if case let .setXattr(_, _, name, value) = record { added += UInt64(name.utf8.count + value.count) / 4000 + 1 }
            guard let id = record.blobID, !countedDirty.contains(id), seen.insert(id).inserted else { continue }
            added += chainPagesEstimate(id)
        }
        guard freeMetadataPageCount < checkpointPagesNeeded + added else { return }
        // Clusters held for discard are free: taken back (or waited for) before anything else.
        if giveUpDiscardHolds(), freeMetadataPageCount >= checkpointPagesNeeded + added { return }
        waitForDiscardsInFlight()
        guard freeMetadataPageCount < checkpointPagesNeeded + added else { return }
        if !dirtyBlobs.isEmpty { try checkpoint() }
        guard frees || freeMetadataPageCount >= checkpointPagesNeeded + added else {
            throw .noSpace("no room for the metadata pages a checkpoint would need (\(freeMetadataPageCount) free)")
        }
    }

    // MARK: - Applying records

    /// Applies one record to the in-memory state. Live operations validate before they
    /// commit, so a failure here while replaying means the log contradicts the checkpoint.
    func apply(_ record: LogRecord, replaying: Bool) throws(BlobStoreError) {
        releasing.removeAll(keepingCapacity: true)
        func fail(_ what: String) -> BlobStoreError { .corrupt("replaying \(record): \(what)") }
        switch record {
        case let .createBlob(id):
            guard id < superBlock.blobIDLimit, blobs[id] == nil else { throw fail("blob id in use or out of range") }
            blobs[id] = BlobMetadata(id: id)
            blobIDs.set(id)
        case let .deleteBlob(id):
            guard let blob = blobs[id] else { throw fail("no such blob") }
            for extent in blob.extents { release(extent) }
            blobs[id] = nil
            blobIDs.clear(id)
            if superBlock.superBlobID == id { superBlock.superBlobID = nil }
        case let .resizeBlob(id, count):
            guard var blob = blobs[id] else { throw fail("no such blob") }
            guard count <= MetadataPage.blobClustersMax else { throw fail("blob size out of range") }
            if count < blob.clusterCount { unmap(&blob, from: count, count: blob.clusterCount - count) }
            blob.clusterCount = count
            blobs[id] = blob
        case let .mapExtent(id, extent):
            guard var blob = blobs[id] else { throw fail("no such blob") }
            // Without overflow, whatever the record holds.
            guard extent.clusterIndex <= blob.clusterCount, UInt64(extent.count) <= blob.clusterCount - extent.clusterIndex,
                  extent.firstCluster <= superBlock.clusterCount,
                  UInt64(extent.count) <= superBlock.clusterCount - extent.firstCluster else { throw fail("extent out of range") }
            for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) {
                guard !clusters[cluster] else { throw fail("cluster \(cluster) already owned") }
            }
            guard !blob.extents.contains(where: {
                $0.clusterIndex < extent.clusterIndex + UInt64(extent.count) && extent.clusterIndex < $0.clusterIndex + UInt64($0.count)
            }) else { throw fail("blob clusters already mapped") }
            for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) { clusters.set(cluster) }
            blob.extents.append(extent)
            blob.extents.sort { $0.clusterIndex < $1.clusterIndex }
            blob.extents = Self.merged(blob.extents)
            blobs[id] = blob
        case let .unmapClusters(id, index, count):
            guard var blob = blobs[id] else { throw fail("no such blob") }
            unmap(&blob, from: index, count: UInt64(count))
            blobs[id] = blob
        case let .setXattr(id, isInternal, name, value):
            guard blobs[id] != nil else { throw fail("no such blob") }
            // What a checkpoint can encode (the log decoder refuses more; this keeps it so).
            let nameBytes = name.utf8.count
            guard nameBytes > 0, nameBytes <= MetadataPage.xattrNameBytesMax,
                  nameBytes + value.count <= MetadataPage.xattrBytesMax else { throw fail("xattr too large") }
            // In place: a directory's blob holds up to 100,000 entries.
            if isInternal { blobs[id]!.internalXattrs.set(name, value) } else { blobs[id]!.xattrs.set(name, value) }
        case let .removeXattr(id, isInternal, name):
            guard blobs[id] != nil else { throw fail("no such blob") }
            if isInternal { blobs[id]!.internalXattrs.remove(name) } else { blobs[id]!.xattrs.remove(name) }
        case let .setFlags(id, flags):
            guard var blob = blobs[id] else { throw fail("no such blob") }
            blob.flags = flags
            blobs[id] = blob
        case let .setSuperBlob(id):
            if let id, blobs[id] == nil { throw fail("no such blob") }
            superBlock.superBlobID = id
        case .commit:
            break
        }
        if let id = record.blobID {
            dirtyBlobs.insert(id)
            // The next checkpoint writes this blob's chain afresh if it exists.
            let estimate = chainPagesEstimate(id)
            if blobs[id] != nil, !countedDirty.contains(id) {
                countedDirty.insert(id)
                dirtyChainPages += estimate
            } else if blobs[id] == nil, countedDirty.remove(id) != nil {
                dirtyChainPages -= estimate
            }
            let handles = openHandles[id] ?? []
            // Released clusters go back to allocation now, or once every open handle has
            // stopped using them (see `ReleaseTicket`).
            var ticket: ReleaseTicket?
            if !releasing.isEmpty && !handles.isEmpty {
                let held = ReleaseTicket(handles: handles.count)
                quarantine.append((held, releasing, releaseEpoch))
                quarantinedClusterCount += releasing.reduce(0) { $0 + UInt64($1.count) }
                ticket = held
            } else {
                for extent in releasing {
                    if replaying { clearClusters(extent) } else { returnReleased(extent, epoch: releaseEpoch) }
                }
            }
            if !handles.isEmpty {
                let snapshot = blobs[id] ?? BlobMetadata(id: id)
                for handle in handles { handle.update(snapshot, releasing: ticket) }
            }
        }
        releasing.removeAll(keepingCapacity: true)
    }

    func clearClusters(_ extent: Extent) {
        for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) { clusters.clear(cluster) }
    }

    /// Returns the released clusters whose handles have all acknowledged to allocation
    /// (or, with online discard, to their unmap: `returnReleased`); true when some settled.
    @discardableResult
    func reclaimReleasedClusters() -> Bool {
        guard !quarantine.isEmpty else { return false }
        var settled = false
        quarantine.removeAll { entry in
            guard entry.ticket.isSettled else { return false }
            for extent in entry.extents {
                quarantinedClusterCount -= UInt64(extent.count)
                returnReleased(extent, epoch: entry.epoch)
            }
            settled = true
            return true
        }
        return settled
    }

    /// Allocation found no free cluster while released ones wait for handles on other
    /// reactors, or for their unmap: takes back those held for discard and not submitted,
    /// and waits for the handles' acknowledgements (a reactor answers within its next
    /// pass) and the unmaps in flight, up to `quarantineWaitNs`. True when some clusters
    /// came back.
    func waitForReleasedClusters() -> Bool {
        let deadline = MonotonicClock.nowNs() + quarantineWaitNs
        let setBefore = clusters.setCount
        while true {
            reclaimReleasedClusters()
            giveUpDiscardHolds()
            if clusters.setCount < setBefore { return true }
            guard !quarantine.isEmpty || !discards.inFlight.isEmpty, MonotonicClock.nowNs() < deadline else { return false }
            if !discards.inFlight.isEmpty { whileWaitingForDiscards?() }
            if let poll = whileWaitingForReleasedClusters { poll() } else { sched_yield() }
        }
    }

    /// Before clusters that may have been released are written again: their release is
    /// durable (a crash could otherwise undo it and leave the old owner holding the new
    /// owner's bytes). Readers and writers through open handles are kept off them by the
    /// quarantine (`ReleaseTicket`).
    func prepareToReuseReleasedClusters() throws(BlobStoreError) {
        if releasedSinceFlush { try flush() }
    }

    private func release(_ extent: Extent) {
        if deferCommitFlush {
            releasedSinceFlush = true
            releaseEpoch += 1
            releasedUnlogged.append(extent)
        }
        releasing.append(extent)
    }

    /// Removes the mapping of blob clusters [from, from + count), releasing their clusters.
    private func unmap(_ blob: inout BlobMetadata, from: UInt64, count: UInt64) {
        let end = from > UInt64.max - count ? UInt64.max : from + count
        var kept: [Extent] = []
        for extent in blob.extents {
            let extentEnd = extent.clusterIndex + UInt64(extent.count)
            if extentEnd <= from || extent.clusterIndex >= end {
                kept.append(extent)
                continue
            }
            let cutStart = max(from, extent.clusterIndex)
            let cutEnd = min(end, extentEnd)
            release(Extent(clusterIndex: cutStart, count: UInt32(cutEnd - cutStart),
                           firstCluster: extent.firstCluster + (cutStart - extent.clusterIndex)))
            if extent.clusterIndex < cutStart {
                kept.append(Extent(clusterIndex: extent.clusterIndex, count: UInt32(cutStart - extent.clusterIndex),
                                   firstCluster: extent.firstCluster))
            }
            if cutEnd < extentEnd {
                kept.append(Extent(clusterIndex: cutEnd, count: UInt32(extentEnd - cutEnd),
                                   firstCluster: extent.firstCluster + (cutEnd - extent.clusterIndex)))
            }
        }
        blob.extents = kept
    }

    static func merged(_ extents: [Extent]) -> [Extent] {
        var result: [Extent] = []
        for extent in extents {
            if let last = result.last, last.clusterIndex + UInt64(last.count) == extent.clusterIndex,
               last.firstCluster + UInt64(last.count) == extent.firstCluster, UInt64(last.count) + UInt64(extent.count) <= UInt64(UInt32.max) {
                result[result.count - 1].count += extent.count
            } else {
                result.append(extent)
            }
        }
        return result
    }
}
