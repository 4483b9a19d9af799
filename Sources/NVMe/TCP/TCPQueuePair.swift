#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env

/// One NVMe/TCP I/O queue per channel: its own TCP connection, connected (TCP connect,
/// ICReq, Fabrics Connect with the association's controller ID) and polled by the
/// channel's reactor, its socket in that reactor's epoll set so a sleeping reactor wakes
/// when a response arrives. Requests become commands split at the controller's maximum
/// transfer; write data travels in the capsule up to the controller's in-capsule size,
/// after an R2T beyond. A request waits (preallocated list) when no slot or no send room
/// is free.
///
/// Faults: a connection that fails (EOF, reset, protocol or digest error, a command
/// unanswered for `commandTimeoutNs`) is closed and reported to the controller, which
/// makes a new association; the queue then reconnects on its reactor and sends every
/// unanswered command again (writes, write zeroes and flushes are idempotent). While
/// the device is lost (`NVMeTCPController.isLost`) waiting and new requests fail with
/// `BdevError.deviceLost`. No allocation per I/O.
final class NVMeTCPQueuePair: BdevBackendChannel, NVMeTCPConnectionDelegate {
    private struct Slot {
        unowned(unsafe) var io: BdevIO?
        var command = SubmissionEntry()
        var data = TCPCommandData()
        var submittedNs: UInt64 = 0
        /// Sent on the current connection (false: waits to be sent again after a reconnect).
        var sent = false
        /// Connections that failed with this command unanswered.
        var failedConnections = 0
    }

    /// A command whose connection failed this many times fails its request with EIO
    /// (a command the target cannot take would otherwise be resent forever; the Linux
    /// host's nvme_max_retries is 5 as well).
    static let connectionFailuresMax = 5

    private enum Link: Equatable {
        case down
        case connecting(epoch: UInt64, deadlineNs: UInt64)
        case live(epoch: UInt64)
    }

    private let controller: NVMeTCPController
    private let reactor: Reactor
    private let connection: NVMeTCPConnection
    private let queueID: Int
    private let entries: Int
    private let blockBytes: Int
    private let maxTransferBytes: Int
    private let timeoutNs: UInt64
    private var link = Link.down
    private var slots: ContiguousArray<Slot>
    private var freeSlots: ContiguousArray<Int> = []
    private let connectSlot: Int
    private let connectBuffer: UnsafeMutableRawPointer
    private let connectIOVec: UnsafeMutablePointer<iovec>
    private var connectAnswered = false
    private var connectStatus = NVMeStatus.success
    private var resendPending = false
    private var registeredFD: Int32 = -1
    /// Requests waiting for a slot or send room, oldest first.
    private var waiting: ContiguousArray<BdevIO> = []
    private var waitingHead = 0
    /// Per request (by BdevIO.index): bytes (or blocks) turned into commands, commands
    /// outstanding, first failure.
    private var progress: [Int]
    private var outstanding: [Int]
    private var failure: [BdevStatus]
    private var timerID: PollerID?
    private var inFlightCommands = 0
    private let supportsWriteZeroes: Bool
    private(set) var reconnects = 0

    init(controller: NVMeTCPController, reactor: Reactor) throws {
        self.controller = controller
        self.reactor = reactor
        entries = min(controller.options.ioQueueEntries, controller.capabilities.maxQueueEntries)
        blockBytes = controller.namespaceData.blockSizeBytes
        maxTransferBytes = min(controller.maxTransferBytes, 65536 * blockBytes) / blockBytes * blockBytes
        timeoutNs = controller.options.commandTimeoutNs
        supportsWriteZeroes = controller.controllerData.supportsWriteZeroes
        guard let queueID = controller.takeQueueID() else {
            throw NVMeController.InitError.unsupported("all \(controller.ioQueuesGranted) I/O queues are in use")
        }
        self.queueID = queueID
        // One slot fewer than entries (a full SQ is entries - 1), plus one for Connect.
        connectSlot = entries - 1
        connection = NVMeTCPConnection(endpoint: controller.address, slotCount: entries)
        slots = ContiguousArray(repeating: Slot(), count: entries)
        freeSlots = ContiguousArray((0..<(entries - 1)).reversed())
        connectBuffer = .allocate(byteCount: ConnectData.bytes, alignment: 64)
        connectIOVec = .allocate(capacity: 1)
        connectIOVec.pointee = iovec(iov_base: connectBuffer, iov_len: ConnectData.bytes)
        waiting.reserveCapacity(BdevLimits.queueDepthMax)
        progress = [Int](repeating: 0, count: BdevLimits.queueDepthMax)
        outstanding = [Int](repeating: 0, count: BdevLimits.queueDepthMax)
        failure = [BdevStatus](repeating: .success, count: BdevLimits.queueDepthMax)
        connection.delegate = self
        do {
            try connectNow()
        } catch {
            connection.close()
            controller.returnQueueID(queueID)
            connectBuffer.deallocate()
            connectIOVec.deallocate()
            throw error
        }
        timerID = reactor.registerTimedPoller(periodNs: 50_000_000) { [unowned self] in self.checkHealth() }
    }

