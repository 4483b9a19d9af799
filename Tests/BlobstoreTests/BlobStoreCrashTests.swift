import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
@testable import Blobstore

/// Power is cut after every write index of a workload (N = 1, 2, 3 ... until the
/// workload completes), with several seeds deciding which unflushed writes survive or
/// tear. After each: load (which replays), the verifier passes, every operation that
/// returned is present, and the interrupted one is either wholly there or wholly absent
/// (its data may mix old and new 512-byte sectors only where it overwrote in place).
final class BlobStoreCrashTests: XCTestCase {
    enum Op {
        case create(clusters: UInt64, xattr: String?)
        case write(slot: Int, unit: UInt64, units: Int, seed: UInt64)
        case resize(slot: Int, clusters: UInt64)
        case setXattr(slot: Int, name: String, bytes: Int)
        case removeXattr(slot: Int, name: String)
        case delete(slot: Int)
        case superBlob(slot: Int)
        case unmap(slot: Int, cluster: UInt64)
    }

    /// A fault bdev over `backend` once `image` is written to it: where each power cut of a
    /// campaign starts.
    static func faultDevice(_ backend: MallocBdev, holding image: [UInt8], reactor: Reactor) throws -> FaultBdev {
        let inner = Bdev(backend: backend)
        let copy = try BdevSyncIO(bdev: inner, reactor: reactor)
        try copy.writeBytes(image, offsetBlocks: 0)
        copy.close()
        return FaultBdev(wrapping: inner)
    }

    /// Seeds per write index: `default`, or BLOBFS_CRASH_SEEDS for a longer campaign.
    static func seedCount(_ default: UInt64) -> UInt64 {
        ProcessInfo.processInfo.environment["BLOBFS_CRASH_SEEDS"].flatMap(UInt64.init) ?? `default`
    }

    static let workload: [Op] = [
        .create(clusters: 4, xattr: nil), .write(slot: 0, unit: 0, units: 4, seed: 1), .setXattr(slot: 0, name: "a", bytes: 3),
        .create(clusters: 2, xattr: "kind"), .write(slot: 1, unit: 1, units: 1, seed: 2), .resize(slot: 0, clusters: 6),
        .write(slot: 0, unit: 4, units: 2, seed: 3), .write(slot: 0, unit: 1, units: 2, seed: 4), .superBlob(slot: 1),
        .removeXattr(slot: 0, name: "a"), .resize(slot: 0, clusters: 3), .create(clusters: 1, xattr: "x"),
        .delete(slot: 1), .write(slot: 2, unit: 0, units: 1, seed: 5), .setXattr(slot: 2, name: "b", bytes: 2000),
        .unmap(slot: 0, cluster: 0), .setXattr(slot: 0, name: "c", bytes: 3000), .setXattr(slot: 2, name: "d", bytes: 3000),
    ]

    struct BlobState: Equatable {
        var clusterCount: UInt64
        var xattrs: [String: [UInt8]]
        var data: [UInt8]
    }

    struct Snapshot: Equatable {
        var blobs: [BlobID: BlobState]
        var superBlob: BlobID?
    }

    static func snapshot(_ store: BlobStore) throws -> Snapshot {
        var blobs: [BlobID: BlobState] = [:]
        for id in store.blobIDList {
            let blob = store.blob(id)!
            let units = blob.clusterCount * UInt64(store.clusterSizeBytes / store.ioUnitBytes)
            blobs[id] = BlobState(clusterCount: blob.clusterCount,
                                  xattrs: Dictionary(uniqueKeysWithValues: blob.xattrs.map { ($0.name, $0.value) }),
                                  data: units == 0 ? [] : try store.read(blob: id, offsetUnits: 0, countUnits: units))
        }
        return Snapshot(blobs: blobs, superBlob: store.superBlobID)
    }

    static func data(_ seed: UInt64, _ count: Int) -> [UInt8] {
        var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
        return (0..<count).map { _ in
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return UInt8(truncatingIfNeeded: state)
        }
    }

    static func run(_ op: Op, on store: BlobStore, slots: inout [BlobID]) throws {
        switch op {
        case let .create(clusters, xattr):
            slots.append(try store.createBlob(clusterCount: clusters, xattrs: xattr.map { [($0, [7])] } ?? []))
        case let .write(slot, unit, units, seed):
            try store.write(blob: slots[slot], offsetUnits: unit, data: data(seed, units * store.ioUnitBytes))
            try store.sync()
        case let .resize(slot, clusters): try store.resizeBlob(slots[slot], clusterCount: clusters)
        case let .setXattr(slot, name, bytes): try store.setXattr(slots[slot], name: name, value: data(UInt64(bytes), bytes))
        case let .removeXattr(slot, name): try store.removeXattr(slots[slot], name: name)
        case let .delete(slot): try store.deleteBlob(slots[slot])
        case let .superBlob(slot): try store.setSuperBlob(slots[slot])
        case let .unmap(slot, cluster): try store.unmap(blob: slots[slot], clusterIndex: cluster, count: 1)
        }
    }

