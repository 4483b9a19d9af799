import Bdev
import Env

// Discard: free space given back to the device (docs/ARCHITECTURE.md, "Discard").
//
// Invariants, each checked where it is relied on:
// - A cluster is unmapped only when it is free in the durable state: its release is in a
//   flushed log page or a switched checkpoint (`releases.durableEpoch`), or it was never
//   allocated since, and no open handle can reach it any more (the quarantine settled).
// - From the moment a cluster is chosen for an unmap until that unmap completed, its bit
//   stays set in the allocator's bitmap (`clusters`): nothing allocates it, so no write to
//   it can be reordered before the unmap (a device may execute requests in flight in any
//   order). The metadata, and every bitmap a checkpoint persists, have it free.
// - Log pages and metadata-region pages are unmapped synchronously through the store's own
//   channel, so the next write to them (a commit, a checkpoint) is submitted after the
//   unmap completed.

/// Consecutive device clusters.
public struct ClusterRun: Equatable, Sendable, CustomStringConvertible {
    public var first: UInt64
    public var count: UInt64
    public var end: UInt64 { first + count }
    public init(first: UInt64, count: UInt64) {
        self.first = first
        self.count = count
    }
    init(_ extent: Extent) { self.init(first: extent.firstCluster, count: UInt64(extent.count)) }
    public var description: String { "\(first)+\(count)" }
}

/// Clusters on their way to an unmap, all of them set in the allocator's bitmap: released
/// ones waiting for their release to be durable, released ones ready to go, and runs
/// submitted to the device (released, or free runs an explicit trim took).
struct DiscardQueue {
    private(set) var awaitingDurability: [(epoch: UInt64, run: ClusterRun)] = []
    private(set) var ready: [ClusterRun] = []
    private(set) var inFlight: [ClusterRun] = []
    /// Clusters in the three lists.
    private(set) var heldClusterCount: UInt64 = 0

    var isEmpty: Bool { heldClusterCount == 0 }
    var hasReady: Bool { !ready.isEmpty }
    var allRuns: [ClusterRun] { awaitingDurability.map(\.run) + ready + inFlight }

    /// A released run: ready if its release (`epoch`) is durable, else waiting for that.
    mutating func hold(_ run: ClusterRun, epoch: UInt64, durableEpoch: UInt64) {
        precondition(run.count > 0, "an empty run held for discard")
        heldClusterCount += run.count
        if epoch <= durableEpoch { ready.append(run) } else { awaitingDurability.append((epoch, run)) }
    }

    /// Releases up to `epoch` are durable: their runs are ready.
    mutating func promote(through epoch: UInt64) {
        guard !awaitingDurability.isEmpty else { return }
        var still: [(epoch: UInt64, run: ClusterRun)] = []
        for entry in awaitingDurability {
            if entry.epoch <= epoch { ready.append(entry.run) } else { still.append(entry) }
        }
        awaitingDurability = still
    }

    /// Up to `runsMax` ready runs, adjacent ones merged and none longer than
    /// `clustersMax`, moved in flight.
    mutating func takeReady(runsMax: Int, clustersMax: UInt64) -> [ClusterRun] {
        guard runsMax > 0, !ready.isEmpty else { return [] }
        ready.sort { $0.first < $1.first }
        var merged: [ClusterRun] = []
        for run in ready {
            if let last = merged.last, last.end == run.first { merged[merged.count - 1].count += run.count } else { merged.append(run) }
        }
        var taken: [ClusterRun] = []
        var rest: [ClusterRun] = []
        for var run in merged {
            while taken.count < runsMax, run.count > 0 {
                let piece = ClusterRun(first: run.first, count: min(run.count, clustersMax))
                taken.append(piece)
                run = ClusterRun(first: piece.end, count: run.count - piece.count)
            }
            if run.count > 0 { rest.append(run) }
        }
        ready = rest
        inFlight += taken
        return taken
    }

    /// A free run an explicit trim took (its bits just set): in flight at once.
    mutating func beginTrim(_ run: ClusterRun) {
        heldClusterCount += run.count
        inFlight.append(run)
    }

