#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Blobstore
import Env

/// The file system on the blob store's metadata reactor: one thread owns both and runs
/// every request in order; callers on other threads hand requests over as messages and
/// the request's reply is sent from that thread. Attributes changed only in memory
/// (sizes and times after writes) and commits not yet flushed are made durable every
/// second.
public final class FileSystemService: @unchecked Sendable {
    public let blobService: BlobStoreService
    private var fileSystem: FileSystem?  // reactor thread only
    private var writeBackPoller: PollerID?

    /// Loads (or formats, `format` given) the store on `bdev` and mounts the file system.
    /// `discard`: freed clusters are unmapped on the device once their release is durable
    /// (`blobfs mount -o discard`); `trim` works either way. `metadataCache`: blobs whose
    /// metadata stays in memory at most (`BlobStore.metadataCacheLimit`; 0: no limit).
    public init(bdev: Bdev, format: BlobStore.Options? = nil, cpu: Int? = nil, discard: Bool = false,
                metadataCache: Int = 0) throws {
        blobService = try BlobStoreService(bdev: bdev, format: format, cpu: cpu)
        let failure: FSError? = blobService.reactor.call { [self] in
            do {
                let store = try storeOf()
                store.metadataCacheLimit = metadataCache
                fileSystem = format != nil ? try FileSystem.format(store) : try FileSystem.mount(store)
                try makeDataChannel(store)
                try blobService.startTrimmer(discardReleasedClusters: discard)
            } catch let error as FSError { return error } catch let error as BlobStoreError { return FSError(error) } catch let error as BdevError {
                return FSError(error.errno, "data channel: \(error)")
            } catch { return FSError(EIO, "data channel: \(error)") }
            writeBackPoller = blobService.reactor.registerTimedPoller(periodNs: 1_000_000_000) { [self] in
                closeFinishedHandles()
                noteDeviceLoss()
                return writeBack()
            }
            return nil
        }
        if let failure {
            try? blobService.stop()
            throw failure
        }
    }

    private func storeOf() throws(FSError) -> BlobStore {
        guard let store = blobService.storeOnReactor else { throw FSError(EIO, "blob store not loaded") }
        return store
    }

    /// Runs `body` on the file system's thread.
    public func submit(_ body: @escaping @Sendable (FileSystem) -> Void) {
        blobService.reactor.send { [self] in body(fileSystem!) }
    }

    /// Runs `body` now: the caller is on the file system's thread (a request decoded there).
    public func runHere(_ body: (FileSystem) -> Void) {
        blobService.reactor.preconditionCurrent()
        body(fileSystem!)
    }

    /// Runs `body` on the file system's thread and waits (control path only).
    public func perform<T: Sendable>(_ body: @escaping @Sendable (FileSystem) -> T) -> T {
        blobService.reactor.call { [self] in body(fileSystem!) }
    }

    // MARK: - Asynchronous flushes (the metadata reactor keeps serving meanwhile)

