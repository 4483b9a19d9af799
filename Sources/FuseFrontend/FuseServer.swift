#if canImport(Glibc)
import Glibc
#endif
import BlobFileSystem
import CFuse
import Env
import ReactorRing
import Synchronization

/// Options of the FUSE front end (the `-o` options blobfs handles itself; the rest go
/// to the kernel mount: allow_other, default_permissions, ro, ...).
public struct FuseOptions: Sendable {
    public var entryTimeout: Double = 1
    public var attributeTimeout: Double = 1
    /// The kernel's page cache absorbs buffered writes (FUSE_WRITEBACK_CACHE); on by
    /// default, `no_writeback_cache` turns it off.
    public var writebackCache = true
    /// Under the writeback cache, files opened for writing while less than this is free
    /// write through (see `FuseSession.openFlags`).
    public var writeThroughBelowBytes: UInt64 = 1 << 30
    /// Every open bypasses the page cache (as if O_DIRECT).
    public var directIO = false
    public var maxWrite: UInt32 = 1 << 20
    /// Requests the kernel may keep in flight in the background (async direct I/O,
    /// readahead, writeback): the kernel's default of 12 would cap a queue depth of 32.
    public var maxBackground = 128
    public enum Transport: String, Sendable {
        /// FUSE over io_uring when the kernel offers it, else /dev/fuse.
        case auto
        case ioURing = "io_uring"
        case devFuse = "dev_fuse"
    }
    public var transport = Transport.auto
    /// A request held longer than this is logged with its opcode and node (once).
    public var warnUnansweredSeconds: Double = 30
    /// Freed clusters are unmapped on the device as their release becomes durable
    /// (`discard`; `nodiscard`, the default, leaves it to fstrim).
    public var discard = false
    /// Per-operation counts and latency histograms (`blobfs stats`); `no_stats` turns them
    /// off (no clock read per request).
    public var statistics = true
    /// One io_uring per reactor for the FUSE queues and the image's I/O (`ReactorRing`);
    /// `no_reactor_ring` gives each its own ring, woken through epoll (the earlier path).
    public var reactorRing = true
    /// Blobs whose metadata (inodes, directory entries, extents) the daemon keeps in memory
    /// at most (`metadata_cache=N`; 0: no limit): clean ones nobody has open are let go
    /// past it and read again when next used.
    public var metadataCache = 65_536
    public var mountOptions: [String] = []
    public init() {}

    /// Splits a comma-separated `-o` list into ours and the kernel's.
    public mutating func parse(_ list: String) throws(FSError) {
        for option in list.split(separator: ",").map(String.init) where !option.isEmpty && !option.hasPrefix("x-") {
            let parts = option.split(separator: "=", maxSplits: 1).map(String.init)
            let value = parts.count == 2 ? parts[1] : nil
            func number() throws(FSError) -> Double {
                guard let value, let number = Double(value), number >= 0 else {
                    throw FSError(EINVAL, "mount option \(option): expected a number of seconds")
                }
                return number
            }
            switch parts[0] {
            case "entry_timeout": entryTimeout = try number()
            case "attr_timeout": attributeTimeout = try number()
            case "warn_unanswered":
                warnUnansweredSeconds = try number()
                guard warnUnansweredSeconds >= 1 else { throw FSError(EINVAL, "mount option \(option): at least 1 second") }
            case "writeback_cache": writebackCache = true
            case "no_writeback_cache": writebackCache = false
            case "direct_io": directIO = true
            case "discard": discard = true
            case "nodiscard": discard = false
            case "stats": statistics = true
            case "no_stats": statistics = false
            case "reactor_ring": reactorRing = true
            case "no_reactor_ring": reactorRing = false
            case "fuse_transport":
                guard let value, let chosen = Transport(rawValue: value) else {
                    throw FSError(EINVAL, "mount option \(option): expected auto, io_uring or dev_fuse")
                }
                transport = chosen
            case "metadata_cache":
                guard let value, let count = Int(value), count >= 0, count == 0 || count >= 1024 else {
                    throw FSError(EINVAL, "mount option \(option): expected a number of blobs, 0 (no limit) or at least 1024")
                }
                metadataCache = count
            case "max_write":
                guard let value, let bytes = UInt32(value), bytes >= 4096, bytes <= 1 << 20 else {
                    throw FSError(EINVAL, "mount option \(option): expected 4096...1048576")
                }
                maxWrite = bytes
            case "allow_other", "allow_root", "default_permissions", "ro", "rw", "suid", "nosuid", "dev", "nodev",
                 "exec", "noexec", "atime", "noatime", "relatime", "sync", "async", "dirsync", "auto_unmount":
                mountOptions.append(option)
            case "fsname", "subtype":
                mountOptions.append(option)
            case "nofail", "_netdev", "auto", "noauto", "user", "nouser", "users", "defaults":
                continue  // fstab-only words mount(8) passes along
            default:
                throw FSError(EINVAL, "unknown mount option '\(option)'")
            }
        }
    }
}