    /// The unmap of `run` (taken in flight) completed.
    mutating func complete(_ run: ClusterRun) {
        guard let index = inFlight.firstIndex(of: run) else { preconditionFailure("discard of \(run) completed but not in flight") }
        inFlight.remove(at: index)
        heldClusterCount -= run.count
    }

    /// Everything not in flight, taken out (given up: back to allocation undiscarded).
    mutating func takeNotInFlight() -> (awaiting: [ClusterRun], ready: [ClusterRun]) {
        let taken = (awaitingDurability.map(\.run), ready)
        for run in taken.0 + taken.1 { heldClusterCount -= run.count }
        awaitingDurability = []
        ready = []
        return taken
    }
}

extension BlobStore {
    /// Clusters held for discard and not yet submitted go back to allocation without
    /// their unmap (space is short, or online discard was turned off); a later trim finds
    /// them free. True when some did. Those whose release is not durable are then like any
    /// such released cluster: `prepareToReuseReleasedClusters` flushes before their reuse.
    @discardableResult
    func giveUpDiscardHolds() -> Bool {
        let (awaiting, ready) = discards.takeNotInFlight()
        for run in awaiting + ready { clusters.clear(run: run.first, count: run.count) }
        if !awaiting.isEmpty { releases.sinceFlush = true }
        return !(awaiting.isEmpty && ready.isEmpty)
    }

    /// Online discard: released clusters whose release is durable wait to be unmapped.
    var hasDiscardsReady: Bool { discards.hasReady }

    /// Ready released runs (merged, at most `clustersMax` each), now in flight: the caller
    /// submits their unmaps and reports each with `discardCompleted`.
    func takeDiscards(runsMax: Int, clustersMax: UInt64) -> [ClusterRun] {
        discards.takeReady(runsMax: runsMax, clustersMax: clustersMax)
    }

    /// Free clusters in [cursor, end), in runs of at least `minimumClusters` (at most
    /// `clustersMax` each, at most `runsMax` of them), set in the allocator and in flight
    /// for an explicit trim; `cursor` moves past what was looked at. Every free cluster is
    /// free in the durable state: a release not yet durable is made so first (a flush).
    func takeFreeRuns(cursor: inout UInt64, end: UInt64, minimumClusters: UInt64, runsMax: Int,
                      clustersMax: UInt64) throws(BlobStoreError) -> [ClusterRun] {
        precondition(clustersBeingMapped.isEmpty, "a trim inside an allocating write")
        if releases.sinceFlush { try flush() }
        let limit = min(end, clusters.count)
        var taken: [ClusterRun] = []
        while taken.count < runsMax, cursor < limit, let start = clusters.firstClear(from: cursor, before: limit) {
            let runEnd = min(clusters.firstSet(from: start, before: limit) ?? limit, start + clustersMax)
            cursor = runEnd
            guard runEnd - start >= minimumClusters else { continue }
            let run = ClusterRun(first: start, count: runEnd - start)
            clusters.set(run: run.first, count: run.count)
            discards.beginTrim(run)
            taken.append(run)
        }
        if taken.count < runsMax { cursor = max(cursor, limit) }
        return taken
    }

    /// The unmap of `run` (from `takeDiscards` or `takeFreeRuns`) completed, well or not:
    /// its clusters go back to allocation.
    func discardCompleted(_ run: ClusterRun) {
        discards.complete(run)
        clusters.clear(run: run.first, count: run.count)
    }

    /// Unmaps in flight hold clusters allocation may need: polls their channel until they
    /// completed, up to `releases.quarantineWaitNs`.
    func waitForDiscardsInFlight() {
        guard !discards.inFlight.isEmpty, let poll = whileWaitingForDiscards else { return }
        let deadline = MonotonicClock.nowNs() + releases.quarantineWaitNs
        while !discards.inFlight.isEmpty, MonotonicClock.nowNs() < deadline { poll() }
    }

    /// Device byte offset of cluster `cluster`.
    public func clusterOffsetBytes(_ cluster: UInt64) -> UInt64 {
        superBlock.dataStartPage * UInt64(Self.pageBytes) + cluster * UInt64(clusterSizeBytes)
    }

