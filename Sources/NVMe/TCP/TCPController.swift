#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env
import Logging
import Synchronization

/// How the host connects: digests, timeouts, identity. The spec's query string sets
/// them (`DeviceSpec`: hostnqn, hdgst, ddgst, kato, ctrl_loss_tmo, io_timeout).
public struct NVMeTCPOptions: Sendable, Equatable {
    public var hostNQN: String
    /// HOSTID: 16 bytes, stable for a host (the UUID of its default NQN).
    public var hostID: [UInt8]
    public var headerDigest = false
    public var dataDigest = false
    /// KATO sent in the admin Connect; a Keep Alive goes every half of it.
    public var keepAliveTimeoutMs: UInt32 = 10_000
    /// A command with no answer this long ends its connection (error recovery: reconnect
    /// and send it again).
    public var commandTimeoutNs: UInt64 = 30_000_000_000
    /// While the target is unreachable, requests wait; past this time without a working
    /// association, waiting and new requests fail with `BdevError.deviceLost` (reconnect
    /// attempts go on, and requests work again once the target is back).
    public var deviceLossTimeoutNs: UInt64 = 60_000_000_000
    /// First delay between reconnect attempts, doubled after each failure up to the max.
    public var reconnectDelayNs: UInt64 = 100_000_000
    public var reconnectDelayMaxNs: UInt64 = 2_000_000_000
    /// TCP connect, ICReq/ICResp and each admin command during set-up.
    public var connectTimeoutNs: UInt64 = 5_000_000_000
    /// Entries of each I/O queue (bounded by the controller's CAP.MQES).
    public var ioQueueEntries = 128

    public init(hostNQN: String? = nil) {
        let uuid = NVMeTCPOptions.defaultHostUUID()
        hostID = uuid
        self.hostNQN = hostNQN ?? "nqn.2014-08.org.nvmexpress:uuid:" + NVMeTCPOptions.uuidString(uuid)
    }

    /// The host's UUID: from /etc/machine-id when it has one (stable across runs, as
    /// nvme-cli's hostnqn is), else a fixed one.
    static func defaultHostUUID() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 16)
        let fd = open("/etc/machine-id", O_RDONLY | O_CLOEXEC)
        if fd >= 0 {
            defer { close(fd) }
            var text = [UInt8](repeating: 0, count: 32)
            if read(fd, &text, 32) == 32, let value = UInt128(String(decoding: text, as: UTF8.self), radix: 16) {
                for index in 0..<16 { bytes[index] = UInt8(truncatingIfNeeded: value >> (8 * UInt128(15 - index))) }
                bytes[6] = bytes[6] & 0x0F | 0x40  // version 4 layout, so it reads as a UUID
                bytes[8] = bytes[8] & 0x3F | 0x80
                return bytes
            }
        }
        return [0xb1, 0x0b, 0xf5, 0x00, 0x00, 0x00, 0x40, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01]
    }

    static func uuidString(_ bytes: [UInt8]) -> String {
        let hex = bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }
        return hex[0..<4].joined() + "-" + hex[4..<6].joined() + "-" + hex[6..<8].joined() + "-"
            + hex[8..<10].joined() + "-" + hex[10..<16].joined()
    }
}

/// An NVMe over TCP controller: the association (the admin queue's connection with its
/// Connect, Property Get/Set of CC/CSTS/CAP, Identify and Set Features), its keep-alive,
/// and its recovery. I/O queues (`NVMeTCPQueuePair`, one per channel) connect on their
/// own reactors with the controller ID of the current association.
///
/// The admin queue belongs to a reactor of its own ("nvme-tcp-admin"), which sleeps
/// between its 100 ms ticks: a tick sends the Keep Alive when due (and reads CSTS: a
/// controller in fatal status, CSTS.CFS, is recovered like a lost connection), or runs
/// a reconnect attempt while the association is down. Recovery replaces the whole
/// association, as the Linux host does: new admin connection, Connect, CC.EN, Identify
/// (the namespace must be the one it was), then every I/O queue sees the new epoch and
/// reconnects, sending its unanswered commands again. Attempts back off from
/// `reconnectDelayNs` to `reconnectDelayMaxNs`; past `deviceLossTimeoutNs` the device is
/// reported lost (requests fail with `BdevError.deviceLost`) while attempts continue.
public final class NVMeTCPController: NVMeTCPConnectionDelegate, @unchecked Sendable {
    /// As given (names and messages use it).
    public let endpoint: TCPEndpoint
    /// Resolved once at open: every connection, also a reconnect, goes to this address.
    let address: TCPEndpoint
    public let subsystemNQN: String
    public let options: NVMeTCPOptions
    public private(set) var capabilities = ControllerCapabilities(raw: 0)
    public private(set) var controllerData = IdentifyController()
    public private(set) var namespaceData = IdentifyNamespace()
    public private(set) var ioQueuesGranted = 0
    public private(set) var maxTransferBytes = 128 << 10
    /// Write data an I/O command capsule carries (IOCCSZ); larger writes wait for R2T.
    public private(set) var inCapsuleBytesMax = 0
    public var name: String { "nvme-tcp:\(endpoint)/\(subsystemNQN)" }