/// A mounted blobfs: libfuse3 mounts and unmounts it (fusermount3, mount options) and
/// handles SIGINT/SIGTERM/SIGHUP; the protocol itself is ours (`FuseSession`), served on
/// the file system's reactor over FUSE over io_uring when the kernel offers it, and over
/// `/dev/fuse` always (INIT, FORGET and INTERRUPT come that way, and every request when
/// io_uring is off).
public final class FuseServer: @unchecked Sendable {
    let service: FileSystemService
    let options: FuseOptions
    private var session: OpaquePointer?
    public let mountpoint: String
    /// Reactor-owned once serving starts.
    private var fuse: FuseSession?
    private var devFuse: DevFuseChannel?
    private var ring: URingFuseChannel?
    /// Set on the reactor; read by the thread that waits in `run`.
    private let state = Mutex<(initialized: Bool, ended: Bool, transport: String, writeback: Bool)>((false, false, "", false))
    /// Heap allocations so far in the process (the malloc interposer's count), when the
    /// daemon counts them: every 5 s the log gets allocations per request.
    public var allocationCount: (@Sendable () -> Int)?
    private var allocationWatch: (allocations: Int, requests: [UInt64])?

    /// Slots of the /dev/fuse transport: the requests it can hold at once.
    static let devFuseSlots = 64

    public init(service: FileSystemService, mountpoint: String, options: FuseOptions) throws(FSError) {
        self.service = service
        self.options = options
        self.mountpoint = mountpoint
        let arguments = ["blobfs", "-o", (["fsname=blobfs", "subtype=blobfs"] + options.mountOptions).joined(separator: ",")]
        var cArguments = arguments.map { strdup($0) }
        defer { cArguments.forEach { free($0) } }
        var args = fuse_args(argc: Int32(cArguments.count), argv: nil, allocated: 0)
        var operations = fuse_lowlevel_ops()  // unused: requests never reach libfuse
        session = cArguments.withUnsafeMutableBufferPointer { buffer in
            args.argv = buffer.baseAddress
            return fuse_session_new(&args, &operations, MemoryLayout<fuse_lowlevel_ops>.size, nil)
        }
        fuse_opt_free_args(&args)
        guard let session else { throw FSError(EINVAL, "FUSE session could not be created (see the message above)") }
        guard fuse_session_mount(session, mountpoint) == 0 else {
            fuse_session_destroy(session)
            self.session = nil
            throw FSError(EIO, "cannot mount on \(mountpoint) (is /dev/fuse usable and the directory empty?)")
        }
    }

