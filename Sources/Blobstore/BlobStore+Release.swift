#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env

// Release tracking: clusters a record released go back to allocation only once no open
// handle can reach them (the quarantine) and are written again only once their release is
// durable (release epochs); with online discard they go to their unmap first.

/// Release tracking's state, owned by `BlobStore` (`releases`).
struct ReleaseTracking {
    /// Extents released by the record being applied.
    var byRecord: [Extent] = []
    /// Released clusters still reachable through open handles' old maps: their bits stay
    /// set in `clusters` (so allocation passes them by) until the ticket settles; the
    /// persisted bitmaps show them free.
    var quarantine: [(ticket: ReleaseTicket, extents: [Extent], epoch: UInt64)] = []
    var quarantinedClusterCount: UInt64 = 0
    /// How long an allocation that found no free cluster waits for quarantined ones.
    var quarantineWaitNs: UInt64 = 2_000_000_000
    /// Clusters were released by a commit not yet flushed: they must not receive new data
    /// before that release is durable (a crash could otherwise undo the release and leave
    /// the old owner holding the new owner's bytes).
    var sinceFlush = false
    /// Deferred mode: clusters released by transactions in `metadataLog.pending` (a
    /// checkpoint that holds those transactions must not put metadata pages in them).
    var unlogged: [Extent] = []
    /// Counts cluster releases (as `MetadataLog.commitEpoch` counts deferred commits): a
    /// flush issued by someone else (`beginExternalFlush`) covers those made before it
    /// was issued.
    var epoch: UInt64 = 0
    /// Releases up to this `epoch` are durable (in a flushed log page or a switched
    /// checkpoint): their clusters may be unmapped.
    var durableEpoch: UInt64 = 0

    /// The record being applied releases `extent`; `deferred`: its log page is not
    /// written yet, so the release is durable only after a later flush.
    mutating func note(_ extent: Extent, deferred: Bool) {
        if deferred {
            sinceFlush = true
            epoch += 1
            unlogged.append(extent)
        }
        byRecord.append(extent)
    }

    /// The record's releases wait for `ticket` (the open handles' acknowledgements).
    mutating func hold(_ extents: [Extent], until ticket: ReleaseTicket) {
        quarantine.append((ticket, extents, epoch))
        quarantinedClusterCount += extents.reduce(0) { $0 + UInt64($1.count) }
    }

    /// Takes the quarantined releases whose handles have all acknowledged, in order.
    mutating func takeSettled() -> [(extents: [Extent], epoch: UInt64)] {
        var settled: [(extents: [Extent], epoch: UInt64)] = []
        quarantine.removeAll { entry in
            guard entry.ticket.isSettled else { return false }
            for extent in entry.extents { quarantinedClusterCount -= UInt64(extent.count) }
            settled.append((entry.extents, entry.epoch))
            return true
        }
        precondition(!quarantine.isEmpty || quarantinedClusterCount == 0, "the quarantine's count is of its clusters")
        return settled
    }

    /// Every release up to `through` is durable.
    mutating func becameDurable(through: UInt64) {
        precondition(through <= epoch, "a release is durable only once it happened")
        durableEpoch = max(durableEpoch, through)
    }
}

extension BlobStore {
    /// Released clusters that no handle can reach any more: back to allocation, or with
    /// online discard held for their unmap (ready once release `epoch` is durable).
    func returnReleased(_ extent: Extent, epoch: UInt64) {
        guard discardsReleasedClusters else { return clearClusters(extent) }
        discards.hold(ClusterRun(extent), epoch: epoch, durableEpoch: releases.durableEpoch)
    }

    /// Every release up to `epoch` is durable (a flush after its log page, or a checkpoint
    /// switch that holds it).
    func releasesBecameDurable(through epoch: UInt64) {
        releases.becameDurable(through: epoch)
        discards.promote(through: releases.durableEpoch)
    }

    func clearClusters(_ extent: Extent) {
        for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) { clusters.clear(cluster) }
    }

    /// Returns the released clusters whose handles have all acknowledged to allocation
    /// (or, with online discard, to their unmap: `returnReleased`); true when some settled.
    @discardableResult
    func reclaimReleasedClusters() -> Bool {
        guard !releases.quarantine.isEmpty else { return false }
        let settled = releases.takeSettled()
        for (extents, epoch) in settled { for extent in extents { returnReleased(extent, epoch: epoch) } }
        return !settled.isEmpty
    }

    /// Allocation found no free cluster while released ones wait for handles on other
    /// reactors, or for their unmap: takes back those held for discard and not submitted,
    /// and waits for the handles' acknowledgements (a reactor answers within its next
    /// pass) and the unmaps in flight, up to `releases.quarantineWaitNs`. True when some clusters
    /// came back.
    func waitForReleasedClusters() -> Bool {
        let deadline = MonotonicClock.nowNs() + releases.quarantineWaitNs
        let setBefore = clusters.setCount
        while true {
            reclaimReleasedClusters()
            giveUpDiscardHolds()
            if clusters.setCount < setBefore { return true }
            guard !releases.quarantine.isEmpty || !discards.inFlight.isEmpty, MonotonicClock.nowNs() < deadline else { return false }
            if !discards.inFlight.isEmpty { whileWaitingForDiscards?() }
            if let poll = whileWaitingForReleasedClusters { poll() } else { sched_yield() }
        }
    }

    /// Before clusters that may have been released are written again: their release is
    /// durable (a crash could otherwise undo it and leave the old owner holding the new
    /// owner's bytes). Readers and writers through open handles are kept off them by the
    /// quarantine (`ReleaseTicket`).
    func prepareToReuseReleasedClusters() throws(BlobStoreError) {
        if releases.sinceFlush { try flush() }
    }

    /// Notes that the record being applied releases `extent` (deferred mode: a release
    /// not durable before the next flush).
    func release(_ extent: Extent) {
        releases.note(extent, deferred: deferCommitFlush)
    }
}
