#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env
import Synchronization

/// One I/O queue pair per channel (per reactor): the data path. Requests become one or
/// more commands (split at the controller's maximum transfer and 65,536 blocks), with
/// PRP1/PRP2 or a PRP list from the command slot's preallocated list page; memory that
/// PRPs cannot describe (a segment boundary off a page boundary) goes through a bounce
/// buffer. The SQ tail doorbell is rung once per poll, the CQ head doorbell once per
/// batch of completions. A full queue parks requests in a preallocated list. Commands
/// older than the timeout are aborted (Abort admin command) and fail their request with
/// ETIMEDOUT (the slot stays reserved until the controller answers). A controller fatal
/// status (CSTS.CFS) resets the controller (`NVMeController.recoverFromFatalStatus`); the
/// queue pair is then created again with its queue ID and every unanswered command sent
/// again (writes, write zeroes and flushes are idempotent); if the reset fails, requests
/// fail with `BdevError.deviceLost`.
final class NVMeQueuePair: BdevBackendChannel {
    private final class Slot {
        unowned(unsafe) var io: BdevIO?
        let prpList: DMABuffer
        var bounce = -1
        var byteOffset = 0
        var bytes = 0
        var submittedNs: UInt64 = 0
        var timedOut = false
        /// The entry as sent, to send again after a controller reset.
        var command = SubmissionEntry()
        init() throws { prpList = try DMABuffer.allocate(bytes: 4096) }
    }

    private let controller: NVMeController
    private let transport: NVMeTransport
    private let reactor: Reactor
    private let queueID: Int
    private let entries: Int
    private let submissionQueue: DMABuffer
    private let completionQueue: DMABuffer
    private let sqBase: UnsafeMutableRawPointer
    private let cqBase: UnsafeMutableRawPointer
    private let sqDoorbell: Int
    private let cqDoorbell: Int
    private let blockBytes: Int
    private let maxTransferBytes: Int
    private let timeoutNs: UInt64
    private var sqTail = 0
    private var cqHead = 0
    private var phase = true
    private var doorbellDue = false
    private var slots: ContiguousArray<Slot> = []
    private var freeSlots: ContiguousArray<Int> = []
    private let bounceBuffer: DMABuffer
    private var freeBounces: ContiguousArray<Int> = []
    private static let bounceCount = 8
    /// Requests waiting for a slot or bounce buffer, oldest first.
    private var waiting: ContiguousArray<BdevIO> = []
    private var waitingHead = 0
    /// Per request (by BdevIO.index): bytes (or blocks) already turned into commands,
    /// commands outstanding, and the first failure.
    private var progress: [Int]
    private var outstanding: [Int]
    private var failure: [BdevStatus]
    private var failed = false
    private var failedError = BdevError.io(errno: EIO)
    /// The controller's reset generation this queue was created under.
    private var generation: UInt64
    private var timerID: PollerID?
    private(set) var lastError: NVMeStatus?
    private var inFlightCommands = 0
    private(set) var timeouts = 0
    /// Commands whose requests already failed (timeout, fatal status), slots still held.
    private var quarantined = 0
    private let unmapByDeallocate: Bool
    /// The controller wakes our reactor when it posts completions (an interrupt): commands
    /// in flight need no polling meanwhile.
    private let interrupts: Bool

