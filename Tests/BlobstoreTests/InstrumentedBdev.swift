import Bdev
import Env
import Synchronization

/// A test device over another backend: counts the bytes written through it, and while
/// `holding` keeps back the writes submitted from the reactor named `holdingReactor`
/// (reads and other reactors' I/O pass), submitting them when `holding` ends.
final class InstrumentedBdev: BdevBackend, @unchecked Sendable {
    let inner: any BdevBackend
    let holdingReactor: String?
    let written = Atomic<Int>(0)
    let holding = Atomic<Bool>(false)
    /// Writes kept back right now.
    let held = Atomic<Int>(0)
    var name: String { "instrumented" }
    var geometry: BdevGeometry { inner.geometry }

    init(_ inner: any BdevBackend, holdingReactor: String? = nil) {
        self.inner = inner
        self.holdingReactor = holdingReactor
    }

    func makeChannel(reactor: Reactor) throws(BdevError) -> any BdevBackendChannel {
        Channel(try inner.makeChannel(reactor: reactor), self, mayHold: holdingReactor == reactor.name)
    }

    func close() { inner.close() }

    final class Channel: BdevBackendChannel {
        let inner: any BdevBackendChannel
        unowned let device: InstrumentedBdev
        let mayHold: Bool
        var waiting: [BdevIO] = []

        init(_ inner: any BdevBackendChannel, _ device: InstrumentedBdev, mayHold: Bool) {
            self.inner = inner
            self.device = device
            self.mayHold = mayHold
        }

        func submit(_ io: BdevIO) {
            guard io.type == .write else { return inner.submit(io) }
            device.written.add(io.byteCount, ordering: .relaxed)
            guard mayHold, device.holding.load(ordering: .acquiring) else { return inner.submit(io) }
            waiting.append(io)
            device.held.add(1, ordering: .releasing)
        }

        func poll() -> PollStatus {
            if !waiting.isEmpty && !device.holding.load(ordering: .acquiring) {
                for io in waiting { inner.submit(io) }
                device.held.subtract(waiting.count, ordering: .releasing)
                waiting.removeAll()
            }
            let status = inner.poll()
            return waiting.isEmpty ? status : .pending
        }

        func close() { inner.close() }
    }
}
