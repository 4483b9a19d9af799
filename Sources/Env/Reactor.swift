#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import CLinux

/// What a poller found on one call.
public enum PollStatus: Sendable {
    /// Nothing to do.
    case idle
    /// Did work; the reactor keeps spinning.
    case busy
    /// Nothing done now, but work is in flight that no registered fd will announce
    /// (e.g. a device polled in memory): the reactor must not go to sleep.
    case pending
}

public struct PollerID: Hashable, Sendable {
    fileprivate let value: Int
}

/// What a reactor sleeps in instead of `epoll_wait`, when one is installed
/// (`Reactor.waiter`): an io_uring that carries the reactor's own I/O, so that one
/// `io_uring_enter` submits what the pass queued and waits for its completions. It must
/// also return when the reactor's epoll set has an fd ready (its wake eventfd: messages,
/// `wake()`; other registered fds) — then it calls `Reactor.pollWakeFDs()` — and when
/// `timeoutMs` (-1: none) has passed (the next timer).
public protocol ReactorWaiter: AnyObject {
    func wait(timeoutMs: Int32)
}

/// A reactor: one thread that runs its pollers in a loop, run-to-completion.
///
/// It spins while pollers find work; after `idleBeforeSleepNs` without work it sleeps
/// in epoll on its wake eventfd, the fds that pollers registered and the next timer,
/// so an idle reactor costs no CPU. Other threads talk to it only through `send`.
///
/// A reactor can also be stepped by hand (`runOnce`, `run(until:)`) on the calling
/// thread: the deterministic mode tests and offline tools use.
public final class Reactor: @unchecked Sendable {
    /// How a reactor waits for work.
    public enum Polling: Sendable, Equatable {
        /// It owns a core: it spins while work comes, and sleeps only after
        /// `idleBeforeSleepNs` without any (SPDK's polled mode, latency first).
        case spin
        /// It shares cores with other threads: a pass that finds nothing to do puts it to
        /// sleep at once, until a message, a registered fd (a FUSE channel, a device's
        /// completion eventfd) or a timer wakes it (SPDK's interrupt mode). Spinning on a
        /// core it does not own would take the core from the thread it waits for.
        case interrupt
    }

    public struct Configuration: Sendable {
        /// CPU to pin the reactor thread to (nil: not pinned).
        public var cpu: Int?
        /// How long a spinning reactor goes on without finding work before it sleeps.
        public var idleBeforeSleepNs: UInt64
        public var messageCapacity: Int
        public var polling: Polling

        /// `polling` defaults to `.spin` for a pinned reactor (the caller gave it a core)
        /// and `.interrupt` otherwise.
        public init(cpu: Int? = nil, idleBeforeSleepNs: UInt64 = 200_000, messageCapacity: Int = 4096,
                    polling: Polling? = nil) {
            self.cpu = cpu
            self.idleBeforeSleepNs = idleBeforeSleepNs
            self.messageCapacity = messageCapacity
            self.polling = polling ?? (cpu == nil ? .interrupt : .spin)
        }
    }

    public typealias Message = @Sendable () -> Void
    public typealias Poller = () -> PollStatus

    private struct TimedPoller {
        let id: Int
        let periodNs: UInt64
        var deadlineNs: UInt64
        let poll: Poller
    }

    public let name: String
    public let configuration: Configuration
    private let ring: MessageRing<Message>
    private let wakeEvent: EventFD
    private let epoll: Epoll
    private let sleeping = Atomic<Bool>(false)
    private let sleepCounter = Atomic<Int>(0)
    /// Where the reactor's time goes, for `load` (written by the thread that steps it,
    /// read by any: single writer, relaxed loads and stores, no read-modify-write).
    private let busyNs = Atomic<UInt64>(0)
    private let sleptNs = Atomic<UInt64>(0)
    private let passCounter = Atomic<UInt64>(0)
    /// When the sleep in progress began (0: awake), so that a sleeping reactor's load counts it.
    private let asleepSinceNs = Atomic<UInt64>(0)
    private let createdNs = MonotonicClock.nowNs()

    /// When the pass in progress began (monotonic ns): a timestamp for work the pass found
    /// waiting (a FUSE request received in it) without a clock read each. Reactor thread only.
    public private(set) var passStartNs: UInt64 = 0

