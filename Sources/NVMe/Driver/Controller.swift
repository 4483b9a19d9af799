#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env
import Synchronization

/// The NVMe driver's control path: controller reset and enable (honouring CAP.TO and
/// CSTS.RDY/CFS), the admin queue, Identify, Set Features (number of queues), and the
/// creation and deletion of I/O queue pairs. Admin commands are synchronous and
/// serialized; they are the control path, never the data path.
public final class NVMeController: @unchecked Sendable {
    public let transport: NVMeTransport
    public private(set) var capabilities: ControllerCapabilities
    public private(set) var controllerData = IdentifyController()
    public private(set) var namespaceData = IdentifyNamespace()
    public private(set) var ioQueuesGranted = 0
    /// Largest transfer of one command, in bytes.
    public private(set) var maxTransferBytes = 128 << 10
    public let adminTimeoutNs: UInt64

    static let adminEntries = 32
    private let adminSQ: DMABuffer
    private let adminCQ: DMABuffer
    private let scratch: DMABuffer
    private var adminTail = 0
    private var adminHead = 0
    private var adminPhase = true
    private var nextCommandID: UInt16 = 0
    private let adminLock = Mutex(())
    private var freeQueueIDs: [Int] = []
    var strideShift: Int { capabilities.doorbellStrideShift }
    /// Incremented by every reset after a fatal status: I/O queues made before it are gone
    /// and their channels re-create them (same queue IDs) and resend what was unanswered.
    private let resetGeneration = Atomic<UInt64>(0)
    private let recoveryLock = Mutex(())
    public private(set) var fatalResets = 0

    public enum InitError: Error, CustomStringConvertible {
        case timeout(String)
        case fatalStatus(String)
        case unsupported(String)
        case command(NVMeError)
        case memory(SystemError)

        public var description: String {
            switch self {
            case let .timeout(what): "NVMe controller: timed out \(what)"
            case let .fatalStatus(what): "NVMe controller reports fatal status (CSTS.CFS) \(what)"
            case let .unsupported(what): "NVMe controller: \(what)"
            case let .command(error): "\(error)"
            case let .memory(error): "\(error)"
            }
        }
    }

    public init(transport: NVMeTransport, adminTimeoutNs: UInt64 = 5_000_000_000) throws {
        self.transport = transport
        self.adminTimeoutNs = adminTimeoutNs
        capabilities = ControllerCapabilities(raw: transport.read64(NVMeRegister.cap))
        do {
            adminSQ = try DMABuffer.allocate(bytes: Self.adminEntries * SubmissionEntry.bytes)
            adminCQ = try DMABuffer.allocate(bytes: Self.adminEntries * CompletionEntry.bytes)
            scratch = try DMABuffer.allocate(bytes: 4096)
        } catch { throw InitError.memory(error) }
        guard capabilities.supportsNVMCommandSet, capabilities.memoryPageSizeMinShift <= 12 else {
            throw InitError.unsupported("no NVM command set or 4 KiB pages (CAP 0x\(String(capabilities.raw, radix: 16)))")
        }
        try resetAndEnable()
        try identifyAll()
        try negotiateQueues()
    }

    // MARK: - Reset and enable

    private func waitReady(_ wanted: Bool, _ what: String) throws {
        let timeoutNs = UInt64(max(capabilities.timeoutMs, 500)) * 1_000_000
        let deadline = MonotonicClock.nowNs() + timeoutNs
        while true {
            let status = ControllerStatus(raw: transport.read32(NVMeRegister.csts))
            if status.fatal && wanted { throw InitError.fatalStatus(what) }
            if status.ready == wanted { return }
            if MonotonicClock.nowNs() > deadline {
                throw InitError.timeout("\(what): CSTS.RDY stayed \(!wanted) for \(timeoutNs / 1_000_000) ms (CAP.TO)")
            }
            usleep(1000)
        }
    }

    /// CC.EN to 0 and wait for CSTS.RDY 0; program the admin queue; CC.EN to 1 and wait.
    public func resetAndEnable() throws {
        let cc = ControllerConfiguration(raw: transport.read32(NVMeRegister.cc))
        if cc.enabled { transport.write32(NVMeRegister.cc, cc.raw & ~1) }
        try waitReady(false, "disabling")
        adminSQ.fill(0)
        adminCQ.fill(0)
        adminTail = 0
        adminHead = 0
        adminPhase = true
        let entries = UInt32(Self.adminEntries - 1)
        transport.write32(NVMeRegister.aqa, entries | entries << 16)
        transport.write64(NVMeRegister.asq, busAddress(adminSQ.segment().base))
        transport.write64(NVMeRegister.acq, busAddress(adminCQ.segment().base))
        transport.write32(NVMeRegister.cc, ControllerConfiguration.standard.raw)
        try waitReady(true, "enabling")
    }

