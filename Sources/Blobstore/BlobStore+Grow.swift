import Bdev
import Env

/// Online grow (FORMAT.md, "Online grow"): a loaded store extends onto the rest of a
/// device that grew under it. The table and bitmaps are written afresh, sized for the new
/// device, after everything the current store uses; then one super block switches to the
/// new geometry. Nothing the current checkpoint needs is overwritten before that switch,
/// so a crash at any write leaves either the old store or the grown one, each whole.
extension BlobStore {
    /// Blob ids (inodes) a store gets unless told: with metadata pages in clusters, one per
    /// 8 KiB of device (half its pages; mke2fs's inode ratio scales the same way, at one per
    /// 16 KiB), else one per page of the metadata page region (each blob needs one); at most
    /// `blobIDLimitDefaultMax`.
    public static func defaultBlobIDLimit(devicePages: UInt64, metadataPages: UInt64, pagesInClusters: Bool) -> UInt64 {
        min(pagesInClusters ? max(metadataPages, devicePages / 2) : metadataPages, blobIDLimitDefaultMax)
    }

    /// A load reads the active blob table whole (4 bytes an id): 16 Mi ids are a 64 MiB
    /// table, read at every mount. More only when asked for (`--inodes`).
    public static let blobIDLimitDefaultMax: UInt64 = 1 << 24

    public struct GrowReport: Sendable, Equatable {
        public var devicePagesBefore: UInt64
        public var devicePagesAfter: UInt64
        public var clustersBefore: UInt64
        public var clustersAfter: UInt64
        public var blobIDLimitBefore: UInt64
        public var blobIDLimitAfter: UInt64
        /// Pages written for the new table and bitmaps (one copy).
        public var arrayPagesWritten: UInt64
    }

    /// The geometry of `block`'s store grown onto `devicePages`: clusters up to the new
    /// table and bitmaps, which go at the end of the device, past every page the current
    /// store uses (its `devicePages`); blob ids raised to the default for the new size
    /// (never lowered). Sequence, active copy and records are the caller's.
    static func grownGeometry(_ block: SuperBlock, devicePages: UInt64) throws(BlobStoreError) -> SuperBlock {
        guard devicePages > block.devicePages, devicePages <= SuperBlock.devicePagesMax else {
            throw .invalidArgument("the store already covers \(block.devicePages * UInt64(pageBytes)) bytes; "
                + "\(devicePages * UInt64(pageBytes)) is no growth (grow the image file or device first, or give a larger size)")
        }
        let clusterPages = block.clusterPages
        var idLimit = max(block.blobIDLimit, defaultBlobIDLimit(devicePages: devicePages, metadataPages: block.metadataPages.pageCount,
                                                                 pagesInClusters: block.hasMetadataPagesInClusters))
        // Without metadata pages in clusters each blob needs a page of the region, which
        // does not grow: more ids than its pages would never be used.
        if !block.hasMetadataPagesInClusters { idLimit = max(block.blobIDLimit, min(idLimit, block.metadataPages.pageCount)) }
        let tablePages = (idLimit + UInt64(TablePage.entriesPerPage) - 1) / UInt64(TablePage.entriesPerPage)
        // Bitmap pages for every cluster the new device could hold (as format sizes them).
        let clusterBound = (devicePages - block.dataStartPage) / clusterPages
        let bitmapPages = BitmapPage.pages(forBits: clusterBound) + BitmapPage.pages(forBits: block.metadataPages.pageCount)
            + BitmapPage.pages(forBits: idLimit)
        let arrayPages = 2 * tablePages + 2 * bitmapPages
        guard devicePages - block.devicePages >= arrayPages else {
            let needed = (block.devicePages + arrayPages) * UInt64(pageBytes)
            throw .noSpace("growing to \(devicePages * UInt64(pageBytes)) bytes leaves no room for the new table and bitmaps "
                + "(\(arrayPages) pages) past the store's \(block.devicePages) pages: grow to at least \(needed) bytes")
        }
        let tableStart = devicePages - arrayPages
        var next = block
        next.incompatibleFeatures |= SuperBlock.Features.arraysAfterData
        next.devicePages = devicePages
        next.table = SuperBlock.Region(startPage: tableStart, pageCount: tablePages)
        next.bitmaps = SuperBlock.Region(startPage: tableStart + 2 * tablePages, pageCount: bitmapPages)
        next.clusterCount = (tableStart - block.dataStartPage) / clusterPages
        next.blobIDLimit = idLimit
        precondition(next.clusterCount >= block.clusterCount && next.bitmapRegionError(slotOffset: 0) == nil,
                     "grown geometry: \(next.clusterCount) clusters (had \(block.clusterCount))")
        return next
    }

