import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
@testable import Blobstore

/// Snapshots and clones (BlobStore+Clones.swift) as a specification: what a clone reads,
/// that writes on either side never show on the other, what a snapshot costs, what deleting
/// one does, and that a power cut at every write of a workload of them leaves one of the
/// states the workload passed through.
final class CloneTests: XCTestCase {
    var reactor: Reactor!
    var io: BdevSyncIO!
    var store: BlobStore!
    let cluster = 4096

    override func setUpWithError() throws {
        reactor = try Reactor()
        io = try BdevSyncIO(bdev: Bdev(backend: try MallocBdev(blockCount: 16384, blockSizeBytes: 512)), reactor: reactor)
        store = try BlobStore.format(io, options: .init(logPages: 32))
    }

    override func tearDown() {
        io?.close()
        store = nil
    }

    func pattern(_ seed: UInt8, _ count: Int) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7) ^ seed } }

    func contents(_ store: BlobStore, _ id: BlobID) throws -> [UInt8] {
        let blob = try XCTUnwrap(store.blob(id))
        guard blob.clusterCount > 0 else { return [] }
        return try store.read(blob: id, offsetUnits: 0, countUnits: blob.clusterCount * UInt64(cluster / store.ioUnitBytes))
    }

    func units(_ byte: Int) -> UInt64 { UInt64(byte / store.ioUnitBytes) }

    /// A blob of `clusters` clusters written whole with pattern `seed`, then snapshotted:
    /// the blob (now a clone), its bytes, and the snapshot.
    func snapshotted(clusters: Int, seed: UInt8) throws -> (blob: BlobID, bytes: [UInt8], snapshot: BlobID) {
        let blob = try store.createBlob(clusterCount: UInt64(clusters))
        let bytes = pattern(seed, clusters * cluster)
        try store.write(blob: blob, offsetUnits: 0, data: bytes)
        return (blob, bytes, try store.snapshotBlob(blob))
    }

    func verify(_ context: String = "") {
        let report = store.verify()
        XCTAssertTrue(report.isConsistent, "\(context) \(report.problems)")
    }

    func testSnapshotSharesClustersAndWritesStayOnTheirSide() throws {
        let a = try store.createBlob(clusterCount: 8)
        let original = pattern(1, 8 * cluster)
        try store.write(blob: a, offsetUnits: 0, data: original)
        let free = store.freeClusterCount

        let snapshot = try store.snapshotBlob(a)
        XCTAssertEqual(store.freeClusterCount, free, "a snapshot allocates no cluster")
        XCTAssertEqual(store.parent(of: a), snapshot)
        XCTAssertTrue(store.blob(snapshot)!.isSnapshot)
        XCTAssertEqual(store.blob(a)!.extents, [], "the blob's clusters moved to the snapshot")
        XCTAssertEqual(try contents(store, a), original)
        let clone = try store.cloneBlob(snapshot)
        XCTAssertEqual(store.clones(of: snapshot), [a, clone].sorted())
        XCTAssertEqual(try contents(store, clone), original)
        XCTAssertEqual(store.freeClusterCount, free, "a clone allocates no cluster")

        // A partial write to a shared cluster copies it: one cluster, the rest of it kept.
        try store.write(blob: clone, offsetUnits: units(2 * cluster + 512), data: [UInt8](repeating: 0xEE, count: 512))
        XCTAssertEqual(store.freeClusterCount, free - 1, "the first write to a shared cluster copies one cluster")
        var expectedClone = original
        expectedClone.replaceSubrange((2 * cluster + 512)..<(2 * cluster + 1024), with: [UInt8](repeating: 0xEE, count: 512))
        XCTAssertEqual(try contents(store, clone), expectedClone)
        XCTAssertEqual(try contents(store, a), original, "the other clone does not see it")
        XCTAssertEqual(try contents(store, snapshot), original, "the snapshot does not change")
        // And the other way.
        try store.write(blob: a, offsetUnits: units(5 * cluster), data: [UInt8](repeating: 0x11, count: cluster))
        var expectedA = original
        expectedA.replaceSubrange((5 * cluster)..<(6 * cluster), with: [UInt8](repeating: 0x11, count: cluster))
        XCTAssertEqual(try contents(store, a), expectedA)
        XCTAssertEqual(try contents(store, clone), expectedClone)

        // Snapshots refuse writes, resizes and unmaps.
        XCTAssertThrowsError(try store.write(blob: snapshot, offsetUnits: 0, data: [UInt8](repeating: 0, count: 512))) {
            XCTAssertEqual($0 as? BlobStoreError, .snapshotReadOnly(snapshot))
        }
        XCTAssertThrowsError(try store.resizeBlob(snapshot, clusterCount: 1))
        XCTAssertThrowsError(try store.unmap(blob: snapshot, clusterIndex: 0, count: 1))
        verify()

        // Survives an unload and load (the checkpoint), and a crash (replay).
        try store.unload()
        store = try BlobStore.load(io).0
        XCTAssertEqual(store.parent(of: clone), snapshot)
        XCTAssertEqual(try contents(store, clone), expectedClone)
        XCTAssertEqual(try contents(store, a), expectedA)
        let other = try store.cloneBlob(snapshot)
        store = try BlobStore.load(io).0  // no unload: replayed from the log
        XCTAssertEqual(store.clones(of: snapshot), [a, clone, other].sorted())
        XCTAssertEqual(try contents(store, other), original)
        verify("after replay")
    }

    func testDeletingASnapshotRefusedWithClonesMergedIntoTheLastOne() throws {
        let (a, original, snapshot) = try snapshotted(clusters: 6, seed: 2)
        let clone = try store.cloneBlob(snapshot)
        try store.write(blob: clone, offsetUnits: units(cluster), data: [UInt8](repeating: 0x22, count: cluster))
        let free = store.freeClusterCount
        XCTAssertThrowsError(try store.deleteBlob(snapshot)) {
            XCTAssertEqual($0 as? BlobStoreError, .hasClones(blob: snapshot, count: 2))
        }
        try store.deleteBlob(a)
        XCTAssertEqual(store.freeClusterCount, free, "the deleted clone owned nothing")
        try store.deleteBlob(snapshot)  // one clone left: merged into it
        XCTAssertNil(store.blob(snapshot))
        XCTAssertNil(store.parent(of: clone))
        XCTAssertEqual(store.freeClusterCount, free + 1, "the snapshot's cluster the clone had copied is released")
        var expected = original
        expected.replaceSubrange(cluster..<(2 * cluster), with: [UInt8](repeating: 0x22, count: cluster))
        XCTAssertEqual(try contents(store, clone), expected)
        XCTAssertEqual(store.blob(clone)!.extents.reduce(0) { $0 + Int($1.count) }, 6, "the clone owns every cluster now")
        verify()
        store = try BlobStore.load(io).0
        XCTAssertEqual(try contents(store, clone), expected)
        verify("after replay")
    }

    func testAChainOfSnapshotsReadsTheNearestCopy() throws {
        let a = try store.createBlob(clusterCount: 4)
        try store.write(blob: a, offsetUnits: 0, data: pattern(3, 4 * cluster))
        let first = try store.snapshotBlob(a)
        try store.write(blob: a, offsetUnits: units(cluster), data: [UInt8](repeating: 0x33, count: cluster))
        let second = try store.snapshotBlob(a)
        XCTAssertEqual(store.parent(of: second), first)
        try store.write(blob: a, offsetUnits: units(2 * cluster), data: [UInt8](repeating: 0x44, count: cluster))
        var expected = pattern(3, 4 * cluster)
        expected.replaceSubrange(cluster..<(2 * cluster), with: [UInt8](repeating: 0x33, count: cluster))
        XCTAssertEqual(try contents(store, second), expected)
        expected.replaceSubrange((2 * cluster)..<(3 * cluster), with: [UInt8](repeating: 0x44, count: cluster))
        XCTAssertEqual(try contents(store, a), expected)
        // Deleting the middle snapshot merges it into its one clone; reads do not change.
        try store.deleteBlob(second)
        XCTAssertEqual(store.parent(of: a), first)
        XCTAssertEqual(try contents(store, a), expected)
        // Decoupling copies what the parent maps; inflating leaves no parent.
        try store.decoupleParent(a)
        XCTAssertNil(store.parent(of: a))
        XCTAssertEqual(try contents(store, a), expected)
        try store.deleteBlob(first)
        XCTAssertEqual(try contents(store, a), expected)
        verify()
    }

    func testInflateCopiesAndDropsTheParent() throws {
        let a = try store.createBlob(clusterCount: 4)
        try store.write(blob: a, offsetUnits: units(cluster), data: pattern(4, 2 * cluster))
        let snapshot = try store.snapshotBlob(a)
        let clone = try store.cloneBlob(snapshot)
        let before = try contents(store, clone)
        let free = store.freeClusterCount
        try store.inflateBlob(clone)
        XCTAssertNil(store.parent(of: clone))
        XCTAssertEqual(store.clones(of: snapshot), [a])
        XCTAssertEqual(try contents(store, clone), before)
        XCTAssertEqual(store.freeClusterCount, free - 2, "the two clusters the snapshot maps are copied; holes stay thin")
        verify()
    }

    func testCloneShrunkAndGrownReadsZerosAndHolesHideTheParent() throws {
        let (a, original, snapshot) = try snapshotted(clusters: 6, seed: 5)
        let clone = try store.cloneBlob(snapshot)
        try store.resizeBlob(clone, clusterCount: 2)
        try store.resizeBlob(clone, clusterCount: 6)
        XCTAssertEqual(try contents(store, clone), Array(original[0..<(2 * cluster)]) + [UInt8](repeating: 0, count: 4 * cluster))
        // An unmap inside what the parent backs writes zeros; at its end it lowers the backing.
        try store.unmap(blob: a, clusterIndex: 1, count: 1)
        try store.unmap(blob: a, clusterIndex: 4, count: 2)
        var expected = original
        expected.replaceSubrange(cluster..<(2 * cluster), with: [UInt8](repeating: 0, count: cluster))
        expected.replaceSubrange((4 * cluster)..<(6 * cluster), with: [UInt8](repeating: 0, count: 2 * cluster))
        XCTAssertEqual(try contents(store, a), expected)
        XCTAssertEqual(store.blob(a)!.backedClusters, 4)
        // writeZeroes over a shared range reads zeros too.
        try store.writeZeroes(blob: a, offsetUnits: units(2 * cluster + 1024), countUnits: units(1024))
        expected.replaceSubrange((2 * cluster + 1024)..<(2 * cluster + 2048), with: [UInt8](repeating: 0, count: 1024))
        XCTAssertEqual(try contents(store, a), expected)
        XCTAssertEqual(try contents(store, snapshot), original, "the snapshot keeps its bytes")
        verify()
    }

    func testHandlesReadThroughTheParentAndFollowASnapshot() throws {
        let a = try store.createBlob(clusterCount: 4)
        let original = pattern(6, 4 * cluster)
        try store.write(blob: a, offsetUnits: 0, data: original)
        let handle = try store.openBlob(a)
        let channel = store.makeChannel(try io.channel.bdev.makeChannel(reactor: reactor))
        defer { channel.close(); store.closeBlob(handle) }
        let snapshot = try store.snapshotBlob(a)
        XCTAssertEqual(handle.physicalCluster(0), nil, "the handle took the new map")
        XCTAssertNotNil(handle.readCluster(0))
        let buffer = try DMABuffer.allocate(bytes: 4 * cluster)
        let done = Completion()
        try channel.read(handle, offsetUnits: 0, countUnits: units(4 * cluster), into: buffer, handler: done)
        reactor.run(until: { done.finished })
        XCTAssertEqual(done.status, .success)
        XCTAssertEqual(buffer.bytes(), original)
        // A data-path write to a shared cluster is not an overwrite: without a service it is refused.
        XCTAssertThrowsError(try channel.write(handle, offsetUnits: 0, countUnits: 1, from: buffer, handler: done))
        let snapshotHandle = try store.openBlob(snapshot)
        defer { store.closeBlob(snapshotHandle) }
        XCTAssertThrowsError(try channel.write(snapshotHandle, offsetUnits: 0, countUnits: 1, from: buffer, handler: done)) {
            XCTAssertEqual($0 as? BlobStoreError, .snapshotReadOnly(snapshot))
        }
    }

    /// Handles of clones of one snapshot share its cached view; each reads its own clusters
    /// first, and a clone made after another wrote reads the snapshot, not that write.
    func testClonesOfOneSnapshotShareTheViewNotTheirWrites() throws {
        let a = try store.createBlob(clusterCount: 4)
        try store.write(blob: a, offsetUnits: 0, data: pattern(7, 4 * cluster))
        let snapshot = try store.snapshotBlob(a)
        let first = try store.cloneBlob(snapshot)
        let firstHandle = try store.openBlob(first)
        defer { store.closeBlob(firstHandle) }
        let shared = try XCTUnwrap(firstHandle.readCluster(1))
        try store.write(blob: first, offsetUnits: units(cluster), data: [UInt8](repeating: 9, count: cluster))
        XCTAssertNotEqual(firstHandle.readCluster(1), shared, "the handle reads the clone's own copy")
        try store.deleteBlob(first)
        let second = try store.cloneBlob(snapshot)
        XCTAssertEqual(second, first, "the id comes back")
        let secondHandle = try store.openBlob(second)
        defer { store.closeBlob(secondHandle) }
        XCTAssertEqual(secondHandle.readCluster(1), shared)
        XCTAssertEqual(try contents(store, second), pattern(7, 4 * cluster))
        XCTAssertEqual(store.dataExtents(second).reduce(0) { $0 + Int($1.count) }, 4)
        try store.write(blob: second, offsetUnits: units(2 * cluster), data: [UInt8](repeating: 5, count: 2 * cluster))
        XCTAssertEqual(store.dataClusterCount(second), 4, "own clusters over shared ones count once")
        XCTAssertEqual(UInt64(store.dataExtents(second).reduce(0) { $0 + Int($1.count) }), store.dataClusterCount(second))
        XCTAssertTrue(store.hasData(second, from: 3, to: 4))
        try store.resizeBlob(second, clusterCount: 2)
        try store.resizeBlob(second, clusterCount: 4)
        XCTAssertFalse(store.hasData(second, from: 2, to: 4), "cut off and grown again: zeros")
        XCTAssertNil(secondHandle.readCluster(3))
    }

    final class Completion: BdevCompletionHandler {
        var finished = false
        var status: BdevStatus = .success
        func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
            finished = true
            self.status = status
        }
    }

    // MARK: - Power cuts

    /// Each step of the workload is one durable operation; `states[k]` is every blob's
    /// parent and bytes after k steps.
    typealias State = [BlobID: (parent: BlobID?, bytes: [UInt8])]
    static let stepCount = 10

    static func workload(_ store: BlobStore, steps: Int) throws -> Int {
        var done = 0
        try workload(store, steps: steps, done: &done)
        return done
    }

    /// Runs the first `steps` steps; `done` counts those that returned (also when one throws).
    static func workload(_ store: BlobStore, steps: Int, done: inout Int) throws {
        let unitsPerCluster = UInt64(4096 / store.ioUnitBytes)
        let a = BlobID(rawValue: 0)
        func step(_ body: () throws -> Void) throws -> Bool {
            guard done < steps else { return false }
            try body()
            done += 1
            return true
        }
        var snapshot = BlobID(rawValue: 0), clone = BlobID(rawValue: 0)
        guard try step({ snapshot = try store.snapshotBlob(a) }) else { return }
        guard try step({ clone = try store.cloneBlob(snapshot) }) else { return }
        guard try step({ try store.write(blob: clone, offsetUnits: 2 * unitsPerCluster + 1, data: [UInt8](repeating: 0xC1, count: store.ioUnitBytes)) }) else { return }
        guard try step({ try store.write(blob: a, offsetUnits: 5 * unitsPerCluster, data: [UInt8](repeating: 0xA5, count: 4096)) }) else { return }
        guard try step({ try store.unmap(blob: clone, clusterIndex: 3, count: 1) }) else { return }
        guard try step({ try store.resizeBlob(clone, clusterCount: 6) }) else { return }
        guard try step({ try store.deleteBlob(a) }) else { return }
        guard try step({ try store.deleteBlob(snapshot) }) else { return }
        guard try step({ snapshot = try store.snapshotBlob(clone) }) else { return }
        guard try step({ _ = try store.cloneBlob(snapshot) }) else { return }
    }

    static func state(_ store: BlobStore) throws -> State {
        var result: State = [:]
        for id in store.blobIDList {
            let blob = store.blob(id)!
            let bytes = blob.clusterCount == 0 ? [] :
                try store.read(blob: id, offsetUnits: 0, countUnits: blob.clusterCount * UInt64(4096 / store.ioUnitBytes))
            result[id] = (blob.parent, bytes)
        }
        return result
    }

    static func describe(_ state: State) -> String {
        state.keys.sorted().map { id in
            let value = state[id]!
            var crc: UInt32 = 0
            for byte in value.bytes { crc = crc &* 31 &+ UInt32(byte) }
            return "\(id)<-\(value.parent.map(String.init) ?? "-"):\(value.bytes.count / 4096)c:\(String(crc, radix: 16))"
        }.joined(separator: " ")
    }

    static func same(_ a: State, _ b: State) -> Bool {
        a.count == b.count && a.allSatisfy { id, value in b[id].map { $0.parent == value.parent && $0.bytes == value.bytes } ?? false }
    }

    func testPowerCutAtEveryWriteOfSnapshotsClonesAndMerges() throws {
        for blockSize in [4096, 512] {
            let blocks = UInt64(16 << 20) / UInt64(blockSize)
            // The image: blob 0 of 8 clusters of data; and the states the workload passes through.
            let image: [UInt8]
            var states: [State] = []
            do {
                let io = try BdevSyncIO(bdev: Bdev(backend: try MallocBdev(blockCount: blocks, blockSizeBytes: blockSize)), reactor: reactor)
                defer { io.close() }
                let store = try BlobStore.format(io, options: .init(logPages: 16))
                let a = try store.createBlob(clusterCount: 8)
                try store.write(blob: a, offsetUnits: 0, data: pattern(9, 8 * 4096))
                try store.unload()
                image = try io.readBytes(offsetBlocks: 0, countBlocks: blocks)
                let steps = try Self.workload(BlobStore.load(io).0, steps: 0)
                XCTAssertEqual(steps, 0)
                for count in 0...Self.stepCount {
                    try io.writeBytes(image, offsetBlocks: 0)
                    let store = try BlobStore.load(io).0
                    XCTAssertEqual(try Self.workload(store, steps: count), count)
                    states.append(try Self.state(store))
                }
            }
            var cut: UInt64 = 1
            var finishedRuns = 0
            while finishedRuns == 0 {
                for seed in UInt64(0)..<BlobStoreCrashTests.seedCount(2) {
                    let fault = try BlobStoreCrashTests.faultDevice(try MallocBdev(blockCount: blocks, blockSizeBytes: blockSize),
                                                                     holding: image, reactor: reactor)
                    var io = try BdevSyncIO(bdev: Bdev(backend: fault), reactor: reactor)
                    var completed = 0
                    do {
                        let store = try BlobStore.load(io).0
                        fault.powerCut(afterWrites: fault.writeCount + cut)
                        try? Self.workload(store, steps: Self.stepCount, done: &completed)
                    }
                    if completed == Self.stepCount { finishedRuns += 1 }
                    io.close()
                    let crash = try fault.crash(seed: seed, reactor: reactor)
                    io = try BdevSyncIO(bdev: Bdev(backend: fault), reactor: reactor)
                    defer { io.close() }
                    let context = "\(blockSize)-byte blocks, cut after write \(cut), seed \(seed), crash \(crash)"
                    let loaded: BlobStore
                    do { loaded = try BlobStore.load(io).0 } catch {
                        XCTFail("\(context): load: \(error)")
                        continue
                    }
                    let report = loaded.verify()
                    XCTAssertTrue(report.isConsistent, "\(context): \(report.problems)")
                    let found = try Self.state(loaded)
                    let matches = states.indices.filter { Self.same(states[$0], found) }
                    XCTAssertFalse(matches.isEmpty, "\(context): the store is in none of the workload's states: completed \(completed), found \(Self.describe(found)); expected \(Self.describe(states[min(completed, Self.stepCount)])) or \(Self.describe(states[min(completed + 1, Self.stepCount)]))")
                    if let last = matches.last {
                        XCTAssertGreaterThanOrEqual(last, completed, "\(context): a step that returned is lost")
                    }
                }
                cut += 1
                XCTAssertLessThan(cut, 2000, "the workload never finishes")
                if cut >= 2000 { break }
            }
        }
    }
}