    func busAddress(_ pointer: UnsafeRawPointer) -> UInt64 {
        guard let address = transport.busAddress(of: pointer) else {
            preconditionFailure("NVMe: memory at \(pointer) is not DMA memory the device can reach")
        }
        return address
    }

    // MARK: - Admin commands

    /// Runs one admin command to completion. `data` (4 KiB) is PRP1 when the command
    /// moves data; the caller reads it from `scratch` after.
    @discardableResult
    func admin(_ command: SubmissionEntry, withData: Bool = false) throws -> CompletionEntry {
        try adminLock.withLock { _ throws -> CompletionEntry in
            var entry = command
            entry.commandID = nextCommandID
            nextCommandID &+= 1
            if withData { entry.prp1 = busAddress(scratch.segment().base) }
            adminSQ.withUnsafeMutableBytes { entry.store(to: $0.baseAddress! + adminTail * SubmissionEntry.bytes) }
            adminTail = (adminTail + 1) % Self.adminEntries
            transport.write32(NVMeRegister.doorbell(queue: 0, completion: false, strideShift: strideShift), UInt32(adminTail))
            let deadline = MonotonicClock.nowNs() + adminTimeoutNs
            while true {
                let done: CompletionEntry? = adminCQ.withUnsafeBytes { bytes in
                    let slot = bytes.baseAddress! + adminHead * CompletionEntry.bytes
                    guard blobfsPhase(slot) == adminPhase else { return nil }
                    atomicMemoryFence(ordering: .acquiring)
                    return CompletionEntry(loadingFrom: slot)
                }
                if let done {
                    adminHead += 1
                    if adminHead == Self.adminEntries {
                        adminHead = 0
                        adminPhase.toggle()
                    }
                    transport.write32(NVMeRegister.doorbell(queue: 0, completion: true, strideShift: strideShift), UInt32(adminHead))
                    guard done.commandID == entry.commandID else {
                        throw InitError.unsupported("admin completion for command \(done.commandID), expected \(entry.commandID)")
                    }
                    guard done.status.isSuccess else { throw InitError.command(NVMeError(status: done.status, opcode: entry.opcode)) }
                    return done
                }
                if ControllerStatus(raw: transport.read32(NVMeRegister.csts)).fatal {
                    throw InitError.fatalStatus("during admin command 0x\(String(entry.opcode, radix: 16))")
                }
                if MonotonicClock.nowNs() > deadline {
                    throw InitError.timeout("admin command 0x\(String(entry.opcode, radix: 16))")
                }
                sched_yield()
            }
        }
    }

    private func identifyAll() throws {
        var command = SubmissionEntry()
        command.opcode = AdminOpcode.identify.rawValue
        command.cdw10 = IdentifyCNS.controller.rawValue
        try admin(command, withData: true)
        controllerData = scratch.withUnsafeBytes { IdentifyController(decoding: $0) }
        guard controllerData.namespaceCount >= 1 else { throw InitError.unsupported("controller has no namespace") }
        command.cdw10 = IdentifyCNS.namespace.rawValue
        command.namespaceID = 1
        try admin(command, withData: true)
        namespaceData = scratch.withUnsafeBytes { IdentifyNamespace(decoding: $0) }
        guard [512, 4096].contains(namespaceData.blockSizeBytes), namespaceData.size > 0 else {
            throw InitError.unsupported("namespace 1: \(namespaceData.blockSizeBytes)-byte blocks, \(namespaceData.size) blocks")
        }
        if controllerData.maxDataTransferShift > 0 {
            maxTransferBytes = min(maxTransferBytes, 4096 << Int(controllerData.maxDataTransferShift))
        }
    }

    @inline(__always) var generation: UInt64 { resetGeneration.load(ordering: .acquiring) }

    /// Resets a controller in fatal status (CSTS.CFS): CC.EN to 0 and 1 again (CAP.TO
    /// bounded), the admin queue reprogrammed, the number of queues negotiated again.
    /// Called by the first queue pair that sees the status (`seenGeneration` is the
    /// generation it knew); others that arrive meanwhile find the generation moved on
    /// and only re-create their queues. Per the spec the controller stops all DMA once
    /// CSTS.RDY reads 0, so the unanswered commands can then be sent again.
    func recoverFromFatalStatus(seenGeneration: UInt64) throws {
        try recoveryLock.withLock { _ throws in
            guard resetGeneration.load(ordering: .acquiring) == seenGeneration else { return }
            Log.logger("nvme").warning("\(transport.name): controller fatal status (CSTS.CFS): resetting")
            try adminLock.withLock { _ throws in try resetAndEnable() }
            try negotiateQueues()
            fatalResets += 1
            resetGeneration.add(1, ordering: .releasing)
        }
    }

