#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env

/// The per-reactor path of a FaultBdev. Writes complete into the overlay; reads come
/// from the medium, patched with the overlay as it stood when the read was submitted;
/// a flush writes the overlay through and then flushes the medium.
///
/// Ordering on the medium: one flush at a time per device (the flush token in
/// `FaultState`), so two flushes never write different versions of a block
/// concurrently. Inner requests refused with `queueFull` wait in a backlog and go out,
/// in order, as inner requests complete: a flush of many scattered runs never fails for
/// lack of inner queue slots.
final class FaultChannel: BdevBackendChannel, BdevCompletionHandler {
    private let bdev: FaultBdev
    private let innerChannel: BdevChannel
    private let blockBytes: Int
    private var nextTag: UInt64 = 1
    private var pending: [UInt64: Pending] = [:]
    private var backlog: [UInt64] = []
    private var backlogHead = 0
    private var draining = false
    private var queuedFlushes: [BdevIO] = []
    private var flushing: FlushState?

    /// Blocks written through per inner write of a flush.
    static let flushRunBlocksMax = 256

    private final class Bounce {
        let buffer: DMABuffer
        init(bytes: Int) throws(BdevError) {
            do { buffer = try DMABuffer.allocate(bytes: bytes) } catch { throw .system(error) }
        }
    }

    /// An overlay block captured for a read: the record's bytes (shared, copy-on-write)
    /// and where the block starts in them.
    private struct Patch {
        let blockInRequest: Int
        let data: [UInt8]
        let startBytes: Int
    }

    private enum Pending {
        case read(BdevIO, Bounce, [Patch])
        case flushWrite(Bounce, offsetBlocks: UInt64, countBlocks: UInt64)
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

    func close() {
        precondition(pending.isEmpty && queuedFlushes.isEmpty && flushing == nil,
                     "fault channel closed with requests in flight")
        innerChannel.close()
    }

    /// Inner completions arrive through the inner channel's own poller; this one only
    /// retries a flush that waits for another channel's flush to end.
    func poll() -> PollStatus {
        guard flushing == nil, !queuedFlushes.isEmpty else { return .idle }
        startNextFlush()
        return flushing == nil ? .pending : .busy
    }

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
            bdev.state.withLock { state in
                state.record(offsetBlocks: io.offsetBlocks, data: data, blockBytes: blockBytes)
                if io.type == .unmap { state.unmaps.append((state.writeCount, io.offsetBlocks, io.countBlocks)) }
            }
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

    // MARK: - Inner requests

    private func submitInner(_ entry: Pending) {
        let tag = nextTag
        nextTag += 1
        pending[tag] = entry
        if backlogHead < backlog.count || !trySubmit(tag) { backlog.append(tag) }
    }

    /// False when the inner queue is full; any other refusal completes the request.
    private func trySubmit(_ tag: UInt64) -> Bool {
        do throws(BdevError) {
            switch pending[tag]! {
            case let .read(io, bounce, _):
                try innerChannel.read(into: bounce.buffer, offsetBlocks: io.offsetBlocks,
                                      countBlocks: io.countBlocks, handler: self, tag: tag)
            case let .flushWrite(bounce, offsetBlocks, countBlocks):
                try innerChannel.write(from: bounce.buffer, offsetBlocks: offsetBlocks,
                                       countBlocks: countBlocks, handler: self, tag: tag)
            case .flushMedium:
                try innerChannel.flush(handler: self, tag: tag)
            }
        } catch .queueFull {
            return false
        } catch {
            bdevIOCompleted(tag: tag, status: .failed(error))
        }
        return true
    }

    private func drainBacklog() {
        guard !draining else { return }
        draining = true
        defer { draining = false }
        while backlogHead < backlog.count, trySubmit(backlog[backlogHead]) { backlogHead += 1 }
        if backlogHead == backlog.count {
            backlog.removeAll(keepingCapacity: true)
            backlogHead = 0
        }
    }

    func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        guard let entry = pending.removeValue(forKey: tag) else { preconditionFailure("unknown inner tag \(tag)") }
        switch entry {
        case let .read(io, bounce, patches):
            finishRead(io, bounce, patches, status)
        case .flushWrite:
            if case let .failed(error) = status { flushing!.error = flushing!.error ?? error }
            flushing!.outstanding -= 1
            if flushing!.outstanding == 0 { flushMedium() }
        case .flushMedium:
            if case let .failed(error) = status { flushing!.error = flushing!.error ?? error }
            endFlush()
        }
        drainBacklog()
    }

