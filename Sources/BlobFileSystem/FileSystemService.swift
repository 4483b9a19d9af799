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

    /// Runs `body` on the file system's thread and waits (control path only).
    public func perform<T: Sendable>(_ body: @escaping @Sendable (FileSystem) -> T) -> T {
        blobService.reactor.call { [self] in body(fileSystem!) }
    }

    /// Writes everything back, deletes orphans, unloads the store cleanly and stops.
    public func stop() throws {
        let failure: String? = blobService.reactor.call { [self] in
            if let writeBackPoller { blobService.reactor.unregisterPoller(writeBackPoller) }
            writeBackPoller = nil
            do throws(FSError) { try fileSystem?.unmount() } catch { return error.description }
            fileSystem = nil
            return nil
        }
        try blobService.stop()
        if let failure { throw FSError(EIO, "unmount: \(failure)") }
    }
}
