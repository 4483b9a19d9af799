import Bdev
import Env

// The metadata log writer: the log head, the LSNs, group commit (deferred records and the
// open log page) and the room a checkpoint needs. FORMAT.md, "Metadata log".

/// The log writer's state, owned by `BlobStore` (`metadataLog`); the device writes are
/// the store's (below).
struct MetadataLog {
    /// Sequence of the next log page written (pages from the super block's tail sequence
    /// up to here are in use).
    var head: UInt64
    /// The LSN the next record gets: LSNs increase by one per record, for the store's
    /// lifetime.
    var nextLSN: UInt64
    /// Deferred mode: the records of the last log page written since the last flush, and
    /// its bytes in use; the next commit appends to it.
    var openPage: (records: [LoggedRecord], used: Int)?
    /// Deferred mode: transactions applied but not yet written to the log (in order), and
    /// their encoded bytes (see `BlobStore.commit`).
    var pending: [LoggedRecord] = []
    var pendingBytes = 0
    /// Deferred mode: allocating writes under `pending` whose data is not yet flushed.
    var pendingNeedsDataFlush = false
    /// Counts deferred commits: a flush issued by someone else (`beginExternalFlush`)
    /// covers those made before it was issued.
    var commitEpoch: UInt64 = 0

    /// What `takePending` took out of the deferred queue.
    typealias Taken = (records: [LoggedRecord], bytes: Int, dataFlush: Bool)

    /// The state after checkpoint `block`: the log starts at its tail, its LSNs after its.
    init(_ block: SuperBlock) {
        head = block.logTailSequence
        nextLSN = block.checkpointLSN + 1
    }

    /// `records` and their commit record as one transaction, numbered from `nextLSN`.
    func numbered(_ records: [LogRecord]) -> [LoggedRecord] {
        let first = nextLSN
        let all = records + [.commit(recordCount: UInt32(records.count + 1))]
        return all.enumerated().map { LoggedRecord(lsn: first + UInt64($0), transaction: first, record: $1) }
    }

    /// `logged` (from `numbered`) is in the log or the deferred queue: the LSNs after it.
    mutating func advance(past logged: [LoggedRecord]) {
        precondition(logged.first?.lsn == nextLSN && logged.last!.lsn == nextLSN + UInt64(logged.count) - 1,
                     "LSNs are given out in order, once")
        nextLSN += UInt64(logged.count)
    }

    /// Deferred mode: `logged` (`bytes` encoded) waits for the next flush.
    mutating func enqueue(_ logged: [LoggedRecord], bytes: Int) {
        advance(past: logged)
        pending += logged
        pendingBytes += bytes
        commitEpoch += 1
    }

    /// Empties the deferred queue, returning what it held.
    mutating func takePending() -> Taken {
        defer {
            pending = []
            pendingBytes = 0
        }
        return (pending, pendingBytes, pendingNeedsDataFlush)
    }

    /// Puts back what `takePending` returned, ahead of anything queued since.
    mutating func putBack(_ taken: Taken, dataFlush: Bool) {
        precondition(taken.records.isEmpty || pending.isEmpty || taken.records.last!.lsn < pending[0].lsn,
                     "the deferred queue stays in LSN order")
        pending = taken.records + pending
        pendingBytes += taken.bytes
        if dataFlush && taken.dataFlush { pendingNeedsDataFlush = true }
    }

    /// `logged` cut into log pages from the head on, joining `reopened` (the open page,
    /// rewritten whole) when some fit in it: the pages' records, the first one's
    /// sequence, and the bytes in use in the last one.
    func pages(for logged: [LoggedRecord], reopened: (records: [LoggedRecord], used: Int)?)
        -> (pages: [[LoggedRecord]], firstSequence: UInt64, lastUsed: Int) {
        let capacity = BlobStore.pageBytes - LogPage.headerBytes
        var pages: [[LoggedRecord]] = [reopened?.records ?? []]
        var used = reopened?.used ?? 0
        for record in logged {
            let size = LogPage.encodedBytes(record.record)
            if used + size > capacity {
                pages.append([])
                used = 0
            }
            pages[pages.count - 1].append(record)
            used += size
        }
        var firstSequence = head
        if let reopened {
            if pages[0].count == reopened.records.count {
                pages.removeFirst()  // nothing of these records fit: leave the page as it is
            } else {
                firstSequence = head - 1
            }
        }
        return (pages, firstSequence, used)
    }
}