    init(controller: NVMeController, reactor: Reactor, entries requested: Int, timeoutNs: UInt64) throws {
        self.controller = controller
        transport = controller.transport
        self.reactor = reactor
        entries = min(requested, controller.capabilities.maxQueueEntries)
        blockBytes = controller.namespaceData.blockSizeBytes
        maxTransferBytes = min(controller.maxTransferBytes, 65536 * blockBytes) / blockBytes * blockBytes
        self.timeoutNs = timeoutNs
        // Write Zeroes (with the deallocate hint) guarantees zeros; a dataset-management
        // deallocate only where write zeroes is missing and the namespace promises zeros
        // (QEMU's, for one, can promise and not deliver on a backend opened without discard).
        unmapByDeallocate = !controller.controllerData.supportsWriteZeroes
            && controller.namespaceData.deallocatedReadsZeros && controller.controllerData.supportsDatasetManagement
        submissionQueue = try DMABuffer.allocate(bytes: entries * SubmissionEntry.bytes)
        completionQueue = try DMABuffer.allocate(bytes: entries * CompletionEntry.bytes)
        submissionQueue.fill(0)
        completionQueue.fill(0)
        sqBase = submissionQueue.segment().base
        cqBase = completionQueue.segment().base
        bounceBuffer = try DMABuffer.allocate(bytes: Self.bounceCount * maxTransferBytes)
        for index in 0..<(entries - 1) {
            slots.append(try Slot())
            freeSlots.append(entries - 2 - index)
        }
        freeBounces = ContiguousArray((0..<Self.bounceCount).reversed())
        waiting.reserveCapacity(BdevLimits.queueDepthMax)
        progress = [Int](repeating: 0, count: BdevLimits.queueDepthMax)
        outstanding = [Int](repeating: 0, count: BdevLimits.queueDepthMax)
        failure = [BdevStatus](repeating: .success, count: BdevLimits.queueDepthMax)
        generation = controller.generation
        (queueID, interrupts) = try controller.createQueuePair(entries: entries, submission: sqBase, completion: cqBase,
                                                               interruptsTo: reactor)
        sqDoorbell = NVMeRegister.doorbell(queue: queueID, completion: false, strideShift: controller.strideShift)
        cqDoorbell = NVMeRegister.doorbell(queue: queueID, completion: true, strideShift: controller.strideShift)
        timerID = reactor.registerTimedPoller(periodNs: 50_000_000) { [unowned self] in self.checkHealth() }
    }

    func close() {
        // Timed-out commands may never come back; deleting the queue ends them.
        precondition(inFlightCommands == quarantined || failed, "NVMe queue pair closed with commands in flight")
        if let timerID { reactor.unregisterPoller(timerID) }
        timerID = nil
        if !failed { controller.deleteQueuePair(queueID) }
    }

    // MARK: - Submission

    func submit(_ io: BdevIO) {
        progress[io.index] = 0
        outstanding[io.index] = 0
        failure[io.index] = .success
        if failed { return io.complete(.failed(failedError)) }
        if waitingHead < waiting.count || !issue(io) { waiting.append(io) }
    }

    /// Issues as many commands of `io` as slots allow; true when all are issued.
    private func issue(_ io: BdevIO) -> Bool {
        switch io.type {
        case .flush:
            guard progress[io.index] == 0 else { return true }
            guard let slot = freeSlots.popLast() else { return false }
            var command = SubmissionEntry()
            command.opcode = NVMOpcode.flush.rawValue
            send(command, slot: slot, io: io, bytes: 0)
            progress[io.index] = 1
            return true
        case .writeZeroes, .unmap:
            // Unmap must read back as zeros (see unmapByDeallocate).
            let deallocate = io.type == .unmap && unmapByDeallocate
            if !deallocate && !controller.controllerData.supportsWriteZeroes {
                if progress[io.index] == 0 && outstanding[io.index] == 0 { io.complete(.failed(.unsupported("write zeroes"))) }
                return true
            }
            while UInt64(progress[io.index]) < io.countBlocks {
                guard let slot = freeSlots.popLast() else { return false }
                let done = UInt64(progress[io.index])
                let count = min(io.countBlocks - done, deallocate ? UInt64(UInt32.max) : 65536)
                var command = SubmissionEntry()
                if !deallocate {
                    command.opcode = NVMOpcode.writeZeroes.rawValue
                    command.startingLBA = io.offsetBlocks + done
                    command.blockCount = Int(count)
                    if io.type == .unmap { command.cdw12 |= 1 << 25 }  // DEAC: deallocate if it can
                } else {
                    command.opcode = NVMOpcode.datasetManagement.rawValue
                    command.cdw10 = 0         // one range
                    command.cdw11 = 1 << 2    // deallocate
                    let record = slots[slot]
                    record.prpList.withUnsafeMutableBytes { range in
                        range.storeBytes(of: UInt32(0), toByteOffset: 0, as: UInt32.self)
                        range.storeBytes(of: UInt32(count).littleEndian, toByteOffset: 4, as: UInt32.self)
                        range.storeBytes(of: (io.offsetBlocks + done).littleEndian, toByteOffset: 8, as: UInt64.self)
                    }
                    command.prp1 = controller.busAddress(record.prpList.segment().base)
                }
                send(command, slot: slot, io: io, bytes: 0)
                progress[io.index] += Int(count)
            }
            return true
        case .read, .write:
            while progress[io.index] < io.byteCount {
                guard let slot = freeSlots.last else { return false }
                let offset = progress[io.index]
                let bytes = min(maxTransferBytes, io.byteCount - offset)
                var command = SubmissionEntry()
                command.opcode = io.type == .read ? NVMOpcode.read.rawValue : NVMOpcode.write.rawValue
                command.startingLBA = io.offsetBlocks + UInt64(offset / blockBytes)
                command.blockCount = bytes / blockBytes
                if !describe(io, offset: offset, bytes: bytes, slot: slots[slot], into: &command) {
                    guard let bounce = freeBounces.popLast() else { return false }
                    let memory = bounceBuffer.segment(offset: bounce * maxTransferBytes, count: maxTransferBytes).base
                    if io.type == .write { copy(io, offset: offset, bytes: bytes, to: memory) }
                    slots[slot].bounce = bounce
                    command.prp1 = controller.busAddress(memory)
                    fillPRPs(from: memory, bytes: bytes, slot: slots[slot], into: &command)
                }
                freeSlots.removeLast()
                send(command, slot: slot, io: io, bytes: bytes, byteOffset: offset)
                progress[io.index] += bytes
            }
            return true
        }
    }

