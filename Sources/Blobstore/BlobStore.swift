import Bdev
import Env

/// A clone's parent and backed count: what its ancestors' view depends on.
struct AncestorKey: Hashable {
    let parent: BlobID
    let backed: UInt64
}

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
///
/// Invariants (checked with `precondition` where the check is cheap; the place is named):
/// - Clusters: a cluster's bit in `clusters` is set while it is mapped by exactly one
///   blob's extent, holds a page of a durable chain or of the chains a running
///   checkpoint writes, is quarantined (`releases.quarantine`: released, still reachable
///   through an open handle's old map) or is held for an unmap (`discards`); a clear bit
///   is owned by nothing (a write may have chosen it and be committing its mapping:
///   `clustersBeingMapped`). A record maps only clusters whose bit is clear (`apply` refuses
///   the others as "already owned"); the persisted bitmaps show quarantined, held and
///   superseded clusters free.
/// - Blob ids: `blobIDs` has a bit set exactly for the blobs in `blobs` (end of `apply`,
///   end of a checkpoint).
/// - Chains: after a checkpoint every blob has a durable chain and nothing is dirty
///   (`adoptCheckpoint`); a chain's pages are set in `metadataPageBits` (region) or
///   `clusters` (metadata pages in clusters).
/// - Log: LSNs are given out in order, one per record, and never again
///   (`MetadataLog.advance`); the head never moves back and the pages in use, from the
///   super block's tail sequence to the head, never exceed the log (`writeLog`); a
///   checkpoint's LSN and tail never move back (`switchSuperBlock`).
/// - Durability order: the data of newly allocated clusters is durable before a record
///   that maps them is written (`write`: flush, or `pendingNeedsDataFlush` in deferred
///   mode); a checkpoint writes only the inactive copy of the table and bitmaps and
///   switches the super block last, after a flush, to sequence + 1.
/// - Clones: a blob's parent exists and is a snapshot; parent links form no cycle;
///   `clones` holds exactly the reverse of the parent links (end of `apply`, load); a
///   snapshot's clusters never change while it has clones, except by a merge into its
///   only clone (BlobStore+Clones.swift).
/// - Releases: nothing released is written again before its release is durable
///   (`prepareToReuseReleasedClusters` flushes first; a checkpoint puts no metadata page
///   in `releases.unlogged` or `clustersBeingMapped`), nor handed out while an open
///   handle can reach it (quarantine); releases are durable only up to the last one made
///   (`ReleaseTracking.becameDurable`), and unmapped only once durable (`DiscardQueue`).
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
    let blobs = BlobCache()
    var durableChains: [BlobID: [UInt32]] = [:]
    var dirtyBlobs: Set<BlobID> = []
    var clusters: Bitmap
    var metadataPageBits: Bitmap
    var blobIDs: Bitmap
    /// The metadata log writer's state (BlobStore+Log.swift).
    var metadataLog: MetadataLog
    /// For each copy of the table and of the bitmaps, the pages that differ (or may) from
    /// what the state makes them; absent: the copy is unknown (the next checkpoint into it
    /// writes it whole). Checkpoints write only these pages.
    var copyDifferences: [ArrayCopyKey: Set<Int>] = [:]
    /// Blobs open for the data path; their handles follow metadata changes (each on the
    /// reactor that owns it).
    var openHandles: [BlobID: [BlobHandle]] = [:]
    /// For each snapshot, the blobs whose parent it is (kept by `apply` and built at
    /// load: the parent links are in the children's metadata).
    var clones: [BlobID: Set<BlobID>] = [:]
    /// Whether `clones` holds every link. A load that reads chains on demand leaves it
    /// partial (links of unread clones are missing); `cloneSet` completes it the first
    /// time a snapshot's clones are asked for.
    var clonesComplete = true
    /// The first chain a read on demand could not read (the store then takes no changes).
    public internal(set) var chainReadFailure: BlobStoreError?
    /// What a clone with a given parent and backed count reads from its ancestors (the
    /// ancestors' view, without its own extents), shared by every clone and handle with
    /// that key: computing it walks every ancestor extent. Ancestors are snapshots and do
    /// not change, so it is cleared only by the records that change parent links
    /// (`BlobStore+Clones.swift`).
    var ancestorViews: [AncestorKey: ContiguousArray<Extent>] = [:]
    /// Released clusters: the quarantine, release epochs (BlobStore+Release.swift).
    var releases = ReleaseTracking()
    /// The durable chain pages of the blobs changed since the checkpoint, plus one each:
    /// with the log pages in use, a bound on the pages the next checkpoint writes.
    var dirtyChainPages: UInt64 = 0
    /// The changed blobs counted in `dirtyChainPages` (those that still exist).
    var countedDirty: Set<BlobID> = []
    /// Metadata pages of the last checkpoint's chains that are in data clusters.
    public internal(set) var metadataPagesInClusterCount: UInt64 = 0
    /// Clusters a write is committing the mapping of (written, not yet set in `clusters`).
    var clustersBeingMapped: Set<UInt64> = []
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
    /// Called while an allocation waits for released clusters whose open handles have not
    /// acknowledged yet: handles owned by this thread finish their requests only when their
    /// channel is polled, and this polls it (nil: the handles are on other reactors).
    public var whileWaitingForReleasedClusters: (() -> Void)?
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
        metadataLog = MetadataLog(superBlock)
        blocksPerPage = UInt64(Self.pageBytes / io.geometry.blockSizeBytes)
        ioUnitBytes = io.geometry.blockSizeBytes
        blobs.reader = { [unowned self] id in self.readChainsAhead(of: CollectionOfOne(id)) }
        blobs.evictable = { [unowned self] id in self.letGo(id) }
    }

    // MARK: - Queries

    public var blobIDList: [BlobID] { blobs.ids.sorted() }
    public func blob(_ id: BlobID) -> BlobMetadata? { blobs[id] }
    /// Blobs whose metadata stays in memory at most (0, the default: no limit). Past it,
    /// clean blobs without an open handle are let go, oldest read first, and read again
    /// on their next use (`BlobCache`). `blobfs mount -o metadata_cache=N` sets it.
    public var metadataCacheLimit: Int {
        get { blobs.limit }
        set { blobs.limit = max(0, newValue) }
    }
    /// Blobs in memory, and how many times one was let go.
    public var metadataCacheCount: Int { blobs.readCount }
    public var metadataCacheEvictions: UInt64 { blobs.evictions }

    /// The first page of `id`'s durable chain if the cache may let it go now (its chain is
    /// then forgotten; reading it again brings it back): clean since the last checkpoint,
    /// no open handle, not the super blob.
    func letGo(_ id: BlobID) -> UInt32? {
        guard !dirtyBlobs.contains(id), openHandles[id]?.isEmpty ?? true, id != superBlock.superBlobID,
              let root = durableChains[id]?.first else { return nil }
        durableChains[id] = nil
        return root
    }

    /// Whether `id`'s chain is in memory (or `id` is no blob): using it reads nothing.
    public func isRead(_ id: BlobID) -> Bool { blobs.unreadRoot(id) == nil }
    public var superBlobID: BlobID? { superBlock.superBlobID }
    public var clusterCount: UInt64 { superBlock.clusterCount }
    /// Free as the metadata has it (clusters released while open handles finish with
    /// them count as free).
    public var freeClusterCount: UInt64 {
        clusters.count - clusters.setCount + releases.quarantinedClusterCount + discards.heldClusterCount
    }
    public var clusterSizeBytes: Int { Int(superBlock.clusterSizeBytes) }
    /// The unit of blob reads and writes: the device block (fixed: read once, not per request).
    public let ioUnitBytes: Int
    public var logPagesInUse: UInt64 { metadataLog.head - superBlock.logTailSequence }

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
        metadataLog.openPage = nil
        return FlushToken(commitEpoch: metadataLog.commitEpoch, releaseEpoch: releases.epoch, releasesLogged: releases.unlogged.isEmpty)
    }

    /// The flush begun with `token` completed: what it covered is durable.
    public func externalFlushCompleted(_ token: FlushToken) {
        if metadataLog.commitEpoch == token.commitEpoch { hasUnflushedCommits = false }
        if releases.epoch == token.releaseEpoch { releases.sinceFlush = false }
        if token.releasesLogged { releasesBecameDurable(through: token.releaseEpoch) }
    }

    func flush() throws(BlobStoreError) {
        try refuseIfDeviceLost()
        try writePendingLog()
        do { try io.flush() } catch { throw deviceWriteFailed(error, "device flush") }
        hasUnflushedCommits = false
        releases.sinceFlush = false
        metadataLog.openPage = nil
        // Inside a checkpoint that holds releasing transactions they are durable only at
        // its switch (which says so then).
        if releases.unlogged.isEmpty { releasesBecameDurable(through: releases.epoch) }
    }
}

/// Sees the device pages a store is about to overwrite with metadata, before the write
/// is issued; a throw stops the write (nothing of it reaches the device).
public protocol MetadataWriteObserver: AnyObject {
    func willOverwrite(pages: Range<UInt64>) throws(BlobStoreError)
}
