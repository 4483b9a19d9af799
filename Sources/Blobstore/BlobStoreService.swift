import Bdev
import Env

/// The blob store on its metadata reactor: one thread owns the store and runs every
/// metadata operation (and every allocation) in order; other reactors hand it work as
/// messages and get their answers back as messages, so their own I/O never waits on it.
/// The store's own device I/O goes through a reactor stepped by the metadata thread.
public final class BlobStoreService: @unchecked Sendable {
    public let reactor: Reactor
    private let ioReactor: Reactor
    private var store: BlobStore?   // metadata thread only
    private var io: BdevSyncIO?     // metadata thread only
    private var trimmer: ClusterTrimmer?  // metadata thread only
    public let bdev: Bdev
    /// Fixed at format: what data channels need, readable from any thread.
    private var dataStartBytes: UInt64 = 0
    private var clusterBytes: UInt64 = 0

    /// Starts the metadata reactor and formats (`format` given) or loads the store on it.
    public init(bdev: Bdev, format: BlobStore.Options? = nil, cpu: Int? = nil) throws {
        self.bdev = bdev
        reactor = try Reactor(name: "blob-md", configuration: .init(cpu: cpu))
        ioReactor = try Reactor(name: "blob-md-io")
        try reactor.start()
        let failure: BlobStoreError? = reactor.call { [self] in
            do {
                let io = try BdevSyncIO(bdev: bdev, reactor: ioReactor)
                self.io = io
                let store = try format.map { try BlobStore.format(io, options: $0) } ?? BlobStore.load(io).0
                self.store = store
                dataStartBytes = store.superBlock.dataStartPage * UInt64(SuperBlock.pageBytes)
                clusterBytes = UInt64(store.clusterSizeBytes)
                return nil
            } catch let error as BlobStoreError { return error } catch let error as BdevError { return .device(error) } catch {
                return .invalidArgument("blob store on \(bdev.name): \(error)")
            }
        }
        if let failure {
            reactor.stop()
            throw failure
        }
    }

    /// Runs `body` on the metadata reactor and waits for it (control path only).
    public func perform<T: Sendable>(_ body: @escaping @Sendable (BlobStore) throws -> T) throws -> T {
        let result: Result<T, BlobStoreError> = reactor.call { [self] in
            do { return .success(try body(store!)) } catch let error as BlobStoreError { return .failure(error) } catch {
                return .failure(.invalidArgument("\(error)"))
            }
        }
        return try result.get()
    }

    /// The store, for code already running on the metadata reactor (nil elsewhere and
    /// after `stop`).
    public var storeOnReactor: BlobStore? { reactor.isCurrent ? store : nil }

    /// Starts unmapping free space from the metadata reactor, on a channel of its own:
    /// explicit trims (`trimmerOnReactor`), and with `discardReleasedClusters` online
    /// discard (`BlobStore.discardsReleasedClusters`). Call on the metadata reactor.
    public func startTrimmer(discardReleasedClusters: Bool) throws {
        reactor.preconditionCurrent()
        guard trimmer == nil, let store else { return }
        let channel = try bdev.makeChannel(reactor: reactor, queueDepth: ClusterTrimmer.requestsInFlightMax)
        trimmer = ClusterTrimmer(store: store, channel: channel)
        store.discardsReleasedClusters = discardReleasedClusters
    }

    /// The trimmer, for code already running on the metadata reactor (nil elsewhere, and
    /// before `startTrimmer`).
    public var trimmerOnReactor: ClusterTrimmer? { reactor.isCurrent ? trimmer : nil }

    /// Runs `body` on the metadata reactor without waiting.
    public func submit(_ body: @escaping @Sendable (BlobStore) -> Void) {
        reactor.send { [self] in body(store!) }
    }

    /// Opens a blob for the data path of `owner`.
    public func openBlob(_ id: BlobID, owner: Reactor) throws -> BlobHandle {
        try perform { try $0.openBlob(id, owner: owner) }
    }

    public func closeBlob(_ handle: BlobHandle) {
        submit { $0.closeBlob(handle) }
    }

    /// A data channel for the calling reactor; writes that need allocation come here.
    public func makeChannel(_ bdevChannel: BdevChannel, queueDepth: Int = BdevLimits.queueDepthDefault) -> BlobChannel {
        BlobChannel(bdevChannel: bdevChannel, dataStartBytes: dataStartBytes, clusterBytes: clusterBytes,
                    queueDepth: queueDepth, service: self)
    }

    /// Unloads the store cleanly and stops the metadata reactor.
    public func stop() throws {
        let failure: BlobStoreError? = reactor.call { [self] in
            defer {
                io?.close()
                io = nil
                store = nil
            }
            // Discards whose release is durable go out before the store is unloaded.
            trimmer?.close()
            trimmer = nil
            do { try store?.unload() } catch let error as BlobStoreError { return error } catch { return .invalidArgument("unload: \(error)") }
            return nil
        }
        reactor.stop()
        if let failure { throw failure }
    }
}