    @inline(__always)
    private func send(_ command: SubmissionEntry, slot: Int, io: BdevIO, bytes: Int, byteOffset: Int = 0) {
        var entry = command
        entry.commandID = UInt16(slot)
        entry.namespaceID = 1
        let record = slots[slot]
        record.io = io
        record.bytes = bytes
        record.byteOffset = byteOffset
        record.timedOut = false
        record.submittedNs = MonotonicClock.nowNs()
        record.command = entry
        entry.store(to: sqBase + sqTail * SubmissionEntry.bytes)
        sqTail = sqTail + 1 == entries ? 0 : sqTail + 1
        doorbellDue = true
        outstanding[io.index] += 1
        inFlightCommands += 1
    }

    /// PRPs straight over the request's memory, when its segments allow: every segment
    /// boundary inside the command must fall on a page boundary, and addresses be dword aligned.
    private func describe(_ io: BdevIO, offset: Int, bytes: Int, slot: Slot, into command: inout SubmissionEntry) -> Bool {
        var skip = offset
        var remaining = bytes
        var pages = 0
        var first = true
        var listIndex = 0
        var ok = true
        slot.prpList.withUnsafeMutableBytes { list in
            for index in 0..<io.segmentCount where remaining > 0 {
                let vector = io.iovecs[index]
                if skip >= vector.iov_len {
                    skip -= vector.iov_len
                    continue
                }
                let start = vector.iov_base! + skip
                let length = min(vector.iov_len - skip, remaining)
                skip = 0
                let address = UInt(bitPattern: start)
                if address & 3 != 0 || (!first && address & 4095 != 0) { ok = false; return }
                remaining -= length
                if remaining > 0 && (address + UInt(length)) & 4095 != 0 { ok = false; return }
                // One PRP entry per page touched.
                var page = address & ~4095
                let end = address + UInt(length)
                while page < end {
                    let entryAddress = first ? address : page
                    let bus = controller.busAddress(UnsafeRawPointer(bitPattern: entryAddress)!)
                    if pages == 0 {
                        command.prp1 = bus
                    } else {
                        if listIndex >= 512 { ok = false; return }
                        list.storeBytes(of: bus.littleEndian, toByteOffset: listIndex * 8, as: UInt64.self)
                        listIndex += 1
                    }
                    pages += 1
                    first = false
                    page += 4096
                }
            }
        }
        guard ok else { return false }
        if pages == 2 {
            command.prp2 = slot.prpList.withUnsafeBytes { UInt64(littleEndian: $0.load(fromByteOffset: 0, as: UInt64.self)) }
        } else if pages > 2 {
            command.prp2 = controller.busAddress(slot.prpList.segment().base)
        }
        return true
    }

