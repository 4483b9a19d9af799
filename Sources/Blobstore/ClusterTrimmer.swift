import Bdev
import Env

/// Gives free space back to the device, on the store's thread and off the request path
/// (docs/ARCHITECTURE.md, "Discard"):
///
/// - online discard (`BlobStore.discardsReleasedClusters`): released clusters whose
///   release is durable, merged into runs, as soon as the store has them ready;
/// - explicit trims (`trimFreeSpace`: FITRIM through the mount, `blobcli trim`): a
///   checkpoint (the whole log is then dead), the dead log and the free metadata-region
///   pages (synchronously, through the store's channel), then every free cluster run in
///   the range, a window of runs at a time.
///
/// Cluster unmaps go through `channel` and complete asynchronously; until each completed
/// the store keeps its clusters out of allocation. Unmaps are submitted only from the
/// trimmer's poller, never from a completion: a completion may be delivered inside a store
/// operation that waits for space (`BlobStore.whileWaitingForDiscards`), where clusters an
/// allocating write has chosen are still clear in the bitmap.
///
/// `channel` must be on the reactor that owns the store and must not be the one the
/// store's own synchronous I/O steps (its poller would run inside store operations).
public final class ClusterTrimmer: BdevCompletionHandler {
    /// Unmaps in flight at most, and bytes per unmap at most: together they bound the free
    /// space allocation cannot use while unmaps are in flight (512 MiB).
    public static let requestsInFlightMax = 8
    public static let runBytesMax: UInt64 = 64 << 20

    private unowned let store: BlobStore
    private let channel: BdevChannel
    private let blockBytes: UInt64
    private let clusterBytes: UInt64
    private var pollerID: PollerID?
    /// In flight, by tag: the run and the explicit trim it belongs to (nil: online discard).
    private var slots: [(run: ClusterRun, job: TrimJob?)?]
    private var freeSlots: [Int]
    /// Explicit trims, served in order.
    private var jobs: [TrimJob] = []
    /// Bytes unmapped by online discard since the trimmer started.
    public private(set) var discardedBytes: UInt64 = 0
    /// Online discards the device failed (their clusters are free all the same).
    public private(set) var failedDiscards: UInt64 = 0
    public private(set) var lastDiscardError: BdevError?

    /// One explicit trim: free clusters [cursor, end) in runs of at least `minimumClusters`.
    private final class TrimJob {
        var cursor: UInt64
        let end: UInt64
        let minimumClusters: UInt64
        var trimmedBytes: UInt64
        var inFlight = 0
        var error: BlobStoreError?
        let done: (Result<UInt64, BlobStoreError>) -> Void

        init(cursor: UInt64, end: UInt64, minimumClusters: UInt64, trimmedBytes: UInt64,
             done: @escaping (Result<UInt64, BlobStoreError>) -> Void) {
            self.cursor = cursor
            self.end = end
            self.minimumClusters = minimumClusters
            self.trimmedBytes = trimmedBytes
            self.done = done
        }

        var isFinished: Bool { (cursor >= end || error != nil) && inFlight == 0 }
    }

    public init(store: BlobStore, channel: BdevChannel) {
        self.store = store
        self.channel = channel
        blockBytes = UInt64(channel.bdev.geometry.blockSizeBytes)
        clusterBytes = UInt64(store.clusterSizeBytes)
        let depth = min(channel.queueDepth, Self.requestsInFlightMax)
        slots = Array(repeating: nil, count: depth)
        freeSlots = Array((0..<depth).reversed())
        store.whileWaitingForDiscards = { [unowned channel] in _ = channel.poll() }
        pollerID = channel.reactor.registerPoller { [unowned self] in self.poll() }
    }

    /// Unmaps in flight now.
    public var inFlight: Int { slots.count - freeSlots.count }