    // Owned by the reactor's thread.
    private var pollers: ContiguousArray<(id: Int, poll: Poller)> = []
    /// Registered fds whose owner wants to hear when epoll reports them ready.
    private var readyHandlers: ContiguousArray<(fd: Int32, ready: () -> Void)> = []
    /// Replaces the epoll sleep (on the reactor's thread, or before it runs).
    public var waiter: (any ReactorWaiter)?
    /// An object that lives as long as the reactor and belongs to its thread: the
    /// reactor's io_uring when it has one (Sources/ReactorRing).
    public var attachment: AnyObject?
    /// Whether the loop runs (`run(until:)`), so a pass that finds nothing is followed by
    /// a sleep; false while a caller steps `runOnce` by hand.
    public private(set) var isLooping = false
    /// Whether the pass in progress is the last before the reactor sleeps (the one after it
    /// announced the sleep): what it queues is submitted by the waiter's sleep.
    public private(set) var isSleepPass = false
    private var timers: ContiguousArray<TimedPoller> = []
    private var nextPollerID = 0
    private var lastWorkNs: UInt64 = 0
    private var stopRequested = false
    private var thread: pthread_t?

    public init(name: String = "reactor", configuration: Configuration = Configuration()) throws(SystemError) {
        self.name = name
        self.configuration = configuration
        ring = MessageRing(capacity: configuration.messageCapacity)
        wakeEvent = try EventFD()
        epoll = try Epoll()
        try epoll.add(wakeEvent.fd)
        Self.registry.withLock { list in
            list.removeAll { $0.reactor == nil }
            list.append(WeakReactor(reactor: self))
        }
    }

    // MARK: - Identity

    private static let currentKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()

    /// The reactor running on the calling thread, if any.
    public static var current: Reactor? {
        guard let raw = pthread_getspecific(currentKey) else { return nil }
        return Unmanaged<Reactor>.fromOpaque(raw).takeUnretainedValue()
    }

    public var isCurrent: Bool { pthread_getspecific(Self.currentKey) == Unmanaged.passUnretained(self).toOpaque() }

    /// Stops the process when called off this reactor's thread: a thread rule ("call on the
    /// reactor") checked where it applies, as swift-nio's `preconditionInEventLoop` does.
    /// One thread-specific load; the message is built only on failure.
    @inline(__always)
    public func preconditionCurrent(_ function: StaticString = #function, file: StaticString = #fileID, line: UInt = #line) {
        precondition(isCurrent, "\(function) called off the thread of reactor '\(name)'", file: file, line: line)
    }

    private func becomeCurrent() {
        pthread_setspecific(Self.currentKey, Unmanaged.passUnretained(self).toOpaque())
    }

    /// Times the reactor went to sleep (a test hook for adaptive polling).
    public var sleepCount: Int { sleepCounter.load(ordering: .relaxed) }

    // MARK: - Load (any thread)

    /// Where a reactor's time went since it was made: passes that did work (`busyNs`),
    /// asleep in epoll (`sleptNs`), and the rest (passes that found nothing, spinning,
    /// or not stepped at all for a reactor stepped by hand).
    public struct Load: Sendable {
        public var name: String
        public var cpu: Int?
        public var polling: Polling
        public var elapsedNs: UInt64
        public var busyNs: UInt64
        public var sleptNs: UInt64
        public var passes: UInt64
        public var sleeps: UInt64

        /// Busy time over elapsed time since `earlier` (the same reactor, sampled before).
        public func busyShare(since earlier: Load? = nil) -> Double {
            let elapsed = elapsedNs &- (earlier?.elapsedNs ?? 0)
            guard elapsed > 0 else { return 0 }
            return min(1, Double(busyNs &- (earlier?.busyNs ?? 0)) / Double(elapsed))
        }
    }

    public var load: Load {
        let now = MonotonicClock.nowNs()
        let asleep = asleepSinceNs.load(ordering: .relaxed)
        var slept = sleptNs.load(ordering: .relaxed)
        if asleep != 0 && now > asleep { slept &+= now - asleep }
        return Load(name: name, cpu: configuration.cpu, polling: configuration.polling, elapsedNs: now &- createdNs,
                    busyNs: busyNs.load(ordering: .relaxed), sleptNs: slept, passes: passCounter.load(ordering: .relaxed),
                    sleeps: UInt64(sleepCounter.load(ordering: .relaxed)))
    }

    private struct WeakReactor: @unchecked Sendable {
        weak var reactor: Reactor?
    }

    private static let registry = Mutex<[WeakReactor]>([])

    /// Every reactor of the process that still exists, oldest first (`blobfs status`).
    public static var all: [Reactor] {
        registry.withLock { list in list.compactMap(\.reactor) }
    }