    static let adminEntries = 32
    private static let adminSlots = 2
    private let log = Log.logger("nvme.tcp")
    private let admin: NVMeTCPConnection
    private let adminLock = Mutex(())
    private let adminBuffer: UnsafeMutableRawPointer
    private let adminIOVec: UnsafeMutablePointer<iovec>
    private var adminCompletion: CompletionEntry?
    private var identified = false

    private struct State {
        /// Incremented by every association made; queues connected under an older one reconnect.
        var epoch: UInt64 = 0
        var controllerID: UInt16 = 0
        var live = false
        var lost = false
        var downSinceNs: UInt64 = 0
        var nextAttemptNs: UInt64 = 0
        var delayNs: UInt64 = 0
        var attempts = 0
        var closing = false
        var reason = ""
    }
    private let state = Mutex(State())
    private let lostFlag = Atomic<Bool>(false)
    private let epochValue = Atomic<UInt64>(0)
    private let liveFlag = Atomic<Bool>(false)
    private var adminReactor: Reactor?
    private var nextKeepAliveNs: UInt64 = 0
    private let queueIDs = Mutex<[Int]>([])
    public private(set) var reconnects = 0

    /// Connects (blocking, bounded by `options.connectTimeoutNs`), identifies, and starts
    /// the admin reactor.
    public init(endpoint: TCPEndpoint, subsystemNQN: String, options: NVMeTCPOptions) throws {
        self.endpoint = endpoint
        address = try endpoint.resolved()
        self.subsystemNQN = subsystemNQN
        self.options = options
        admin = NVMeTCPConnection(endpoint: address, slotCount: Self.adminSlots)
        adminBuffer = .allocate(byteCount: 4096, alignment: 4096)
        adminIOVec = .allocate(capacity: 1)
        admin.delegate = self
        do {
            try associate()
            let reactor = try Reactor(name: "nvme-tcp-admin")
            reactor.registerTimedPoller(periodNs: 100_000_000) { [unowned self] in self.tick() }
            try reactor.start()
            adminReactor = reactor
        } catch {
            admin.close()
            adminBuffer.deallocate()
            adminIOVec.deallocate()
            throw error
        }
    }

    deinit {
        adminBuffer.deallocate()
        adminIOVec.deallocate()
    }

    // MARK: - What the I/O queues read (any thread)

    /// The association I/O queues connect under, nil while there is none.
    func association() -> (epoch: UInt64, controllerID: UInt16)? {
        state.withLock { $0.live ? ($0.epoch, $0.controllerID) : nil }
    }

    @inline(__always) var currentEpoch: UInt64 { epochValue.load(ordering: .acquiring) }
    @inline(__always) public var isLost: Bool { lostFlag.load(ordering: .relaxed) }
    @inline(__always) var isLive: Bool { liveFlag.load(ordering: .acquiring) }
    public var lossReason: String { state.withLock { $0.reason } }

    /// A queue of association `epoch` failed: start recovery unless it already runs.
    func connectionLost(epoch: UInt64, reason: String) {
        let first: Bool = state.withLock { state in
            guard state.live, state.epoch == epoch, !state.closing else { return false }
            state.live = false
            state.downSinceNs = MonotonicClock.nowNs()
            state.nextAttemptNs = 0
            state.delayNs = options.reconnectDelayNs
            state.attempts = 0
            state.reason = reason
            return true
        }
        if first {
            liveFlag.store(false, ordering: .releasing)
            log.warning("\(name): connection lost (\(reason)); reconnecting")
            adminReactor?.wake()
        }
    }

