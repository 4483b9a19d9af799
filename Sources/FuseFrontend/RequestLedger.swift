import Env

/// The kernel's FUSE opcodes (include/uapi/linux/fuse.h, `enum fuse_opcode`; these
/// numbers are stable across protocol minors). Only what the ledger names and the
/// front end dispatches on.
public enum FuseOpcode: UInt32, Sendable {
    case lookup = 1, forget = 2, getattr = 3, setattr = 4, readlink = 5, symlink = 6, mknod = 8, mkdir = 9
    case unlink = 10, rmdir = 11, rename = 12, link = 13, open = 14, read = 15, write = 16, statfs = 17
    case release = 18, fsync = 20, setxattr = 21, getxattr = 22, listxattr = 23, removexattr = 24
    case flush = 25, `init` = 26, opendir = 27, readdir = 28, releasedir = 29, fsyncdir = 30
    case getlk = 31, setlk = 32, setlkw = 33, access = 34, create = 35, interrupt = 36, bmap = 37
    case destroy = 38, ioctl = 39, poll = 40, notifyReply = 41, batchForget = 42, fallocate = 43
    case readdirplus = 44, rename2 = 45, lseek = 46, copyFileRange = 47, setupMapping = 48
    case removeMapping = 49, syncfs = 50, tmpfile = 51, statx = 52

    /// The kernel's name without the FUSE_ prefix, as logs and `strace` show it.
    public var name: String {
        switch self {
        case .notifyReply: "NOTIFY_REPLY"
        case .batchForget: "BATCH_FORGET"
        case .copyFileRange: "COPY_FILE_RANGE"
        case .setupMapping: "SETUPMAPPING"
        case .removeMapping: "REMOVEMAPPING"
        default: "\(self)".uppercased()
        }
    }

    public static func name(_ raw: UInt32) -> String { FuseOpcode(rawValue: raw)?.name ?? "OPCODE_\(raw)" }
}

/// The requests the daemon has taken from the kernel and not answered yet: every request
/// must be answered exactly once, and one that is not leaves its caller in D state until
/// the daemon dies. The ledger makes such a bug loud: a request held longer than a limit
/// is logged with its opcode and node (once), a second answer to the same request is
/// logged, and at unmount the requests still held are reported.
///
/// One thread owns it (the reactor that takes and answers the requests). Slots are
/// reused through a free list, so taking and answering allocate nothing once the table
/// has grown to the peak number of requests in flight.
public final class RequestLedger {
    public struct Held: Sendable, CustomStringConvertible {
        public var opcode: UInt32
        public var nodeID: UInt64
        public var sinceNs: UInt64
        public var description: String { "\(FuseOpcode.name(opcode)) node \(nodeID)" }
        public func age(nowNs: UInt64) -> Double { Double(nowNs &- sinceNs) / 1e9 }
    }

    private struct Slot {
        var held: Held
        var inUse: Bool
        var warned: Bool
        /// Bumped each time the slot is reused, so a stale ticket is recognised.
        var generation: UInt32
    }

    /// A taken request's place in the ledger; answer it with `answer(_:)` exactly once.
    public struct Ticket: Sendable, Equatable {
        fileprivate let index: Int32
        fileprivate let generation: UInt32
        /// Not in the ledger (a request the front end does not track, e.g. in tests).
        public static let none = Ticket(index: -1, generation: 0)
    }

    private var slots: [Slot] = []
    private var free: [Int32] = []
    public private(set) var count = 0
    /// Answers given to a request already answered (or never taken): always a bug.
    public private(set) var doubleAnswers = 0
    private let log = Log.logger("fuse")

    public init(capacity: Int = 256) {
        slots.reserveCapacity(capacity)
        free.reserveCapacity(capacity)
    }

    /// Records a request taken from the kernel.
    public func take(opcode: UInt32, nodeID: UInt64, nowNs: UInt64 = MonotonicClock.nowNs()) -> Ticket {
        let held = Held(opcode: opcode, nodeID: nodeID, sinceNs: nowNs)
        count += 1
        if let index = free.popLast() {
            let generation = slots[Int(index)].generation &+ 1
            slots[Int(index)] = Slot(held: held, inUse: true, warned: false, generation: generation)
            return Ticket(index: index, generation: generation)
        }
        slots.append(Slot(held: held, inUse: true, warned: false, generation: 0))
        return Ticket(index: Int32(slots.count - 1), generation: 0)
    }

    /// The request of `ticket` was answered. A second answer is counted and logged.
    public func answer(_ ticket: Ticket) {
        guard ticket.index >= 0 else { return }
        let index = Int(ticket.index)
        guard index < slots.count, slots[index].inUse, slots[index].generation == ticket.generation else {
            doubleAnswers += 1
            log.error("a FUSE request was answered twice (or was never taken); this is a bug")
            return
        }
        if slots[index].warned {
            let held = slots[index].held
            log.warning("\(held) answered after \(String(format1: held.age(nowNs: MonotonicClock.nowNs()))) s")
        }
        slots[index].inUse = false
        free.append(ticket.index)
        count -= 1
    }

    /// Logs each request held longer than `limitNs` (once per request) and returns how
    /// many are over the limit now.
    @discardableResult
    public func warnAboutOverdue(limitNs: UInt64, nowNs: UInt64 = MonotonicClock.nowNs()) -> Int {
        guard count > 0 else { return 0 }
        var overdue = 0
        for index in slots.indices where slots[index].inUse && nowNs &- slots[index].held.sinceNs > limitNs {
            overdue += 1
            guard !slots[index].warned else { continue }
            slots[index].warned = true
            let held = slots[index].held
            log.warning("\(held) unanswered for \(String(format1: held.age(nowNs: nowNs))) s (\(count) requests held)")
        }
        return overdue
    }

    /// The requests still held, oldest first.
    public func outstanding() -> [Held] {
        slots.filter(\.inUse).map(\.held).sorted { $0.sinceNs < $1.sinceNs }
    }

    /// The unmount report: nil when every request was answered exactly once.
    public func unmountReport(nowNs: UInt64 = MonotonicClock.nowNs()) -> String? {
        let held = outstanding()
        guard !held.isEmpty || doubleAnswers > 0 else { return nil }
        var parts: [String] = []
        if !held.isEmpty {
            let list = held.prefix(16).map { "\($0) (\(String(format1: $0.age(nowNs: nowNs))) s)" }.joined(separator: ", ")
            parts.append("\(held.count) FUSE requests never answered: \(list)\(held.count > 16 ? ", ..." : "")")
        }
        if doubleAnswers > 0 { parts.append("\(doubleAnswers) answered twice") }
        return parts.joined(separator: "; ")
    }
}

extension String {
    /// One decimal place, without Foundation.
    init(format1 value: Double) {
        let tenths = Int((value * 10).rounded())
        self = "\(tenths / 10).\(abs(tenths % 10))"
    }

    /// Two decimal places, without Foundation.
    init(format2 value: Double) {
        let hundredths = Int((value * 100).rounded())
        let rest = abs(hundredths % 100)
        self = "\(hundredths / 100).\(rest < 10 ? "0" : "")\(rest)"
    }
}
