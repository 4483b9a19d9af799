#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env
import Synchronization

/// A software NVMe controller in this process: the controller side of the registers,
/// admin and I/O queues of the NVMe base specification, serving one namespace backed by
/// any bdev. It runs on a reactor of its own and notices the host only by polling its
/// register memory (doorbells, CC), reading submission entries from host memory and
/// writing completion entries there, as a device would over PCIe.
public final class NVMeSoftController: BdevCompletionHandler, @unchecked Sendable {
    public struct Configuration: Sendable {
        public var maxQueueEntries = 1024
        public var queueCount = 16           // I/O queue pairs offered
        public var maxTransferShift: UInt8 = 5  // MDTS: 2^5 pages = 128 KiB
        public var timeoutUnits = 20         // CAP.TO: 10 s
        public var serialNumber = "BLOBFS-EMU-0001"
        public var modelNumber = "blobfs software NVMe controller"
        /// A CPU of its own: the device thread is pinned there and spins on its doorbells.
        /// nil: after `pollBeforeSleepNs` without work it sleeps until the driver's register
        /// writes wake it (interrupt mode).
        public var cpu: Int?
        /// Unpinned: how long the device thread goes on polling its doorbells after its
        /// last work before it sleeps (0: it sleeps as soon as a pass finds nothing). A
        /// host with requests in flight rings again within microseconds; a sleep between
        /// its batches costs an eventfd write on the host and a wake-up here each time.
        /// It polls only while its core is its own: every `contentionCheckNs` it reads
        /// how long it waited for a CPU (/proc/thread-self/schedstat); more than 1/20 of
        /// the interval means other threads want this core, and it sleeps between batches
        /// until the next check (a poller runs up a debt with the scheduler that every
        /// later wake-up pays; a sleeper woken by a doorbell gets the core at once).
        public var pollBeforeSleepNs: UInt64 = 50_000
        public var contentionCheckNs: UInt64 = 10_000_000
        public init() {}
    }

    /// Test hooks: faults a real controller can show.
    public struct Faults: Sendable {
        /// Post each poll's completions in reverse order.
        public var reverseCompletions = false
        /// Never complete commands whose starting LBA is this one (a lost command).
        public var dropLBA: UInt64?
        /// Complete commands whose starting LBA is this one with this status.
        public var failLBA: (lba: UInt64, status: NVMeStatus)?
        /// Report the namespace as not ready.
        public var namespaceNotReady = false
        public init() {}
    }

    public let configuration: Configuration
    public let namespace: Bdev
    let bar: UnsafeMutableRawPointer
    static let barBytes = 0x4000
    let reactor: Reactor
    private var channel: BdevChannel?
    private let faultState = Mutex(Faults())
    /// Whether any fault is set: the I/O path takes `faultState`'s lock only then.
    private let faultsArmed = Atomic<Bool>(false)

    // Controller state: owned by the controller's reactor thread.
    private var lastCC = ControllerConfiguration(raw: 0)
    /// Unpinned polling (Configuration.pollBeforeSleepNs): pass start times from the reactor.
    private var lastWorkNs: UInt64 = 0
    private var contended = true
    private var lastCheckNs: UInt64 = 0
    private var lastRunDelayNs: UInt64 = 0
    private let schedstatBuffer = UnsafeMutablePointer<UInt8>.allocate(capacity: 128)
    /// Queues by ID (0: admin), nil where none exists; sized at start, plain values, so a
    /// command costs no hashing and no reference counting. `queuesChanged()` after each change.
    var submissionQueues: ContiguousArray<SubmissionQueue?>
    var completionQueues: ContiguousArray<CompletionQueue?>
    /// The host reactor each completion queue's interrupt vector is routed to (IEN set at creation).
    var interrupts: ContiguousArray<Reactor?>
    /// The IDs of the submission queues, in order, for the poll loop.
    private var queueList: ContiguousArray<Int> = []
    /// The IDs of the completion queues with interrupts enabled.
    private var interruptingQueues: ContiguousArray<Int> = []
    /// Commands in the medium's hands, by tag (a slot index); allocated once.
    private var commands: ContiguousArray<InFlight?> = ContiguousArray(repeating: nil, count: BdevLimits.queueDepthMax)
    private var freeTags: ContiguousArray<Int> = ContiguousArray((0..<BdevLimits.queueDepthMax).reversed())
    private var ready: ContiguousArray<(cq: Int, entry: CompletionEntry)> = []
    /// Scratch for the segments of one command (copied by the bdev layer at submission).
    private let segmentScratch = UnsafeMutablePointer<DMASegment>.allocate(capacity: BdevLimits.segmentCountMax)