extension BlobStore {
    /// Makes `records` one transaction. Immediate mode: its log pages are written after
    /// the head and flushed, then it is applied. Deferred mode (`deferCommitFlush`): it is
    /// applied at once and its records wait in memory (`metadataLog.pending`) until the next
    /// flush, sync or checkpoint, or until they fill `pendingLogLimit` bytes; the data of
    /// allocating writes under them is flushed before they are written (group commit: one
    /// flush for many allocating writes, none of their mappings ever on the device before
    /// their data). A log without room forces a checkpoint first.
    package func commit(_ records: [LogRecord]) throws(BlobStoreError) {
        guard !isReadOnly else { throw .readOnly }
        try refuseIfDeviceLost()
        try keepRoomForCheckpoint(records)
        let logged = metadataLog.numbered(records)
        let bytes = logged.reduce(0) { $0 + LogPage.encodedBytes($1.record) }
        guard UInt64(bytes / (Self.pageBytes - LogPage.headerBytes) + 2) < superBlock.log.pageCount else {
            throw .noSpace("a transaction of \(bytes) bytes of log records exceeds the log")
        }
        guard deferCommitFlush else {
            try writePendingLog()  // left by a deferred mode turned off: they come first
            try writeLog(logged, applied: false)
            metadataLog.advance(past: logged)
            for record in records { try apply(record, replaying: false) }
            checkpointIfTheCacheIsDirty()
            return
        }
        metadataLog.enqueue(logged, bytes: bytes)
        hasUnflushedCommits = true
        for record in records { try apply(record, replaying: false) }
        if metadataLog.pendingBytes >= Self.pendingLogLimit { try writePendingLog() }
        checkpointIfTheCacheIsDirty()
    }

    /// With a metadata cache limit, blobs changed since the last checkpoint cannot be let
    /// go: past an eighth of the limit of them, a checkpoint writes them (then they are
    /// clean and the cache can shrink; a checkpoint holds every changed chain encoded in
    /// memory while it writes them, 4 KiB each, so fewer at a time keeps that peak small).
    /// Without it a large log let 160,000 creates keep every blob in memory until the log
    /// filled. The transaction is committed either way: a checkpoint that fails here is
    /// logged and tried again at the next commit (and with `readOnlyOnDeviceError` the
    /// store has turned read-only).
    private func checkpointIfTheCacheIsDirty() {
        guard blobs.limit > 0, dirtyBlobs.count > blobs.limit / 8, !refusesChanges else { return }
        do throws(BlobStoreError) { try checkpoint() } catch {
            Log.logger("blobstore").warning("checkpoint for the metadata cache (\(dirtyBlobs.count) changed blobs) failed: \(error)")
        }
    }

    /// Deferred mode: log record bytes held in memory before they are written.
    static let pendingLogLimit = 8 * (pageBytes - LogPage.headerBytes)

    /// The most log pages one device write carries (256 KiB).
    static let logWritePagesMax = 64

    /// Writes the deferred transactions to the log (not flushed), after a flush that makes
    /// the data of the allocating writes under them durable. A log without room for them
    /// takes a checkpoint instead, which holds them.
    func writePendingLog() throws(BlobStoreError) {
        guard !metadataLog.pending.isEmpty else { return }
        if metadataLog.pendingNeedsDataFlush {
            do { try io.flush() } catch { throw deviceWriteFailed(error, "device flush") }
            metadataLog.pendingNeedsDataFlush = false
            metadataLog.openPage = nil  // durable now: not to be rewritten
        }
        // Taken out first: the flush an immediate-mode write ends with, or the checkpoint
        // a full log takes (which then holds them), must not write them again.
        let taken = metadataLog.takePending()
        do {
            // Written (or held by a checkpoint): a flush now makes their releases durable.
            if try writeLog(taken.records, applied: true) { releases.unlogged = [] }
        } catch {
            requeue(taken, dataFlush: false)
            throw error
        }
    }

