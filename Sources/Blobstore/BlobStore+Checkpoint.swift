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
        defer {
            if !switched {
                allocatedPages.forEach { metadataPageBits.clear($0) }
                allocatedClusters.forEach { clusters.clear($0) }
            }
        }
        let region = superBlock.metadataPages.pageCount
        let clustersForPages = superBlock.metadataPageIDLimit - region
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
            var cursor = clusterCursor
            var found: UInt64?
            for _ in 0...clustersBeingMapped.count {
                guard let free = clusters.firstClear(from: cursor), free < clustersForPages else { return nil }
                if !clustersBeingMapped.contains(free) {
                    found = free
                    break
                }
                cursor = free + 1
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
        superBlock = next
        durableChains = chains
        metadataPageBits = persisted
        supersededClusters.forEach { clusters.clear($0) }
        metadataPagesInClusterCount += UInt64(allocatedClusters.count)
        metadataPagesInClusterCount -= UInt64(supersededClusters.count)
        dirtyBlobs = []
    }

    /// `freeClusters`: clusters still set in memory that the persisted bitmap shows free
    /// (superseded metadata pages in clusters). `announce`: before overwriting any page
    /// of the copy, write the announcement of checkpoint `checkpointSequence` (the pages
    /// it will write) to the other super block slot and flush (see
    /// `SuperBlock.isCheckpointIntent`). Returns the pages of this copy (table pages,
    /// then bitmap pages) that differ from the other copy, nil when unknown.
    @discardableResult
    func writeTableAndBitmaps(copy: UInt8, chains: [UInt64: [UInt32]], metadataBits: Bitmap? = nil,
                              freeClusters: [UInt64] = [], checkpointSequence: UInt64,
                              announce: Bool = false) throws(BlobStoreError) -> [UInt32]? {
        let block = superBlock
        let table = planArray(tablePayload(chains), kind: .table, copy: copy, pageCount: block.table.pageCount,
                              at: block.table.startPage + UInt64(copy) * block.table.pageCount)
        var clusterBits = clustersAsCommitted
        freeClusters.forEach { clusterBits.clear($0) }
        let bitmaps = planArray(bitmapPayload(clusters: clusterBits, metadataPages: metadataBits ?? metadataPageBits),
                                kind: .bitmap, copy: copy, pageCount: block.bitmaps.pageCount,
                                at: block.bitmaps.startPage + UInt64(copy) * block.bitmaps.pageCount)
        let tablePages = UInt32(block.table.pageCount)
        if announce && !(table.writes.isEmpty && bitmaps.writes.isEmpty) {
            var intent = block
            intent.sequence = checkpointSequence
            intent.isCheckpointIntent = true
            let pages = table.writes.map { UInt32($0) } + bitmaps.writes.map { tablePages + UInt32($0) }
            intent.changedSincePrevious = pages.count <= SuperBlock.changedPagesMax ? pages : nil
            try writePages(at: UInt64(intent.slot), intent.encode())
            try flush()
        }
        try executeArray(table, sequence: checkpointSequence)
        try executeArray(bitmaps, sequence: checkpointSequence)
        guard let tableDiff = table.differing, let bitmapDiff = bitmaps.differing else { return nil }
        return tableDiff.map { UInt32($0) } + bitmapDiff.map { tablePages + UInt32($0) }
    }

    /// What writing one array copy takes: its payload, the pages to write (those that
    /// differ from what the copy holds, or all when that is unknown), and the pages that
    /// differ from the other copy (nil when that copy is unknown).
    struct ArrayWrite {
        let key: ArrayCopyKey
        let payload: [UInt8]
        let start: UInt64
        let writes: [Int]
        let differing: [Int]?
    }

    private func planArray(_ payload: [UInt8], kind: ArrayPageKind, copy: UInt8, pageCount: UInt64,
                           at start: UInt64) -> ArrayWrite {
        let key = ArrayCopyKey(kind: kind, copy: copy)
        let known = writtenPayloads[key] ?? [UInt8]()
        let stale = stalePages[key] ?? []
        let knownComplete = known.count == payload.count
        let otherKey = ArrayCopyKey(kind: kind, copy: 1 - copy)
        let other = stalePages[otherKey] == nil ? writtenPayloads[otherKey] : nil
        var differing: [Int]? = other?.count == payload.count ? [] : nil
        var writes: [Int] = []
        for index in 0..<Int(pageCount) {
            let range = (index * ArrayPage.payloadBytes)..<((index + 1) * ArrayPage.payloadBytes)
            if differing != nil, !Self.samePage(other!, payload, range) { differing!.append(index) }
            if !knownComplete || stale.contains(index) || !Self.samePage(known, payload, range) { writes.append(index) }
        }
        return ArrayWrite(key: key, payload: payload, start: start, writes: writes, differing: differing)
    }

    /// Writes the planned pages, in runs of consecutive ones; the copy is known to hold
    /// the payload only once every write succeeded.
    private func executeArray(_ plan: ArrayWrite, sequence: UInt64) throws(BlobStoreError) {
        writtenPayloads[plan.key] = nil
        var index = 0
        while index < plan.writes.count {
            var end = index + 1
            while end < plan.writes.count, plan.writes[end] == plan.writes[end - 1] + 1 { end += 1 }
            var run: [UInt8] = []
            run.reserveCapacity((end - index) * SuperBlock.pageBytes)
            for page in plan.writes[index..<end] {
                let range = (page * ArrayPage.payloadBytes)..<((page + 1) * ArrayPage.payloadBytes)
                run += ArrayPage.encode(kind: plan.key.kind, checkpointSequence: sequence, pageIndex: UInt32(page),
                                        payload: plan.payload[range])
            }
            try writePages(at: plan.start + UInt64(plan.writes[index]), run)
            index = end
        }
        stalePages[plan.key] = nil
        writtenPayloads[plan.key] = plan.payload
    }

    /// Whether `a` and `b` hold the same bytes in `range` (a page's payload: memcmp).
    @inline(__always)
    static func samePage(_ a: [UInt8], _ b: [UInt8], _ range: Range<Int>) -> Bool {
        a.withUnsafeBytes { left in
            b.withUnsafeBytes { right in
                memcmp(left.baseAddress! + range.lowerBound, right.baseAddress! + range.lowerBound, range.count) == 0
            }
        }
    }

    /// The blob table's payload for `chains` (id -> first metadata page + 1).
    func tablePayload(_ chains: [UInt64: [UInt32]]) -> [UInt8] {
        var table = [UInt8](repeating: 0, count: Int(superBlock.table.pageCount) * ArrayPage.payloadBytes)
        for (id, pages) in chains {
            let at = Int(id) * TablePage.entryBytes
            let value = pages[0] + 1
            for index in 0..<4 { table[at + index] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(index))) }
        }
        return table
    }

    /// The bitmap copy's payload: the three bitmaps, each from a page boundary.
    func bitmapPayload(clusters: Bitmap, metadataPages: Bitmap) -> [UInt8] {
        let block = superBlock
        var bits: [UInt8] = []
        bits.reserveCapacity(Int(block.bitmaps.pageCount) * ArrayPage.payloadBytes)
        for (bitmap, count) in [(clusters, block.clusterCount), (metadataPages, block.metadataPages.pageCount),
                                (blobIDs, block.blobIDLimit)] {
            var section = bitmap.bytes()
            section += [UInt8](repeating: 0, count: Int(BitmapPage.pages(forBits: count)) * ArrayPage.payloadBytes - section.count)
            bits += section
        }
        bits += [UInt8](repeating: 0, count: Int(block.bitmaps.pageCount) * ArrayPage.payloadBytes - bits.count)
        return bits
    }

    // MARK: - Log

    /// Makes `records` one durable transaction: log pages written after the head, then
    /// a flush. A log without room for them forces a checkpoint first.
    package func commit(_ records: [LogRecord]) throws(BlobStoreError) {
        guard !isReadOnly else { throw .readOnly }
        let first = nextLSN
        let all = records + [.commit(recordCount: UInt32(records.count + 1))]
        let logged = all.enumerated().map { LoggedRecord(lsn: first + UInt64($0), transaction: first, record: $1) }
        // Deferred mode: the last page written since the last flush is still open, and
        // this transaction's first records join it (the page is rewritten whole). It holds
        // nothing a flush has promised, so a torn rewrite loses only unflushed commits.
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
                pages.removeFirst()  // nothing of this transaction fit: leave the page as it is
            } else {
                firstSequence = logHead - 1
            }
        }
        let newPages = UInt64(pages.count) - (logHead - firstSequence)
        let logPages = superBlock.log.pageCount
        guard UInt64(pages.count) < logPages else { throw .noSpace("a transaction of \(pages.count) pages exceeds the log") }
        if logHead + newPages - superBlock.logTailSequence > logPages {
            // The checkpoint flushes and closes the open page: start this transaction afresh.
            try checkpoint()
            return try commit(records)
        }
        for (index, content) in pages.enumerated() {
            let sequence = firstSequence + UInt64(index)
            let bytes = LogPage.encode(sequence: sequence, storeTag: superBlock.storeID.0, records: content)
            try writePages(at: superBlock.log.startPage + sequence % logPages, bytes)
        }
        if deferCommitFlush {
            hasUnflushedCommits = true
            commitEpoch += 1
            openLogPage = (pages[pages.count - 1], used)
        } else {
            try flush()
        }
        logHead = firstSequence + UInt64(pages.count)
        nextLSN += UInt64(logged.count)
        for record in records { try apply(record, replaying: false) }
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
            let handles = openHandles[id] ?? []
            // Released clusters go back to allocation now, or once every open handle has
            // stopped using them (see `ReleaseTicket`).
            var ticket: ReleaseTicket?
            if !releasing.isEmpty && !handles.isEmpty {
                let held = ReleaseTicket(handles: handles.count)
                quarantine.append((held, releasing))
                quarantinedClusterCount += releasing.reduce(0) { $0 + UInt64($1.count) }
                ticket = held
            } else {
                for extent in releasing { clearClusters(extent) }
            }
            if !handles.isEmpty {
                let snapshot = blobs[id] ?? BlobMetadata(id: id)
                for handle in handles { handle.update(snapshot, releasing: ticket) }
            }
        }
        releasing.removeAll(keepingCapacity: true)
    }

    private func clearClusters(_ extent: Extent) {
        for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) { clusters.clear(cluster) }
    }

    /// Returns to allocation the released clusters whose handles have all acknowledged;
    /// true when some came back.
    @discardableResult
    func reclaimReleasedClusters() -> Bool {
        guard !quarantine.isEmpty else { return false }
        var reclaimed = false
        quarantine.removeAll { entry in
            guard entry.ticket.isSettled else { return false }
            for extent in entry.extents {
                clearClusters(extent)
                quarantinedClusterCount -= UInt64(extent.count)
            }
            reclaimed = true
            return true
        }
        return reclaimed
    }

    /// Allocation found no free cluster while released ones wait for handles on other
    /// reactors: waits for their acknowledgements (a reactor answers within its next
    /// pass), up to `quarantineWaitNs`. True when some clusters came back.
    func waitForReleasedClusters() -> Bool {
        let deadline = MonotonicClock.nowNs() + quarantineWaitNs
        while !quarantine.isEmpty {
            if reclaimReleasedClusters() { return true }
            if MonotonicClock.nowNs() >= deadline { return false }
            sched_yield()
        }
        return false
    }

    /// The cluster bitmap as the metadata has it: clusters waiting in quarantine are free.
    var clustersAsCommitted: Bitmap {
        guard !quarantine.isEmpty else { return clusters }
        var bits = clusters
        for entry in quarantine {
            for extent in entry.extents {
                for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) { bits.clear(cluster) }
            }
        }
        return bits
    }

    /// Before clusters that may have been released are written again: readers outside
    /// the store finish with them (`beforeReusingReleasedClusters`), and their release
    /// is durable (a crash could otherwise undo it and leave the old owner holding the
    /// new owner's bytes).
    func prepareToReuseReleasedClusters() throws(BlobStoreError) {
        if releasedSinceDrain {
            releasedSinceDrain = false
            beforeReusingReleasedClusters?()
        }
        if releasedSinceFlush { try flush() }
    }

    private func release(_ extent: Extent) {
        releasedSinceDrain = true
        if deferCommitFlush {
            releasedSinceFlush = true
            releaseEpoch += 1
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
