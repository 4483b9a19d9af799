import XCTest
import Bdev
import BdevMalloc
import Env
@testable import Blobstore

final class BlobChannelTests: XCTestCase {
    final class Waiter: BdevCompletionHandler {
        var done = 0
        var statuses: [BdevStatus] = []
        func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
            done += 1
            statuses.append(status)
        }
    }

    func testAsynchronousReadsAndOverwritesMatchTheStore() throws {
        let reactor = try Reactor()
        let bdev = Bdev(backend: try MallocBdev(blockCount: 2048, blockSizeBytes: 512))
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        let store = try BlobStore.format(io, options: BlobStoreTests.options)
        let id = try store.createBlob(clusterCount: 6)
        let first = BlobStoreCrashTests.data(1, 8192)
        try store.write(blob: id, offsetUnits: 0, data: first)             // clusters 0-1
        try store.write(blob: id, offsetUnits: 32, data: BlobStoreCrashTests.data(2, 4096))  // cluster 4
        let handle = try store.openBlob(id)
        let channel = store.makeChannel(try bdev.makeChannel(reactor: reactor))
        let waiter = Waiter()

        // A read across allocated clusters, a hole and an allocated one again.
        let buffer = try DMABuffer.allocate(bytes: 6 * 4096)
        buffer.fill(0xCC)
        try channel.read(handle, offsetUnits: 0, countUnits: 48, into: buffer, handler: waiter)
        reactor.run(until: { waiter.done == 1 })
        XCTAssertEqual(waiter.statuses, [.success])
        XCTAssertEqual(buffer.bytes(), try store.read(blob: id, offsetUnits: 0, countUnits: 48))

        // An overwrite of allocated data, visible to the store.
        let update = try DMABuffer.allocate(bytes: 1024)
        update.store(BlobStoreCrashTests.data(3, 1024))
        try channel.write(handle, offsetUnits: 3, countUnits: 2, from: update, handler: waiter)
        reactor.run(until: { waiter.done == 2 })
        XCTAssertEqual(try store.read(blob: id, offsetUnits: 3, countUnits: 2), update.bytes())

        // A write into a hole belongs to the metadata owner.
        XCTAssertThrowsError(try channel.write(handle, offsetUnits: 16, countUnits: 1, from: update, handler: waiter)) {
            XCTAssertEqual($0 as? BlobStoreError, .unallocated(blob: id, cluster: 2))
        }
        // ...after which the channel sees the new cluster.
        try store.write(blob: id, offsetUnits: 16, data: BlobStoreCrashTests.data(4, 512))
        try channel.write(handle, offsetUnits: 16, countUnits: 1, from: update, handler: waiter)
        reactor.run(until: { waiter.done == 3 })
        XCTAssertEqual(try store.read(blob: id, offsetUnits: 16, countUnits: 1), Array(update.bytes()[0..<512]))

        // A read of nothing but holes completes from the poller, not inside the call.
        try store.resizeBlob(id, clusterCount: 8)
        try channel.read(handle, offsetUnits: 56, countUnits: 8, into: buffer, handler: waiter)
        XCTAssertEqual(waiter.done, 3)
        reactor.run(until: { waiter.done == 4 })
        XCTAssertEqual(buffer.bytes(count: 4096), [UInt8](repeating: 0, count: 4096))
        XCTAssertThrowsError(try channel.read(handle, offsetUnits: 64, countUnits: 1, into: buffer, handler: waiter))
        channel.close()
        channel.bdevChannel.close()
    }
}