    // MARK: - Reads

    private func startRead(_ io: BdevIO) {
        let bounce: Bounce
        do { bounce = try Bounce(bytes: io.byteCount) } catch { return finish(io, .failed(error)) }
        // The overlay as of submission: a flush that ends before the inner read completes
        // removes its records, and the medium read may predate the flush's writes.
        let patches = bdev.state.withLock { state -> [Patch] in
            var patches: [Patch] = []
            for block in 0..<io.countBlocks {
                let address = io.offsetBlocks + block
                guard let id = state.latest[address], let record = state.records[id] else { continue }
                patches.append(Patch(blockInRequest: Int(block), data: record.data,
                                     startBytes: Int(address - record.offsetBlocks) * blockBytes))
            }
            return patches
        }
        submitInner(.read(io, bounce, patches))
    }

    private func finishRead(_ io: BdevIO, _ bounce: Bounce, _ patches: [Patch], _ status: BdevStatus) {
        guard status == .success else { return finish(io, status) }
        let corrupt = bdev.state.withLock { $0.corruptBlocks }
        bounce.buffer.withUnsafeMutableBytes { bytes in
            for patch in patches {
                patch.data.withUnsafeBytes {
                    (bytes.baseAddress! + patch.blockInRequest * blockBytes)
                        .copyMemory(from: $0.baseAddress! + patch.startBytes, byteCount: blockBytes)
                }
            }
            for block in 0..<Int(io.countBlocks) where corrupt.contains(io.offsetBlocks + UInt64(block)) {
                FaultBdev.corrupt(UnsafeMutableRawBufferPointer(rebasing: bytes[(block * blockBytes)..<((block + 1) * blockBytes)]))
            }
            io.scatter(from: bytes.baseAddress!)
        }
        finish(io, .success)
    }

    // MARK: - Flushes

    private func startNextFlush() {
        guard flushing == nil, !queuedFlushes.isEmpty else { return }
        // Write through the newest bytes of every unflushed block, in runs.
        let snapshot = bdev.state.withLock { state -> (UInt64, [(UInt64, [UInt8])])? in
            guard !state.flushing else { return nil }  // another channel's flush: poll retries
            state.flushing = true
            var runs: [(UInt64, [UInt8])] = []
            for address in state.latest.keys.sorted() {
                let record = state.records[state.latest[address]!]!
                let start = Int(address - record.offsetBlocks) * blockBytes
                let bytes = record.data[start..<(start + blockBytes)]
                if let last = runs.last, last.0 + UInt64(last.1.count / blockBytes) == address,
                   last.1.count < Self.flushRunBlocksMax * blockBytes {
                    runs[runs.count - 1].1.append(contentsOf: bytes)
                } else {
                    runs.append((address, Array(bytes)))
                }
            }
            return (state.nextRecordID - 1, runs)
        }
        guard let (cut, runs) = snapshot else { return }
        let io = queuedFlushes.removeFirst()
        flushing = FlushState(io: io, cutRecordID: cut, outstanding: runs.count, error: nil)
        if runs.isEmpty { return flushMedium() }
        for (offsetBlocks, bytes) in runs {
            do {
                let bounce = try Bounce(bytes: bytes.count)
                bounce.buffer.store(bytes)
                submitInner(.flushWrite(bounce, offsetBlocks: offsetBlocks, countBlocks: UInt64(bytes.count / blockBytes)))
            } catch {
                flushing!.error = flushing!.error ?? error
                flushing!.outstanding -= 1
                if flushing!.outstanding == 0 { flushMedium() }
            }
        }
    }

    private func flushMedium() {
        if flushing!.error != nil { return endFlush() }
        flushing!.outstanding = 1
        submitInner(.flushMedium)
    }

    private func endFlush() {
        let done = flushing!
        flushing = nil
        bdev.state.withLock { state in
            state.flushing = false
            // The medium now holds every record up to the cut: drop them from the overlay.
            if done.error == nil { state.removeRecords(through: done.cutRecordID) }
        }
        finish(done.io, done.error.map { .failed($0) } ?? .success)
        startNextFlush()
    }
}
