#if canImport(Glibc)
import Glibc
#endif
import CURing
import Env
import Synchronization

/// What gets a reactor ring's completions: each consumer (a bdev channel, a FUSE
/// transport) is given a tag, puts it in the low bits of its entries' user data, and gets
/// back the rest of the user data with the result.
public protocol ReactorRingConsumer: AnyObject {
    /// `payload` is the user data the entry was given (its low `ReactorRing.tagBits` bits
    /// clear); runs on the reactor, from the ring's poller.
    func ringCompleted(payload: UInt64, result: Int32)
}

/// One io_uring for everything a reactor does through io_uring: the FUSE queues it
/// serves and its channels to an image file or block device. The reactor sleeps in it
/// (`ReactorWaiter`): one `io_uring_enter` submits what the last passes queued (a device
/// read, the replies of FUSE requests) and waits for the next completion of any of them,
/// so a request costs no epoll or eventfd hop. The reactor's epoll set (its wake eventfd,
/// /dev/fuse, other fds) is watched by a poll request in the same ring.
///
/// A reactor that loops in interrupt mode leaves its queued entries to its sleep; one that
/// spins, or is stepped by hand, submits them at the end of each pass of the ring's poller.
///
/// Code that waits for its device requests by polling their channel in a loop (a drain
/// before unmount, an allocation waiting for released clusters) calls `pollByHand`: it
/// submits, and hands out the completions of consumers that asked for it (bdev channels,
/// whose completion only queues the request in its channel); the others (a FUSE request,
/// the epoll poll) wait in `deferred` for the poller's next pass, so nothing runs nested
/// inside code that did not expect it.
///
/// Entries are 128 bytes (FUSE's commands need `IORING_SETUP_SQE128`); `prepare`-style
/// helpers of liburing fill the first 64 of them, which is all an ordinary read needs.
public final class ReactorRing: ReactorWaiter, ReactorRingConsumer {
    /// Consumers put their tag in these low bits of the user data (a Swift object's
    /// address has them clear: objects are 16-byte aligned).
    public static let tagBits: UInt64 = 4
    public static let tagMask: UInt64 = (1 << tagBits) - 1
    static let submissionEntries: UInt32 = 1024
    static let completionEntries: UInt32 = 8192
    static let reapBatch: UInt32 = 64
    private static let epollTag: UInt64 = 1

    /// Whether reactors get a ring when a channel or transport first asks (`ring(of:)`).
    /// Off by default: a process (blobfs mount) turns it on before it makes channels.
    public static let enabled = Atomic<Bool>(false)

    private unowned(unsafe) let reactor: Reactor
    /// The ring, for consumers' `io_uring_prep_*` calls: use `nextEntry()` to get entries.
    public let ring: UnsafeMutablePointer<io_uring>
    private let cqes: UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>
    /// Indexed by tag; slot 0 is unused (user data 0), slot 1 is the ring itself (epoll).
    private var consumers: ContiguousArray<(any ReactorRingConsumer)?>
    /// By tag: whether the consumer's completions may be handed out by `pollByHand`.
    private var completesInHandPolls: ContiguousArray<Bool>
    private struct Completion {
        var userData: UInt64
        var result: Int32
    }
    /// Completions copied out of the ring before they are handed out (the ring's slots
    /// are given back first, so a hand poll inside a handler never sees them again).
    private let batch: UnsafeMutablePointer<Completion>
    private let handBatch: UnsafeMutablePointer<Completion>
    /// Completions a hand poll reaped for consumers that do not take them there.
    private var deferred: ContiguousArray<Completion> = []
    /// Entries queued and not yet taken by the kernel.
    public var queuedEntries: Int { Int(io_uring_sq_ready(ring)) }
    private var epollArmed = false
    private var heldOnePass = false

    /// The reactor's ring: the one attached to it, else a new one when rings are enabled,
    /// else nil (the caller keeps a ring of its own). Call on the reactor's thread, or
    /// before the reactor runs.
    public static func ring(of reactor: Reactor) -> ReactorRing? {
        if let ring = reactor.attachment as? ReactorRing { return ring }
        guard enabled.load(ordering: .relaxed) else { return nil }
        return try? attach(to: reactor)
    }

