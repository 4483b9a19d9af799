#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env

/// The per-reactor path of a FaultBdev. Writes complete into the overlay; reads come
/// from the medium, patched with the overlay; a flush writes the overlay through
/// (one flush at a time, so overlapping writes reach the medium in order) and then
/// flushes the medium.
final class FaultChannel: BdevBackendChannel, BdevCompletionHandler {
    private let bdev: FaultBdev
    private let innerChannel: BdevChannel
    private let blockBytes: Int
    private var nextTag: UInt64 = 1
    private var pending: [UInt64: Pending] = [:]
    private var queuedFlushes: [BdevIO] = []
    private var flushing: FlushState?

    private final class Bounce {
        let buffer: DMABuffer
        init(bytes: Int) throws { buffer = try DMABuffer.allocate(bytes: bytes) }
    }

    private enum Pending {
        case read(BdevIO, Bounce)
        case flushWrite(Bounce)
        case flushMedium
    }

    private struct FlushState {
        let io: BdevIO
        let cutRecordID: UInt64
        var outstanding: Int
        var error: BdevError?
    }

    init(bdev: FaultBdev, innerChannel: BdevChannel) {
        self.bdev = bdev
        self.innerChannel = innerChannel
        blockBytes = bdev.geometry.blockSizeBytes
    }

    func close() { innerChannel.close() }
    func poll() -> PollStatus { .idle }  // the inner channel has its own poller

    func submit(_ io: BdevIO) {
        let isWrite = io.type == .write || io.type == .writeZeroes || io.type == .unmap
        let fails = bdev.state.withLock { state -> Bool in
            state.inFlight += 1
            return state.admit(isWrite: isWrite)
        }
        if fails { return finish(io, .failed(.io(errno: EIO))) }
        switch io.type {
        case .write, .writeZeroes, .unmap:
            var data = [UInt8](repeating: 0, count: Int(io.countBlocks) * blockBytes)
            if io.type == .write { data.withUnsafeMutableBytes { io.gather(into: $0.baseAddress!) } }
            bdev.state.withLock { $0.record(offsetBlocks: io.offsetBlocks, data: data, blockBytes: blockBytes) }
            finish(io, .success)
        case .read:
            startRead(io)
        case .flush:
            queuedFlushes.append(io)
            startNextFlush()
        }
    }

    private func finish(_ io: BdevIO, _ status: BdevStatus) {
        bdev.state.withLock { $0.inFlight -= 1 }
        io.complete(status)
    }

    private func tag(_ entry: Pending) -> UInt64 {
        let tag = nextTag
        nextTag += 1
        pending[tag] = entry
        return tag
    }

    // MARK: - Reads

    private func startRead(_ io: BdevIO) {
        do {
            let bounce = try Bounce(bytes: io.byteCount)
            let tag = tag(.read(io, bounce))
            do {
                try innerChannel.read(into: bounce.buffer, offsetBlocks: io.offsetBlocks, countBlocks: io.countBlocks,
                                      handler: self, tag: tag)
            } catch {
                pending[tag] = nil
                finish(io, .failed(error))
            }
        } catch {
            finish(io, .failed(.io(errno: ENOMEM)))
        }
    }

    private func finishRead(_ io: BdevIO, _ bounce: Bounce, _ status: BdevStatus) {
        guard status == .success else { return finish(io, status) }
        bounce.buffer.withUnsafeMutableBytes { bytes in
            bdev.state.withLock { state in
                for block in 0..<io.countBlocks {
                    let target = bytes.baseAddress! + Int(block) * blockBytes
                    let address = io.offsetBlocks + block
                    if let id = state.latest[address], let record = state.records[id] {
                        let start = Int(address - record.offsetBlocks) * blockBytes
                        record.data.withUnsafeBytes { target.copyMemory(from: $0.baseAddress! + start, byteCount: blockBytes) }
                    }
                    if state.corruptBlocks.contains(address) {
                        for offset in stride(from: 0, to: blockBytes, by: 97) {
                            target.storeBytes(of: target.load(fromByteOffset: offset, as: UInt8.self) ^ 0x5A,
                                              toByteOffset: offset, as: UInt8.self)
                        }
                    }
                }
            }
            io.scatter(from: bytes.baseAddress!)
        }
        finish(io, .success)
    }

    // MARK: - Flushes

    private func startNextFlush() {
        guard flushing == nil, !queuedFlushes.isEmpty else { return }
        let io = queuedFlushes.removeFirst()
        // Write through the newest bytes of every unflushed block, in runs.
        let (cut, runs) = bdev.state.withLock { state -> (UInt64, [(UInt64, [UInt8])]) in
            let cut = state.nextRecordID - 1
            var runs: [(UInt64, [UInt8])] = []
            for address in state.latest.keys.sorted() {
                let record = state.records[state.latest[address]!]!
                let start = Int(address - record.offsetBlocks) * blockBytes
                let bytes = record.data[start..<(start + blockBytes)]
                if let last = runs.last, last.0 + UInt64(last.1.count / blockBytes) == address,
                   last.1.count < 256 * blockBytes {
                    runs[runs.count - 1].1.append(contentsOf: bytes)
                } else {
                    runs.append((address, Array(bytes)))
                }
            }
            return (cut, runs)
        }
        flushing = FlushState(io: io, cutRecordID: cut, outstanding: 0, error: nil)
        for (offset, bytes) in runs {
            do {
                let bounce = try Bounce(bytes: bytes.count)
                bounce.buffer.store(bytes)
                let tag = tag(.flushWrite(bounce))
                try innerChannel.write(from: bounce.buffer, offsetBlocks: offset,
                                       countBlocks: UInt64(bytes.count / blockBytes), handler: self, tag: tag)
                flushing!.outstanding += 1
            } catch let error as BdevError {
                flushing!.error = flushing!.error ?? error
            } catch {
                flushing!.error = flushing!.error ?? .io(errno: ENOMEM)
            }
        }
        if flushing!.outstanding == 0 { flushMedium() }
    }

    private func flushMedium() {
        if flushing!.error != nil { return endFlush() }
        do {
            try innerChannel.flush(handler: self, tag: tag(.flushMedium))
            flushing!.outstanding = 1
        } catch {
            flushing!.error = error
            endFlush()
        }
    }

    private func endFlush() {
        let done = flushing!
        flushing = nil
        if done.error == nil {
            // The medium now holds every record up to the cut: drop them from the overlay.
            bdev.state.withLock { state in
                state.records = state.records.filter { $0.key > done.cutRecordID }
                state.latest = state.latest.filter { $0.value > done.cutRecordID }
            }
        }
        finish(done.io, done.error.map { .failed($0) } ?? .success)
        startNextFlush()
    }

    // MARK: - Inner completions

    func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        guard let entry = pending.removeValue(forKey: tag) else { preconditionFailure("unknown inner tag \(tag)") }
        switch entry {
        case let .read(io, bounce):
            finishRead(io, bounce, status)
        case .flushWrite:
            if case let .failed(error) = status { flushing!.error = flushing!.error ?? error }
            flushing!.outstanding -= 1
            if flushing!.outstanding == 0 { flushMedium() }
        case .flushMedium:
            if case let .failed(error) = status { flushing!.error = flushing!.error ?? error }
            endFlush()
        }
    }
}
