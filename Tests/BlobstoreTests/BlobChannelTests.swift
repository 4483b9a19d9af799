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

extension BlobChannelTests {
    func testVectoredReadsAndWritesAcrossClustersAndHoles() throws {
        let reactor = try Reactor()
        let bdev = Bdev(backend: try MallocBdev(blockCount: 2048, blockSizeBytes: 512))
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        let store = try BlobStore.format(io, options: BlobStoreTests.options)
        let id = try store.createBlob(clusterCount: 4)
        try store.write(blob: id, offsetUnits: 0, data: BlobStoreCrashTests.data(1, 8192))   // clusters 0-1
        try store.write(blob: id, offsetUnits: 24, data: BlobStoreCrashTests.data(2, 4096))  // cluster 3; 2 is a hole
        let handle = try store.openBlob(id)
        let channel = store.makeChannel(try bdev.makeChannel(reactor: reactor))
        let waiter = Waiter()
        // Three buffers of odd sizes covering units 4..<28 (clusters 0-3, across the hole).
        let a = try DMABuffer.allocate(bytes: 1536)
        let b = try DMABuffer.allocate(bytes: 7680)
        let c = try DMABuffer.allocate(bytes: 3072)
        a.fill(0xCC); b.fill(0xCC); c.fill(0xCC)
        try channel.readv(handle, offsetUnits: 4, countUnits: 24, [a.segment(), b.segment(), c.segment()], handler: waiter)
        reactor.run(until: { waiter.done == 1 })
        XCTAssertEqual(waiter.statuses, [.success])
        XCTAssertEqual(a.bytes() + b.bytes() + c.bytes(), try store.read(blob: id, offsetUnits: 4, countUnits: 24))
        // A vectored overwrite of allocated clusters, split unevenly across the segments.
        a.store(BlobStoreCrashTests.data(5, 1536)); b.store(BlobStoreCrashTests.data(6, 7680))
        try channel.writev(handle, offsetUnits: 0, countUnits: 16, [a.segment(), b.segment(count: 6656)], handler: waiter)
        reactor.run(until: { waiter.done == 2 })
        XCTAssertEqual(waiter.statuses.last, .success)
        XCTAssertEqual(try store.read(blob: id, offsetUnits: 0, countUnits: 16), a.bytes() + b.bytes(count: 6656))
        // Past the allocated clusters the data path refuses (no metadata reactor here).
        XCTAssertThrowsError(try channel.writev(handle, offsetUnits: 0, countUnits: 18, [a.segment(), b.segment()],
                                                handler: waiter)) {
            XCTAssertEqual($0 as? BlobStoreError, .unallocated(blob: id, cluster: 2))
        }
        // Segments must add up to the request.
        XCTAssertThrowsError(try channel.readv(handle, offsetUnits: 0, countUnits: 2, [a.segment()], handler: waiter))
        channel.close()
        channel.bdevChannel.close()
    }

    /// One buffer over a physically contiguous run of more clusters than a request has
    /// segments (128 clusters of 4 KiB, 64 segments at most): the pieces of the buffer
    /// for consecutive clusters are one iovec, so the run is one device request.
    func testALongContiguousRunFromOneBufferIsOneRequest() throws {
        let reactor = try Reactor()
        let bdev = Bdev(backend: try MallocBdev(blockCount: 4096))
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        let store = try BlobStore.format(io, options: BlobStore.Options(clusterSizeBytes: 4096))
        let id = try store.createBlob(clusterCount: 256)
        try store.write(blob: id, offsetUnits: 0, data: [UInt8](repeating: 1, count: 256 * 4096))
        let handle = try store.openBlob(id)
        let channel = store.makeChannel(try bdev.makeChannel(reactor: reactor))
        let waiter = Waiter()
        let buffer = try DMABuffer.allocate(bytes: 1 << 20)
        let data = BlobStoreCrashTests.data(9, 1 << 20)
        buffer.store(data)
        try channel.write(handle, offsetUnits: 0, countUnits: 256, from: buffer, handler: waiter)
        reactor.run(until: { waiter.done == 1 })
        XCTAssertEqual(waiter.statuses, [.success], "1 MiB over 256 contiguous clusters")
        XCTAssertEqual(try store.read(blob: id, offsetUnits: 0, countUnits: 256), data)
        buffer.fill(0)
        try channel.read(handle, offsetUnits: 0, countUnits: 256, into: buffer, handler: waiter)
        reactor.run(until: { waiter.done == 2 })
        XCTAssertEqual(waiter.statuses, [.success, .success])
        XCTAssertEqual(buffer.bytes(), data)
    }
}