    /// Serves until unmounted or signalled (SIGINT, SIGTERM, SIGHUP), then unmounts.
    /// `onReady` gets a line naming the transport once the kernel's INIT is answered and
    /// the transport is set up (true), or why the mount never became live (false).
    /// Returns 0 on a clean end, 3 when requests were left unanswered (logged), 1 when
    /// serving could not start.
    public func run(onReady: (String, Bool) -> Void) -> Int32 {
        guard let session else { return 1 }
        guard fuse_set_signal_handlers(session) == 0 else { return 1 }
        defer {
            fuse_remove_signal_handlers(session)
            fuse_session_unmount(session)
        }
        let reactor = service.blobService.reactor
        let fd = fuse_session_fd(session)
        let failure: String? = reactor.call { [self] in startServing(fd: fd, reactor: reactor) }
        if let failure {
            Log.logger("fuse").error("\(failure)")
            return 1
        }
        let readyDeadline = MonotonicClock.nowNs() + 10_000_000_000
        var announced = false
        while fuse_session_exited(session) == 0 {
            let now = state.withLock { $0 }
            if now.ended { break }
            if !announced && (now.initialized || MonotonicClock.nowNs() > readyDeadline) {
                announced = true
                var line = now.initialized ? now.transport : "the kernel has not sent INIT yet"
                if now.writeback { line += "; writeback cache, \(holdRoomForWriteBack() >> 20) MiB held for it" }
                onReady(line, true)
            }
            usleep(20_000)
        }
        if !announced { onReady("the FUSE session ended before the kernel's INIT", false) }
        reactor.call { [self] in
            devFuse?.stop()
            ring?.stop()
        }
        // Requests whose device I/O is still completing are answered (into a closed
        // connection) within moments; any still held after that were never answered.
        var report: String? = nil
        for _ in 0..<100 {
            report = reactor.call { [self] in fuse?.ledger.unmountReport() }
            if report == nil { break }
            usleep(20_000)
        }
        reactor.call { [self] in stopServing() }
        if let report {
            Log.logger("fuse").error("unmount: \(report)")
            return 3
        }
        return 0
    }

    /// On the reactor: the session, the /dev/fuse transport, and once INIT is answered
    /// the io_uring transport when the kernel offers it and the options allow.
    private func startServing(fd: Int32, reactor: Reactor) -> String? {
        reactor.preconditionCurrent()
        let session = FuseSession(service: service, options: options)
        fuse = session
        let channel: DevFuseChannel
        do {
            channel = try DevFuseChannel(fd: fd, slotCount: Self.devFuseSlots, maxWrite: Int(options.maxWrite), reactor: reactor)
            try channel.start(session) { [unowned self] in state.withLock { $0.ended = true } }
        } catch { return "cannot serve /dev/fuse: \(error)" }
        // With the reactor's ring (made now if mounts use one), epoll's word reaches a busy reactor too.
        channel.readsOnlyWhenReady = ReactorRing.ring(of: reactor) != nil
        devFuse = channel
        session.onInitialized = { [unowned self, unowned session] in
            var transport = "/dev/fuse (\(Self.devFuseSlots) requests in flight)"
            if options.transport != .devFuse && session.kernelOffersURing {
                do {
                    let ring = try URingFuseChannel(fd: fd, maxWrite: session.maxWrite, reactor: reactor)
                    try ring.start(session)
                    self.ring = ring
                    channel.readsOnlyWhenReady = true
                    let sharing = ring.sharesReactorRing ? ", sharing the reactor's io_uring with the device" : ""
                    transport = "FUSE over io_uring, \(ring.queueCount) queues of \(ring.entriesPerQueue) on one reactor\(sharing)"
                } catch {
                    Log.logger("fuse").warning("FUSE over io_uring unavailable (\(error)); serving /dev/fuse")
                }
            } else if options.transport == .ioURing {
                let hint = "echo Y > /sys/module/fuse/parameters/enable_uring"
                Log.logger("fuse").warning("FUSE over io_uring asked for but not offered by the kernel (\(hint)); serving /dev/fuse")
            }
            Log.logger("fuse").info("transport: \(transport)")
            state.withLock {
                $0.initialized = true
                $0.transport = transport
                $0.writeback = session.writebackCache
            }
        }
        if let allocationCount {
            allocationPoller = reactor.registerTimedPoller(periodNs: 5_000_000_000) { [unowned self, unowned session] in
                reportAllocations(session, allocationCount())
                return .idle
            }
        }
        let limitNs = UInt64(options.warnUnansweredSeconds * 1e9)
        watchPoller = reactor.registerTimedPoller(periodNs: 1_000_000_000) { [unowned session] in
            session.ledger.warnAboutOverdue(limitNs: limitNs)
            return .idle
        }
        return nil
    }