    /// Trims the free space within device bytes [startBytes, startBytes + lengthBytes) in
    /// runs of at least `minimumBytes`: a checkpoint, the log pages no replay reads and the
    /// free metadata-region pages (synchronously), then the free clusters (asynchronously;
    /// the store's reactor serves other work meanwhile). `done` gets the bytes unmapped,
    /// or the first failure, exactly once, on the store's thread. Call on that thread.
    public func trimFreeSpace(startBytes: UInt64, lengthBytes: UInt64, minimumBytes: UInt64,
                              done: @escaping (Result<UInt64, BlobStoreError>) -> Void) {
        let deviceBytes = store.superBlock.devicePages * UInt64(SuperBlock.pageBytes)
        guard !store.isReadOnly else { return done(.failure(.readOnly)) }
        guard startBytes < deviceBytes else {
            return done(.failure(.invalidArgument("trim from byte \(startBytes): past the end of the \(deviceBytes)-byte store")))
        }
        guard minimumBytes <= deviceBytes else {
            return done(.failure(.invalidArgument("trim of runs of at least \(minimumBytes) bytes: more than the \(deviceBytes)-byte store")))
        }
        let endBytes = startBytes + min(lengthBytes, deviceBytes - startBytes)
        let metadataBytes: UInt64
        do throws(BlobStoreError) {
            // Everything durable, the log empty: all of it can go.
            try store.checkpoint()
            metadataBytes = try store.trimMetadataRegions(startBytes: startBytes, endBytes: endBytes, minimumBytes: minimumBytes)
        } catch { return done(.failure(error)) }
        // Clusters wholly inside the range.
        let dataStart = store.clusterOffsetBytes(0)
        let first = startBytes <= dataStart ? 0 : (startBytes - dataStart + clusterBytes - 1) / clusterBytes
        let end = endBytes <= dataStart ? 0 : min(store.clusterCount, (endBytes - dataStart) / clusterBytes)
        jobs.append(TrimJob(cursor: first, end: end, minimumClusters: max(1, (minimumBytes + clusterBytes - 1) / clusterBytes),
                            trimmedBytes: metadataBytes, done: done))
    }

    /// Submits what is ready: online discards first, then the next window of the current
    /// explicit trim; answers a trim that finished. The trimmer's poller.
    func poll() -> PollStatus {
        var worked = false
        // Released clusters whose handles have settled join the queue now, not at the next
        // allocating write (which is when allocation would take them back).
        if store.discardsReleasedClusters { store.reclaimReleasedClusters() }
        while !freeSlots.isEmpty, store.hasDiscardsReady {
            for run in store.takeDiscards(runsMax: freeSlots.count, clustersMax: Self.runBytesMax / clusterBytes) {
                submit(run, job: nil)
                worked = true
            }
        }
        guard let job = jobs.first else { return worked ? .busy : .idle }
        if job.error == nil, job.cursor < job.end, !freeSlots.isEmpty {
            do throws(BlobStoreError) {
                let runs = try store.takeFreeRuns(cursor: &job.cursor, end: job.end, minimumClusters: job.minimumClusters,
                                                  runsMax: freeSlots.count,
                                                  clustersMax: max(Self.runBytesMax / clusterBytes, job.minimumClusters))
                for run in runs { submit(run, job: job) }
            } catch { job.error = error }
            worked = true
        }
        if job.isFinished {
            jobs.removeFirst()
            job.done(job.error.map { .failure($0) } ?? .success(job.trimmedBytes))
            worked = true
        }
        return worked ? .busy : .idle
    }

    private func submit(_ run: ClusterRun, job: TrimJob?) {
        let slot = freeSlots.removeLast()
        do {
            try channel.unmap(offsetBlocks: store.clusterOffsetBytes(run.first) / blockBytes,
                              countBlocks: run.count * clusterBytes / blockBytes, handler: self, tag: UInt64(slot))
        } catch {
            freeSlots.append(slot)
            finished(run, job: job, error: error)
            return
        }
        slots[slot] = (run, job)
        job?.inFlight += 1
    }

    public func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        guard let entry = slots[Int(tag)] else { preconditionFailure("unmap completion for idle slot \(tag)") }
        slots[Int(tag)] = nil
        freeSlots.append(Int(tag))
        entry.job?.inFlight -= 1
        let error: BdevError? = if case let .failed(error) = status { error } else { nil }
        finished(entry.run, job: entry.job, error: error)
    }

    /// An unmap ended: its clusters go back to allocation (free whether the device
    /// unmapped them or not) and its bytes are counted, or its failure noted.
    private func finished(_ run: ClusterRun, job: TrimJob?, error: BdevError?) {
        store.discardCompleted(run)
        let bytes = run.count * clusterBytes
        if let job {
            if let error { job.error = job.error ?? .device(error) } else { job.trimmedBytes += bytes }
        } else if let error {
            // Said once: a device that refuses unmaps refuses them all.
            if failedDiscards == 0 {
                Log.logger("blobstore.discard").warning("online discard: the device failed an unmap (\(error)); its clusters are free all the same")
            }
            failedDiscards += 1
            lastDiscardError = error
        } else {
            discardedBytes += bytes
        }
    }

    /// Submits every ready discard and finishes every trim, polling until nothing is in
    /// flight (before unloading the store). Call on the store's thread.
    public func drain() {
        repeat {
            _ = poll()
            _ = channel.poll()
        } while store.hasDiscardsReady || inFlight > 0 || !jobs.isEmpty
    }

    /// Drains, then stops the poller and closes the channel (once).
    public func close() {
        guard pollerID != nil else { return }
        drain()
        if let pollerID { channel.reactor.unregisterPoller(pollerID) }
        pollerID = nil
        store.whileWaitingForDiscards = nil
        channel.close()
    }
}