    /// A queue ID for a new I/O queue (1...granted), or nil when all are taken.
    func takeQueueID() -> Int? {
        queueIDs.withLock { $0.popLast() }
    }

    func returnQueueID(_ id: Int) {
        queueIDs.withLock { $0.append(id) }
    }

    func connectData(controllerID: UInt16) -> ConnectData {
        ConnectData(hostID: options.hostID, controllerID: controllerID, subsystemNQN: subsystemNQN, hostNQN: options.hostNQN)
    }

    // MARK: - The association

    /// Admin connection, Connect, enable, identify, number of queues. Blocking.
    private func associate() throws {
        admin.close()
        let deadline = MonotonicClock.nowNs() + options.connectTimeoutNs
        try admin.open(headerDigest: options.headerDigest, dataDigest: options.dataDigest)
        try drive(until: deadline, "ICResp from \(endpoint)") { self.admin.isInitialized }
        admin.inCapsuleBytesMax = 8192  // the admin queue's capsules (Connect data) carry up to 8 KiB
        let connect = FabricsCommand.connect(queueID: 0, submissionQueueEntries: Self.adminEntries,
                                             keepAliveTimeoutMs: options.keepAliveTimeoutMs)
        connectData(controllerID: 0xFFFF).encode(into: UnsafeMutableRawBufferPointer(start: adminBuffer, count: 4096))
        let connected = try execute(connect, dataBytes: ConnectData.bytes, toController: true, deadline: deadline)
        let controllerID = FabricsCommand.controllerID(ofConnect: connected)
        let cap = ControllerCapabilities(raw: try getProperty(NVMeRegister.cap, eightBytes: true, deadline: deadline))
        // What I/O queues read (capabilities, identify data, limits) is written by the
        // first association only, before any queue exists; a reconnect only compares.
        if !identified { capabilities = cap }
        try enable(deadline: deadline)
        try identify(deadline: deadline)
        try negotiateQueues(deadline: deadline)
        let epoch: UInt64 = state.withLock { state in
            state.epoch += 1
            state.controllerID = controllerID
            state.live = true
            state.lost = false
            return state.epoch
        }
        epochValue.store(epoch, ordering: .releasing)
        lostFlag.store(false, ordering: .relaxed)
        liveFlag.store(true, ordering: .releasing)
        nextKeepAliveNs = MonotonicClock.nowNs() + keepAliveIntervalNs
    }

    private var keepAliveIntervalNs: UInt64 { max(UInt64(options.keepAliveTimeoutMs) * 500_000, 500_000_000) }

    /// CC.EN = 1 and wait for CSTS.RDY within CAP.TO, through Property Set/Get.
    private func enable(deadline: UInt64) throws {
        let cc = ControllerConfiguration(raw: UInt32(truncatingIfNeeded: try getProperty(NVMeRegister.cc, eightBytes: false, deadline: deadline)))
        if cc.enabled {
            try setProperty(NVMeRegister.cc, value: UInt64(cc.raw & ~1), deadline: deadline)
            try waitReady(false, deadline: deadline)
        }
        try setProperty(NVMeRegister.cc, value: UInt64(ControllerConfiguration.standard.raw), deadline: deadline)
        try waitReady(true, deadline: deadline)
    }

    private func waitReady(_ wanted: Bool, deadline: UInt64) throws {
        let readyDeadline = MonotonicClock.nowNs() + UInt64(max(capabilities.timeoutMs, 500)) * 1_000_000
        while true {
            let status = ControllerStatus(raw: UInt32(truncatingIfNeeded: try getProperty(NVMeRegister.csts, eightBytes: false, deadline: deadline)))
            if status.fatal { throw NVMeController.InitError.fatalStatus(wanted ? "enabling" : "disabling") }
            if status.ready == wanted { return }
            if MonotonicClock.nowNs() > readyDeadline {
                throw NVMeController.InitError.timeout("CSTS.RDY stayed \(!wanted) for CAP.TO (\(capabilities.timeoutMs) ms)")
            }
            usleep(1000)
        }
    }

