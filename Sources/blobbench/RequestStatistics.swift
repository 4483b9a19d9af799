import ArgumentParser
import Bdev
import BdevMalloc
import Env
import Foundation

/// What keeping statistics adds to each FUSE request (blobfs stats): the work
/// `FuseSession` does per request with statistics on — a clock read at the answer (the
/// receipt takes the reactor pass's start, read anyway) and a histogram record — and the
/// extra call `CountingBdev` puts on each device request, measured against the same loops
/// without them. `bench/stats-overhead.sh`
/// measures the whole path through a mount; this isolates the added cost.
struct RequestStatistics: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "request-statistics",
        abstract: "ns per request that statistics add: the session's clock read and histogram record, CountingBdev's call.")
    @Option(help: "Requests per measurement.") var requests = 10_000_000
    @Option(help: "Device requests (malloc, 4 KiB reads) per measurement.") var deviceRequests = 2_000_000

    func run() throws {
        // 1. The session's share: two clock reads and a record into the opcode's row.
        let histograms = OperationHistograms(rows: 64)
        var sink: UInt64 = 0
        let plain = BlobBench.seconds {
            for index in 0..<requests { sink &+= UInt64(index & 63) }
        }
        let kept = BlobBench.seconds {
            let received = MonotonicClock.nowNs()
            for index in 0..<requests {
                sink &+= UInt64(index & 63)
                histograms.record(row: index & 15, ns: MonotonicClock.nowNs() &- received, bytes: 4096, failed: false)
            }
        }
        print(String(format: "session: %.1f ns per request with statistics, %.1f without (%.1f ns added)",
                     kept * 1e9 / Double(requests), plain * 1e9 / Double(requests), (kept - plain) * 1e9 / Double(requests)))
        let clock = BlobBench.seconds {
            for _ in 0..<requests { sink &+= MonotonicClock.nowNs() }
        }
        let record = BlobBench.seconds {
            for index in 0..<requests { histograms.record(row: index & 15, ns: UInt64(index & 0xFFFFF), bytes: 4096, failed: false) }
        }
        print(String(format: "of which: a clock read %.1f ns, a histogram record %.1f ns",
                     clock * 1e9 / Double(requests), record * 1e9 / Double(requests)))
        // 2. CountingBdev's share: 4 KiB reads from RAM, submitted and polled one at a time.
        func device(_ counting: Bool) throws -> Double {
            let malloc = try MallocBdev(blockCount: 1024)
            let bdev = Bdev(backend: counting ? CountingBdev(wrapping: malloc) : malloc)
            let reactor = try Reactor()
            let channel = try bdev.makeChannel(reactor: reactor)
            defer { channel.close() }
            final class Done: BdevCompletionHandler { var count = 0; func bdevIOCompleted(tag: UInt64, status: BdevStatus) { count += 1 } }
            let done = Done()
            let buffer = try DMABuffer.allocate(bytes: 4096)
            return try BlobBench.seconds {
                for index in 0..<deviceRequests {
                    try channel.read(into: buffer, offsetBlocks: UInt64(index & 1023), countBlocks: 1, handler: done)
                    _ = channel.poll()
                }
            }
        }
        var direct: [Double] = [], wrapped: [Double] = []
        for _ in 0..<3 {  // interleaved, the median of three
            direct.append(try device(false))
            wrapped.append(try device(true))
        }
        let directNs = direct.sorted()[1] * 1e9 / Double(deviceRequests), wrappedNs = wrapped.sorted()[1] * 1e9 / Double(deviceRequests)
        print(String(format: "device: %.1f ns per 4 KiB malloc read through CountingBdev, %.1f without (%.1f ns added)",
                     wrappedNs, directNs, wrappedNs - directNs))
        if sink == 42 { print("") }  // keeps the loops
    }
}
