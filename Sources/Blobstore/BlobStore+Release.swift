#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env

// Release tracking: clusters a record released go back to allocation only once no open
// handle can reach them (the quarantine) and are written again only once their release is
// durable (release epochs); with online discard they go to their unmap first.
extension BlobStore {
    /// Released clusters that no handle can reach any more: back to allocation, or with
    /// online discard held for their unmap (ready once release `epoch` is durable).
    func returnReleased(_ extent: Extent, epoch: UInt64) {
        guard discardsReleasedClusters else { return clearClusters(extent) }
        discards.hold(ClusterRun(extent), epoch: epoch, durableEpoch: durableReleaseEpoch)
    }

    /// Every release up to `epoch` is durable (a flush after its log page, or a checkpoint
    /// switch that holds it).
    func releasesBecameDurable(through epoch: UInt64) {
        durableReleaseEpoch = max(durableReleaseEpoch, epoch)
        discards.promote(through: durableReleaseEpoch)
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

    /// Notes that the record being applied releases `extent` (deferred mode: a release
    /// not durable before the next flush).
    func release(_ extent: Extent) {
        if deferCommitFlush {
            releasedSinceFlush = true
            releaseEpoch += 1
            releasedUnlogged.append(extent)
        }
        releasing.append(extent)
    }
}