    private var watchPoller: PollerID?
    private var allocationPoller: PollerID?

    /// Logs the allocations per request since the last report, and the requests by kind.
    private func reportAllocations(_ session: FuseSession, _ allocations: Int) {
        defer { allocationWatch = (allocations, session.requestCounts) }
        guard let last = allocationWatch else { return }
        var requests: UInt64 = 0
        var kinds: [String] = []
        for opcode in session.requestCounts.indices {
            let count = session.requestCounts[opcode] - last.requests[opcode]
            guard count > 0 else { continue }
            requests += count
            kinds.append("\(FuseOpcode.name(UInt32(opcode))) \(count)")
        }
        guard requests > 0 else { return }
        let made = allocations - last.allocations
        let perRequest = Double(made) / Double(requests)
        Log.logger("fuse").info("allocations: \(made) in 5 s, \(String(format2: perRequest)) per request (\(requests) requests: \(kinds.joined(separator: ", ")))")
    }

    /// The writeback cache: bounds the dirty bytes the kernel may hold for this mount (the
    /// bdi's max_bytes, where we may write it) and holds that much free space for their
    /// write-back, so bytes write() accepted always find room. Returns the bytes held.
    private func holdRoomForWriteBack() -> UInt64 {
        let reactor = service.blobService.reactor
        let capacity = reactor.call { [service] in service.fileSystemOnReactor.statistics().blocks * service.fileSystemOnReactor.statistics().blockSize }
        var bytes = min(64 << 20, max(capacity / 8, 1 << 20))
        let limited = Self.backingDevice(of: mountpoint).map { Self.write("\(bytes)", to: "/sys/class/bdi/\($0)/max_bytes") } ?? false
        if !limited {
            // Not ours to set: what the kernel allows a FUSE mount by default (max_ratio
            // percent of the dirty threshold, dirty_ratio percent of available memory).
            bytes = max(bytes, Self.defaultDirtyLimitBytes(Self.backingDevice(of: mountpoint)))
        }
        let held = bytes
        reactor.call { [service] in service.fileSystemOnReactor.writebackReserveBytes = held }
        Log.logger("fuse").info("writeback cache: \(bytes >> 20) MiB of dirty pages at most\(limited ? "" : " (estimated)"), as much space held for them")
        return bytes
    }

    /// "MAJOR:MINOR" of the mount at `path` (its bdi's name), from /proc/self/mountinfo.
    static func backingDevice(of path: String) -> String? {
        guard let file = fopen("/proc/self/mountinfo", "r") else { return nil }
        defer { fclose(file) }
        var line: UnsafeMutablePointer<CChar>?
        var capacity = 0
        defer { free(line) }
        var found: String?
        while getline(&line, &capacity, file) > 0 {
            let fields = String(cString: line!).split(separator: " ")
            if fields.count > 4, fields[4] == path { found = String(fields[2]) }  // the last mount there wins
        }
        return found
    }

    static func write(_ text: String, to path: String) -> Bool {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return text.withCString { Glibc.write(fd, $0, strlen($0)) } == text.utf8.count
    }