    private func identify(deadline: UInt64) throws {
        var command = SubmissionEntry()
        command.opcode = AdminOpcode.identify.rawValue
        command.cdw10 = IdentifyCNS.controller.rawValue
        try execute(command, dataBytes: 4096, toController: false, deadline: deadline)
        let controller = IdentifyController(decoding: UnsafeRawBufferPointer(start: adminBuffer, count: 4096))
        guard controller.namespaceCount >= 1 else { throw NVMeController.InitError.unsupported("controller has no namespace") }
        command.cdw10 = IdentifyCNS.namespace.rawValue
        command.namespaceID = 1
        try execute(command, dataBytes: 4096, toController: false, deadline: deadline)
        let namespace = IdentifyNamespace(decoding: UnsafeRawBufferPointer(start: adminBuffer, count: 4096))
        guard [512, 4096].contains(namespace.blockSizeBytes), namespace.size > 0 else {
            throw NVMeController.InitError.unsupported("namespace 1: \(namespace.blockSizeBytes)-byte blocks, \(namespace.size) blocks")
        }
        if identified {
            // A reconnect must find the namespace the bdev was opened on.
            guard namespace.size == namespaceData.size, namespace.blockSizeBytes == namespaceData.blockSizeBytes else {
                throw NVMeController.InitError.unsupported(
                    "namespace 1 changed across a reconnect: \(namespace.size) × \(namespace.blockSizeBytes) B, "
                    + "was \(namespaceData.size) × \(namespaceData.blockSizeBytes) B")
            }
            return
        }
        controllerData = controller
        namespaceData = namespace
        if controller.maxDataTransferShift > 0 {
            maxTransferBytes = min(128 << 10, 4096 << Int(controller.maxDataTransferShift))
        }
        // In-capsule data needs offset SGL data blocks (SGLS bit 20) as well.
        inCapsuleBytesMax = controller.sglSupport >> 20 & 1 == 1 ? min(controller.inCapsuleDataBytes, 32 << 10) : 0
        identified = true
    }

    private func negotiateQueues(deadline: UInt64) throws {
        var command = SubmissionEntry()
        command.opcode = AdminOpcode.setFeatures.rawValue
        command.cdw10 = UInt32(FeatureID.numberOfQueues.rawValue)
        command.cdw11 = 15 | 15 << 16  // 16 queues: channels come and go, reactors are few
        let done = try execute(command, dataBytes: 0, toController: false, deadline: deadline)
        let granted = Int(min(done.commandSpecific & 0xFFFF, done.commandSpecific >> 16)) + 1
        if ioQueuesGranted == 0 {
            ioQueuesGranted = granted
            queueIDs.withLock { $0 = Array((1...granted).reversed()) }
        } else if granted < ioQueuesGranted {
            throw NVMeController.InitError.unsupported("\(granted) I/O queues after a reconnect, \(ioQueuesGranted) before")
        }
    }

    // MARK: - Admin commands (synchronous, serialized)

    func tcpCommandCompleted(slot: Int, completion: CompletionEntry) {
        adminCompletion = completion
    }

    /// Runs one admin command; data (up to 4 KiB) moves through `adminBuffer`.
    @discardableResult
    private func execute(_ command: SubmissionEntry, dataBytes: Int, toController: Bool, deadline: UInt64) throws -> CompletionEntry {
        try adminLock.withLock { _ throws -> CompletionEntry in
            adminIOVec.pointee = iovec(iov_base: adminBuffer, iov_len: 4096)
            let data = TCPCommandData(iovecs: UnsafePointer(adminIOVec), segmentCount: 1, skipBytes: 0, bytes: dataBytes,
                                      toController: toController)
            adminCompletion = nil
            guard admin.isInitialized, admin.submit(slot: 0, command: command, data: data) else {
                throw NVMeTCPError.protocolViolation("admin queue not ready")
            }
            try drive(until: deadline, "admin command 0x\(String(command.opcode, radix: 16))") { self.adminCompletion != nil }
            let done = adminCompletion!
            guard done.status.isSuccess else { throw NVMeTCPError.command(NVMeError(status: done.status, opcode: command.opcode)) }
            return done
        }
    }

    /// Polls the admin connection, waiting in poll(2), until `done` or the deadline.
    private func drive(until deadline: UInt64, _ what: @autoclosure () -> String, _ done: () -> Bool) throws {
        while !done() {
            let progress = try admin.poll()
            if done() { return }
            let now = MonotonicClock.nowNs()
            guard now < deadline else { throw NVMeTCPError.timeout(what()) }
            if progress == .idle || progress == .blocked {
                var entry = pollfd(fd: admin.fd, events: Int16(POLLIN) | (progress == .blocked ? Int16(POLLOUT) : 0), revents: 0)
                _ = poll(&entry, 1, Int32(min((deadline - now) / 1_000_000 + 1, 50)))
            }
        }
    }