    /// Puts back what `metadataLog.takePending` returned (ahead of anything queued since)
    /// after the write or checkpoint meant for it failed: nothing of it is durable.
    func requeue(_ taken: MetadataLog.Taken, dataFlush: Bool) {
        guard !taken.records.isEmpty else { return }
        metadataLog.putBack(taken, dataFlush: dataFlush)
        // A flush in between covered none of their commits or releases.
        hasUnflushedCommits = true
        if !releases.unlogged.isEmpty { releases.sinceFlush = true }
    }

    /// Writes `logged` after the log head, joining the open page in deferred mode, and
    /// flushes in immediate mode. Without room: a checkpoint, which holds records already
    /// `applied` (false returned: nothing to write); others are written after it.
    @discardableResult
    private func writeLog(_ logged: [LoggedRecord], applied: Bool) throws(BlobStoreError) -> Bool {
        // Deferred mode: the last page written since the last flush is still open, and
        // these records join it (the page is rewritten whole). It holds nothing a flush
        // has promised, so a torn rewrite loses only unflushed commits.
        let (pages, firstSequence, used) = metadataLog.pages(for: logged, reopened: deferCommitFlush ? metadataLog.openPage : nil)
        precondition(firstSequence == metadataLog.head || firstSequence == metadataLog.head - 1,
                     "log pages are written from the head on, or rewrite the open page just before it")
        let newPages = UInt64(pages.count) - (metadataLog.head - firstSequence)
        let logPages = superBlock.log.pageCount
        if metadataLog.head + newPages - superBlock.logTailSequence > logPages {
            // The checkpoint flushes and closes the open page; deferred records are in it.
            try checkpoint()
            guard !applied else { return false }
            return try writeLog(logged, applied: false)
        }
        // Pages that lie side by side in the region go in one device write (up to
        // `logWritePagesMax`): a deferred batch of 8-9 pages was 8-9 synchronous writes,
        // each a wait of the metadata reactor. Nothing is promised before the flush, and
        // unflushed writes may land in any order or not at all either way.
        var run: [UInt8] = []
        var runStart: UInt64 = 0
        for (index, content) in pages.enumerated() {
            let sequence = firstSequence + UInt64(index)
            let at = superBlock.log.startPage + sequence % logPages
            let runPages = run.count / Self.pageBytes
            if !run.isEmpty && (at != runStart + UInt64(runPages) || runPages == Self.logWritePagesMax) {
                try writePages(at: runStart, run)
                run.removeAll(keepingCapacity: true)
            }
            if run.isEmpty { runStart = at }
            run += LogPage.encode(sequence: sequence, storeTag: superBlock.storeID.0, records: content)
        }
        if !run.isEmpty { try writePages(at: runStart, run) }
        if deferCommitFlush {
            metadataLog.openPage = (pages[pages.count - 1], used)
        } else {
            try flush()
        }
        precondition(firstSequence + UInt64(pages.count) >= metadataLog.head, "the log head never moves back")
        metadataLog.head = firstSequence + UInt64(pages.count)
        precondition(metadataLog.head - superBlock.logTailSequence <= logPages, "the log never overwrites a page still in use")
        return true
    }

    /// What the durable chain of blob `id` costs a checkpoint that rewrites it: its pages
    /// and one more.
    func chainPagesEstimate(_ id: BlobID) -> UInt64 { UInt64(durableChains[id]?.count ?? 0) + 1 }

    /// A checkpoint must always find pages for the chains it rewrites (the old ones are
    /// free only after it), or a full log would stop every commit, and unloading. So when
    /// `records` could take the free metadata pages (region and clusters) below what the
    /// next checkpoint needs, checkpoint first, which frees the superseded chains; if
    /// there is still no room and the transaction frees nothing (no delete, resize, unmap
    /// or xattr removal), refuse it with no space before anything is written.
    private func keepRoomForCheckpoint(_ records: [LogRecord]) throws(BlobStoreError) {
        var added: UInt64 = 2  // the log pages this transaction may take
        var seen: Set<BlobID> = []
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
}