    struct SubmissionQueue {
        let base: UnsafeMutableRawPointer
        let entries: Int
        let completionQueue: Int
        var head = 0
    }

    struct CompletionQueue {
        let base: UnsafeMutableRawPointer
        let entries: Int
        var tail = 0
        var phase = true
        var raised = false
    }

    /// Submission entries taken from one queue per pass before the completions of the pass
    /// are posted: the host reaps and submits again while the rest are served.
    static let commandsPerPass = 8

    func queuesChanged() {
        queueList = ContiguousArray(submissionQueues.indices.filter { submissionQueues[$0] != nil })
        interruptingQueues = ContiguousArray(completionQueues.indices.filter {
            completionQueues[$0] != nil && interrupts[$0] != nil
        })
    }

    func hasCompletionQueue(_ id: Int) -> Bool { id >= 0 && id < completionQueues.count && completionQueues[id] != nil }
    func hasSubmissionQueue(_ id: Int) -> Bool { id >= 0 && id < submissionQueues.count && submissionQueues[id] != nil }

    /// Interrupt vectors routed to host reactors (the driver's side sets them before it
    /// creates the queue; the device reads them when the queue is created).
    let interruptRoutes = Mutex<[Int: Reactor]>([:])

    private struct InFlight {
        var queue: Int
        var commandID: UInt16
        var opcode: UInt8
    }

    public init(namespace: Bdev, configuration: Configuration = Configuration()) throws {
        self.namespace = namespace
        self.configuration = configuration
        submissionQueues = ContiguousArray(repeating: nil, count: configuration.queueCount + 1)
        completionQueues = ContiguousArray(repeating: nil, count: configuration.queueCount + 1)
        interrupts = ContiguousArray(repeating: nil, count: configuration.queueCount + 1)
        ready.reserveCapacity(BdevLimits.queueDepthMax * 2)
        bar = .allocate(byteCount: Self.barBytes, alignment: 4096)
        bar.initializeMemory(as: UInt8.self, repeating: 0, count: Self.barBytes)
        // Unpinned, it polls by its poller's `.pending` (a spin without idle time, so
        // without sched_yield: a yielding thread loses its place in the scheduler's queue).
        reactor = try Reactor(name: "nvme-emu", configuration: configuration.cpu != nil
            ? .init(cpu: configuration.cpu, idleBeforeSleepNs: 1_000_000)
            : .init(idleBeforeSleepNs: 0, polling: .spin))
        let cap = ControllerCapabilities.make(maxQueueEntries: configuration.maxQueueEntries,
                                              timeoutUnits: configuration.timeoutUnits, strideShift: 0)
        MMIO.write64(bar, NVMeRegister.cap, cap.raw)
        MMIO.write32(bar, NVMeRegister.vs, 0x0002_0000)  // 2.0
        // The device's own pollers: registers and queues; and its path to the medium.
        reactor.registerPoller { [unowned self] in self.pollOrSleep(busy: self.poll() == .busy) }
        // The driver's register writes wake the device (EmulatedTransport); a slow timer
        // stays as a safety net.
        reactor.registerTimedPoller(periodNs: 100_000_000) { .idle }
        try reactor.start()
        let made: String? = reactor.call { [unowned self] in
            do {
                self.channel = try namespace.makeChannel(reactor: Reactor.current!, queueDepth: BdevLimits.queueDepthMax)
                return nil
            } catch { return "\(error)" }
        }
        if let made { throw BdevError.invalidConfiguration("software NVMe controller: \(made)") }
    }

    /// Stops the device thread. The driver must be detached first.
    public func shutdown() {
        reactor.call { [unowned self] in
            self.channel?.close()
            self.channel = nil
        }
        reactor.stop()
        bar.deallocate()
        segmentScratch.deallocate()
        schedstatBuffer.deallocate()
    }

