#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env
import Synchronization

/// A fault-injecting device for crash tests. It wraps any bdev (the durable medium) and
/// models a volatile write cache: the wrapped device holds exactly the state as of the
/// last completed flush; writes, write-zeroes and unmaps since then live in memory, in
/// order, until a flush writes them through or `crash` decides their fate:
///
/// - `crash(seed:)` keeps a seeded subset of the unflushed writes (in their original
///   order), drops the rest, and may tear one kept write at 512-byte granularity.
/// - `failIO(at:)`, `failIO(from:)` fail chosen requests with EIO; `powerCut(afterWrites:)`
///   fails everything after the N-th write until the next crash, which is how a workload
///   is interrupted at write index N; `corruptReads(block:)` flips bits in what a read
///   of that block returns, leaving the medium intact.
///
/// A test device: it allocates per request and serializes its state with a lock.
public final class FaultBdev: BdevBackend, @unchecked Sendable {
    public static let sectorBytes = 512

    public let inner: Bdev
    public let name: String
    public var geometry: BdevGeometry { inner.geometry }
    let state = Mutex(FaultState())

    public init(wrapping inner: Bdev, name: String? = nil) {
        self.inner = inner
        self.name = name ?? "fault(\(inner.name))"
    }

    public func makeChannel(reactor: Reactor) throws(BdevError) -> any BdevBackendChannel {
        FaultChannel(bdev: self, innerChannel: try inner.makeChannel(reactor: reactor))
    }

    public func close() { inner.close() }

    public func refreshGeometry() throws(BdevError) -> BdevGeometry { try inner.refreshGeometry() }

    // MARK: - Triggers and counters

    /// Fails exactly the `n`-th request (counted from 1 over every type) with EIO.
    public func failIO(at n: UInt64) { state.withLock { _ = $0.failAt.insert(n) } }
    /// Fails every request from the `n`-th on with EIO.
    public func failIO(from n: UInt64) { state.withLock { $0.failFrom = n } }
    /// After the `n`-th write (write, write-zeroes or unmap) is accepted, every later
    /// request fails with EIO until `crash`. When `n` writes were already accepted, the
    /// power is off at once.
    public func powerCut(afterWrites n: UInt64) {
        state.withLock { state in
            state.powerCutAfterWrites = n
            if state.writeCount >= n { state.poweredOff = true }
        }
    }
    /// Reads of `block` return flipped bits; the medium keeps its bytes.
    public func corruptReads(block: UInt64) { state.withLock { _ = $0.corruptBlocks.insert(block) } }
    public func clearFaults() { state.withLock { $0.clearTriggers() } }

    public var ioCount: UInt64 { state.withLock { $0.ioCount } }
    public var writeCount: UInt64 { state.withLock { $0.writeCount } }
    public var unflushedWriteCount: Int { state.withLock { $0.records.count } }
    public var isPoweredOff: Bool { state.withLock { $0.poweredOff } }

    /// The unmaps accepted since the last call (their index among the writes, offset and
    /// length in blocks), in order: what a test checks against the blocks that were live
    /// when each was submitted, and where it cuts the power.
    public func takeUnmaps() -> [(writeIndex: UInt64, offsetBlocks: UInt64, countBlocks: UInt64)] {
        state.withLock { state in
            defer { state.unmaps = [] }
            return state.unmaps
        }
    }

    // MARK: - Crash

    public enum CrashPolicy: Sendable {
        /// Each unflushed write survives with probability 1/2; with probability 1/2 one
        /// surviving write is torn.
        case random(seed: UInt64)
        case keepNone
        case keepAll
        /// Exactly the unflushed writes with these indices (in write order) survive.
        case keep(Set<Int>)
    }

    public struct CrashReport: Sendable, CustomStringConvertible {
        /// Indices (in write order) of unflushed writes that reached the medium.
        public var kept: [Int] = []
        public var dropped: [Int] = []
        /// The torn write and which of its 512-byte sectors reached the medium.
        public var torn: (record: Int, sectorsApplied: [Int])?

        public var description: String {
            "kept \(kept), dropped \(dropped)" + (torn.map { ", torn #\($0.record) sectors \($0.sectorsApplied)" } ?? "")
        }
    }

    public func crash(seed: UInt64, reactor: Reactor, keepingFaults: Bool = false) throws -> CrashReport {
        try crash(policy: .random(seed: seed), reactor: reactor, keepingFaults: keepingFaults)
    }

