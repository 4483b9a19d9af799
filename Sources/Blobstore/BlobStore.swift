import Bdev
import Env

/// One copy (0 or 1) of the blob table or of the bitmaps.
struct ArrayCopyKey: Hashable {
    let kind: ArrayPageKind
    let copy: UInt8
}

/// A blob store on a block device: FORMAT.md gives the layout.
///
/// Every metadata operation is one transaction of redo records, written to the log and
/// flushed before the call returns and before the in-memory state changes. Checkpoints
/// write the metadata of changed blobs to fresh metadata pages (copy-on-write), the
/// blob table and bitmaps to the inactive copy, flush, and only then switch the super
/// block (alternating slots) — so a crash at any point leaves a valid checkpoint and the
/// log that follows it. Loading replays the committed transactions after the checkpoint.
///
/// The engine drives the device synchronously (`BdevSyncIO` on a reactor stepped by
/// the calling thread) and is owned by one thread; `BlobStoreService` runs it on a
/// metadata reactor, and data I/O from any reactor goes through `BlobChannel`.
public final class BlobStore {
    /// Format parameters. A blob costs at least one metadata page (its chain) plus its
    /// clusters. With 4 KiB clusters (the default) metadata pages that do not fit the
    /// metadata page region go to data clusters (`metadataPagesInClusters`), so the
    /// region's size does not limit the number of blobs; the blob id limit does: by
    /// default half the device's pages, up to 16 Mi (131,072 in 1 GiB; `defaultBlobIDLimit`).
    public struct Options: Sendable {
        public var clusterSizeBytes = 4096
        public var logPages: UInt64?
        public var metadataPages: UInt64?
        public var blobIDLimit: UInt64?
        /// nil: on with 4 KiB clusters, off otherwise; true needs 4 KiB clusters.
        public var metadataPagesInClusters: Bool?
        public init(clusterSizeBytes: Int = 4096, logPages: UInt64? = nil, metadataPages: UInt64? = nil,
                    blobIDLimit: UInt64? = nil, metadataPagesInClusters: Bool? = nil) {
            self.clusterSizeBytes = clusterSizeBytes
            self.logPages = logPages
            self.metadataPages = metadataPages
            self.blobIDLimit = blobIDLimit
            self.metadataPagesInClusters = metadataPagesInClusters
        }
    }

    /// What loading found.
    public struct LoadReport: Sendable {
        public var superBlockSlot: Int
        public var wasClean: Bool
        public var replayedTransactions: Int
        public var discardedRecords: Int
        public var logStop: FormatError?
    }