    public func setFaults(_ faults: Faults) {
        faultState.withLock { $0 = faults }
        let armed = faults.reverseCompletions || faults.dropLBA != nil || faults.failLBA != nil || faults.namespaceNotReady
        faultsArmed.store(armed, ordering: .sequentiallyConsistent)
    }

    /// Sets CSTS.CFS, as a controller that hit a fatal internal error.
    public func raiseFatalStatus() {
        reactor.call { [unowned self] in
            let status = MMIO.read32(self.bar, NVMeRegister.csts)
            MMIO.write32(self.bar, NVMeRegister.csts, status | 2)
        }
    }

    /// A transport for the driver: this controller's registers, identity bus addresses.
    public func makeTransport() -> NVMeTransport { EmulatedTransport(controller: self) }

    // MARK: - The device loop

    private func poll() -> PollStatus {
        var busy = false
        let cc = ControllerConfiguration(raw: MMIO.read32(bar, NVMeRegister.cc))
        if cc != lastCC {
            handleConfiguration(cc)
            busy = true
        }
        let status = ControllerStatus(raw: MMIO.read32(bar, NVMeRegister.csts))
        guard cc.enabled, status.ready, !status.fatal else { return busy ? .busy : .idle }
        var executed = 0
        var more = false
        for id in queueList {
            // An admin command earlier in this pass may have deleted the queue (and zeroed
            // its doorbell): reading on would re-execute a lap of stale entries.
            guard let queue = submissionQueues[id] else { continue }
            let tail = Int(MMIO.read32(bar, NVMeRegister.doorbell(queue: id, completion: false, strideShift: 0)))
            guard tail < queue.entries else {
                fatal("submission queue \(id) tail doorbell \(tail) beyond \(queue.entries) entries")
                return .busy
            }
            var head = queue.head
            var taken = 0
            while head != tail {
                if id != 0 && taken == Self.commandsPerPass {
                    more = true
                    break
                }
                let entry = SubmissionEntry(loadingFrom: queue.base + head * SubmissionEntry.bytes)
                head = head + 1 == queue.entries ? 0 : head + 1
                // Before executing: a completion reports the head as of its command.
                submissionQueues[id]!.head = head
                if id == 0 { executeAdmin(entry) } else { executeIO(entry, queue: id) }
                taken += 1
            }
            executed += taken
        }
        if executed > 0 {
            busy = true
            // A namespace that completes at its next poll (malloc does) completes now, so
            // the completions of this pass are posted in this pass.
            _ = channel?.poll()
        }
        if more { busy = true }
        if !ready.isEmpty {
            postReady()
            busy = true
        }
        // Commands waiting for the namespace: its channel's poller reports whether
        // something must poll for them (it is a poller of this reactor too).
        return busy ? .busy : .idle
    }

    /// Unpinned: whether to go on polling (`.pending`: the reactor yields and comes back)
    /// or to sleep until a register write wakes the device (`.idle`).
    private func pollOrSleep(busy: Bool) -> PollStatus {
        guard configuration.cpu == nil, configuration.pollBeforeSleepNs > 0 else { return busy ? .busy : .idle }
        let now = reactor.passStartNs
        if now &- lastCheckNs >= configuration.contentionCheckNs {
            let delay = runDelayNs()
            contended = delay &- lastRunDelayNs > (now &- lastCheckNs) / 20
            lastRunDelayNs = delay
            lastCheckNs = now
        }
        if busy {
            lastWorkNs = now
            return .busy
        }
        return !contended && now &- lastWorkNs < configuration.pollBeforeSleepNs ? .pending : .idle
    }