    private final class FlushCompletion: BdevCompletionHandler {
        var body: ((BdevStatus) -> Void)?
        func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
            let body = self.body
            self.body = nil
            body?(status)
        }
    }

    /// The device was lost (a remote target away past its controller-loss timeout, a
    /// controller that could not be reset): the store refuses every change from now on,
    /// so the file system is read-only: changes get EROFS, reads go on where the device
    /// still answers. Logged once.
    private var lossReported = false

    public var isReadOnlyAfterDeviceLoss: Bool { (try? storeOf())?.lostDevice != nil }

    private func noteDeviceLoss() {
        guard !lossReported, let lost = (try? storeOf())?.lostDevice else { return }
        lossReported = true
        Log.logger("fs").error("device lost (\(lost)): the file system is read-only; unmount and mount again when the device is back")
    }

    private var flushChannel: BdevChannel?
    private let flushCompletion = FlushCompletion()
    /// The waiters of the flush in flight (answered by its completion) and of the next one.
    private var flushing: [(Bool) -> Void] = []
    private var flushQueued: [(Bool) -> Void] = []
    /// A device flush is in flight: `flushing` belongs to it. At most one at a time.
    private var flushInFlight = false

    /// Makes everything written so far durable and then calls `done` (on the metadata
    /// reactor) exactly once. The device flush runs on a channel of the metadata reactor
    /// without blocking it: reads and writes keep being served. Flushes requested while
    /// one is in flight share the next one (group commit). A waiter may itself ask for a
    /// flush (fsync's second half does): it joins the next one. Call on the metadata reactor.
    public func flush(_ done: @escaping (Bool) -> Void) {
        blobService.reactor.preconditionCurrent()
        flushQueued.append(done)
        startFlush()
    }

    /// Answers `waiters` in order. A waiter that asks for another flush from here joins
    /// `flushQueued`; the caller starts it afterwards.
    private func answer(_ waiters: [(Bool) -> Void], _ ok: Bool) {
        for waiter in waiters { waiter(ok) }
    }

    /// Starts the next flush if none is in flight and someone waits for one. Every waiter
    /// taken here is answered exactly once: by the completion, or at once on a failure to
    /// begin. Loops (never recurses) while answering failed waiters queues new ones.
    private func startFlush() {
        while !flushInFlight, !flushQueued.isEmpty {
            let waiters = flushQueued
            flushQueued = []
            guard let store = try? storeOf() else {
                answer(waiters, false)
                continue
            }
            let token: BlobStore.FlushToken
            do { token = try store.beginExternalFlush() } catch {
                noteDeviceLoss()
                answer(waiters, false)
                continue
            }
            if flushChannel == nil { flushChannel = try? blobService.bdev.makeChannel(reactor: blobService.reactor) }
            flushing = waiters
            flushInFlight = true
            flushCompletion.body = { [self] status in
                if case let .failed(error) = status {
                    // What the log holds past the last good flush is unknown now: the store
                    // turns read-only (a lost device, or readOnlyOnDeviceError).
                    (try? storeOf())?.externalFlushFailed(error)
                    noteDeviceLoss()
                } else {
                    (try? storeOf())?.externalFlushCompleted(token)
                }
                noteFlush(status.isSuccess)
                let finished = flushing
                flushing = []
                flushInFlight = false
                answer(finished, status.isSuccess)
                startFlush()
            }
            do {
                guard let flushChannel else { throw BdevError.invalidConfiguration("no flush channel") }
                try flushChannel.flush(handler: flushCompletion)
            } catch {
                // No channel or no room in it: flush synchronously (the store's own path).
                let ok = (try? store.sync()) != nil
                flushCompletion.body = nil
                flushing = []
                flushInFlight = false
                answer(waiters, ok)
            }
        }
    }

    private var writeBackInFlight = false

    /// The once-a-second write-back, without holding the reactor: what was written so far
    /// flushed, then the attributes changed only in memory committed and flushed (a new
    /// size never durable before the bytes under it), as asynchronous flushes that
    /// fsyncs share.
    private func writeBack() -> PollStatus {
        guard !writeBackInFlight, let fileSystem, fileSystem.needsWriteBack else { return .idle }
        writeBackInFlight = true
        flush { [self] ok in
            guard ok, let fileSystem = self.fileSystem, (try? fileSystem.writeBack()) != nil else {
                writeBackInFlight = false
                return
            }
            flush { [self] _ in writeBackInFlight = false }
        }
        return .busy
    }

    /// fsync without holding the metadata reactor; `done` gets the errno (0 on success).
    /// When the file grew since its data was last flushed: the data flushed, then the
    /// attributes committed and flushed (the new size never durable before the bytes
    /// under it). Otherwise the attributes (times) are committed and one flush makes
    /// them and the data durable; for fdatasync (`dataOnly`) the times need not be, and
    /// the one flush is all. Call on the reactor.
    public func fsync(ino: InodeNumber, dataOnly: Bool = false, _ done: @escaping (Int32) -> Void) {
        blobService.reactor.preconditionCurrent()
        guard let fileSystem else { return done(EIO) }
        let plan: (needsAttributes: Bool, dataFirst: UInt64?)
        do throws(FSError) { plan = try fileSystem.fsyncPlan(ino: ino) } catch { return done(error.errno) }
        guard let growths = plan.dataFirst else {
            if plan.needsAttributes && !dataOnly {
                do throws(FSError) { try fileSystem.commitAttributes(ino: ino) } catch { return done(error.errno) }
            }
            return flush { ok in done(ok ? 0 : EIO) }
        }
        flush { [self] ok in
            guard ok else { return done(EIO) }
            guard let fileSystem = self.fileSystem else { return done(EIO) }
            fileSystem.dataFlushed(ino: ino, growths: growths)
            do throws(FSError) { try fileSystem.commitAttributes(ino: ino) } catch { return done(error.errno) }
            flush { ok in done(ok ? 0 : EIO) }
        }
    }

    // MARK: - Trim (FITRIM)

    /// Unmaps the free space within device bytes [startBytes, startBytes + lengthBytes)
    /// in runs of at least `minimumBytes` (the blob store's `ClusterTrimmer`: a checkpoint,
    /// then the dead log and free metadata pages, then free clusters without holding the
    /// reactor); `done` gets the bytes unmapped or the errno, exactly once. Call on the reactor.
    public func trim(startBytes: UInt64, lengthBytes: UInt64, minimumBytes: UInt64,
                     _ done: @escaping (Result<UInt64, FSError>) -> Void) {
        blobService.reactor.preconditionCurrent()
        guard let trimmer = blobService.trimmerOnReactor else { return done(.failure(FSError(EOPNOTSUPP, "no trimmer"))) }
        trimmer.trimFreeSpace(startBytes: startBytes, lengthBytes: lengthBytes, minimumBytes: minimumBytes) { result in
            done(result.mapError { error in
                switch error {
                case .device(.unsupported), .device(.io(errno: EOPNOTSUPP)): FSError(EOPNOTSUPP, "\(error)")
                default: FSError(error)
                }
            })
        }
    }

    // MARK: - The data path: reads and writes through the file's blob handle

    /// An open file's blob handle, shared by every open of the inode.
    private final class OpenBlob {
        let handle: BlobHandle
        var opens = 1
        init(_ handle: BlobHandle) { self.handle = handle }
    }

    /// The metadata reactor's data channel (reads and overwrites of allocated clusters).
    private var dataBdevChannel: BdevChannel?
    private var dataChannel: BlobChannel?
    private var openBlobs: [BlobID: OpenBlob] = [:]
    /// Handles of files closed while I/O through them was still in flight.
    private var closingHandles: [BlobHandle] = []

    /// The file system, for callers already on its reactor (the FUSE front end).
    public var fileSystemOnReactor: FileSystem {
        blobService.reactor.preconditionCurrent()
        return fileSystem!
    }

    private func makeDataChannel(_ store: BlobStore) throws {
        let bdevChannel = try blobService.bdev.makeChannel(reactor: blobService.reactor, queueDepth: BdevLimits.queueDepthMax)
        dataBdevChannel = bdevChannel
        dataChannel = store.makeChannel(bdevChannel, queueDepth: BdevLimits.queueDepthMax)
        // An allocation that waits for released clusters waits for handles of this
        // reactor too: their requests complete only when this channel is polled.
        store.whileWaitingForReleasedClusters = { [unowned bdevChannel] in _ = bdevChannel.poll() }
    }

    /// Opens `ino` for the kernel (FUSE OPEN): the file system's open (with O_TRUNC) and
    /// the blob handle its reads and writes go through. Call on the reactor.
    public func open(ino: InodeNumber, truncate: Bool) throws(FSError) {
        blobService.reactor.preconditionCurrent()
        guard let fileSystem else { throw FSError(EIO) }
        try fileSystem.open(ino: ino, truncate: truncate)
        takeHandle(fileSystem, ino)
    }

    /// Creates and opens a regular file (FUSE CREATE). Call on the reactor.
    public func create(parent: InodeNumber, name: [UInt8], mode: UInt32, caller: Caller) throws(FSError) -> Attributes {
        blobService.reactor.preconditionCurrent()
        guard let fileSystem else { throw FSError(EIO) }
        let attributes = try fileSystem.create(parent: parent, name: name, mode: mode, caller: caller)
        takeHandle(fileSystem, attributes.ino)
        return attributes
    }

    private func takeHandle(_ fileSystem: FileSystem, _ ino: InodeNumber) {
        let id = ino.blobID
        if let open = openBlobs[id] {
            open.opens += 1
        } else if fileSystem.store.blob(id) != nil, let handle = try? fileSystem.store.openBlob(id, owner: blobService.reactor) {
            openBlobs[id] = OpenBlob(handle)
        }
    }

    /// The kernel released an open of `ino` (FUSE RELEASE): the last one closes the blob
    /// handle (before the file system may delete an orphan). Call on the reactor.
    public func release(ino: InodeNumber) {
        blobService.reactor.preconditionCurrent()
        let id = ino.blobID
        if let open = openBlobs[id] {
            open.opens -= 1
            if open.opens == 0 {
                openBlobs[id] = nil
                close(open.handle)
            }
        }
        fileSystem?.release(ino: ino)
    }

    private func close(_ handle: BlobHandle) {
        guard handle.ioInFlight == 0 else { return closingHandles.append(handle) }
        (try? storeOf())?.closeBlob(handle)
    }

    /// Closes the handles whose last requests have completed since their file was closed.
    private func closeFinishedHandles() {
        guard !closingHandles.isEmpty, let store = try? storeOf() else { return }
        closingHandles.removeAll { handle in
            guard handle.ioInFlight == 0 else { return false }
            store.closeBlob(handle)
            return true
        }
    }

    /// What `startRead` began: the answer is `count` bytes at `skip` in the buffer, once
    /// `handler` has been called (`pending`), or now.
    public struct ReadStarted: Sendable {
        public var skip: Int
        public var count: Int
        public var pending: Bool
    }

    /// Reads up to `count` bytes at `offset` of `ino` into `buffer` (DMA memory of at
    /// least `count` + 2 io units): the whole io units the range covers, holes and bytes
    /// past the blob as zeros. Device reads go through the file's blob handle and
    /// complete on `handler` with `tag`; nil at or past the end of the file (nothing to
    /// read). Allocates nothing. Call on the reactor.
    public func startRead(ino: InodeNumber, offset: UInt64, count: Int, into buffer: DMASegment,
                          handler: any BdevCompletionHandler, tag: UInt64) throws(FSError) -> ReadStarted? {
        blobService.reactor.preconditionCurrent()
        guard let fileSystem, let dataChannel else { throw FSError(EIO) }
        guard let window = try fileSystem.readWindow(ino: ino, offset: offset, count: count) else { return nil }
        let bytes = Int(window.alignedEnd - window.start)
        guard bytes <= buffer.count else { throw FSError(EINVAL, "read of \(count) bytes into a \(buffer.count)-byte buffer") }
        let started = ReadStarted(skip: Int(offset - window.start), count: Int(window.end - offset), pending: window.readEnd > window.start)
        if window.readEnd < window.alignedEnd {
            let tail = Int(window.readEnd - window.start)
            (buffer.base + tail).initializeMemory(as: UInt8.self, repeating: 0, count: bytes - tail)
        }
        guard started.pending else { return started }
        let handle = try handle(fileSystem, window.id)
        let unit = UInt64(fileSystem.store.ioUnitBytes)
        do {
            try dataChannel.read(handle, offsetUnits: window.start / unit, countUnits: (window.readEnd - window.start) / unit,
                                 into: buffer.slice(from: 0, count: Int(window.readEnd - window.start)), handler: handler, tag: tag)
        } catch { throw FSError(error) }
        return started
    }

    /// How `startWrite` went: `pending` (its answer comes to `handler`) or done now with
    /// `bytes` written.
    public enum WriteStarted: Sendable {
        case pending
        case done(bytes: Int)
    }

    /// Writes `data` at `offset` of `ino`. Whole io units inside the file over allocated
    /// clusters go straight from `data` (DMA memory, not copied) to the device through the
    /// file's blob handle, completing on `handler`; anything else (growth, holes, partial
    /// units, append) is the file system's synchronous write, done on return. Call on the
    /// reactor.
    public func startWrite(ino: InodeNumber, offset: UInt64, data: DMASegment, append: Bool, writeBack: Bool = false,
                           handler: any BdevCompletionHandler, tag: UInt64) throws(FSError) -> WriteStarted {
        blobService.reactor.preconditionCurrent()
        guard let fileSystem, let dataChannel else { throw FSError(EIO) }
        if fileSystem.store.lostDevice != nil {
            noteDeviceLoss()
            throw FSError(EROFS, "the device was lost")
        }
        if !append, let id = try fileSystem.overwriteTarget(ino: ino, offset: offset, count: data.count) {
            let handle = try handle(fileSystem, id)
            let unit = UInt64(fileSystem.store.ioUnitBytes)
            do {
                try dataChannel.write(handle, offsetUnits: offset / unit, countUnits: UInt64(data.count) / unit,
                                      from: data, handler: handler, tag: tag)
                fileSystem.overwritten(id)
                return .pending
            } catch .unallocated {
                // A hole: the synchronous write allocates.
            } catch { throw FSError(error) }
        }
        let bytes = Array(UnsafeRawBufferPointer(start: data.base, count: data.count))
        return .done(bytes: try fileSystem.write(ino: ino, offset: offset, data: bytes, append: append, writeBack: writeBack))
    }

    /// The handle of an open file's blob (one is opened if the file was opened before the
    /// data path knew it).
    private func handle(_ fileSystem: FileSystem, _ id: BlobID) throws(FSError) -> BlobHandle {
        if let open = openBlobs[id] { return open.handle }
        let handle = try storeCall { try fileSystem.store.openBlob(id, owner: blobService.reactor) }
        openBlobs[id] = OpenBlob(handle)
        return handle
    }

    /// Polls the data channel until no request is in flight (before unmounting).
    private func drainDataIO() {
        guard let dataBdevChannel else { return }
        while dataBdevChannel.inFlight > 0 { _ = dataBdevChannel.poll() }
    }

    // MARK: - Operating a mount (control path: `blobfs status`, `sync`, `checkpoint`)

    /// Device flushes completed (failed ones apart) and when the last one completed
    /// (monotonic ns; 0: none yet). Reactor thread only.
    private var flushCount: UInt64 = 0
    private var flushFailures: UInt64 = 0
    private var lastFlushNs: UInt64 = 0

    private func noteFlush(_ ok: Bool) {
        if ok {
            flushCount += 1
            lastFlushNs = MonotonicClock.nowNs()
        } else {
            flushFailures += 1
        }
    }

    /// The store and the file system as `blobfs status` shows them.
    public struct Status: Sendable {
        public var storeBytes: UInt64
        public var clusterBytes: UInt64
        public var clusters: UInt64
        public var freeClusters: UInt64
        /// What statfs reports free: less the checkpoints' and the writeback cache's reserves.
        public var freeBytesForWriting: UInt64
        public var writebackReserveBytes: UInt64
        public var metadataRegionPages: UInt64
        public var metadataRegionFreePages: UInt64
        public var metadataPagesInClusters: UInt64
        public var logPages: UInt64
        public var logPagesInUse: UInt64
        public var blobIDLimit: UInt64
        public var blobs: UInt64
        public var dirtyInodes: Int
        public var cachedInodes: Int
        /// Blobs whose metadata is in memory, the limit (0: none), and how many were let go.
        public var metadataCached: Int
        public var metadataCacheLimit: Int
        public var metadataEvictions: UInt64
        public var openFiles: Int
        public var unflushedCommits: Bool
        public var checkpointSequence: UInt64
        public var checkpoints: UInt64
        public var lastCheckpointNs: UInt64
        public var flushes: UInt64
        public var flushFailures: UInt64
        public var lastFlushNs: UInt64
        public var readOnly: Bool
        /// Why the store stopped taking writes (a device error), nil when it did not.
        public var readOnlyReason: String?
        /// Device requests of the store that failed.
        public var deviceErrors: UInt64
    }

    /// Call on the reactor (the control socket asks with `Reactor.call`).
    public func statusOnReactor() -> Status? {
        blobService.reactor.preconditionCurrent()
        guard let fileSystem, let store = try? storeOf() else { return nil }
        let block = store.superBlock
        return Status(
            storeBytes: block.devicePages * UInt64(SuperBlock.pageBytes), clusterBytes: UInt64(store.clusterSizeBytes),
            clusters: store.clusterCount, freeClusters: store.freeClusterCount,
            freeBytesForWriting: fileSystem.freeBytesForWriting, writebackReserveBytes: fileSystem.writebackReserveBytes,
            metadataRegionPages: store.metadataPageCount, metadataRegionFreePages: store.freeRegionMetadataPageCount,
            metadataPagesInClusters: store.metadataPagesInClusterCount, logPages: block.log.pageCount,
            logPagesInUse: store.logPagesInUse, blobIDLimit: store.blobIDLimit, blobs: UInt64(store.blobCount),
            dirtyInodes: fileSystem.dirtyInodeCount, cachedInodes: fileSystem.cachedInodeCount,
            metadataCached: store.metadataCacheCount, metadataCacheLimit: store.metadataCacheLimit,
            metadataEvictions: store.metadataCacheEvictions, openFiles: openBlobs.count,
            unflushedCommits: store.hasUnflushedCommits, checkpointSequence: block.sequence,
            checkpoints: store.checkpointCount, lastCheckpointNs: store.lastCheckpointNs, flushes: flushCount,
            flushFailures: flushFailures, lastFlushNs: lastFlushNs, readOnly: store.refusesChanges, readOnlyReason: store.deviceFailure,
            deviceErrors: store.deviceErrorCount)
    }

    /// `blobfs sync`: attributes changed in memory written back, everything flushed, and a
    /// checkpoint (the log emptied). On the reactor; it holds the reactor for the checkpoint.
    public func syncNow() throws(FSError) {
        blobService.reactor.preconditionCurrent()
        guard let fileSystem else { throw FSError(EIO, "not mounted") }
        try fileSystem.sync()
        try storeCall { try fileSystem.store.checkpoint() }
    }

    /// `blobfs checkpoint`: what is committed goes to its home pages and the log is emptied
    /// (attributes changed only in memory are not committed). On the reactor.
    public func checkpointNow() throws(FSError) {
        blobService.reactor.preconditionCurrent()
        guard let store = fileSystem?.store else { throw FSError(EIO, "not mounted") }
        try storeCall { try store.checkpoint() }
    }

    /// `blobfs grow`: the store extended onto `devicePages` pages of its device (nil: all
    /// of it, as `Bdev.refreshGeometry` last found it). On the reactor, which it holds for a
    /// checkpoint and the write of the new table and bitmaps (FORMAT.md, "Online grow").
    public func growNow(toDevicePages devicePages: UInt64?) throws(FSError) -> BlobStore.GrowReport {
        blobService.reactor.preconditionCurrent()
        guard let store = fileSystem?.store else { throw FSError(EIO, "not mounted") }
        return try storeCall { try store.grow(toDevicePages: devicePages) }
    }

    /// Writes everything back, deletes orphans, unloads the store cleanly and stops.
    public func stop() throws {
        let failure: FSError? = blobService.reactor.call { [self] in
            if let writeBackPoller { blobService.reactor.unregisterPoller(writeBackPoller) }
            writeBackPoller = nil
            flushChannel?.close()
            flushChannel = nil
            drainDataIO()
            for (_, open) in openBlobs { (try? storeOf())?.closeBlob(open.handle) }
            openBlobs = [:]
            closingHandles.forEach { (try? storeOf())?.closeBlob($0) }
            closingHandles = []
            (try? storeOf())?.whileWaitingForReleasedClusters = nil
            dataChannel?.close()
            dataChannel = nil
            dataBdevChannel?.close()
            dataBdevChannel = nil
            do throws(FSError) { try fileSystem?.unmount() } catch { return error }
            fileSystem = nil
            return nil
        }
        try blobService.stop()
        if let failure { throw FSError(failure.errno, "unmount: \(failure.message)") }
    }
}