    /// PRPs over contiguous bounce memory.
    private func fillPRPs(from memory: UnsafeMutableRawPointer, bytes: Int, slot: Slot, into command: inout SubmissionEntry) {
        let pages = (bytes + 4095) / 4096
        if pages == 2 {
            command.prp2 = controller.busAddress(memory + 4096)
        } else if pages > 2 {
            slot.prpList.withUnsafeMutableBytes { list in
                for index in 1..<pages {
                    list.storeBytes(of: controller.busAddress(memory + index * 4096).littleEndian,
                                    toByteOffset: (index - 1) * 8, as: UInt64.self)
                }
            }
            command.prp2 = controller.busAddress(slot.prpList.segment().base)
        }
    }

    /// Copies `bytes` of the request's data from byte `offset` into `memory`, or back.
    private func copy(_ io: BdevIO, offset: Int, bytes: Int, to memory: UnsafeMutableRawPointer, reverse: Bool = false) {
        var skip = offset
        var done = 0
        for index in 0..<io.segmentCount where done < bytes {
            let vector = io.iovecs[index]
            if skip >= vector.iov_len {
                skip -= vector.iov_len
                continue
            }
            let length = min(vector.iov_len - skip, bytes - done)
            if reverse {
                (vector.iov_base! + skip).copyMemory(from: memory + done, byteCount: length)
            } else {
                (memory + done).copyMemory(from: vector.iov_base! + skip, byteCount: length)
            }
            done += length
            skip = 0
        }
    }

    // MARK: - Completion

    func poll() -> PollStatus {
        var busy = false
        if generation != controller.generation && !failed {
            recover()  // another queue pair reset the controller: this queue is gone
            busy = true
        }
        if doorbellDue {
            transport.write32(sqDoorbell, UInt32(sqTail))
            doorbellDue = false
            busy = true
        }
        var reaped = 0
        while true {
            let slotAddress = cqBase + cqHead * CompletionEntry.bytes
            guard blobfsPhase(slotAddress) == phase else { break }
            atomicMemoryFence(ordering: .acquiring)
            let entry = CompletionEntry(loadingFrom: slotAddress)
            cqHead += 1
            if cqHead == entries {
                cqHead = 0
                phase.toggle()
            }
            reaped += 1
            finish(slot: Int(entry.commandID), status: entry.status)
        }
        if reaped > 0 {
            transport.write32(cqDoorbell, UInt32(cqHead))
            busy = true
        }
        while waitingHead < waiting.count, issue(waiting[waitingHead]) {
            waitingHead += 1
            busy = true
        }
        if waitingHead == waiting.count && waitingHead > 0 {
            waiting.removeAll(keepingCapacity: true)
            waitingHead = 0
        }
        if doorbellDue {
            transport.write32(sqDoorbell, UInt32(sqTail))
            doorbellDue = false
        }
        if busy { return .busy }
        return inFlightCommands > 0 && !interrupts ? .pending : .idle
    }

    private func finish(slot index: Int, status: NVMeStatus) {
        guard index < slots.count, let io = slots[index].io else { return }  // stray or duplicate completion
        let slot = slots[index]
        slot.io = nil
        inFlightCommands -= 1
        if slot.bounce >= 0 {
            if status.isSuccess && io.type == .read && !slot.timedOut {
                copy(io, offset: slot.byteOffset, bytes: slot.bytes,
                     to: bounceBuffer.segment(offset: slot.bounce * maxTransferBytes, count: maxTransferBytes).base,
                     reverse: true)
            }
            freeBounces.append(slot.bounce)
            slot.bounce = -1
        }
        freeSlots.append(index)
        if slot.timedOut {  // its request already failed
            quarantined -= 1
            return
        }
        if !status.isSuccess {
            lastError = status
            if failure[io.index] == .success {
                failure[io.index] = .failed(.deviceStatus(code: UInt32(status.raw), meaning: status.description))
            }
        }
        partDone(io)
    }