    deinit {
        connectBuffer.deallocate()
        connectIOVec.deallocate()
    }

    /// The first connect, on the channel's reactor at channel creation: driven here until
    /// live or the connect timeout.
    private func connectNow() throws {
        guard let association = controller.association() else {
            throw NVMeTCPError.timeout("no association with \(controller.name)")
        }
        try startConnect(association)
        while true {
            if case .live = link { return }
            guard case let .connecting(_, deadline) = link else { throw NVMeTCPError.closedByTarget }
            let progress = try connection.poll()
            try advanceConnect()
            if case .live = link { return }
            if MonotonicClock.nowNs() > deadline { throw NVMeTCPError.timeout("I/O queue \(queueID) connect") }
            if progress != .busy {
                var entry = pollfd(fd: connection.fd, events: Int16(POLLIN) | (progress == .blocked ? Int16(POLLOUT) : 0), revents: 0)
                _ = Glibc.poll(&entry, 1, 10)
            }
        }
    }

    private func startConnect(_ association: (epoch: UInt64, controllerID: UInt16)) throws(NVMeTCPError) {
        connectAnswered = false
        try connection.open(headerDigest: controller.options.headerDigest, dataDigest: controller.options.dataDigest)
        connection.inCapsuleBytesMax = max(controller.inCapsuleBytesMax, ConnectData.bytes)
        controller.connectData(controllerID: association.controllerID)
            .encode(into: UnsafeMutableRawBufferPointer(start: connectBuffer, count: ConnectData.bytes))
        link = .connecting(epoch: association.epoch, deadlineNs: MonotonicClock.nowNs() + controller.options.connectTimeoutNs)
        registerSocket()
    }

    /// Moves a connect along: ICResp seen → send Connect; Connect answered → live.
    private func advanceConnect() throws(NVMeTCPError) {
        guard case let .connecting(epoch, _) = link, connection.isInitialized else { return }
        if connectAnswered {
            guard connectStatus.isSuccess else {
                throw .command(NVMeError(status: connectStatus, opcode: FabricsOpcode.fabrics))
            }
            // The in-capsule size of the I/O queue is the controller's (Connect data was 1 KiB).
            connection.inCapsuleBytesMax = controller.inCapsuleBytesMax
            link = .live(epoch: epoch)
            resendPending = inFlightCommands > 0
            return
        }
        if connection.commandsInFlight == 0 {
            let command = FabricsCommand.connect(queueID: UInt16(queueID), submissionQueueEntries: entries,
                                                 keepAliveTimeoutMs: 0)
            let data = TCPCommandData(iovecs: UnsafePointer(connectIOVec), segmentCount: 1, skipBytes: 0,
                                      bytes: ConnectData.bytes, toController: true)
            _ = connection.submit(slot: connectSlot, command: command, data: data)
        }
    }

    private func registerSocket() {
        unregisterSocket()
        let fd = connection.fd
        guard fd >= 0 else { return }
        do {
            try reactor.registerWakeFD(fd)
            registeredFD = fd
        } catch {
            // Without the fd in epoll the poller still sees responses, only later.
            registeredFD = -1
        }
    }

    private func unregisterSocket() {
        if registeredFD >= 0 { reactor.unregisterWakeFD(registeredFD) }
        registeredFD = -1
    }

    func close() {
        precondition(inFlightCommands == 0, "NVMe/TCP queue pair closed with commands in flight")
        if let timerID { reactor.unregisterPoller(timerID) }
        timerID = nil
        unregisterSocket()
        connection.close()
        controller.returnQueueID(queueID)
    }

    // MARK: - Submission

    func submit(_ io: BdevIO) {
        progress[io.index] = 0
        outstanding[io.index] = 0
        failure[io.index] = .success
        if controller.isLost && !isLive { return io.complete(.failed(lostError)) }
        if waitingHead < waiting.count || !issue(io) { waiting.append(io) }
    }