    /// Time this thread has waited for a CPU since it started (the second field of
    /// /proc/thread-self/schedstat), read without allocating; 0 if unreadable.
    private func runDelayNs() -> UInt64 {
        let fd = open("/proc/thread-self/schedstat", O_RDONLY)
        guard fd >= 0 else { return 0 }
        defer { Glibc.close(fd) }
        let count = read(fd, schedstatBuffer, 127)
        guard count > 0 else { return 0 }
        var field = 0
        var value: UInt64 = 0
        for index in 0..<count {
            let byte = schedstatBuffer[index]
            if byte == UInt8(ascii: " ") {
                if field == 1 { return value }
                field += 1
                value = 0
            } else if byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") {
                value = value &* 10 &+ UInt64(byte - UInt8(ascii: "0"))
            }
        }
        return field == 1 ? value : 0
    }

    private func fatal(_ why: String) {
        Log.logger("nvme.emu").error("controller fatal status: \(why)")
        MMIO.write32(bar, NVMeRegister.csts, MMIO.read32(bar, NVMeRegister.csts) | 2)
    }

    private func handleConfiguration(_ cc: ControllerConfiguration) {
        defer { lastCC = cc }
        if cc.enabled && !lastCC.enabled {
            let aqa = MMIO.read32(bar, NVMeRegister.aqa)
            let submissionEntries = Int(aqa & 0xFFF) + 1
            let completionEntries = Int(aqa >> 16 & 0xFFF) + 1
            guard cc.submissionEntrySizeShift == 6, cc.completionEntrySizeShift == 4, cc.memoryPageSizeShift == 12,
                  submissionEntries >= 2, completionEntries >= 2,
                  let sq = hostMemory(MMIO.read64(bar, NVMeRegister.asq)),
                  let cq = hostMemory(MMIO.read64(bar, NVMeRegister.acq)) else {
                fatal("enable with an unsupported configuration (CC 0x\(String(cc.raw, radix: 16)), AQA 0x\(String(aqa, radix: 16)))")
                return
            }
            completionQueues[0] = CompletionQueue(base: cq, entries: completionEntries)
            interrupts[0] = nil
            submissionQueues[0] = SubmissionQueue(base: sq, entries: submissionEntries, completionQueue: 0)
            queuesChanged()
            MMIO.write32(bar, NVMeRegister.csts, 1)
        } else if !cc.enabled && lastCC.enabled {
            // Controller reset: queues gone, doorbells zero, not ready.
            for id in submissionQueues.indices {
                submissionQueues[id] = nil
                completionQueues[id] = nil
                interrupts[id] = nil
            }
            queuesChanged()
            ready = []
            for offset in stride(from: NVMeRegister.doorbellBase, to: Self.barBytes, by: 4) { MMIO.write32(bar, offset, 0) }
            MMIO.write32(bar, NVMeRegister.csts, 0)
        }
        if cc.shutdownNotification != 0 {
            let status = MMIO.read32(bar, NVMeRegister.csts) & ~UInt32(0xC)
            MMIO.write32(bar, NVMeRegister.csts, status | 2 << 2)  // shutdown complete
        }
    }

    /// Host memory at a bus address (identity mapping in this process).
    func hostMemory(_ address: UInt64) -> UnsafeMutableRawPointer? {
        guard address != 0, address & 0x3 == 0 else { return nil }
        return UnsafeMutableRawPointer(bitPattern: UInt(address))
    }

    func complete(queue: Int, commandID: UInt16, status: NVMeStatus, result: UInt32 = 0) {
        guard let sq = submissionQueues[queue] else { return }  // queue deleted meanwhile
        var entry = CompletionEntry()
        entry.commandSpecific = result
        entry.submissionQueueHead = UInt16(sq.head)
        entry.submissionQueueID = UInt16(queue)
        entry.commandID = commandID
        entry.status = status
        ready.append((sq.completionQueue, entry))
    }

    private func postReady() {
        // Reversed in place, so that the entries kept for a full queue (written from the
        // front) only ever overwrite entries already read.
        if faultsArmed.load(ordering: .relaxed) && faultState.withLock({ $0.reverseCompletions }) { ready.reverse() }
        var kept = 0
        let count = ready.count
        for position in 0..<count {
            let (queueID, entry) = ready[position]
            guard let cq = completionQueues[queueID] else { continue }
            let head = Int(MMIO.read32(bar, NVMeRegister.doorbell(queue: queueID, completion: true, strideShift: 0)))
            if (cq.tail + 1) % cq.entries == head {  // full: the host has not consumed yet
                ready[kept] = (queueID, entry)
                kept += 1
                continue
            }
            var posted = entry
            posted.phase = cq.phase
            // The phase dword goes last, after a release fence: the host polls it.
            posted.store(to: cq.base + cq.tail * CompletionEntry.bytes)
            var advanced = cq
            advanced.tail += 1
            if advanced.tail == cq.entries {
                advanced.tail = 0
                advanced.phase.toggle()
            }
            advanced.raised = true
            completionQueues[queueID] = advanced
        }
        ready.removeLast(count - kept)
        // One interrupt per queue per batch, after its entries are visible.
        for id in interruptingQueues where completionQueues[id]!.raised {
            completionQueues[id]!.raised = false
            interrupts[id]!.wake()
        }
    }

    // MARK: - I/O commands

    private func executeIO(_ command: SubmissionEntry, queue: Int) {
        let id = command.commandID
        guard let opcode = NVMOpcode(rawValue: command.opcode) else {
            return complete(queue: queue, commandID: id, status: .invalidOpcode)
        }
        guard command.namespaceID == 1 else { return complete(queue: queue, commandID: id, status: .invalidNamespace) }
        let faults = faultsArmed.load(ordering: .relaxed) ? faultState.withLock { $0 } : Faults()
        if faults.namespaceNotReady { return complete(queue: queue, commandID: id, status: .namespaceNotReady) }
        guard let channel else { return complete(queue: queue, commandID: id, status: .internalError) }
        let geometry = namespace.geometry
        let lba = command.startingLBA
        if opcode != .flush && opcode != .datasetManagement {
            let count = UInt64(command.blockCount)
            guard lba < geometry.blockCount, count <= geometry.blockCount - lba else {
                return complete(queue: queue, commandID: id, status: .lbaOutOfRange)
            }
            if faults.dropLBA == lba { return }
            if let fail = faults.failLBA, fail.lba == lba { return complete(queue: queue, commandID: id, status: fail.status) }
        }
        guard let slot = freeTags.popLast() else {
            return complete(queue: queue, commandID: id, status: .namespaceNotReady)
        }
        let tag = UInt64(slot)
        let inFlight = InFlight(queue: queue, commandID: id, opcode: command.opcode)
        do throws(BdevError) {
            switch opcode {
            case .read, .write:
                let bytes = command.blockCount * geometry.blockSizeBytes
                guard bytes <= (4096 << Int(configuration.maxTransferShift)) else {
                    return complete(queue: queue, commandID: id, status: .invalidField)
                }
                guard let count = prpSegments(command, bytes: bytes) else {
                    freeTags.append(slot)
                    return complete(queue: queue, commandID: id, status: .dataTransferError)
                }
                let segments = UnsafeBufferPointer(start: segmentScratch, count: count)
                commands[slot] = inFlight
                if opcode == .read {
                    try channel.readv(segments, offsetBlocks: lba, countBlocks: UInt64(command.blockCount), handler: self, tag: tag)
                } else {
                    try channel.writev(segments, offsetBlocks: lba, countBlocks: UInt64(command.blockCount), handler: self, tag: tag)
                }
            case .flush:
                commands[slot] = inFlight
                try channel.flush(handler: self, tag: tag)
            case .writeZeroes:
                commands[slot] = inFlight
                // DEAC (CDW12 bit 25): deallocate, which reads back as zeros here (DLFEAT).
                if command.cdw12 >> 25 & 1 == 1 {
                    try channel.unmap(offsetBlocks: lba, countBlocks: UInt64(command.blockCount), handler: self, tag: tag)
                } else {
                    try channel.writeZeroes(offsetBlocks: lba, countBlocks: UInt64(command.blockCount), handler: self, tag: tag)
                }
            case .datasetManagement:
                // Deallocate each range; the command completes when all have.
                freeTags.append(slot)
                guard command.cdw11 >> 2 & 1 == 1 else { return complete(queue: queue, commandID: id, status: .success) }
                let ranges = Int(command.cdw10 & 0xFF) + 1
                guard let list = hostMemory(command.prp1) else {
                    return complete(queue: queue, commandID: id, status: .dataTransferError)
                }
                var pending = 0
                for index in 0..<ranges {
                    let length = UInt64(UInt32(littleEndian: list.loadUnaligned(fromByteOffset: index * 16 + 4, as: UInt32.self)))
                    let start = UInt64(littleEndian: list.loadUnaligned(fromByteOffset: index * 16 + 8, as: UInt64.self))
                    guard length > 0 else { continue }
                    guard start < geometry.blockCount, length <= geometry.blockCount - start else {
                        if pending == 0 { return complete(queue: queue, commandID: id, status: .lbaOutOfRange) }
                        break
                    }
                    guard let rangeSlot = freeTags.popLast() else { break }
                    commands[rangeSlot] = InFlight(queue: queue, commandID: id, opcode: command.opcode)
                    dsmRemaining[id, default: 0] += 1
                    do { try channel.unmap(offsetBlocks: start, countBlocks: length, handler: self, tag: UInt64(rangeSlot)) } catch {
                        commands[rangeSlot] = nil
                        freeTags.append(rangeSlot)
                        dsmRemaining[id, default: 1] -= 1
                        throw error
                    }
                    pending += 1
                }
                if pending == 0 { complete(queue: queue, commandID: id, status: .success) }
            }
        } catch {
            if commands[slot] != nil {
                commands[slot] = nil
                freeTags.append(slot)
            }
            complete(queue: queue, commandID: id, status: error == .queueFull ? .namespaceNotReady : .internalError)
        }
    }

    private var dsmRemaining: [UInt16: Int] = [:]

    /// Writes the host pages a command's PRPs name into `segmentScratch` (merged where
    /// contiguous); returns how many, or nil when the PRPs are invalid.
    private func prpSegments(_ command: SubmissionEntry, bytes: Int) -> Int? {
        let page = 4096
        guard let first = hostMemory(command.prp1) else { return nil }
        var count = 0
        func add(_ pointer: UnsafeMutableRawPointer, _ length: Int) -> Bool {
            if count > 0, segmentScratch[count - 1].base + segmentScratch[count - 1].count == pointer {
                let last = segmentScratch[count - 1]
                segmentScratch[count - 1] = DMASegment(unsafeExternal: UnsafeMutableRawBufferPointer(start: last.base, count: last.count + length))
                return true
            }
            guard count < BdevLimits.segmentCountMax else { return false }
            (segmentScratch + count).initialize(to: DMASegment(unsafeExternal: UnsafeMutableRawBufferPointer(start: pointer, count: length)))
            count += 1
            return true
        }
        let firstBytes = min(bytes, page - Int(command.prp1 % UInt64(page)))
        _ = add(first, firstBytes)
        var remaining = bytes - firstBytes
        if remaining == 0 { return count }
        if remaining <= page {
            guard command.prp2 % UInt64(page) == 0, let second = hostMemory(command.prp2) else { return nil }
            _ = add(second, remaining)
            return count
        }
        // PRP2 points at a list of page addresses (transfers here fit one list page).
        guard let list = hostMemory(command.prp2) else { return nil }
        var index = 0
        while remaining > 0 {
            guard index < page / 8 else { return nil }
            let address = UInt64(littleEndian: list.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self))
            guard address % UInt64(page) == 0, let pointer = hostMemory(address), add(pointer, min(page, remaining)) else {
                return nil
            }
            remaining -= min(page, remaining)
            index += 1
        }
        return count
    }

    public func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        guard let inFlight = commands[Int(tag)] else { return }
        commands[Int(tag)] = nil
        freeTags.append(Int(tag))
        let nvmeStatus: NVMeStatus = status == .success ? .success : .dataTransferError
        if inFlight.opcode == NVMOpcode.datasetManagement.rawValue {
            dsmRemaining[inFlight.commandID, default: 1] -= 1
            guard dsmRemaining[inFlight.commandID] == 0 else { return }
            dsmRemaining[inFlight.commandID] = nil
        }
        complete(queue: inFlight.queue, commandID: inFlight.commandID, status: nvmeStatus)
    }
}

/// The driver's view of a software controller.
final class EmulatedTransport: NVMeTransport, @unchecked Sendable {
    let controller: NVMeSoftController
    init(controller: NVMeSoftController) { self.controller = controller }
    var registers: UnsafeMutableRawPointer { controller.bar }
    var name: String { "nvme-emu(\(controller.namespace.name))" }
    func busAddress(of pointer: UnsafeRawPointer) -> UInt64? { UInt64(UInt(bitPattern: pointer)) }
    func close() {}
    func registersWritten() { controller.reactor.wake() }
    func connectInterrupt(vector: Int, to reactor: Reactor) -> Bool {
        controller.interruptRoutes.withLock { $0[vector] = reactor }
        return true
    }
    func disconnectInterrupt(vector: Int) { _ = controller.interruptRoutes.withLock { $0.removeValue(forKey: vector) } }
}
