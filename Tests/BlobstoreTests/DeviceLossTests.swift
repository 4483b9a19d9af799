import XCTest
import Bdev
import BdevMalloc
import Env
import Synchronization
@testable import Blobstore

/// A store whose device reports itself lost (`BdevError.deviceLost`, what an NVMe/TCP
/// target away past its loss timeout gives) refuses every change from then on, even
/// after the device answers again: a write or flush that failed cannot be known durable.
/// A transient error does not latch.
final class DeviceLossTests: XCTestCase {
    /// Passes I/O through to RAM, or fails every request with `failure` while it is set.
    final class LosableBdev: BdevBackend, @unchecked Sendable {
        let inner: MallocBdev
        let failure = Mutex<BdevError?>(nil)
        var name: String { "losable" }
        var geometry: BdevGeometry { inner.geometry }
        init() throws { inner = try MallocBdev(blockCount: 2048, blockSizeBytes: 4096) }
        func makeChannel(reactor: Reactor) throws(BdevError) -> any BdevBackendChannel {
            Channel(try inner.makeChannel(reactor: reactor), self)
        }
        func close() { inner.close() }

        final class Channel: BdevBackendChannel {
            let inner: any BdevBackendChannel
            unowned let device: LosableBdev
            init(_ inner: any BdevBackendChannel, _ device: LosableBdev) {
                self.inner = inner
                self.device = device
            }
            func submit(_ io: BdevIO) {
                if let error = device.failure.withLock({ $0 }) { return io.complete(.failed(error)) }
                inner.submit(io)
            }
            func poll() -> PollStatus { inner.poll() }
            func close() { inner.close() }
        }
    }

    static let options = BlobStore.Options(clusterSizeBytes: 4096, logPages: 16, metadataPages: 128, blobIDLimit: 128)

    func testALostDeviceStopsEveryChangeUntilTheStoreIsLoadedAgain() throws {
        let device = try LosableBdev()
        let bdev = Bdev(backend: device)
        let io = try BdevSyncIO(bdev: bdev, reactor: try Reactor())
        let store = try BlobStore.format(io, options: Self.options)
        store.deferCommitFlush = true
        let kept = try store.createBlob(clusterCount: 1)
        try store.sync()
        _ = try store.createBlob(clusterCount: 1)
        device.failure.withLock { $0 = .deviceLost("test target away") }
        XCTAssertThrowsError(try store.sync()) { error in
            guard case BlobStoreError.deviceLost(.deviceLost) = error else { return XCTFail("\(error)") }
        }
        device.failure.withLock { $0 = nil }  // the device answers again...
        XCTAssertNotNil(store.lostDevice)
        XCTAssertThrowsError(try store.createBlob(clusterCount: 1)) { error in
            guard case BlobStoreError.deviceLost = error else { return XCTFail("\(error)") }
        }
        XCTAssertThrowsError(try store.sync())  // ...but nothing is promised durable any more
        XCTAssertThrowsError(try store.beginExternalFlush())
        io.close()
        let (reloaded, _) = try BlobStore.load(try BdevSyncIO(bdev: bdev, reactor: try Reactor()))
        XCTAssertNil(reloaded.lostDevice)
        XCTAssertTrue(reloaded.blobIDList.contains(kept), "what was synced before the loss is there")
        _ = try reloaded.createBlob(clusterCount: 1)
        try reloaded.unload()
        bdev.close()
    }

    func testATransientErrorDoesNotLatch() throws {
        let device = try LosableBdev()
        let bdev = Bdev(backend: device)
        let io = try BdevSyncIO(bdev: bdev, reactor: try Reactor())
        let store = try BlobStore.format(io, options: Self.options)
        store.deferCommitFlush = true
        _ = try store.createBlob(clusterCount: 1)
        device.failure.withLock { $0 = .io(errno: EIO) }
        XCTAssertThrowsError(try store.sync())
        device.failure.withLock { $0 = nil }
        XCTAssertNil(store.lostDevice)
        try store.sync()
        _ = try store.createBlob(clusterCount: 1)
        try store.unload()
        io.close()
        bdev.close()
    }
}