    /// Metadata equal to one side; data equal to that side too, except that an
    /// interrupted in-place overwrite may leave any sector old or new.
    static func matches(_ state: Snapshot, before: Snapshot, after: Snapshot, allowMixing: Bool) -> Bool {
        func metadata(_ s: Snapshot) -> [BlobID: [String]] {
            s.blobs.mapValues { ["\($0.clusterCount)"] + $0.xattrs.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" } }
        }
        func matches(side: Snapshot, other: Snapshot) -> Bool {
            guard metadata(state) == metadata(side), state.superBlob == side.superBlob else { return false }
            for (id, blob) in state.blobs {
                let expected = side.blobs[id]!.data
                guard blob.data.count == expected.count else { return false }
                if !allowMixing {
                    if blob.data != expected { return false }
                    continue
                }
                let alternative = other.blobs[id]?.data
                for sector in stride(from: 0, to: expected.count, by: 512) {
                    let range = sector..<(sector + 512)
                    if blob.data[range] == expected[range] { continue }
                    if let alternative, alternative.count == expected.count, blob.data[range] == alternative[range] { continue }
                    return false
                }
            }
            return true
        }
        return matches(side: after, other: before) || matches(side: before, other: after)
    }

    func testPowerCutAtEveryWriteIndex() throws {
        for blockSize in [4096, 512] {
            try powerCutAtEveryWriteIndex(blockSize: blockSize, seeds: 0..<Self.seedCount(6))
        }
    }

    /// The same with a metadata page region of 2 pages: the chains live in data clusters
    /// (allocated and released by checkpoints, next to the blobs' data).
    func testPowerCutAtEveryWriteIndexWithMetadataPagesInClusters() throws {
        var options = BlobStoreTests.options
        options.metadataPages = 2
        try powerCutAtEveryWriteIndex(blockSize: 4096, seeds: 0..<Self.seedCount(4), options: options)
    }

    private func powerCutAtEveryWriteIndex(blockSize: Int, seeds: Range<UInt64>,
                                           options: BlobStore.Options = BlobStoreTests.options) throws {
        let reactor = try Reactor()
        // The reference run: the state after each operation.
        var reference: [Snapshot] = []
        // Writes that allocate nothing overwrite in place: only their data may mix old
        // and new sectors after a crash.
        var inPlace: [Bool] = []
        do {
            let io = try BdevSyncIO(bdev: Bdev(backend: try MallocBdev(blockCount: (4 << 20) / UInt64(blockSize),
                                                                        blockSizeBytes: blockSize)), reactor: reactor)
            let store = try BlobStore.format(io, options: options)
            var slots: [BlobID] = []
            reference.append(try Self.snapshot(store))
            for op in Self.workload {
                let free = store.freeClusterCount
                try Self.run(op, on: store, slots: &slots)
                if case .write = op { inPlace.append(store.freeClusterCount == free) } else { inPlace.append(false) }
                reference.append(try Self.snapshot(store))
            }
            XCTAssertTrue(inPlace.contains(true), "the workload overwrites in place somewhere")
            if options.metadataPages == 2 {
                try store.checkpoint()
                XCTAssertTrue(store.durableChains.values.joined().contains { $0 >= 2 }, "chains in data clusters")
            }
            io.close()
        }
        var cutIndex: UInt64 = 1
        var iterations = 0
        while true {
            var completedAll = false
            for seed in seeds {
                let inner = Bdev(backend: try MallocBdev(blockCount: (4 << 20) / UInt64(blockSize), blockSizeBytes: blockSize))
                do {  // a used device: stale bytes everywhere, so stale data cannot pass for zeros
                    let fill = try BdevSyncIO(bdev: inner, reactor: reactor)
                    try fill.writeBytes([UInt8](repeating: 0xEE, count: 4 << 20), offsetBlocks: 0)
                    fill.close()
                }
                let fault = FaultBdev(wrapping: inner)
                let device = Bdev(backend: fault)
                var io = try BdevSyncIO(bdev: device, reactor: reactor)
                let store = try BlobStore.format(io, options: options)
                fault.powerCut(afterWrites: fault.writeCount + cutIndex)
                var slots: [BlobID] = []
                var completed = 0
                do {
                    for op in Self.workload {
                        try Self.run(op, on: store, slots: &slots)
                        completed += 1
                    }
                } catch {}
                completedAll = completed == Self.workload.count
                io.close()
                let report = try fault.crash(seed: seed, reactor: reactor)
                io = try BdevSyncIO(bdev: device, reactor: reactor)
                let context = "block \(blockSize), cut after write \(cutIndex), seed \(seed), \(completed) ops done, crash \(report)"
                let loaded: BlobStore
                do { loaded = try BlobStore.load(io).0 } catch {
                    XCTFail("\(context): load failed: \(error)")
                    io.close()
                    continue
                }
                let verify = Verifier.verify(io)
                XCTAssertTrue(verify.isConsistent, "\(context): \(verify.problems)")
                let state = try Self.snapshot(loaded)
                let before = reference[completed]
                let after = reference[min(completed + 1, Self.workload.count)]
                if ProcessInfo.processInfo.environment["CRASH_DEBUG"] != nil, !Self.matches(state, before: before, after: after, allowMixing: completed < inPlace.count && inPlace[completed]) {
                    print("STATE", state.blobs.mapValues { ($0.clusterCount, $0.xattrs, $0.data.count, Set($0.data)) }, state.superBlob)
                    print("BEFORE", before.blobs.mapValues { ($0.clusterCount, $0.xattrs, $0.data.count, Set($0.data).count) }, before.superBlob)
                    print("AFTER", after.blobs.mapValues { ($0.clusterCount, $0.xattrs, $0.data.count, Set($0.data).count) }, after.superBlob)
                }
                XCTAssertTrue(Self.matches(state, before: before, after: after, allowMixing: completed < inPlace.count && inPlace[completed]),
                              "\(context): state after recovery is neither before nor after the interrupted operation")
                io.close()
                iterations += 1
            }
            if completedAll { break }
            cutIndex += 1
            XCTAssertLessThan(cutIndex, 2000, "the workload never completes")
            if cutIndex >= 2000 { break }
        }
        print("crash test, block size \(blockSize): \(cutIndex) write indices × \(seeds.count) seeds = \(iterations) recoveries")
    }
}