    static func defaultDirtyLimitBytes(_ device: String?) -> UInt64 {
        func number(_ path: String) -> UInt64? {
            guard let file = fopen(path, "r") else { return nil }
            defer { fclose(file) }
            var line = [CChar](repeating: 0, count: 64)
            guard fgets(&line, Int32(line.count), file) != nil else { return nil }
            return UInt64(String(cString: line).split(separator: "\n").first ?? "")
        }
        var available: UInt64 = 0
        if let file = fopen("/proc/meminfo", "r") {
            var line = [CChar](repeating: 0, count: 256)
            while fgets(&line, Int32(line.count), file) != nil {
                let text = String(cString: line)
                if text.hasPrefix("MemAvailable:"), let kib = UInt64(text.split(separator: " ")[1]) { available = kib << 10 }
            }
            fclose(file)
        }
        let threshold = number("/proc/sys/vm/dirty_bytes").flatMap { $0 > 0 ? $0 : nil }
            ?? available / 100 * (number("/proc/sys/vm/dirty_ratio") ?? 20)
        let ratio = device.flatMap { number("/sys/class/bdi/\($0)/max_ratio") } ?? 1
        return threshold / 100 * ratio
    }

    /// On the reactor, after the transports stopped: lets go of them.
    private func stopServing() {
        service.blobService.reactor.preconditionCurrent()
        if let watchPoller { service.blobService.reactor.unregisterPoller(watchPoller) }
        watchPoller = nil
        if let allocationPoller { service.blobService.reactor.unregisterPoller(allocationPoller) }
        allocationPoller = nil
        ring?.close()
        ring = nil
        devFuse = nil
        fuse = nil
    }

    // MARK: - What `blobfs status` and `blobfs stats` read

    /// The front end as it is at one moment.
    public struct Snapshot: Sendable {
        public struct Operation: Sendable {
            public var opcode: UInt32
            public var name: String
            public var received: UInt64
            /// Answers: counts, errors, bytes and latency from receipt to answer.
            public var answers: LatencySnapshot
        }

        public var initialized: Bool
        /// "io_uring" or "dev_fuse" (empty before INIT), its queues and entries per queue.
        public var transport: String
        public var queues: Int
        public var entriesPerQueue: Int
        public var description: String
        public var kernelMinor: UInt32
        public var writebackCache: Bool
        public var maxWriteBytes: Int
        /// Requests taken and not yet answered, and answers given twice (a bug).
        public var requestsHeld: Int
        public var doubleAnswers: Int
        public var statisticsKept: Bool
        /// Opcodes that were received at least once, in opcode order.
        public var operations: [Operation]
        /// Error answers by errno (non-zero counts only).
        public var errors: [(errno: Int32, count: UInt64)]
    }

    /// On the file system's reactor (the control socket asks with `Reactor.call`): nil
    /// until serving has started. Copies only the rows of opcodes seen.
    public func snapshotOnReactor() -> Snapshot? {
        service.blobService.reactor.preconditionCurrent()
        guard let fuse else { return nil }
        let description = state.withLock { $0.transport }
        var operations: [Snapshot.Operation] = []
        for opcode in fuse.requestCounts.indices where fuse.requestCounts[opcode] > 0 {
            operations.append(Snapshot.Operation(
                opcode: UInt32(opcode), name: FuseOpcode.name(UInt32(opcode)), received: fuse.requestCounts[opcode],
                answers: fuse.statistics?.snapshot(row: opcode) ?? LatencySnapshot()))
        }
        var errors: [(errno: Int32, count: UInt64)] = []
        for errno in fuse.errorCounts.indices where fuse.errorCounts[errno] > 0 {
            errors.append((Int32(errno), fuse.errorCounts[errno]))
        }
        return Snapshot(
            initialized: fuse.initialized, transport: !fuse.initialized ? "" : ring != nil ? "io_uring" : "dev_fuse",
            queues: ring?.queueCount ?? 1, entriesPerQueue: ring?.entriesPerQueue ?? Self.devFuseSlots,
            description: description, kernelMinor: min(fuse.kernelMinor, FuseSession.minorImplemented), writebackCache: fuse.writebackCache,
            maxWriteBytes: fuse.maxWrite, requestsHeld: fuse.ledger.count, doubleAnswers: fuse.ledger.doubleAnswers,
            statisticsKept: fuse.statistics != nil, operations: operations, errors: errors)
    }

    /// Ends the loop from another thread (tests).
    public func exit() {
        if let session { fuse_session_exit(session) }
    }

    deinit {
        if let session { fuse_session_destroy(session) }
    }
}
