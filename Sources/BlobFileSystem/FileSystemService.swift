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
    public init(bdev: Bdev, format: BlobStore.Options? = nil, cpu: Int? = nil) throws {
        blobService = try BlobStoreService(bdev: bdev, format: format, cpu: cpu)
        let failure: String? = blobService.reactor.call { [self] in
            do throws(FSError) {
                let store = try storeOf()
                fileSystem = format != nil ? try FileSystem.format(store) : try FileSystem.mount(store)
                store.beforeReusingReleasedClusters = { [unowned self] in drainDataIO() }
            } catch { return error.description }
            writeBackPoller = blobService.reactor.registerTimedPoller(periodNs: 1_000_000_000) { [self] in
                guard let fileSystem, fileSystem.needsWriteBack else { return .idle }
                try? fileSystem.sync()
                return .busy
            }
            return nil
        }
        if let failure {
            try? blobService.stop()
            throw FSError(EINVAL, failure)
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
        precondition(blobService.reactor.isCurrent, "runHere off the file system's thread")
        body(fileSystem!)
    }

    /// Runs `body` on the file system's thread and waits (control path only).
    public func perform<T: Sendable>(_ body: @escaping @Sendable (FileSystem) -> T) -> T {
        blobService.reactor.call { [self] in body(fileSystem!) }
    }

    // MARK: - Asynchronous flushes (the metadata reactor keeps serving meanwhile)

    private final class FlushCompletion: BdevCompletionHandler {
        var body: ((Bool) -> Void)?
        func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
            let body = self.body
            self.body = nil
            body?(status.isSuccess)
        }
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
                answer(waiters, false)
                continue
            }
            if flushChannel == nil { flushChannel = try? blobService.bdev.makeChannel(reactor: blobService.reactor) }
            flushing = waiters
            flushInFlight = true
            flushCompletion.body = { [self] ok in
                if ok { (try? storeOf())?.externalFlushCompleted(token) }
                let finished = flushing
                flushing = []
                flushInFlight = false
                answer(finished, ok)
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

    /// fsync without holding the metadata reactor; `done` gets the errno (0 on success).
    /// When the file grew since its data was last flushed: the data flushed, then the
    /// attributes committed and flushed (the new size never durable before the bytes
    /// under it). Otherwise the attributes (times) are committed and one flush makes
    /// them and the data durable. Call on the reactor.
    public func fsync(ino: UInt64, _ done: @escaping (Int32) -> Void) {
        guard let fileSystem else { return done(EIO) }
        let plan: (needsAttributes: Bool, dataFirst: UInt64?)
        do throws(FSError) { plan = try fileSystem.fsyncPlan(ino: ino) } catch { return done(error.errno) }
        guard let growths = plan.dataFirst else {
            if plan.needsAttributes {
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

    // MARK: - Asynchronous data I/O (device requests overlap; the reactor serves meanwhile)

    /// One read or write in flight: its buffer and its device requests still outstanding.
    private final class PendingIO: BdevCompletionHandler {
        let buffer: DMABuffer
        var outstanding = 0
        var failed = false
        let finished: (PendingIO) -> Void
        unowned let service: FileSystemService
        /// Channels hold their handlers unowned: the request keeps itself alive until done.
        var keepAlive: PendingIO?

        init(buffer: consuming DMABuffer, service: FileSystemService, finished: @escaping (PendingIO) -> Void) {
            self.buffer = buffer
            self.service = service
            self.finished = finished
        }

        func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
            if !status.isSuccess { failed = true }
            outstanding -= 1
            guard outstanding == 0 else { return }
            let keep = keepAlive
            keepAlive = nil
            defer { withExtendedLifetime(keep) {} }
            service.dataIOInFlight -= 1
            finished(self)
        }
    }

    private var dataChannel: BdevChannel?
    fileprivate var dataIOInFlight = 0

    /// Submits one device request per run (`deviceBlock` nil: zeros in the buffer, for a
    /// read); `finished` runs on the reactor when all have completed.
    private func submit(_ type: BdevIOType, _ buffer: consuming DMABuffer, _ runs: [(bytes: Int, deviceBlock: UInt64?)],
                        finished: @escaping (PendingIO) -> Void) {
        if dataChannel == nil {
            dataChannel = try? blobService.bdev.makeChannel(reactor: blobService.reactor, queueDepth: 1024)
        }
        let blockBytes = blobService.bdev.geometry.blockSizeBytes
        let pending = PendingIO(buffer: buffer, service: self, finished: finished)
        pending.keepAlive = pending
        dataIOInFlight += 1
        pending.outstanding = 1  // released after the submissions: no completion finishes it early
        var bufferOffset = 0
        for run in runs {
            defer { bufferOffset += run.bytes }
            guard let block = run.deviceBlock else {
                pending.buffer.withUnsafeMutableBytes { raw in _ = memset(raw.baseAddress! + bufferOffset, 0, run.bytes) }
                continue
            }
            do {
                guard let dataChannel else { throw BdevError.invalidConfiguration("no data channel") }
                let count = UInt64(run.bytes / blockBytes)
                if type == .read {
                    try dataChannel.read(into: pending.buffer, bufferOffset: bufferOffset, offsetBlocks: block,
                                         countBlocks: count, handler: pending)
                } else {
                    try dataChannel.write(from: pending.buffer, bufferOffset: bufferOffset, offsetBlocks: block,
                                          countBlocks: count, handler: pending)
                }
                pending.outstanding += 1
            } catch {
                pending.failed = true
                break
            }
        }
        pending.bdevIOCompleted(tag: 0, status: .success)
    }

    /// Reads `count` bytes at `offset` and calls `done` on the metadata reactor with the
    /// bytes (valid only during the call; empty at end of file) and 0, or with an errno.
    /// The device reads are submitted and the reactor goes on serving other requests; a
    /// read costs the metadata thread only its planning and its reply. Call on the reactor.
    public func read(ino: UInt64, offset: UInt64, count: Int, _ done: @escaping (UnsafeRawBufferPointer, Int32) -> Void) {
        let none = UnsafeRawBufferPointer(start: nil, count: 0)
        guard let fileSystem else { return done(none, EIO) }
        let plan: FileSystem.ReadPlan
        do throws(FSError) {
            guard let planned = try fileSystem.readPlan(ino: ino, offset: offset, count: count) else { return done(none, 0) }
            plan = planned
        } catch { return done(none, error.errno) }
        let buffer: DMABuffer
        do { buffer = try DMABuffer.allocate(bytes: plan.bufferBytes) } catch { return done(none, ENOMEM) }
        let answer = plan.answer
        submit(.read, buffer, plan.runs) { pending in
            if pending.failed { return done(none, EIO) }
            pending.buffer.withUnsafeBytes { raw in done(UnsafeRawBufferPointer(rebasing: raw[answer]), 0) }
        }
    }

    /// Writes `data` (read only during this call) at `offset` and calls `done` on the
    /// metadata reactor with the bytes written or an errno. An overwrite of whole io units inside the file and its
    /// allocated clusters goes to the device asynchronously (answered on completion, so
    /// an fsync after it covers it); anything else (allocation, partial units, growth,
    /// append) is the file system's synchronous write. Call on the reactor.
    public func write(ino: UInt64, offset: UInt64, data: UnsafeRawBufferPointer, append: Bool,
                      _ done: @escaping (Int, Int32) -> Void) {
        guard let fileSystem else { return done(0, EIO) }
        let count = data.count
        do throws(FSError) {
            if !append, let runs = try fileSystem.overwritePlan(ino: ino, offset: offset, count: count) {
                let buffer: DMABuffer
                do { buffer = try DMABuffer.allocate(bytes: count) } catch { throw FSError(ENOMEM) }
                buffer.withUnsafeMutableBytes { $0.copyMemory(from: data) }
                submit(.write, buffer, runs) { pending in done(pending.failed ? 0 : count, pending.failed ? EIO : 0) }
                return
            }
            done(try fileSystem.write(ino: ino, offset: offset, data: Array(data), append: append), 0)
        } catch { done(0, error.errno) }
    }

    /// Polls the data channel until no request is in flight: before clusters released
    /// since the last flush are handed out again (their old owner's requests must be
    /// done), and before unmounting.
    private func drainDataIO() {
        while dataIOInFlight > 0, let dataChannel {
            if dataChannel.poll() != .busy { sched_yield() }
        }
    }

    /// Writes everything back, deletes orphans, unloads the store cleanly and stops.
    public func stop() throws {
        let failure: String? = blobService.reactor.call { [self] in
            if let writeBackPoller { blobService.reactor.unregisterPoller(writeBackPoller) }
            writeBackPoller = nil
            flushChannel?.close()
            flushChannel = nil
            drainDataIO()
            dataChannel?.close()
            dataChannel = nil
            do throws(FSError) { try fileSystem?.unmount() } catch { return error.description }
            fileSystem = nil
            return nil
        }
        try blobService.stop()
        if let failure { throw FSError(EIO, "unmount: \(failure)") }
    }
}
