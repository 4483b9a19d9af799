import XCTest
import Bdev
import BdevMalloc
import Env
import Synchronization
@testable import Blobstore

/// A blob shrinks on the metadata reactor while another reactor still reaches its
/// clusters through an open handle: the released clusters must not go to another blob
/// until that handle has taken the new map and its I/O under the old one completed.
final class ReleasedClusterTests: XCTestCase {
    final class Completion: BdevCompletionHandler, @unchecked Sendable {
        let done = Atomic<Int>(0)
        let failed = Atomic<Int>(0)
        func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
            if status != .success { failed.add(1, ordering: .relaxed) }
            done.add(1, ordering: .releasing)
        }
    }

    final class DataSide: @unchecked Sendable {
        var channel: BlobChannel?
        let buffer: DMABuffer
        init() throws { buffer = try DMABuffer.allocate(bytes: 4096) }
    }

    private func until(_ what: String, timeoutSeconds: UInt64 = 10, _ condition: () throws -> Bool) rethrows {
        let deadline = MonotonicClock.nowNs() + timeoutSeconds * 1_000_000_000
        while try !condition() {
            guard MonotonicClock.nowNs() < deadline else { return XCTFail("timed out waiting for \(what)") }
            usleep(1000)
        }
    }

    private struct Setup {
        let gate: InstrumentedBdev
        let service: BlobStoreService
        let data: Reactor
        let side: DataSide
        let handle: BlobHandle
        let victim: BlobID
        let victimClusters: [UInt64]
    }

    /// A blob of 2 allocated clusters, open on reactor `data` with a channel there.
    private func makeSetup(quarantineWaitNs: UInt64 = 2_000_000_000) throws -> Setup {
        let gate = InstrumentedBdev(try MallocBdev(blockCount: 2048), holdingReactor: "data")
        let bdev = Bdev(backend: gate)
        let service = try BlobStoreService(bdev: bdev, format: BlobStoreTests.options)
        let data = try Reactor(name: "data")
        try data.start()
        let victim = try service.perform { store in
            store.releases.quarantineWaitNs = quarantineWaitNs
            let id = try store.createBlob(clusterCount: 2)
            try store.write(blob: id, offsetUnits: 0, data: [UInt8](repeating: 0xAA, count: 2 * 4096))
            return id
        }
        let victimClusters = try service.perform { store in store.blob(victim)!.extents.flatMap { extent in
            (0..<UInt64(extent.count)).map { extent.firstCluster + $0 }
        } }
        let handle = try service.openBlob(victim, owner: data)
        let side = try DataSide()
        let failure: String? = data.call {
            do {
                side.channel = service.makeChannel(try bdev.makeChannel(reactor: Reactor.current!))
                return nil
            } catch { return "\(error)" }
        }
        XCTAssertNil(failure)
        return Setup(gate: gate, service: service, data: data, side: side, handle: handle, victim: victim,
                     victimClusters: victimClusters)
    }

    private func finish(_ setup: Setup) throws {
        setup.data.call {
            setup.side.channel!.close()
            setup.side.channel!.bdevChannel.close()
            setup.side.channel = nil
        }
        setup.service.closeBlob(setup.handle)
        try setup.service.stop()
        setup.data.stop()
    }

    /// Writes one new blob of `clusters` clusters full of `byte`; returns it and its clusters.
    private func newBlob(_ service: BlobStoreService, clusters: UInt64, byte: UInt8) throws -> (BlobID, Set<UInt64>) {
        try service.perform { store in
            let id = try store.createBlob(clusterCount: clusters)
            try store.write(blob: id, offsetUnits: 0, data: [UInt8](repeating: byte, count: Int(clusters) * 4096))
            return (id, Set(store.blob(id)!.extents.flatMap { extent in (0..<UInt64(extent.count)).map { extent.firstCluster + $0 } }))
        }
    }

    /// The handle's reactor is busy when the shrink commits: it still holds the old map.
    func testReleasedClustersWaitForTheHandleToTakeTheNewMap() throws {
        let setup = try makeSetup()
        defer { try? finish(setup) }
        let busy = Atomic<Bool>(true)
        setup.data.send { while busy.load(ordering: .acquiring) { usleep(100) } }
        let freeBefore = try setup.service.perform { $0.freeClusterCount }
        try setup.service.perform { try $0.resizeBlob(setup.victim, clusterCount: 0) }
        // Free as the metadata has it, but not handed out while the handle may use them.
        XCTAssertEqual(try setup.service.perform { $0.freeClusterCount }, freeBefore + 2)
        let (_, first) = try newBlob(setup.service, clusters: 4, byte: 0xBB)
        XCTAssertTrue(first.isDisjoint(with: setup.victimClusters), "released clusters reused while a handle held them: \(first)")
        // The persisted bitmaps already show them free: a checkpoint now verifies clean.
        let report = try setup.service.perform { $0.verify() }
        XCTAssertTrue(report.isConsistent, "\(report.problems)")
        busy.store(false, ordering: .releasing)
        try until("the handle's acknowledgement") { try setup.service.perform { $0.releases.quarantine.isEmpty || $0.reclaimReleasedClusters() } }
        XCTAssertEqual(try setup.service.perform { $0.releases.quarantinedClusterCount }, 0)
        let (_, second) = try newBlob(setup.service, clusters: 2, byte: 0xCC)
        XCTAssertEqual(second, Set(setup.victimClusters), "lowest free clusters are the released ones")
    }

    /// A write submitted under the old map is still in flight at the shrink: the clusters
    /// come back only after it completed, so it cannot land in another blob's data.
    func testReleasedClustersWaitForInFlightWritesUnderTheOldMap() throws {
        let setup = try makeSetup()
        defer { try? finish(setup) }
        setup.gate.holding.store(true, ordering: .releasing)
        let late = Completion()
        let submitted: String? = setup.data.call {
            do {
                setup.side.buffer.store([UInt8](repeating: 0xEE, count: 4096))
                try setup.side.channel!.write(setup.handle, offsetUnits: 1, countUnits: 1, from: setup.side.buffer, handler: late)
                return nil
            } catch { return "\(error)" }
        }
        XCTAssertNil(submitted)
        try until("the write to reach the gate") { setup.gate.held.load(ordering: .acquiring) == 1 }
        try setup.service.perform { try $0.resizeBlob(setup.victim, clusterCount: 0) }
        // The handle has the new map (the reactor is idle), but its old write is in flight.
        try until("the handle's refresh") { setup.data.call { setup.handle.clusterCount == 0 } }
        let (other, clusters) = try newBlob(setup.service, clusters: 2, byte: 0xBB)
        XCTAssertTrue(clusters.isDisjoint(with: setup.victimClusters), "released clusters reused under an in-flight write")
        setup.gate.holding.store(false, ordering: .releasing)
        until("the late write") { late.done.load(ordering: .acquiring) == 1 }
        let intact = try setup.service.perform { try $0.read(blob: other, offsetUnits: 0, countUnits: 2) }
        XCTAssertEqual(intact, [UInt8](repeating: 0xBB, count: 2 * 4096), "another blob's data was overwritten")
        try until("the handle's acknowledgement") { try setup.service.perform { $0.releases.quarantine.isEmpty || $0.reclaimReleasedClusters() } }
        let (_, reused) = try newBlob(setup.service, clusters: 2, byte: 0xCC)
        XCTAssertEqual(reused, Set(setup.victimClusters))
        let report = try setup.service.perform { $0.verify() }
        XCTAssertTrue(report.isConsistent, "\(report.problems)")
    }

    /// A full store with released clusters in quarantine: the allocation waits for the
    /// acknowledgement instead of failing; with none coming, it fails with no space
    /// after the wait, and the unload persists the clusters as free.
    func testAFullStoreWaitsForReleasedClustersThenReportsNoSpace() throws {
        let setup = try makeSetup(quarantineWaitNs: 200_000_000)
        let busy = Atomic<Bool>(true)
        setup.data.send { while busy.load(ordering: .acquiring) { usleep(100) } }
        let free = try setup.service.perform { $0.freeClusterCount }
        _ = try newBlob(setup.service, clusters: free, byte: 0x11)
        try setup.service.perform { try $0.deleteBlob(setup.victim) }
        XCTAssertEqual(try setup.service.perform { $0.freeClusterCount }, 2)
        // No acknowledgement within the wait: a clear error (the new blob stays empty).
        XCTAssertThrowsError(try newBlob(setup.service, clusters: 1, byte: 0x22)) { error in
            guard case BlobStoreError.noSpace = error else { return XCTFail("\(error)") }
        }
        // The acknowledgement arrives during the wait: the write gets a released cluster.
        let release = Thread { usleep(50_000); busy.store(false, ordering: .releasing) }
        release.start()
        try setup.service.perform { store in store.releases.quarantineWaitNs = 5_000_000_000 }
        let (_, got) = try newBlob(setup.service, clusters: 1, byte: 0x33)
        XCTAssertTrue(got.isSubset(of: setup.victimClusters))
        try finish(setup)
    }
}