    // MARK: - Pollers (on the reactor's thread, or before it starts)

    @discardableResult
    public func registerPoller(_ poll: @escaping Poller) -> PollerID {
        nextPollerID += 1
        pollers.append((nextPollerID, poll))
        return PollerID(value: nextPollerID)
    }

    @discardableResult
    public func registerTimedPoller(periodNs: UInt64, _ poll: @escaping Poller) -> PollerID {
        nextPollerID += 1
        timers.append(TimedPoller(id: nextPollerID, periodNs: periodNs,
                                  deadlineNs: MonotonicClock.nowNs() + periodNs, poll: poll))
        return PollerID(value: nextPollerID)
    }

    public func unregisterPoller(_ id: PollerID) {
        pollers.removeAll { $0.id == id.value }
        timers.removeAll { $0.id == id.value }
    }

    /// An fd whose readiness should wake the sleeping reactor (edge-triggered). `ready`,
    /// if given, runs on the reactor each time epoll reports the fd (found when the reactor
    /// goes to sleep, not between busy passes).
    public func registerWakeFD(_ fd: Int32, ready: (() -> Void)? = nil) throws(SystemError) {
        try epoll.add(fd)
        if let ready { readyHandlers.append((fd, ready)) }
    }

    public func unregisterWakeFD(_ fd: Int32) {
        epoll.remove(fd)
        readyHandlers.removeAll { $0.fd == fd }
    }

    /// The epoll set's fd: a waiter watches it (readable when a registered fd fired).
    public var epollFD: Int32 { epoll.fd }

    /// Collects what the epoll set reported without waiting (a waiter saw it readable):
    /// drains the wake eventfd and tells the owners of the fds that fired.
    public func pollWakeFDs() {
        epoll.wait(timeoutMs: 0) { fd in fired(fd) }
    }

    private func fired(_ fd: Int32) {
        if fd == wakeEvent.fd {
            wakeEvent.drain()
            return
        }
        for handler in readyHandlers where handler.fd == fd { handler.ready() }
    }

    // MARK: - Messages (any thread)

    /// Queues a closure to run on the reactor; spins briefly while the ring is full.
    public func send(_ message: @escaping Message) {
        while !ring.push(message) { sched_yield() }
        if sleeping.load(ordering: .sequentiallyConsistent) { wakeEvent.signal() }
    }

    /// Wakes the reactor if it sleeps: for producers that hand it work through shared
    /// memory its pollers watch (an emulated device's doorbells), not through `send`.
    /// The producer's own stores (a completion entry, a doorbell) are ordered before the
    /// look at `sleeping` by a full fence: the reactor publishes `sleeping` and then looks
    /// at the same memory once more, so one of the two sides always sees the other.
    @inline(__always)
    public func wake() {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if sleeping.load(ordering: .sequentiallyConsistent) { wakeEvent.signal() }
    }

    /// Runs `body` on the reactor and waits for it (control path only; never from the reactor itself).
    public func call<T: Sendable>(_ body: @escaping @Sendable () -> T) -> T {
        precondition(!isCurrent, "Reactor.call from its own thread would deadlock")
        let box = CallBox<T>()
        send { box.finish(body()) }
        return box.wait()
    }

    // MARK: - The loop

    /// One pass over messages, pollers and due timers. Returns (did work, work pending).
    @discardableResult
    public func runOnce() -> (busy: Bool, pending: Bool) {
        passStartNs = MonotonicClock.nowNs()
        var busy = false
        var pending = false
        var drained = 0
        while drained < 128, let message = ring.pop() {
            message()
            drained += 1
        }
        if drained > 0 { busy = true }
        var index = 0
        while index < pollers.count {
            switch pollers[index].poll() {
            case .busy: busy = true
            case .pending: pending = true
            case .idle: break
            }
            index += 1
        }
        if !timers.isEmpty {
            let now = MonotonicClock.nowNs()
            index = 0
            while index < timers.count {
                if now >= timers[index].deadlineNs {
                    timers[index].deadlineNs = now + timers[index].periodNs
                    switch timers[index].poll() {
                    case .busy: busy = true
                    case .pending: pending = true
                    case .idle: break
                    }
                }
                index += 1
            }
        }
        return (busy, pending)
    }

    /// Runs the loop on the calling thread until `done()` holds, sleeping when idle.
    public func run(until done: () -> Bool) {
        let previous = pthread_getspecific(Self.currentKey)
        becomeCurrent()
        defer { pthread_setspecific(Self.currentKey, previous) }
        lastWorkNs = MonotonicClock.nowNs()
        let wasLooping = isLooping
        isLooping = true
        defer { isLooping = wasLooping }
        while !done() && !stopRequested {
            step()
        }
    }