    static let pageBytes = SuperBlock.pageBytes
    /// Log sizes format accepts, in pages (a transaction of one page needs a log of two;
    /// tests use tiny logs to force checkpoints; mkfs asks for 64 or more).
    public static let logPagesRange: ClosedRange<UInt64> = 2...(1 << 20)
    let io: BdevSyncIO
    public internal(set) var superBlock: SuperBlock
    var blobs: [UInt64: BlobMetadata] = [:]
    var durableChains: [UInt64: [UInt32]] = [:]
    var dirtyBlobs: Set<UInt64> = []
    var clusters: Bitmap
    var metadataPageBits: Bitmap
    var blobIDs: Bitmap
    var logHead: UInt64
    var nextLSN: UInt64
    /// For each copy of the table and of the bitmaps, the pages that differ (or may) from
    /// what the state makes them; absent: the copy is unknown (the next checkpoint into it
    /// writes it whole). Checkpoints write only these pages.
    var copyDifferences: [ArrayCopyKey: Set<Int>] = [:]
    /// Blobs open for the data path; their handles follow metadata changes (each on the
    /// reactor that owns it).
    var openHandles: [UInt64: [BlobHandle]] = [:]
    /// Extents released by the record being applied.
    var releasing: [Extent] = []
    /// Released clusters still reachable through open handles' old maps: their bits stay
    /// set in `clusters` (so allocation passes them by) until the ticket settles; the
    /// persisted bitmaps show them free.
    var quarantine: [(ticket: ReleaseTicket, extents: [Extent], epoch: UInt64)] = []
    var quarantinedClusterCount: UInt64 = 0
    /// The durable chain pages of the blobs changed since the checkpoint, plus one each:
    /// with the log pages in use, a bound on the pages the next checkpoint writes.
    var dirtyChainPages: UInt64 = 0
    /// The changed blobs counted in `dirtyChainPages` (those that still exist).
    var countedDirty: Set<UInt64> = []
    /// Metadata pages of the last checkpoint's chains that are in data clusters.
    public internal(set) var metadataPagesInClusterCount: UInt64 = 0
    /// Clusters a write is committing the mapping of (written, not yet set in `clusters`).
    var clustersBeingMapped: Set<UInt64> = []
    /// How long an allocation that found no free cluster waits for quarantined ones.
    var quarantineWaitNs: UInt64 = 2_000_000_000
    /// When set, a commit writes its log pages without flushing them: it becomes durable
    /// at the next `sync()` (or checkpoint). After a crash the log replays up to the first
    /// page that did not make it, so the store comes back as of some earlier commit, never
    /// half of one. The file system sets it (POSIX promises durability at fsync/sync);
    /// off by default: every commit durable on return.
    public var deferCommitFlush = false
    /// Loaded with `readOnly`, or read-only since a device error (`readOnlyOnDeviceError`):
    /// commits, checkpoints and data writes are refused.
    public internal(set) var isReadOnly = false
    /// The device reported itself lost (`BdevError.deviceLost`: a remote target away past
    /// its loss timeout) during a write or flush. From then on nothing the store writes
    /// could be promised durable in order, so commits, flushes and metadata writes are
    /// refused with `BlobStoreError.deviceLost` until the store is loaded again (which
    /// replays the log). Transient errors (`.io`) do not latch: they may be retried.
    public internal(set) var lostDevice: BdevError?
    /// Offline repair: told of every metadata page before it is overwritten (the undo
    /// file keeps the old bytes). Data writes are refused while it is set: the undo file
    /// would not cover them.
    public var writeObserver: (any MetadataWriteObserver)?
    /// Offline repair's dry run: metadata writes change the state in memory and never
    /// reach the device (data writes are refused).
    public var discardsWrites = false
    /// When set, the first device write or flush of the store that fails makes it
    /// read-only (`deviceFailure` says why; logged once): after a failed write or flush
    /// what the device holds is no longer known, and a commit that builds on it could make
    /// things worse. The file system sets it; off by default (a failed commit leaves the
    /// state as it was and may be retried).
    public var readOnlyOnDeviceError = false
    /// The device failure that made the store read-only.
    public internal(set) var deviceFailure: String?
    /// Device writes and flushes of the store that failed.
    public internal(set) var deviceErrorCount: UInt64 = 0
    /// The log scan of the last load (what was replayed and where the scan stopped).
    public internal(set) var lastScan: LogScan?
    /// Checkpoints written since the load, and when the last one switched the super block
    /// (monotonic ns; 0: none yet). For `blobfs status`.
    public internal(set) var checkpointCount: UInt64 = 0
    public internal(set) var lastCheckpointNs: UInt64 = 0
    /// Commits written since the last flush (deferred mode).
    public internal(set) var hasUnflushedCommits = false
    /// Clusters were released by a commit not yet flushed: they must not receive new data
    /// before that release is durable (a crash could otherwise undo the release and leave
    /// the old owner holding the new owner's bytes).
    var releasedSinceFlush = false
    /// Called while an allocation waits for released clusters whose open handles have not
    /// acknowledged yet: handles owned by this thread finish their requests only when their
    /// channel is polled, and this polls it (nil: the handles are on other reactors).
    public var whileWaitingForReleasedClusters: (() -> Void)?
    /// Deferred mode: the records of the last log page written since the last flush, and
    /// its bytes in use; the next commit appends to it.
    var openLogPage: (records: [LoggedRecord], used: Int)?
    /// Deferred mode: transactions applied but not yet written to the log (in order), and
    /// their encoded bytes (see `commit`).
    var pendingLog: [LoggedRecord] = []
    var pendingLogBytes = 0
    /// Deferred mode: allocating writes under `pendingLog` whose data is not yet flushed.
    var pendingNeedsDataFlush = false
    /// Deferred mode: clusters released by transactions in `pendingLog` (a checkpoint that
    /// holds those transactions must not put metadata pages in them).
    var releasedUnlogged: [Extent] = []
    /// Count deferred commits and cluster releases: a flush issued by someone else
    /// (`beginExternalFlush`) covers those made before it was issued.
    var commitEpoch: UInt64 = 0
    var releaseEpoch: UInt64 = 0
    /// Releases up to this `releaseEpoch` are durable (in a flushed log page or a switched
    /// checkpoint): their clusters may be unmapped.
    var durableReleaseEpoch: UInt64 = 0
    /// Online discard (`blobfs mount -o discard`): clusters released once no handle can
    /// reach them are held (set in `clusters`) until their release is durable and their
    /// unmap completed (`ClusterTrimmer`), and each checkpoint unmaps the log pages and
    /// region pages it made dead. Off: released clusters go straight back to allocation.
    public var discardsReleasedClusters = false {
        didSet { if !discardsReleasedClusters { giveUpDiscardHolds() } }
    }
    /// Clusters on their way to an unmap (BlobStore+Discard.swift).
    var discards = DiscardQueue()
    /// Polls the channel of the unmaps in flight, while an allocation waits for them.
    var whileWaitingForDiscards: (() -> Void)?
    private let blocksPerPage: UInt64