    /// Connected under the controller's current association. A connection of an older
    /// one belongs to a controller the target may still run but the host left: nothing
    /// more goes on it (the next poll closes it and reconnects).
    private var isLive: Bool {
        if case let .live(epoch) = link { return epoch == controller.currentEpoch }
        return false
    }

    private var lostError: BdevError {
        .deviceLost("\(controller.name): target unreachable for over \(controller.options.deviceLossTimeoutNs / 1_000_000_000) s (\(controller.lossReason))")
    }

    /// Issues as many commands of `io` as slots and send room allow; true when all are.
    private func issue(_ io: BdevIO) -> Bool {
        guard isLive else { return false }
        switch io.type {
        case .flush:
            guard progress[io.index] == 0 else { return true }
            var command = SubmissionEntry()
            command.opcode = NVMOpcode.flush.rawValue
            guard send(command, io: io, data: TCPCommandData()) else { return false }
            progress[io.index] = 1
            return true
        case .writeZeroes, .unmap:
            guard supportsWriteZeroes else {
                if progress[io.index] == 0 && outstanding[io.index] == 0 { io.complete(.failed(.unsupported("write zeroes"))) }
                return true
            }
            while UInt64(progress[io.index]) < io.countBlocks {
                let done = UInt64(progress[io.index])
                let count = min(io.countBlocks - done, 65536)
                var command = SubmissionEntry()
                command.opcode = NVMOpcode.writeZeroes.rawValue
                command.startingLBA = io.offsetBlocks + done
                command.blockCount = Int(count)
                if io.type == .unmap { command.cdw12 |= 1 << 25 }  // DEAC: deallocate if it can (zeros guaranteed)
                guard send(command, io: io, data: TCPCommandData()) else { return false }
                progress[io.index] += Int(count)
            }
            return true
        case .read, .write:
            while progress[io.index] < io.byteCount {
                let offset = progress[io.index]
                let bytes = min(maxTransferBytes, io.byteCount - offset)
                var command = SubmissionEntry()
                command.opcode = io.type == .read ? NVMOpcode.read.rawValue : NVMOpcode.write.rawValue
                command.startingLBA = io.offsetBlocks + UInt64(offset / blockBytes)
                command.blockCount = bytes / blockBytes
                let data = TCPCommandData(iovecs: UnsafePointer(io.iovecs), segmentCount: io.segmentCount, skipBytes: offset,
                                          bytes: bytes, toController: io.type == .write)
                guard send(command, io: io, data: data) else { return false }
                progress[io.index] += bytes
            }
            return true
        }
    }

    @inline(__always)
    private func send(_ command: SubmissionEntry, io: BdevIO, data: TCPCommandData) -> Bool {
        guard let slot = freeSlots.last else { return false }
        var entry = command
        entry.namespaceID = 1
        guard connection.submit(slot: slot, command: entry, data: data) else { return false }
        freeSlots.removeLast()
        slots[slot].io = io
        slots[slot].command = entry
        slots[slot].data = data
        slots[slot].submittedNs = MonotonicClock.nowNs()
        slots[slot].sent = true
        slots[slot].failedConnections = 0
        outstanding[io.index] += 1
        inFlightCommands += 1
        return true
    }

    // MARK: - Completion

    func tcpCommandCompleted(slot index: Int, completion: CompletionEntry) {
        if index == connectSlot {
            connectAnswered = true
            connectStatus = completion.status
            return
        }
        guard let io = slots[index].io else { return }
        slots[index].io = nil
        slots[index].sent = false
        freeSlots.append(index)
        inFlightCommands -= 1
        if !completion.status.isSuccess, failure[io.index] == .success {
            failure[io.index] = .failed(.deviceStatus(code: UInt32(completion.status.raw), meaning: completion.status.description))
        }
        partDone(io)
    }

    private func partDone(_ io: BdevIO) {
        outstanding[io.index] -= 1
        let issued = io.type == .read || io.type == .write ? progress[io.index] == io.byteCount
            : io.type == .flush ? progress[io.index] == 1 : UInt64(progress[io.index]) == io.countBlocks
        if outstanding[io.index] == 0 && issued { io.complete(failure[io.index]) }
    }

