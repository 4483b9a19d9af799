#if canImport(Glibc)
import AllocationCounting
import Glibc
#endif
import Bdev
import Env
import Synchronization

struct RunResult: Sendable {
    var histogram = LatencyHistogram()
    var reads: UInt64 = 0
    var writes: UInt64 = 0
    var errors: UInt64 = 0
    var firstError: String?
    var seconds: Double = 0
    var cpuSeconds: Double = 0
    var allocations: Int = 0
    var allocationsCounted = false
}


/// Starts one reactor per job, runs the jobs to their end, and gathers their numbers.
struct Runner {
    let bdev: Bdev
    let parameters: JobParameters
    let reactorCount: Int
    let idleNs: UInt64
    let prefill: Bool
    let blob: BlobSetup?

    private final class Slot: @unchecked Sendable {
        var job: Job?
        var error: String?
        let finished = Atomic<Bool>(false)
    }

    func run() throws -> RunResult {
        let measuring = Atomic<Int>(0)
        let cpuCount = NUMA.cpuCount
        let counter = AllocationCounter.shared
        var reactors: [Reactor] = []
        var slots: [Slot] = []
        defer { reactors.forEach { $0.stop() } }
        for index in 0..<reactorCount {
            let reactor = try Reactor(
                name: "bdevperf\(index)",
                configuration: .init(cpu: index % cpuCount, idleBeforeSleepNs: idleNs))
            try reactor.start()
            reactors.append(reactor)
            let slot = Slot()
            slots.append(slot)
            let bdev = self.bdev
            let blob = self.blob
            let parameters = self.parameters
            let total = reactorCount
            reactor.call {
                do {
                    let channel: any PerfTarget = try blob?.makeTarget(reactor: Reactor.current!, queueDepth: parameters.queueDepth)
                        ?? BdevTarget(try bdev.makeChannel(reactor: Reactor.current!, queueDepth: parameters.queueDepth))
                    var seeded = parameters
                    seeded.seed &+= UInt64(index) &* 0x9E37_79B9_7F4A_7C15
                    let job = try Job(
                        parameters: seeded, channel: channel,
                        onMeasureStart: {
                            if measuring.add(1, ordering: .relaxed).newValue == total { counter.start() }
                        },
                        onMeasureEnd: {
                            if measuring.subtract(1, ordering: .relaxed).newValue == 0 { counter.stop() }
                        })
                    job.onFinished = { slot.finished.store(true, ordering: .releasing) }
                    slot.job = job
                } catch {
                    slot.error = "\(error)"
                }
            }
            if let error = slot.error { throw BdevPerfError.setup(error) }
        }
        if prefill, blob == nil, let reactor = reactors.first {
            let error: String? = reactor.call {
                do {
                    let channel = try bdev.makeChannel(reactor: Reactor.current!, queueDepth: 8)
                    defer { channel.close() }
                    let prefill = try Prefill(channel: channel)
                    prefill.start()
                    Reactor.current!.run(until: { prefill.done })
                    return prefill.failure.map { "prefill: \($0)" }
                } catch { return "prefill: \(error)" }
            }
            if let error { throw BdevPerfError.setup(error) }
        }
        for (reactor, slot) in zip(reactors, slots) {
            let error: String? = reactor.call {
                do { try slot.job!.start() } catch { return "\(error)" }
                return nil
            }
            if let error { throw BdevPerfError.setup(error) }
        }
        var result = RunResult()
        for (reactor, slot) in zip(reactors, slots) {
            // Poll a flag rather than the reactor: a message would allocate mid-measurement.
            while !slot.finished.load(ordering: .acquiring) { usleep(20_000) }
            let part: RunResult = reactor.call {
                let job = slot.job!
                var part = RunResult()
                part.histogram = job.histogram
                part.reads = job.completedReads
                part.writes = job.completedWrites
                part.errors = job.errors
                part.firstError = job.firstError
                part.seconds = Double(job.measuredEndNs &- job.measuredStartNs) / 1e9
                part.cpuSeconds = Double(job.cpuEndNs &- job.cpuStartNs) / 1e9
                job.channel.close()
                slot.job = nil
                return part
            }
            result.histogram.merge(part.histogram)
            result.reads += part.reads
            result.writes += part.writes
            result.errors += part.errors
            result.firstError = result.firstError ?? part.firstError
            result.seconds = max(result.seconds, part.seconds)
            // Process CPU time is shared by the jobs: take the widest window once.
            result.cpuSeconds = max(result.cpuSeconds, part.cpuSeconds)
        }
        result.allocations = counter.count
        result.allocationsCounted = AllocationCounter.isInterposed
        return result
    }
}

enum BdevPerfError: Error, CustomStringConvertible {
    case setup(String)
    var description: String {
        switch self {
        case let .setup(message): "set-up failed: \(message)"
        }
    }
}