    private func negotiateQueues() throws {
        var command = SubmissionEntry()
        command.opcode = AdminOpcode.setFeatures.rawValue
        command.cdw10 = UInt32(FeatureID.numberOfQueues.rawValue)
        command.cdw11 = 15 | 15 << 16  // ask for 16 pairs
        let done = try admin(command)
        let granted = Int(min(done.commandSpecific & 0xFFFF, done.commandSpecific >> 16)) + 1
        if ioQueuesGranted == 0 {
            ioQueuesGranted = granted
            freeQueueIDs = Array((1...ioQueuesGranted).reversed())
        } else if granted < ioQueuesGranted {
            // Queue pairs keep their IDs across a reset: fewer would strand some.
            throw InitError.unsupported("\(granted) I/O queues after a reset, \(ioQueuesGranted) before")
        }
    }

    // MARK: - I/O queues

    /// Creates an I/O completion queue and submission queue pair on the given memory. With
    /// `interruptsTo`, the completion queue raises interrupt vector = its queue id, routed
    /// to that reactor, when the transport has interrupts; `interrupts` says whether it has.
    func createQueuePair(entries: Int, submission: UnsafeRawPointer, completion: UnsafeRawPointer,
                         interruptsTo reactor: Reactor?) throws -> (queueID: Int, interrupts: Bool) {
        guard let queueID = adminLock.withLock({ _ in freeQueueIDs.popLast() }) else {
            throw InitError.unsupported("all \(ioQueuesGranted) I/O queue pairs are in use")
        }
        let interrupts = reactor.map { transport.connectInterrupt(vector: queueID, to: $0) } ?? false
        do {
            try createQueues(queueID: queueID, entries: entries, submission: submission, completion: completion,
                             interrupts: interrupts)
        } catch {
            if interrupts { transport.disconnectInterrupt(vector: queueID) }
            adminLock.withLock { _ in freeQueueIDs.append(queueID) }
            throw error
        }
        return (queueID, interrupts)
    }

    /// Creates the completion and submission queues `queueID` (after a reset: again), the
    /// completion queue raising interrupt vector `queueID` when `interrupts`.
    func createQueues(queueID: Int, entries: Int, submission: UnsafeRawPointer, completion: UnsafeRawPointer,
                      interrupts: Bool) throws {
        var command = SubmissionEntry()
        command.opcode = AdminOpcode.createIOCompletionQueue.rawValue
        command.prp1 = busAddress(completion)
        command.cdw10 = UInt32(queueID) | UInt32(entries - 1) << 16
        // CDW11: PC (physically contiguous), IEN (interrupts enabled), IV in 31:16.
        command.cdw11 = interrupts ? 1 | 2 | UInt32(queueID) << 16 : 1
        try admin(command)
        command = SubmissionEntry()
        command.opcode = AdminOpcode.createIOSubmissionQueue.rawValue
        command.prp1 = busAddress(submission)
        command.cdw10 = UInt32(queueID) | UInt32(entries - 1) << 16
        command.cdw11 = 1 | UInt32(queueID) << 16
        try admin(command)
    }

    func deleteQueuePair(_ queueID: Int) {
        var command = SubmissionEntry()
        command.opcode = AdminOpcode.deleteIOSubmissionQueue.rawValue
        command.cdw10 = UInt32(queueID)
        _ = try? admin(command)
        command.opcode = AdminOpcode.deleteIOCompletionQueue.rawValue
        _ = try? admin(command)
        transport.disconnectInterrupt(vector: queueID)
        adminLock.withLock { _ in freeQueueIDs.append(queueID) }
    }

    /// Asks the controller to abort command `commandID` of submission queue `queueID`;
    /// true when it reports the command aborted (DW0 bit 0 clear).
    @discardableResult
    func abort(queueID: Int, commandID: UInt16) -> Bool {
        var command = SubmissionEntry()
        command.opcode = AdminOpcode.abort.rawValue
        command.cdw10 = UInt32(queueID) | UInt32(commandID) << 16
        guard let done = try? admin(command) else { return false }
        return done.commandSpecific & 1 == 0
    }

    /// Normal shutdown notification, then disable.
    public func shutdown() {
        let cc = ControllerConfiguration(raw: transport.read32(NVMeRegister.cc))
        guard cc.enabled else { return }
        transport.write32(NVMeRegister.cc, cc.raw | 1 << 14)
        let deadline = MonotonicClock.nowNs() + UInt64(max(capabilities.timeoutMs, 500)) * 1_000_000
        while ControllerStatus(raw: transport.read32(NVMeRegister.csts)).shutdownStatus != 2 && MonotonicClock.nowNs() < deadline {
            usleep(1000)
        }
        transport.write32(NVMeRegister.cc, 0)
    }

    public var isFatal: Bool { ControllerStatus(raw: transport.read32(NVMeRegister.csts)).fatal }
}

/// Phase bit of a completion entry in queue memory (volatile, as the device writes it).
@inline(__always)
func blobfsPhase(_ slot: UnsafeRawPointer) -> Bool {
    MMIO.read32(UnsafeMutableRawPointer(mutating: slot), 12) >> 16 & 1 == 1
}