    private func step() {
        let (busy, pending) = runOnce()
        // The pass's start (read by runOnce, also for `passStartNs`) and end: the busy share.
        let start = passStartNs
        let now = MonotonicClock.nowNs()
        passCounter.store(passCounter.load(ordering: .relaxed) &+ 1, ordering: .relaxed)
        if busy {
            busyNs.store(busyNs.load(ordering: .relaxed) &+ (now &- start), ordering: .relaxed)
            lastWorkNs = now
            return
        }
        switch configuration.polling {
        case .spin:
            if pending || now &- lastWorkNs < configuration.idleBeforeSleepNs { return }
        case .interrupt:
            // Work in flight that no fd announces (a device polled in memory, with no
            // interrupt): it must be polled, but let the threads sharing this core run first.
            if pending { sched_yield(); return }
        }
        sleep(now: now)
    }

    private func sleep(now: UInt64) {
        sleeping.store(true, ordering: .sequentiallyConsistent)
        // One more pass after announcing the sleep: work that arrived just before the
        // announcement (a doorbell written by a producer that saw us awake) is not missed.
        isSleepPass = true
        let (busy, pending) = runOnce()
        isSleepPass = false
        if !busy && !pending && ring.isEmpty {
            sleepCounter.add(1, ordering: .relaxed)
            let asleep = MonotonicClock.nowNs()
            asleepSinceNs.store(asleep, ordering: .relaxed)
            let timeoutMs = timeoutToNextTimerMs(now: now)
            if let waiter {
                waiter.wait(timeoutMs: timeoutMs)
            } else {
                epoll.wait(timeoutMs: timeoutMs) { fd in fired(fd) }
            }
            asleepSinceNs.store(0, ordering: .relaxed)
            sleptNs.store(sleptNs.load(ordering: .relaxed) &+ (MonotonicClock.nowNs() &- asleep), ordering: .relaxed)
        }
        sleeping.store(false, ordering: .sequentiallyConsistent)
        // lastWorkNs stays: a wake-up that finds no work (a timer) sleeps again at once
        // instead of spinning for another idle period.
    }

    private func timeoutToNextTimerMs(now: UInt64) -> Int32 {
        guard !timers.isEmpty else { return -1 }
        var next = UInt64.max
        for timer in timers { next = min(next, timer.deadlineNs) }  // no temporary array: this runs per sleep
        if next <= now { return 0 }
        return Int32(min((next - now + 999_999) / 1_000_000, UInt64(Int32.max)))
    }

    // MARK: - Thread mode

    /// Starts the reactor on a thread of its own, pinned if configured.
    public func start() throws(SystemError) {
        precondition(thread == nil, "reactor \(name) started twice")
        var handle = pthread_t()
        let context = Unmanaged.passRetained(self).toOpaque()
        let result = pthread_create(&handle, nil, { raw in
            let reactor = Unmanaged<Reactor>.fromOpaque(raw!).takeRetainedValue()
            reactor.threadMain()
            return nil
        }, context)
        guard result == 0 else {
            Unmanaged<Reactor>.fromOpaque(context).release()
            throw SystemError("pthread_create(\(name))", errno: result)
        }
        thread = handle
    }

    private func threadMain() {
        _ = clinux_set_thread_name(name)  // top -H and gdb show the reactor by name
        if let cpu = configuration.cpu {
            do { try NUMA.pinCurrentThread(toCPU: cpu) } catch {
                Log.logger("env.reactor").warning("\(name): cannot pin to CPU \(cpu): \(error)")
            }
        }
        run(until: { false })
    }

    /// Stops a started reactor and waits for its thread to end.
    public func stop() {
        guard let handle = thread else { return }
        send { [unowned self] in self.stopRequested = true }
        pthread_join(handle, nil)
        thread = nil
    }
}

/// A one-shot rendezvous between a reactor and a waiting control thread.
private final class CallBox<T: Sendable>: @unchecked Sendable {
    private var semaphore = sem_t()
    private var value: T?

    init() { sem_init(&semaphore, 0, 0) }
    deinit { sem_destroy(&semaphore) }

    func finish(_ value: T) {
        self.value = value
        sem_post(&semaphore)
    }

    func wait() -> T {
        while sem_wait(&semaphore) != 0 {}
        return value!
    }
}