    /// Gives `reactor` a ring (whatever `enabled` says): it sleeps in it from now on.
    /// Call on the reactor's thread, or before it runs, before it has channels.
    @discardableResult
    public static func attach(to reactor: Reactor) throws(SystemError) -> ReactorRing {
        if let ring = reactor.attachment as? ReactorRing { return ring }
        precondition(reactor.attachment == nil && reactor.waiter == nil, "reactor \(reactor.name) has another attachment or waiter")
        let ring = try ReactorRing(reactor: reactor)
        reactor.attachment = ring
        reactor.waiter = ring
        reactor.registerPoller { [unowned(unsafe) ring] in ring.poll() }
        return ring
    }

    private init(reactor: Reactor) throws(SystemError) {
        self.reactor = reactor
        ring = .allocate(capacity: 1)
        cqes = .allocate(capacity: Int(Self.reapBatch))
        batch = .allocate(capacity: Int(Self.reapBatch))
        handBatch = .allocate(capacity: Int(Self.reapBatch))
        var params = io_uring_params()
        params.flags = UInt32(IORING_SETUP_SQE128) | UInt32(IORING_SETUP_SUBMIT_ALL) | UInt32(IORING_SETUP_CQSIZE)
            | UInt32(IORING_SETUP_COOP_TASKRUN) | UInt32(IORING_SETUP_TASKRUN_FLAG)
        params.cq_entries = Self.completionEntries
        var result = io_uring_queue_init_params(Self.submissionEntries, ring, &params)
        if result == -EINVAL {
            // A kernel without COOP_TASKRUN (before 5.19): without it, then.
            params = io_uring_params()
            params.flags = UInt32(IORING_SETUP_SQE128) | UInt32(IORING_SETUP_SUBMIT_ALL) | UInt32(IORING_SETUP_CQSIZE)
            params.cq_entries = Self.completionEntries
            result = io_uring_queue_init_params(Self.submissionEntries, ring, &params)
        }
        guard result == 0 else {
            ring.deallocate()
            cqes.deallocate()
            batch.deallocate()
            handBatch.deallocate()
            throw SystemError("io_uring_queue_init (reactor ring, SQE128)", errno: -result)
        }
        consumers = ContiguousArray(repeating: nil, count: Int(Self.tagMask) + 1)
        completesInHandPolls = ContiguousArray(repeating: false, count: Int(Self.tagMask) + 1)
        consumers[Int(Self.epollTag)] = self
        // Bounded by the entries in flight; reserved so a hand poll does not allocate.
        deferred.reserveCapacity(Int(Self.completionEntries))
    }

    deinit {
        io_uring_queue_exit(ring)
        ring.deallocate()
        cqes.deallocate()
        batch.deallocate()
        handBatch.deallocate()
    }

    /// A tag for `consumer`'s entries, or nil when all are taken (the consumer then keeps
    /// a ring of its own). Held unowned: `remove` it before the consumer goes.
    public func add(_ consumer: any ReactorRingConsumer, completesInHandPolls: Bool = false) -> UInt64? {
        guard let tag = consumers.indices.first(where: { $0 > 0 && consumers[$0] == nil }) else { return nil }
        consumers[tag] = consumer
        self.completesInHandPolls[tag] = completesInHandPolls
        return UInt64(tag)
    }

    /// Completions still to come for `tag` are dropped.
    public func remove(tag: UInt64) {
        precondition(tag != Self.epollTag && tag <= Self.tagMask, "reactor ring: tag \(tag) is not a consumer's")
        consumers[Int(tag)] = nil
    }

    /// The next submission entry (nil when the queue is full: submit, or wait for the
    /// next pass), counted as queued.
    @inline(__always)
    public func nextEntry() -> UnsafeMutablePointer<io_uring_sqe>? {
        io_uring_get_sqe(ring)
    }

    /// The next submission entry for a device request, after submitting what is already
    /// queued (earlier device requests, FUSE replies): a burst of requests then reaches
    /// the device one by one, as fio submits, not as one batch at the end of the pass.
    /// See `URingChannel.prepare` for why.
    @inline(__always)
    public func nextEntrySubmittingQueued() -> UnsafeMutablePointer<io_uring_sqe>? {
        if queuedEntries > 0 { submitNow() }
        return io_uring_get_sqe(ring)
    }

    /// Submits what is queued now (registrations at start, a full submission queue).
    public func submitNow() {
        guard queuedEntries > 0 else { return }
        report(io_uring_submit(ring))
    }