    private func partDone(_ io: BdevIO) {
        outstanding[io.index] -= 1
        let issued = io.type == .read || io.type == .write ? progress[io.index] == io.byteCount
            : io.type == .flush ? progress[io.index] == 1 : UInt64(progress[io.index]) == io.countBlocks
        if outstanding[io.index] == 0 && issued { io.complete(failure[io.index]) }
    }

    /// Timed poller: command timeouts and controller fatal status.
    private func checkHealth() -> PollStatus {
        guard inFlightCommands > 0 || waitingHead < waiting.count, !failed else { return .idle }
        if generation != controller.generation || controller.isFatal {
            recover()
            return .busy
        }
        let now = MonotonicClock.nowNs()
        var index = 0
        for slot in slots {
            defer { index += 1 }
            guard slot.io != nil, !slot.timedOut, now &- slot.submittedNs > timeoutNs else { continue }
            slot.timedOut = true
            timeouts += 1
            quarantined += 1
            // Ask the controller to abort it (an exceptional, synchronous admin command);
            // whatever it answers, the request fails now and the slot stays reserved
            // until the controller completes or aborts the command.
            controller.abort(queueID: queueID, commandID: UInt16(index))
            let io = slot.io!
            if failure[io.index] == .success { failure[io.index] = .failed(.io(errno: ETIMEDOUT)) }
            partDone(io)
        }
        return .idle
    }

    /// After a controller reset (by this queue pair or another): the queues are gone, so
    /// they are made again on the same memory and ID; commands that timed out are
    /// forgotten (their requests already failed), the others are sent again.
    private func recover() {
        do {
            let seen = generation
            if controller.generation == seen { try controller.recoverFromFatalStatus(seenGeneration: seen) }
            generation = controller.generation
            submissionQueue.fill(0)
            completionQueue.fill(0)
            sqTail = 0
            cqHead = 0
            phase = true
            doorbellDue = false
            // A doorbell this thread rang after the reset but before it saw the new
            // generation left a stale tail in a register the reset had zeroed: zero it
            // again before the queue exists, or the controller would read that tail.
            transport.write32(sqDoorbell, 0)
            transport.write32(cqDoorbell, 0)
            try controller.createQueues(queueID: queueID, entries: entries, submission: sqBase, completion: cqBase,
                                        interrupts: interrupts)
        } catch {
            failAll(.deviceLost("\(transport.name): controller fatal status and the reset failed: \(error)"))
            return
        }
        let now = MonotonicClock.nowNs()
        for index in slots.indices where slots[index].io != nil {
            let slot = slots[index]
            if slot.timedOut {
                slot.io = nil
                if slot.bounce >= 0 {
                    freeBounces.append(slot.bounce)
                    slot.bounce = -1
                }
                freeSlots.append(index)
                inFlightCommands -= 1
                quarantined -= 1
                continue
            }
            slot.command.store(to: sqBase + sqTail * SubmissionEntry.bytes)
            sqTail = sqTail + 1 == entries ? 0 : sqTail + 1
            slot.submittedNs = now
            doorbellDue = true
        }
    }

    private func failAll(_ error: BdevError) {
        failed = true
        failedError = error
        for slot in slots where slot.io != nil && !slot.timedOut {
            slot.timedOut = true
            quarantined += 1
            let io = slot.io!
            if failure[io.index] == .success { failure[io.index] = .failed(error) }
            partDone(io)
        }
        while waitingHead < waiting.count {
            let io = waiting[waitingHead]
            waitingHead += 1
            if outstanding[io.index] == 0 { io.complete(.failed(error)) } else {
                progress[io.index] = io.type == .read || io.type == .write ? io.byteCount : Int(io.countBlocks)
                if io.type == .flush { progress[io.index] = 1 }
            }
        }
        waiting.removeAll(keepingCapacity: true)
        waitingHead = 0
    }
}
