import XCTest
import Bdev
import BdevMalloc
import Env
import Synchronization
@testable import Blobstore

/// The store on its metadata reactor, a data reactor on another thread writing to
/// unallocated clusters through its channel: allocation happens on the metadata
/// reactor, the answers and handle updates come back as messages.
final class BlobStoreServiceTests: XCTestCase {
    final class DataSide: BdevCompletionHandler, @unchecked Sendable {
        var channel: BlobChannel?
        var handle: BlobHandle?
        let buffer: DMABuffer
        init() throws { buffer = try DMABuffer.allocate(bytes: 8 * 4096) }
        let completed = Atomic<Int>(0)
        let failed = Atomic<Int>(0)
        func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
            if status != .success { failed.add(1, ordering: .relaxed) }
            completed.add(1, ordering: .releasing)
        }
    }

    private func wait(_ side: DataSide, for count: Int, file: StaticString = #filePath, line: UInt = #line) {
        let deadline = MonotonicClock.nowNs() + 10_000_000_000
        while side.completed.load(ordering: .acquiring) < count && MonotonicClock.nowNs() < deadline { usleep(1000) }
        XCTAssertEqual(side.completed.load(ordering: .acquiring), count, file: file, line: line)
    }

    func testThinWritesFromAnotherReactorAllocateThroughTheMetadataReactor() throws {
        let bdev = Bdev(backend: try MallocBdev(blockCount: 2048))
        let service = try BlobStoreService(bdev: bdev, format: BlobStoreTests.options)
        let data = try Reactor(name: "data")
        try data.start()
        defer { data.stop() }
        let id = try service.perform { try $0.createBlob(clusterCount: 8) }
        let handle = try service.openBlob(id, owner: data)
        let side = try DataSide()
        let setup: String? = data.call { [service] in
            do {
                let bdevChannel = try bdev.makeChannel(reactor: Reactor.current!)
                side.channel = service.makeChannel(bdevChannel)
                side.handle = handle
                side.buffer.store(BlobStoreCrashTests.data(77, 8 * 4096))
                for index in 0..<8 {  // every cluster unallocated: each write goes to the metadata reactor
                    try side.channel!.write(handle, offsetUnits: UInt64(index), countUnits: 1, from: side.buffer,
                                            bufferOffset: index * 4096, handler: side, tag: UInt64(index))
                }
                return nil
            } catch { return "\(error)" }
        }
        XCTAssertNil(setup)
        wait(side, for: 8)
        XCTAssertEqual(side.failed.load(ordering: .relaxed), 0)
        // The handle, updated by message, now maps every cluster: reads and overwrites
        // stay on the data reactor.
        let mapped: Bool = data.call { side.handle!.physicalCluster(7) != nil }
        XCTAssertTrue(mapped)
        let readBack: [UInt8]? = data.call {
            do {
                let back = try DMABuffer.allocate(bytes: 8 * 4096)
                let reader = try DataSide()
                try side.channel!.read(side.handle!, offsetUnits: 0, countUnits: 8, into: back, handler: reader)
                Reactor.current!.run(until: { reader.completed.load(ordering: .acquiring) == 1 })
                return back.bytes()
            } catch { return nil }
        }
        XCTAssertEqual(readBack, BlobStoreCrashTests.data(77, 8 * 4096))
        let stored = try service.perform { try $0.read(blob: id, offsetUnits: 0, countUnits: 8) }
        XCTAssertEqual(stored, BlobStoreCrashTests.data(77, 8 * 4096))
        let report = try service.perform { $0.verify() }
        XCTAssertTrue(report.isConsistent, "\(report.problems)")
        data.call {
            side.channel!.close()
            side.channel!.bdevChannel.close()
            side.channel = nil
        }
        service.closeBlob(handle)
        try service.stop()
    }
}
