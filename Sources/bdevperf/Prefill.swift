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
        var random = SplitMixBytes(seed: 7)
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

/// Fills memory with pseudo-random bytes (so compressible or zero data flatters nothing).
struct SplitMixBytes {
    private var state: UInt64
    init(seed: UInt64) { state = seed }

    mutating func fill(_ bytes: UnsafeMutableRawBufferPointer) {
        var offset = 0
        while offset + 8 <= bytes.count {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            bytes.storeBytes(of: z ^ (z >> 31), toByteOffset: offset, as: UInt64.self)
            offset += 8
        }
    }
}