    private func getProperty(_ offset: Int, eightBytes: Bool, deadline: UInt64) throws -> UInt64 {
        let done = try execute(FabricsCommand.propertyGet(offset: offset, eightBytes: eightBytes), dataBytes: 0,
                               toController: false, deadline: deadline)
        return UInt64(done.commandSpecific) | (eightBytes ? UInt64(done.commandSpecificHigh) << 32 : 0)
    }

    private func setProperty(_ offset: Int, value: UInt64, deadline: UInt64) throws {
        try execute(FabricsCommand.propertySet(offset: offset, value: value, eightBytes: false), dataBytes: 0,
                    toController: false, deadline: deadline)
    }

    // MARK: - The admin reactor's tick: keep-alive and recovery

    private func tick() -> PollStatus {
        let now = MonotonicClock.nowNs()
        let (live, closing) = state.withLock { ($0.live, $0.closing) }
        if closing { return .idle }
        if live {
            guard now >= nextKeepAliveNs else { return .idle }
            nextKeepAliveNs = now + keepAliveIntervalNs
            do {
                var keepAlive = SubmissionEntry()
                keepAlive.opcode = FabricsOpcode.keepAlive
                try execute(keepAlive, dataBytes: 0, toController: false, deadline: now + keepAliveIntervalNs)
                let status = ControllerStatus(raw: UInt32(truncatingIfNeeded: try getProperty(
                    NVMeRegister.csts, eightBytes: false, deadline: now + keepAliveIntervalNs)))
                if status.fatal { connectionLost(epoch: currentEpoch, reason: "controller fatal status (CSTS.CFS)") }
            } catch {
                connectionLost(epoch: currentEpoch, reason: "keep alive: \(error)")
            }
            return .busy
        }
        return recoverIfDue(now: now)
    }

    private func recoverIfDue(now: UInt64) -> PollStatus {
        let (due, downSince) = state.withLock { ($0.nextAttemptNs <= now, $0.downSinceNs) }
        guard due else { return .idle }
        do {
            try associate()
            reconnects += 1
            let downMs = (MonotonicClock.nowNs() - downSince) / 1_000_000
            log.notice("\(name): reconnected after \(downMs) ms (association \(currentEpoch))")
        } catch {
            admin.close()
            let (lostNow, attempts): (Bool, Int) = state.withLock { state in
                state.attempts += 1
                state.nextAttemptNs = MonotonicClock.nowNs() + state.delayNs
                state.delayNs = min(state.delayNs * 2, options.reconnectDelayMaxNs)
                state.reason = "\(error)"
                let becameLost = !state.lost && now - state.downSinceNs >= options.deviceLossTimeoutNs
                if becameLost { state.lost = true }
                return (becameLost, state.attempts)
            }
            if lostNow {
                lostFlag.store(true, ordering: .relaxed)
                log.error("\(name): target unreachable for \(options.deviceLossTimeoutNs / 1_000_000_000) s (\(error)); the device is lost: I/O fails until it returns")
            } else if attempts == 1 || attempts % 10 == 0 {
                log.warning("\(name): reconnect attempt \(attempts) failed: \(error)")
            }
        }
        return .busy
    }

    // MARK: - Shutdown

    /// Stops the admin reactor, tells a live controller to shut down (CC.SHN) and closes.
    public func close() {
        state.withLock { $0.closing = true }
        adminReactor?.stop()
        adminReactor = nil
        if isLive {
            let deadline = MonotonicClock.nowNs() + 2_000_000_000
            do {
                try setProperty(NVMeRegister.cc, value: UInt64(ControllerConfiguration.standard.raw | 1 << 14), deadline: deadline)
                while MonotonicClock.nowNs() < deadline {
                    let status = ControllerStatus(raw: UInt32(truncatingIfNeeded: try getProperty(NVMeRegister.csts, eightBytes: false, deadline: deadline)))
                    if status.shutdownStatus == 2 { break }
                    usleep(1000)
                }
            } catch {
                log.debug("\(name): shutdown notification: \(error)")
            }
        }
        liveFlag.store(false, ordering: .releasing)
        admin.close()
    }
}