    func poll() -> PollStatus {
        var busy = false
        var blocked = false
        do {
            switch link {
            case let .live(epoch):
                if epoch != controller.currentEpoch {
                    connectionFailed("association \(epoch) replaced")
                    return .busy
                }
                if resendPending { resendUnanswered() }
                switch try connection.poll() {
                case .busy: busy = true
                case .blocked: blocked = true
                case .idle: break
                }
            case .connecting:
                blocked = try connection.poll() == .blocked
                try advanceConnect()
                if isLive { busy = true }
            case .down:
                return .idle
            }
        } catch {
            connectionFailed("\(error)")
            return .busy
        }
        while waitingHead < waiting.count, issue(waiting[waitingHead]) {
            waitingHead += 1
            busy = true
        }
        if waitingHead == waiting.count && waitingHead > 0 {
            waiting.removeAll(keepingCapacity: true)
            waitingHead = 0
        }
        if busy { return .busy }
        // Bytes waiting for socket room or a connect in progress are announced by no fd
        // in the epoll set (it watches readability only): keep the reactor polling.
        if blocked || (isLive && resendPending) { return .pending }
        if case .connecting = link { return .pending }
        return .idle
    }

    /// After a reconnect: every command that was unanswered goes again, in slot order.
    private func resendUnanswered() {
        let now = MonotonicClock.nowNs()
        for index in 0..<(entries - 1) where slots[index].io != nil && !slots[index].sent {
            guard connection.submit(slot: index, command: slots[index].command, data: slots[index].data) else { return }
            slots[index].sent = true
            slots[index].submittedNs = now
        }
        resendPending = false
    }

    /// The connection failed: close it, keep the unanswered commands for resending, and
    /// ask the controller for a new association.
    private func connectionFailed(_ reason: String) {
        let epoch: UInt64
        switch link {
        case let .live(value), let .connecting(value, _): epoch = value
        case .down: return
        }
        unregisterSocket()
        connection.close()
        link = .down
        var given = 0
        for index in 0..<(entries - 1) where slots[index].io != nil {
            slots[index].sent = false
            slots[index].failedConnections += 1
            guard slots[index].failedConnections >= Self.connectionFailuresMax, let io = slots[index].io else { continue }
            slots[index].io = nil
            freeSlots.append(index)
            inFlightCommands -= 1
            if failure[io.index] == .success { failure[io.index] = .failed(.io(errno: EIO)) }
            partDone(io)
            given += 1
        }
        if given > 0 {
            Log.logger("nvme.tcp").error("\(controller.name): \(given) commands failed with EIO after \(Self.connectionFailuresMax) connection failures (last: \(reason))")
        }
        controller.connectionLost(epoch: epoch, reason: "I/O queue \(queueID): \(reason)")
    }

    /// Timed poller: command timeouts, a newer association to move to, reconnecting, and
    /// failing what waits once the device is lost.
    private func checkHealth() -> PollStatus {
        switch link {
        case let .live(epoch):
            if controller.currentEpoch != epoch {
                connectionFailed("association \(epoch) replaced")
                return .busy
            }
            guard inFlightCommands > 0 else { return .idle }
            let now = MonotonicClock.nowNs()
            for index in 0..<(entries - 1) where slots[index].io != nil && slots[index].sent {
                if now &- slots[index].submittedNs > timeoutNs {
                    connectionFailed("command \(index) unanswered for \(timeoutNs / 1_000_000) ms")
                    return .busy
                }
            }
            return .idle
        case let .connecting(_, deadline):
            if MonotonicClock.nowNs() > deadline { connectionFailed("connect timed out") }
            return .idle
        case .down:
            if let association = controller.association() {
                do {
                    try startConnect(association)
                    reconnects += 1
                } catch {
                    connection.close()
                    controller.connectionLost(epoch: association.epoch, reason: "I/O queue \(queueID) connect: \(error)")
                }
                return .busy
            }
            if controller.isLost { failWaiting() }
            return .idle
        }
    }

    /// The device is lost: every request this queue holds fails with `deviceLost`.
    private func failWaiting() {
        let error = lostError
        for index in 0..<(entries - 1) {
            guard let io = slots[index].io else { continue }
            slots[index].io = nil
            slots[index].sent = false
            freeSlots.append(index)
            inFlightCommands -= 1
            if failure[io.index] == .success { failure[io.index] = .failed(error) }
            partDone(io)
        }
        while waitingHead < waiting.count {
            let io = waiting[waitingHead]
            waitingHead += 1
            if failure[io.index] == .success { failure[io.index] = .failed(error) }
            // Parts not yet issued never will be: count them as issued.
            progress[io.index] = io.type == .read || io.type == .write ? io.byteCount
                : io.type == .flush ? 1 : Int(io.countBlocks)
            if outstanding[io.index] == 0 { io.complete(failure[io.index]) }
        }
        waiting.removeAll(keepingCapacity: true)
        waitingHead = 0
    }
}
