import Bdev
import Env

enum Workload: String, CaseIterable, Sendable {
    case read, write, randread, randwrite, rw, randrw

    var reads: Bool { self != .write && self != .randwrite }

    var isRandom: Bool { self == .randread || self == .randwrite || self == .randrw }
}

struct JobParameters: Sendable {
    var workload: Workload
    var readPercent: Int
    var queueDepth: Int
    var ioBytes: Int
    var durationNs: UInt64
    var warmupNs: UInt64
    var seed: UInt64
}

/// One reactor's share of a run: `queueDepth` requests kept in flight on one channel,
/// each slot resubmitting from its completion. The measured phase allocates nothing.
final class Job: BdevCompletionHandler {
    let parameters: JobParameters
    let channel: any PerfTarget
    private let buffer: DMABuffer
    private let ioBlocks: UInt64
    private let regionCount: UInt64  // ioBlocks-sized regions on the device
    private var startNs: [UInt64]
    private var random: UInt64
    private var nextSequential: UInt64 = 0
    private var stopping = false
    private(set) var histogram = LatencyHistogram()
    private(set) var completedReads: UInt64 = 0
    private(set) var completedWrites: UInt64 = 0
    private(set) var errors: UInt64 = 0
    private(set) var firstError: String?
    private var measuring = false
    private var phaseEndNs: UInt64 = 0
    private(set) var measuredStartNs: UInt64 = 0
    private(set) var measuredEndNs: UInt64 = 0
    private(set) var cpuStartNs: UInt64 = 0
    private(set) var cpuEndNs: UInt64 = 0
    private(set) var finished = false {
        didSet { if finished { onFinished() } }
    }
    var onFinished: () -> Void = {}
    private let onMeasureStart: () -> Void
    private let onMeasureEnd: () -> Void

    init(parameters: JobParameters, channel: any PerfTarget, onMeasureStart: @escaping () -> Void,
         onMeasureEnd: @escaping () -> Void) throws {
        self.parameters = parameters
        self.channel = channel
        self.onMeasureStart = onMeasureStart
        self.onMeasureEnd = onMeasureEnd
        ioBlocks = UInt64(parameters.ioBytes / channel.unitBytes)
        regionCount = channel.unitCount / ioBlocks
        buffer = try DMABuffer.allocate(bytes: parameters.ioBytes * parameters.queueDepth)
        buffer.fill(0x5A)
        startNs = [UInt64](repeating: 0, count: parameters.queueDepth)
        random = parameters.seed | 1
    }

    func start() throws {
        let now = MonotonicClock.nowNs()
        if parameters.warmupNs > 0 {
            phaseEndNs = now + parameters.warmupNs
        } else {
            beginMeasuring(now)
        }
        for slot in 0..<parameters.queueDepth { try submit(slot: slot, now: now) }
    }

    private func beginMeasuring(_ now: UInt64) {
        measuring = true
        histogram = LatencyHistogram()
        completedReads = 0
        completedWrites = 0
        measuredStartNs = now
        cpuStartNs = ProcessCPUClock.nowNs()
        phaseEndNs = now + parameters.durationNs
        onMeasureStart()
    }

    @inline(__always)
    private func nextRandom() -> UInt64 {
        random ^= random << 13
        random ^= random >> 7
        random ^= random << 17
        return random
    }

    @inline(__always)
    private func submit(slot: Int, now: UInt64) throws {
        let region: UInt64
        if parameters.workload.isRandom {
            region = nextRandom() % regionCount
        } else {
            region = nextSequential
            nextSequential = nextSequential + 1 == regionCount ? 0 : nextSequential + 1
        }
        let isRead: Bool
        switch parameters.workload {
        case .read, .randread: isRead = true
        case .write, .randwrite: isRead = false
        case .rw, .randrw: isRead = Int(nextRandom() % 100) < parameters.readPercent
        }
        startNs[slot] = now
        let tag = UInt64(slot) << 1 | (isRead ? 1 : 0)
        if isRead {
            try channel.read(into: buffer, bufferOffset: slot * parameters.ioBytes, offsetUnits: region * ioBlocks,
                             countUnits: ioBlocks, handler: self, tag: tag)
        } else {
            try channel.write(from: buffer, bufferOffset: slot * parameters.ioBytes, offsetUnits: region * ioBlocks,
                              countUnits: ioBlocks, handler: self, tag: tag)
        }
    }

    func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        let now = MonotonicClock.nowNs()
        let slot = Int(tag >> 1)
        if case let .failed(error) = status {
            errors += 1
            if firstError == nil { firstError = "\(error)" }
        } else if measuring {
            histogram.record(now &- startNs[slot])
            if tag & 1 == 1 { completedReads += 1 } else { completedWrites += 1 }
        }
        if !stopping && now >= phaseEndNs {
            if measuring {
                stopping = true
                measuredEndNs = now
                cpuEndNs = ProcessCPUClock.nowNs()
                onMeasureEnd()
            } else {
                beginMeasuring(now)
            }
        }
        if stopping || errors > 0 {
            stopping = true
            if channel.inFlight == 0 { finished = true }
            return
        }
        do { try submit(slot: slot, now: now) } catch {
            errors += 1
            if firstError == nil { firstError = "\(error)" }
            stopping = true
            if channel.inFlight == 0 { finished = true }
        }
    }
}