    // MARK: - Log and metadata-region pages (synchronous)

    /// Unmaps the log pages no replay reads (all but those from the tail to the head) and
    /// the free pages of the metadata page region, where they lie within device bytes
    /// [startBytes, endBytes), in runs of at least `minimumBytes`. Returns the bytes
    /// unmapped. Synchronous: the next commit or checkpoint writes after the unmaps.
    func trimMetadataRegions(startBytes: UInt64, endBytes: UInt64, minimumBytes: UInt64) throws(BlobStoreError) -> UInt64 {
        guard !isReadOnly else { throw .readOnly }
        let log = superBlock.log
        let live = metadataLog.head - superBlock.logTailSequence
        precondition(live <= log.pageCount, "log of \(live) live pages in \(log.pageCount)")
        var pages = Self.circularPages(first: metadataLog.head % log.pageCount, count: log.pageCount - live, in: log)
        var index: UInt64 = 0
        let region = superBlock.metadataPages
        while index < region.pageCount, let start = metadataPageBits.firstClear(from: index, before: region.pageCount) {
            let end = metadataPageBits.firstSet(from: start, before: region.pageCount) ?? region.pageCount
            pages.append((region.startPage + start, end - start))
            index = end
        }
        return try unmapPages(pages, startBytes: startBytes, endBytes: endBytes, minimumBytes: minimumBytes)
    }

    /// After a checkpoint switch with online discard: the log pages written since the
    /// previous checkpoint (sequences [oldTail, the new tail)) and the chain pages of the
    /// region it superseded are unmapped. Best effort: the checkpoint already succeeded.
    func discardAfterCheckpoint(oldTailSequence: UInt64, supersededRegionPages: [UInt32]) {
        let log = superBlock.log
        let written = superBlock.logTailSequence - oldTailSequence
        var pages = Self.circularPages(first: oldTailSequence % log.pageCount, count: min(written, log.pageCount), in: log)
        for page in supersededRegionPages.sorted() {
            let address = superBlock.metadataPages.startPage + UInt64(page)
            if let last = pages.last, last.first + last.count == address { pages[pages.count - 1].count += 1 } else { pages.append((address, 1)) }
        }
        _ = try? unmapPages(pages, startBytes: 0, endBytes: .max, minimumBytes: 0)
    }

    /// `count` pages of the circular `region` from index `first`: one or two runs.
    private static func circularPages(first: UInt64, count: UInt64, in region: SuperBlock.Region) -> [(first: UInt64, count: UInt64)] {
        guard count > 0 else { return [] }
        let beforeWrap = min(count, region.pageCount - first)
        var runs = [(region.startPage + first, beforeWrap)]
        if count > beforeWrap { runs.append((region.startPage, count - beforeWrap)) }
        return runs
    }

    /// Unmaps page runs (device pages) clipped to [startBytes, endBytes), those of at
    /// least `minimumBytes`, all in flight together; returns the bytes unmapped.
    private func unmapPages(_ pages: [(first: UInt64, count: UInt64)], startBytes: UInt64, endBytes: UInt64,
                            minimumBytes: UInt64) throws(BlobStoreError) -> UInt64 {
        let pageBytes = UInt64(Self.pageBytes)
        let blockBytes = UInt64(io.geometry.blockSizeBytes)
        var ranges: [(offsetBlocks: UInt64, countBlocks: UInt64)] = []
        var bytes: UInt64 = 0
        for run in pages {
            let start = max(run.first * pageBytes, startBytes)
            let end = min((run.first + run.count) * pageBytes, endBytes)
            guard end > start, end - start >= max(minimumBytes, 1) else { continue }
            // Whole blocks only (a range given in bytes may cut one).
            let first = (start + blockBytes - 1) / blockBytes, last = end / blockBytes
            guard last > first else { continue }
            ranges.append((first, last - first))
            bytes += (last - first) * blockBytes
        }
        guard !ranges.isEmpty else { return 0 }
        do { try io.unmapScattered(ranges) } catch { throw .device(error) }
        return bytes
    }
}