    private func report(_ result: Int32) {
        guard result < 0, result != -EINTR, result != -EAGAIN, result != -EBUSY, result != -ETIME else { return }
        Log.logger("env.ring").error("io_uring_enter: \(String(cString: strerror(-result)))")
    }

    /// The reactor's poller: reaps and hands out completions, and submits what is queued
    /// unless the reactor's sleep will (see the type's comment).
    func poll() -> PollStatus {
        var reaped = false
        if !deferred.isEmpty {
            var index = 0
            while index < deferred.count {  // a handler's hand poll may add more
                deliver(deferred[index])
                index += 1
            }
            deferred.removeAll(keepingCapacity: true)
            reaped = true
        }
        while true {
            let count = take(into: batch)
            if count == 0 { break }
            for index in 0..<count { deliver(batch[index]) }
            reaped = true
        }
        guard queuedEntries > 0 else {
            heldOnePass = false
            return reaped ? .busy : .idle
        }
        // Entries queued: a pass that reaped keeps the reactor going (the next pass sees
        // them); otherwise the sleep submits them, unless the reactor will not sleep soon.
        if reaped { return .busy }
        let sleepSubmits = reactor.isLooping && reactor.configuration.polling == .interrupt
        if sleepSubmits && (reactor.isSleepPass || !heldOnePass) {
            heldOnePass = true
            return .idle
        }
        heldOnePass = false
        submitNow()
        return .busy
    }

    /// For code that waits for its channel's requests in a loop on the reactor's thread:
    /// submits what is queued and reaps; completions of consumers that do not take them
    /// here wait for the poller's next pass.
    public func pollByHand() {
        reactor.preconditionCurrent()
        submitNow()
        while true {
            let count = take(into: handBatch)
            if count == 0 { return }
            for index in 0..<count {
                let completion = handBatch[index]
                if completesInHandPolls[Int(completion.userData & Self.tagMask)] {
                    deliver(completion)
                } else {
                    deferred.append(completion)
                }
            }
        }
    }

    /// Copies up to a batch of completions out of the ring and gives their slots back.
    @inline(__always)
    private func take(into target: UnsafeMutablePointer<Completion>) -> Int {
        let count = Int(io_uring_peek_batch_cqe(ring, cqes, Self.reapBatch))
        for index in 0..<count {
            let cqe = cqes[index]!
            target[index] = Completion(userData: cqe.pointee.user_data, result: cqe.pointee.res)
        }
        if count > 0 { io_uring_cq_advance(ring, UInt32(count)) }
        return count
    }

    @inline(__always)
    private func deliver(_ completion: Completion) {
        guard let consumer = consumers[Int(completion.userData & Self.tagMask)] else { return }
        consumer.ringCompleted(payload: completion.userData & ~Self.tagMask, result: completion.result)
    }

    /// The reactor's sleep: submits what is queued and waits for one completion (or the
    /// epoll set, or the timeout) in one system call.
    public func wait(timeoutMs: Int32) {
        reactor.preconditionCurrent()
        heldOnePass = false
        armEpollPoll()
        if !deferred.isEmpty {
            // A hand poll after this pass's poller reaped work for it: no sleep.
            submitNow()
            return
        }
        var cqe: UnsafeMutablePointer<io_uring_cqe>?
        let result: Int32
        if timeoutMs < 0 {
            result = io_uring_submit_and_wait(ring, 1)
        } else {
            var timeout = __kernel_timespec(tv_sec: Int64(timeoutMs / 1000), tv_nsec: Int64(timeoutMs % 1000) * 1_000_000)
            result = io_uring_submit_and_wait_timeout(ring, &cqe, 1, &timeout, nil)
        }
        report(result)
    }

    /// The epoll poll completed: the set has a ready fd. Collected now, and the poll armed
    /// again at once, so a reactor busy for a long time still hears of fds (a /dev/fuse
    /// request, a message) from its ring's completions, without going to sleep first.
    public func ringCompleted(payload: UInt64, result: Int32) {
        epollArmed = false
        reactor.pollWakeFDs()
        armEpollPoll()
    }

    private func armEpollPoll() {
        guard !epollArmed, let sqe = nextEntry() else { return }
        io_uring_prep_poll_add(sqe, reactor.epollFD, UInt32(POLLIN))
        io_uring_sqe_set_data64(sqe, Self.epollTag)
        epollArmed = true
    }
}
