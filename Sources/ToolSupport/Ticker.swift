#if canImport(Glibc)
import Glibc
#endif
import Env
import Synchronization

/// A phase without a count (loading, verifying) on stderr when it is a terminal: its
/// name and the seconds so far, redrawn five times a second by a thread of its own;
/// `finish()` ends the line.
public final class Ticker: @unchecked Sendable {
    private let label: String
    private let stopped = Atomic<Bool>(false)
    private var thread: pthread_t?
    private let startNs = MonotonicClock.nowNs()

    public init(_ label: String) {
        self.label = label
        guard isatty(2) == 1 else { return }
        var handle = pthread_t()
        let context = Unmanaged.passRetained(self).toOpaque()
        if pthread_create(&handle, nil, { raw in
            let ticker = Unmanaged<Ticker>.fromOpaque(raw!).takeRetainedValue()
            while !ticker.stopped.load(ordering: .acquiring) {
                ticker.draw()
                usleep(200_000)
            }
            return nil
        }, context) == 0 {
            thread = handle
        } else {
            Unmanaged<Ticker>.fromOpaque(context).release()
        }
    }

    private func draw(final: Bool = false) {
        let tenths = (MonotonicClock.nowNs() - startNs) / 100_000_000
        let line = "\r\(label) ... \(tenths / 10).\(tenths % 10) s" + (final ? ", done\n" : "")
        _ = line.withCString { write(2, $0, strlen($0)) }
    }

    public func finish() {
        guard let thread else { return }
        stopped.store(true, ordering: .releasing)
        pthread_join(thread, nil)
        self.thread = nil
        draw(final: true)
    }

    deinit { finish() }
}