    init(io: BdevSyncIO, superBlock: SuperBlock) {
        self.io = io
        self.superBlock = superBlock
        clusters = Bitmap(count: superBlock.clusterCount)
        metadataPageBits = Bitmap(count: superBlock.metadataPages.pageCount)
        blobIDs = Bitmap(count: superBlock.blobIDLimit)
        logHead = superBlock.logTailSequence
        nextLSN = superBlock.checkpointLSN + 1
        blocksPerPage = UInt64(Self.pageBytes / io.geometry.blockSizeBytes)
        ioUnitBytes = io.geometry.blockSizeBytes
    }

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

    /// Loads the store. `readOnly`: the replay happens in memory only — nothing is
    /// written (no checkpoint, the clean flag untouched) and every change is refused;
    /// what offline inspection (blobcli) and checks use.
    /// `rewriteArrays`: the checkpoints after the load write both copies of the table and
    /// bitmaps whole (repair), instead of the pages that differ from what the last
    /// checkpoint recorded.
    public static func load(_ io: BdevSyncIO, readOnly: Bool = false,
                            rewriteArrays: Bool = false) throws(BlobStoreError) -> (BlobStore, LoadReport) {
        let raw = try readPages(io, at: 0, count: 2)
        var decoded: [Result<SuperBlock, FormatError>] = []
        for slot in 0..<2 {
            do throws(FormatError) {
                decoded.append(.success(try SuperBlock.decode(raw[(slot * pageBytes)..<((slot + 1) * pageBytes)],
                                                              offset: UInt64(slot * pageBytes))))
            } catch { decoded.append(.failure(error)) }
        }
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
        store.knowArrayCopies(otherSlot: try? decoded[1 - slot].get(), rewrite: readOnly || rewriteArrays)
        let scan = LogScanner.scan(tailSequence: block.logTailSequence, logPages: block.log.pageCount,
                                   storeTag: block.storeID.0, firstLSN: block.checkpointLSN + 1) { sequence in
            let page = block.log.startPage + sequence % block.log.pageCount
            return (try store.readPages(at: page, count: 1), page * UInt64(pageBytes))
        }
        for transaction in scan.transactions {
            for logged in transaction { try store.apply(logged.record, replaying: true) }
        }
        store.logHead = scan.endSequence
        store.nextLSN = scan.nextLSN
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

    /// Reads the active table and every chain it names; derives the bitmaps. Chains are
    /// read a batch of blobs at a time, every page of a batch's walk step in flight at
    /// once (`readChains`): a store of many small blobs loads at the device's queue depth,
    /// not one page round trip after another.
    private func loadCheckpoint() throws(BlobStoreError) {
        let copyStart = superBlock.table.startPage + UInt64(superBlock.activeCopy) * superBlock.table.pageCount
        let tableBytes = try readPages(at: copyStart, count: superBlock.table.pageCount)
        var roots: [(id: UInt64, root: UInt32)] = []
        for pageIndex in 0..<Int(superBlock.table.pageCount) {
            let page: ArraySlice<UInt8>
            do {
                page = try ArrayPage.decode(tableBytes[(pageIndex * Self.pageBytes)..<((pageIndex + 1) * Self.pageBytes)],
                                            kind: .table, pageIndex: UInt32(pageIndex),
                                            offset: (copyStart + UInt64(pageIndex)) * UInt64(Self.pageBytes)).payload
            } catch { throw .format(error) }
            roots += TablePage.decode(page, pageIndex: pageIndex, blobIDLimit: superBlock.blobIDLimit)
        }
        let buffer: DMABuffer
        do { buffer = try DMABuffer.allocate(bytes: Self.chainReadBatch * Self.pageBytes) } catch { throw .device(.system(error)) }
        for batchStart in stride(from: 0, to: roots.count, by: Self.chainReadBatch) {
            let batch = roots[batchStart..<min(roots.count, batchStart + Self.chainReadBatch)]
            for (id, (blob, chain)) in zip(batch.lazy.map(\.id), try readChains(batch, buffer: buffer)) {
                try account(blob, chain: chain)
                blobs[id] = blob
                durableChains[id] = chain
                blobIDs.set(id)
            }
        }
    }

    /// Blobs whose chains a load reads together (and pages per batched read: 1 MiB).
    static let chainReadBatch = 256

    /// Marks a loaded blob's metadata pages and clusters in use; refuses double owners.
    private func account(_ blob: BlobMetadata, chain: [UInt32]) throws(BlobStoreError) {
        for page in chain {
            if let cluster = superBlock.metadataPageCluster(page) {
                guard !clusters[cluster] else { throw .corrupt("metadata page \(page) (cluster \(cluster)) is owned twice") }
                clusters.set(cluster)
                metadataPagesInClusterCount += 1
                continue
            }
            guard !metadataPageBits[UInt64(page)] else { throw .corrupt("metadata page \(page) is in two chains") }
            metadataPageBits.set(UInt64(page))
        }
        for extent in blob.extents {
            for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) {
                guard cluster < superBlock.clusterCount else { throw .corrupt("blob \(blob.id) maps cluster \(cluster) beyond the device") }
                guard !clusters[cluster] else { throw .corrupt("cluster \(cluster) is owned twice (blob \(blob.id) and another)") }
                clusters.set(cluster)
            }
        }
    }