    /// Power loss. Call with no request in flight, from the thread that steps `reactor`
    /// (the medium is written through a channel on it). Afterwards the overlay is empty,
    /// the counters are zero, the power is on and the device works again; the triggers
    /// are cleared unless `keepingFaults` (their request numbers then count afresh).
    public func crash(policy: CrashPolicy, reactor: Reactor, keepingFaults: Bool = false) throws -> CrashReport {
        let records = state.withLock { state -> [WriteRecord] in
            precondition(state.inFlight == 0 && !state.flushing, "crash with \(state.inFlight) requests in flight")
            return state.records.values.sorted { $0.id < $1.id }
        }
        var report = CrashReport()
        var random = SplitMix64(seed: {
            if case let .random(seed) = policy { return seed } else { return 0 }
        }())
        for index in records.indices {
            let keep: Bool
            switch policy {
            case .keepAll: keep = true
            case .keepNone: keep = false
            case .random: keep = random.next() & 1 == 1
            case let .keep(indices): keep = indices.contains(index)
            }
            if keep { report.kept.append(index) } else { report.dropped.append(index) }
        }
        if case .random = policy, !report.kept.isEmpty, random.next() & 1 == 1 {
            let victim = report.kept[Int(random.next() % UInt64(report.kept.count))]
            let sectorCount = records[victim].data.count / Self.sectorBytes
            var applied = (0..<sectorCount).filter { _ in random.next() & 1 == 1 }
            if sectorCount > 1 {  // a tear: some sectors old, some new
                if applied.isEmpty { applied = [Int(random.next() % UInt64(sectorCount))] }
                if applied.count == sectorCount { applied.remove(at: Int(random.next() % UInt64(sectorCount))) }
            }
            report.torn = (victim, applied)
        }
        let io = try BdevSyncIO(bdev: inner, reactor: reactor)
        defer { io.close() }
        let blockBytes = geometry.blockSizeBytes
        for index in report.kept {
            let record = records[index]
            var bytes = record.data
            if let torn = report.torn, torn.record == index {
                let old = try io.readBytes(offsetBlocks: record.offsetBlocks,
                                           countBlocks: UInt64(record.data.count / blockBytes))
                var mixed = old
                for sector in torn.sectorsApplied {
                    let range = (sector * Self.sectorBytes)..<((sector + 1) * Self.sectorBytes)
                    mixed.replaceSubrange(range, with: record.data[range])
                }
                bytes = mixed
            }
            try io.writeBytes(bytes, offsetBlocks: record.offsetBlocks)
        }
        try io.flush()
        state.withLock { state in
            state.records.removeAll()
            state.latest.removeAll()
            if !keepingFaults { state.clearTriggers() }
            state.poweredOff = false
            state.ioCount = 0
            state.writeCount = 0
            state.unmaps = []
        }
        return report
    }

    /// What `corruptReads` does to a block's bytes: every 97th byte XOR 0x5A, so every
    /// 512-byte sector of it differs from what the medium holds.
    static func corrupt(_ block: UnsafeMutableRawBufferPointer) {
        for offset in stride(from: 0, to: block.count, by: 97) { block[offset] ^= 0x5A }
    }
}

struct WriteRecord {
    let id: UInt64
    let offsetBlocks: UInt64
    let data: [UInt8]
}

struct FaultState {
    var records: [UInt64: WriteRecord] = [:]
    /// Block → the record holding its newest unflushed bytes.
    var latest: [UInt64: UInt64] = [:]
    var nextRecordID: UInt64 = 1
    var ioCount: UInt64 = 0
    var writeCount: UInt64 = 0
    var inFlight = 0
    var failAt: Set<UInt64> = []
    var failFrom: UInt64?
    var powerCutAfterWrites: UInt64?
    var poweredOff = false
    /// A channel is writing the overlay through: one flush at a time per device.
    var flushing = false
    var corruptBlocks: Set<UInt64> = []
    var unmaps: [(writeIndex: UInt64, offsetBlocks: UInt64, countBlocks: UInt64)] = []

    mutating func clearTriggers() {
        failAt = []
        failFrom = nil
        powerCutAfterWrites = nil
        poweredOff = false
        corruptBlocks = []
    }

    /// Counts a new request; true when it must fail.
    mutating func admit(isWrite: Bool) -> Bool {
        ioCount += 1
        if poweredOff || failAt.contains(ioCount) || (failFrom.map { ioCount >= $0 } ?? false) { return true }
        if isWrite {
            writeCount += 1
            if let cut = powerCutAfterWrites, writeCount >= cut { poweredOff = true }
        }
        return false
    }

    mutating func removeRecords(through cutRecordID: UInt64) {
        records = records.filter { $0.key > cutRecordID }
        latest = latest.filter { $0.value > cutRecordID }
    }

    mutating func record(offsetBlocks: UInt64, data: [UInt8], blockBytes: Int) {
        let id = nextRecordID
        nextRecordID += 1
        records[id] = WriteRecord(id: id, offsetBlocks: offsetBlocks, data: data)
        for block in 0..<UInt64(data.count / blockBytes) { latest[offsetBlocks + block] = id }
    }
}