    /// Grows the store onto `devicePages` pages of its device (default: the device's size
    /// now; a device that grew says so through `Bdev.refreshGeometry` first). A checkpoint
    /// first, so that the grown super block is that checkpoint's with a new geometry; then
    /// the new table and bitmaps, one copy, written whole after everything the store uses,
    /// and flushed; then the super block, flushed. The other copy of the new arrays is
    /// unknown, and the next checkpoint writes it whole. Call on the store's thread, not
    /// inside an allocating write.
    public func grow(toDevicePages target: UInt64? = nil) throws(BlobStoreError) -> GrowReport {
        guard !isReadOnly else { throw .readOnly }
        precondition(clustersBeingMapped.isEmpty, "grow inside an allocating write")
        let capacityPages = io.geometry.capacityBytes / UInt64(Self.pageBytes)
        let devicePages = target ?? capacityPages
        guard devicePages <= capacityPages else {
            throw .invalidArgument("the device holds \(capacityPages * UInt64(Self.pageBytes)) bytes, not \(devicePages * UInt64(Self.pageBytes))")
        }
        _ = try Self.grownGeometry(superBlock, devicePages: devicePages)  // refused before anything is written
        try checkpoint()
        precondition(dirtyBlobs.isEmpty && metadataLog.pending.isEmpty && releases.unlogged.isEmpty, "a checkpoint leaves nothing pending")
        let old = superBlock
        var next = try Self.grownGeometry(old, devicePages: devicePages)
        next.sequence = old.sequence + 1
        next.activeCopy = 0
        next.changedSincePrevious = nil  // the other copy of the new arrays was never written
        next.isClean = false
        next.checkpointLSN = metadataLog.nextLSN - 1
        next.logTailSequence = metadataLog.head
        let saved = (clusters: clusters, blobIDs: blobIDs, copies: copyDifferences)
        // writeTableAndBitmaps lays out and fills the arrays from the state: the state takes
        // the new geometry first, and gives it back if a write fails (the old store is
        // untouched on the device: nothing was written inside it).
        superBlock = next
        clusters = saved.clusters.grown(to: next.clusterCount)
        blobIDs = saved.blobIDs.grown(to: next.blobIDLimit)
        copyDifferences = [:]
        do {
            try writeTableAndBitmaps(copy: 0, chains: durableChains, checkpointSequence: next.sequence)
            try flush()
            try writePages(at: UInt64(next.slot), next.encode())
            try flush()
        } catch {
            superBlock = old
            clusters = saved.clusters
            blobIDs = saved.blobIDs
            copyDifferences = saved.copies
            throw error
        }
        _ = metadataPageBits.takeChangedPages()
        checkpointCount += 1
        lastCheckpointNs = MonotonicClock.nowNs()
        Log.logger("blobstore").notice("grown from \(old.devicePages) to \(next.devicePages) pages: \(old.clusterCount) to \(next.clusterCount) clusters, \(old.blobIDLimit) to \(next.blobIDLimit) blob ids; table and bitmaps at page \(next.table.startPage)")
        return GrowReport(devicePagesBefore: old.devicePages, devicePagesAfter: next.devicePages, clustersBefore: old.clusterCount,
                          clustersAfter: next.clusterCount, blobIDLimitBefore: old.blobIDLimit, blobIDLimitAfter: next.blobIDLimit,
                          arrayPagesWritten: next.table.pageCount + next.bitmaps.pageCount)
    }
}