    /// One blob's chain as a walk reads it.
    private struct ChainWalk {
        let id: UInt64
        var pages: [MetadataPage.Page] = []
        var ids: [UInt32] = []
        var next: UInt32?
    }

    /// Walks the chains of `roots` together: each step reads the next page of every
    /// unfinished chain, up to `chainReadBatch` pages in flight (`readScattered`). A chain
    /// ends at a page whose index in it is not the next one (a loop comes back to an
    /// earlier page: decodeBlob names it); a chain longer than there are pages is refused.
    private func readChains(_ roots: ArraySlice<(id: UInt64, root: UInt32)>,
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
    private func decodeChain(_ pages: [MetadataPage.Page], ids: [UInt32], expectedID: UInt64) throws(BlobStoreError) -> BlobMetadata {
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

    // MARK: - Queries

    public var blobIDList: [UInt64] { blobs.keys.sorted() }
    public func blob(_ id: UInt64) -> BlobMetadata? { blobs[id] }
    public var superBlobID: UInt64? { superBlock.superBlobID }
    public var clusterCount: UInt64 { superBlock.clusterCount }
    /// Free as the metadata has it (clusters released while open handles finish with
    /// them count as free).
    public var freeClusterCount: UInt64 {
        clusters.count - clusters.setCount + quarantinedClusterCount + discards.heldClusterCount
    }
    public var clusterSizeBytes: Int { Int(superBlock.clusterSizeBytes) }
    /// The unit of blob reads and writes: the device block (fixed: read once, not per request).
    public let ioUnitBytes: Int
    public var logPagesInUse: UInt64 { logHead - superBlock.logTailSequence }

    // MARK: - Device helpers

    /// Metadata reads: a range beyond the device (a damaged super block's region) is a
    /// typed error before any buffer is allocated for it.
    static func readPages(_ io: BdevSyncIO, at page: UInt64, count: UInt64) throws(BlobStoreError) -> [UInt8] {
        let blocksPerPage = UInt64(pageBytes / io.geometry.blockSizeBytes)
        let devicePages = io.geometry.capacityBytes / UInt64(pageBytes)
        guard page <= devicePages, count <= devicePages - page else {
            throw .device(.outOfRange(offsetBlocks: page &* blocksPerPage, countBlocks: count &* blocksPerPage,
                                      blockCount: devicePages * blocksPerPage))
        }
        do { return try io.readBytes(offsetBlocks: page * blocksPerPage, countBlocks: count * blocksPerPage) } catch {
            throw .device(error)
        }
    }

    func readPages(at page: UInt64, count: UInt64) throws(BlobStoreError) -> [UInt8] {
        try Self.readPages(io, at: page, count: count)
    }

    func writePages(at page: UInt64, _ bytes: [UInt8]) throws(BlobStoreError) {
        precondition(bytes.count % Self.pageBytes == 0)
        guard !isReadOnly else { throw .readOnly }
        try refuseIfDeviceLost()
        try writeObserver?.willOverwrite(pages: page..<(page + UInt64(bytes.count / Self.pageBytes)))
        guard !discardsWrites else { return }
        do { try io.writeBytes(bytes, offsetBlocks: page * blocksPerPage) } catch {
            throw deviceWriteFailed(error, "metadata write at page \(page)")
        }
    }

    /// Throws once the device has been lost (see `lostDevice`).
    @inline(__always)
    func refuseIfDeviceLost() throws(BlobStoreError) {
        if let lostDevice { throw .deviceLost(lostDevice) }
    }

    /// A device write or flush of the store failed (`what`): counted. A lost device latches
    /// `lostDevice` (every later change is refused with `.deviceLost`); any other failure
    /// makes the store read-only when `readOnlyOnDeviceError` is set. The first is logged,
    /// and `deviceFailure` says what it was. Returns the error to throw.
    func deviceWriteFailed(_ error: BdevError, _ what: String) -> BlobStoreError {
        deviceErrorCount += 1
        let lost: Bool
        if case .deviceLost = error { lost = true } else { lost = false }
        if lost && lostDevice == nil { lostDevice = error }
        if (lost || readOnlyOnDeviceError) && deviceFailure == nil {
            deviceFailure = "\(what): \(error)"
            if !lost { isReadOnly = true }
            Log.logger("blobstore").error("device error (\(what): \(error)): the store takes no more writes; every write gets EROFS until it is mounted again (the log replays what was flushed)")
        }
        return lost ? .deviceLost(error) : .device(error)
    }

    /// The store takes no more changes: loaded read-only, read-only since a device error,
    /// or its device lost.
    public var refusesChanges: Bool { isReadOnly || lostDevice != nil }

    /// The flush begun with `beginExternalFlush` failed with `error`: the store's error
    /// for it (as a flush of its own would have failed).
    @discardableResult
    public func externalFlushFailed(_ error: BdevError) -> BlobStoreError {
        deviceWriteFailed(error, "device flush")
    }

    /// What a device flush issued outside the store covers (see `beginExternalFlush`).
    public struct FlushToken: Sendable {
        let commitEpoch: UInt64
        let releaseEpoch: UInt64
        /// Every release up to `releaseEpoch` was in the log when the flush was issued.
        let releasesLogged: Bool
    }

    /// For a flush the caller issues on its own channel (so that its thread can serve
    /// other requests while the device flushes): writes the deferred transactions to the
    /// log (after flushing the data under them), and closes the open log page, so no
    /// later commit rewrites a page the flush makes durable. Every write completed before
    /// the flush is submitted is covered by it.
    public func beginExternalFlush() throws(BlobStoreError) -> FlushToken {
        try refuseIfDeviceLost()
        guard deviceFailure == nil else { throw .readOnly }
        try writePendingLog()
        openLogPage = nil
        return FlushToken(commitEpoch: commitEpoch, releaseEpoch: releaseEpoch, releasesLogged: releasedUnlogged.isEmpty)
    }

    /// The flush begun with `token` completed: what it covered is durable.
    public func externalFlushCompleted(_ token: FlushToken) {
        if commitEpoch == token.commitEpoch { hasUnflushedCommits = false }
        if releaseEpoch == token.releaseEpoch { releasedSinceFlush = false }
        if token.releasesLogged { releasesBecameDurable(through: token.releaseEpoch) }
    }

    func flush() throws(BlobStoreError) {
        try refuseIfDeviceLost()
        try writePendingLog()
        do { try io.flush() } catch { throw deviceWriteFailed(error, "device flush") }
        hasUnflushedCommits = false
        releasedSinceFlush = false
        openLogPage = nil
        // Inside a checkpoint that holds releasing transactions they are durable only at
        // its switch (which says so then).
        if releasedUnlogged.isEmpty { releasesBecameDurable(through: releaseEpoch) }
    }
}

/// Sees the device pages a store is about to overwrite with metadata, before the write
/// is issued; a throw stops the write (nothing of it reaches the device).
public protocol MetadataWriteObserver: AnyObject {
    func willOverwrite(pages: Range<UInt64>) throws(BlobStoreError)
}
