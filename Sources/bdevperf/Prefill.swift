import Bdev
import Env

/// Writes every block of the device once before a read workload, so reads touch real
/// data (on malloc, unwritten memory is the kernel's shared zero page; on a file, a hole)
/// rather than a shortcut.
final class Prefill: BdevCompletionHandler {
    private let channel: BdevChannel
    private let buffer: DMABuffer
    private let chunkBlocks: UInt64
    private let depth = 8
    private var nextBlock: UInt64 = 0
    private(set) var failure: BdevError?
    private(set) var done = false

    init(channel: BdevChannel) throws {
        self.channel = channel
        let geometry = channel.bdev.geometry
        chunkBlocks = UInt64((1 << 20) / geometry.blockSizeBytes)
        buffer = try DMABuffer.allocate(bytes: depth << 20)
        var random = SplitMix64(seed: 7)  // random bytes: compressible or zero data flatters nothing
        buffer.withUnsafeMutableBytes { random.fill($0) }
    }

    func start() {
        for slot in 0..<depth { submit(slot: slot) }
        if channel.inFlight == 0 { done = true }
    }

    private func submit(slot: Int) {
        let blockCount = channel.bdev.geometry.blockCount
        guard failure == nil, nextBlock < blockCount else { return }
        let count = min(chunkBlocks, blockCount - nextBlock)
        do {
            try channel.write(from: buffer, bufferOffset: slot << 20, offsetBlocks: nextBlock, countBlocks: count,
                              handler: self, tag: UInt64(slot))
            nextBlock += count
        } catch { failure = error }
    }

    func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        if case let .failed(error) = status { failure = failure ?? error }
        submit(slot: Int(tag))
        if channel.inFlight == 0 { done = true }
    }
}
