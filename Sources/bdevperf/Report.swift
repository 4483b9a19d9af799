import Foundation

/// The memory-copy limit of the machine for one I/O size: how many copies of `ioBytes`
/// one core makes per second from a 1 GiB region, in the workload's order (random or
/// sequential). SPDK quotes its malloc bdev against the same limit.
struct MemcpyBaseline: Codable {
    var copiesPerSecond: Double
    var mibPerSecond: Double

    static func measure(ioBytes: Int, seconds: Double, random isRandom: Bool) -> MemcpyBaseline {
        let regionBytes = 1 << 30
        let source = UnsafeMutableRawPointer.allocate(byteCount: regionBytes, alignment: 4096)
        let target = UnsafeMutableRawPointer.allocate(byteCount: ioBytes, alignment: 4096)
        defer { source.deallocate(); target.deallocate() }
        memset(source, 1, regionBytes)
        let slots = regionBytes / ioBytes
        var random: UInt64 = 0x1234_5678_9ABC_DEF1
        var copies = 0
        var sequential = 0
        let start = DispatchTime.now().uptimeNanoseconds
        let end = start + UInt64(seconds * 1e9)
        var now = start
        while now < end {
            for _ in 0..<64 {
                let slot: Int
                if isRandom {
                    random ^= random << 13; random ^= random >> 7; random ^= random << 17
                    slot = Int(random % UInt64(slots))
                } else {
                    sequential = sequential + 1 == slots ? 0 : sequential + 1
                    slot = sequential
                }
                target.copyMemory(from: source + slot * ioBytes, byteCount: ioBytes)
            }
            copies += 64
            now = DispatchTime.now().uptimeNanoseconds
        }
        let elapsed = Double(now - start) / 1e9
        let rate = Double(copies) / elapsed
        return MemcpyBaseline(copiesPerSecond: rate, mibPerSecond: rate * Double(ioBytes) / 1048576)
    }
}

struct Report: Codable {
    var device: String
    var workload: String
    var readPercent: Int
    var queueDepth: Int
    var ioBytes: Int
    var blockSize: Int
    var reactors: Int
    var seconds: Double
    var ios: UInt64
    var iops: Double
    var mibPerSecond: Double
    var latencyUs: Latency
    var cpuSeconds: Double
    var cpuSecondsPerMillionIOs: Double
    var allocationsPerIO: Double?
    var errors: UInt64
    var firstError: String?
    var memcpy: MemcpyBaseline?
    var iopsOverMemcpyLimit: Double?

    struct Latency: Codable {
        var mean: Double
        var p50: Double
        var p99: Double
        var p999: Double
        var max: Double
    }

    init(device: String, blockSize: Int, parameters: JobParameters, reactors: Int, result: RunResult,
         memcpy: MemcpyBaseline?) {
        self.device = device
        workload = parameters.workload.rawValue
        readPercent = parameters.readPercent
        queueDepth = parameters.queueDepth
        ioBytes = parameters.ioBytes
        self.blockSize = blockSize
        self.reactors = reactors
        seconds = result.seconds
        ios = result.reads + result.writes
        iops = seconds > 0 ? Double(ios) / seconds : 0
        mibPerSecond = iops * Double(ioBytes) / 1048576
        let h = result.histogram
        latencyUs = Latency(mean: h.meanNs / 1000, p50: Double(h.percentile(0.5)) / 1000,
                            p99: Double(h.percentile(0.99)) / 1000, p999: Double(h.percentile(0.999)) / 1000,
                            max: Double(h.maxNs) / 1000)
        cpuSeconds = result.cpuSeconds
        cpuSecondsPerMillionIOs = ios > 0 ? result.cpuSeconds / Double(ios) * 1e6 : 0
        allocationsPerIO = result.allocationsCounted && ios > 0 ? Double(result.allocations) / Double(ios) : nil
        errors = result.errors
        firstError = result.firstError
        self.memcpy = memcpy
        iopsOverMemcpyLimit = memcpy.map { iops / $0.copiesPerSecond }
    }

    func json() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return String(decoding: try! encoder.encode(self), as: UTF8.self)
    }

    func text() -> String {
        func f(_ value: Double, _ digits: Int = 1) -> String { String(format: "%.\(digits)f", value) }
        var lines = [
            "device \(device)  workload \(workload)\(workload.hasSuffix("rw") ? " (\(readPercent)% reads)" : "")  "
                + "q\(queueDepth)  io \(ioBytes) B  reactors \(reactors)  \(f(seconds, 2)) s",
            "  IOPS        \(f(iops, 0))",
            "  MiB/s       \(f(mibPerSecond))",
            "  latency us  mean \(f(latencyUs.mean, 2))  p50 \(f(latencyUs.p50, 2))  p99 \(f(latencyUs.p99, 2))  "
                + "p99.9 \(f(latencyUs.p999, 2))  max \(f(latencyUs.max, 2))",
            "  CPU         \(f(cpuSeconds, 2)) s (\(f(cpuSecondsPerMillionIOs, 3)) s per million I/O)",
            "  allocations per I/O  " + (allocationsPerIO.map { f($0, 4) } ?? "not counted (interposer not loaded)"),
        ]
        if let memcpy, let ratio = iopsOverMemcpyLimit {
            lines.append("  memcpy limit \(f(memcpy.copiesPerSecond, 0)) copies/s of \(ioBytes) B "
                         + "(\(f(memcpy.mibPerSecond)) MiB/s); IOPS / limit = \(f(ratio, 3))")
        }
        if errors > 0 { lines.append("  ERRORS      \(errors) (first: \(firstError ?? "?"))") }
        return lines.joined(separator: "\n")
    }
}
