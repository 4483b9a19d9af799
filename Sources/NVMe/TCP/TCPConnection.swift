#if canImport(Glibc)
import Glibc
#endif
import Env

/// The bytes a command moves: `bytes` bytes of an iovec array, starting `skipBytes` in.
/// The memory belongs to the caller and stays valid until the command completes.
struct TCPCommandData {
    var iovecs: UnsafePointer<iovec>?
    var segmentCount = 0
    var skipBytes = 0
    var bytes = 0
    /// Host to controller (a write: in-capsule or H2CData after R2T) or the reverse (C2HData).
    var toController = false

}

/// Receives the completions of an `NVMeTCPConnection`, on the thread that polls it.
protocol NVMeTCPConnectionDelegate: AnyObject {
    func tcpCommandCompleted(slot: Int, completion: CompletionEntry)
}

/// One NVMe/TCP connection (one queue: the admin queue or an I/O queue) as a PDU engine:
/// it frames command capsules (with in-capsule data up to the negotiated size), answers
/// R2Ts with H2CData PDUs, places C2HData into the commands' memory, checks and adds
/// header and data digests (CRC32C) when the connection negotiated them, and hands each
/// CapsuleResp to its delegate. Command IDs are slot numbers (0..<slotCount).
///
/// It never blocks and never allocates after init: bytes go out through a send buffer
/// (flushed with non-blocking `send`), come in through a receive buffer that the parser
/// drains completely each pass (a PDU's header is gathered apart, its data copied to its
/// command as it arrives), and per-slot state lives in arrays made at init. Every field a
/// target sends is checked (types, lengths, offsets, command IDs) before it is used; a
/// violation ends the connection with a typed error. Owned by one thread.
final class NVMeTCPConnection {
    struct Limits {
        static let sendBufferBytes = 256 << 10
        static let receiveBufferBytes = 256 << 10
        /// ICResp is the longest header (128) + a header digest.
        static let headerBytesMax = 256
    }

    let slotCount: Int
    let endpoint: TCPEndpoint
    unowned(unsafe) var delegate: (any NVMeTCPConnectionDelegate)?

    // Negotiated by ICReq/ICResp.
    private(set) var isInitialized = false
    private(set) var headerDigest = false
    private(set) var dataDigest = false
    private(set) var maxH2CDataBytes = 0
    /// PDO alignment of the PDUs we send (CPDA+1)*4; 0: none.
    private var controllerAlignmentBytes = 0
    private var wantHeaderDigest = false
    private var wantDataDigest = false
    /// Write data a command capsule may carry on this queue.
    var inCapsuleBytesMax = 0

    private var socket: TCPSocket?
    var fd: Int32 { socket?.fd ?? -1 }
    var isOpen: Bool { socket != nil }

    // Send buffer: [sendHead, sendTail) waits for the socket.
    private let sendBuffer: UnsafeMutableRawPointer
    private var sendHead = 0
    private var sendTail = 0
    private let receiveBuffer: UnsafeMutableRawPointer

    // Receive parser.
    private enum Phase { case header, padding, data, dataDigest }
    private var phase = Phase.header
    private let header: UnsafeMutableRawPointer
    private var headerHave = 0
    private var headerNeed = TCPPDU.commonHeaderBytes
    private var current = TCPCommonHeader.empty
    private var paddingLeft = 0
    private var dataLeft = 0
    private var dataSlot = -1     // -1: data is discarded (TermReq's error data)
    private var dataCursor = 0    // offset in the command's data of the next byte
    private var dataCRC = CRC32C()
    private var digestHave = 0
    private var digestBytes: UInt32 = 0
    private var dataFlags: UInt8 = 0

    // Per slot.
    private let slotData: UnsafeMutablePointer<TCPCommandData>
    private var slotActive: [Bool]
    /// Bytes of C2HData received per slot (a read must receive them all before success).
    private var slotReceived: [Int]
    // R2Ts waiting for H2CData, in arrival order: a ring of slots.
    private var h2cRing: [Int]
    private var h2cHead = 0
    private var h2cCount = 0
    private var h2cTag: [UInt16]
    private var h2cOffset: [Int]
    private var h2cEnd: [Int]
    private var h2cPending: [Bool]

    private(set) var commandsInFlight = 0

    init(endpoint: TCPEndpoint, slotCount: Int) {
        precondition(slotCount > 0 && slotCount <= 65535, "NVMe/TCP: \(slotCount) command slots")
        self.endpoint = endpoint
        self.slotCount = slotCount
        sendBuffer = .allocate(byteCount: Limits.sendBufferBytes, alignment: 64)
        receiveBuffer = .allocate(byteCount: Limits.receiveBufferBytes, alignment: 64)
        header = .allocate(byteCount: Limits.headerBytesMax, alignment: 16)
        slotData = .allocate(capacity: slotCount)
        slotData.initialize(repeating: TCPCommandData(), count: slotCount)
        slotActive = [Bool](repeating: false, count: slotCount)
        slotReceived = [Int](repeating: 0, count: slotCount)
        h2cRing = [Int](repeating: 0, count: slotCount)
        h2cTag = [UInt16](repeating: 0, count: slotCount)
        h2cOffset = [Int](repeating: 0, count: slotCount)
        h2cEnd = [Int](repeating: 0, count: slotCount)
        h2cPending = [Bool](repeating: false, count: slotCount)
    }

    deinit {
        sendBuffer.deallocate()
        receiveBuffer.deallocate()
        header.deallocate()
        slotData.deinitialize(count: slotCount)
        slotData.deallocate()
    }

    // MARK: - Connection

    /// Starts a TCP connect; `poll` finishes it and sends ICReq asking for the digests.
    func open(headerDigest: Bool, dataDigest: Bool) throws(NVMeTCPError) {
        precondition(socket == nil, "NVMe/TCP connection opened twice")
        resetState()
        wantHeaderDigest = headerDigest
        wantDataDigest = dataDigest
        socket = try TCPSocket.connecting(to: endpoint)
        connectPending = true
    }

    private var connectPending = false

    /// Closes the socket and forgets every command: the owner retries or fails them.
    func close() {
        socket = nil
        connectPending = false
        resetState()
    }

    private func resetState() {
        isInitialized = false
        sendHead = 0
        sendTail = 0
        phase = .header
        headerHave = 0
        headerNeed = TCPPDU.commonHeaderBytes
        h2cHead = 0
        h2cCount = 0
        for slot in 0..<slotCount {
            slotActive[slot] = false
            h2cPending[slot] = false
        }
        commandsInFlight = 0
    }

    // MARK: - Sending

    /// Room for `bytes` at the send buffer's tail, moving unsent bytes to the front if needed.
    @inline(__always)
    private func reserve(_ bytes: Int) -> UnsafeMutableRawPointer? {
        if sendTail + bytes > Limits.sendBufferBytes && sendHead > 0 {
            let pending = sendTail - sendHead
            sendBuffer.copyMemory(from: sendBuffer + sendHead, byteCount: pending)  // memmove semantics
            sendHead = 0
            sendTail = pending
        }
        guard sendTail + bytes <= Limits.sendBufferBytes else { return nil }
        return sendBuffer + sendTail
    }

    @inline(__always)
    private func alignedDataOffset(_ headerBytes: Int) -> Int {
        let unaligned = headerBytes + (headerDigest ? TCPPDU.digestBytes : 0)
        guard controllerAlignmentBytes > 0 else { return unaligned }
        return (unaligned + controllerAlignmentBytes - 1) / controllerAlignmentBytes * controllerAlignmentBytes
    }

    /// Bytes a capsule for `data` takes in the send buffer.
    @inline(__always)
    func capsuleBytes(_ data: TCPCommandData) -> Int {
        let inCapsule = data.toController && data.bytes > 0 && data.bytes <= inCapsuleBytesMax
        guard inCapsule else { return TCPPDU.capsuleCommandHeaderBytes + (headerDigest ? TCPPDU.digestBytes : 0) }
        return alignedDataOffset(TCPPDU.capsuleCommandHeaderBytes) + data.bytes + (dataDigest ? TCPPDU.digestBytes : 0)
    }

    /// Queues the command capsule of `slot`; false when the send buffer has no room yet.
    /// Write data up to `inCapsuleBytesMax` travels in the capsule, more waits for an R2T;
    /// the SGL descriptor in DPTR says which.
    func submit(slot: Int, command: SubmissionEntry, data: TCPCommandData) -> Bool {
        precondition(isInitialized && !slotActive[slot], "NVMe/TCP: slot \(slot) busy or queue not ready")
        let total = capsuleBytes(data)
        guard let pdu = reserve(total) else { return false }
        let inCapsule = data.toController && data.bytes > 0 && data.bytes <= inCapsuleBytesMax
        var entry = command
        entry.commandID = UInt16(slot)
        entry.dataTransfer = FabricsCommand.sglDataTransfer
        if inCapsule {
            SGLDescriptor.store(into: &entry, address: 0, length: UInt32(data.bytes), identifier: SGLDescriptor.inCapsuleIdentifier)
        } else if entry.opcode != FabricsOpcode.fabrics || data.bytes > 0 {
            // Fabrics commands bring their descriptor (Connect: its in-capsule data).
            SGLDescriptor.store(into: &entry, address: 0, length: UInt32(data.bytes), identifier: SGLDescriptor.transportIdentifier)
        }
        let headerBytes = TCPPDU.capsuleCommandHeaderBytes
        let dataOffset = inCapsule ? alignedDataOffset(headerBytes) : 0
        var flags: UInt8 = headerDigest ? TCPPDU.flagHeaderDigest : 0
        if inCapsule && dataDigest { flags |= TCPPDU.flagDataDigest }
        TCPPDU.storeCommonHeader(pdu, type: .capsuleCommand, flags: flags, headerBytes: headerBytes,
                                 dataOffset: dataOffset, totalBytes: total)
        entry.store(to: pdu + TCPPDU.commonHeaderBytes)
        if headerDigest { storeDigest(pdu, bytes: headerBytes, at: pdu + headerBytes) }
        if inCapsule {
            let target = pdu + dataOffset
            if dataOffset > headerBytes + (headerDigest ? 4 : 0) {
                (pdu + headerBytes + (headerDigest ? 4 : 0)).initializeMemory(
                    as: UInt8.self, repeating: 0, count: dataOffset - headerBytes - (headerDigest ? 4 : 0))
            }
            copyOut(data, offset: 0, bytes: data.bytes, to: target)
            if dataDigest { storeDigest(target, bytes: data.bytes, at: target + data.bytes) }
        }
        sendTail += total
        slotData[slot] = data
        slotActive[slot] = true
        slotReceived[slot] = 0
        commandsInFlight += 1
        return true
    }

    @inline(__always)
    private func storeDigest(_ bytes: UnsafeRawPointer, bytes count: Int, at target: UnsafeMutableRawPointer) {
        let digest = CRC32C.checksum(UnsafeRawBufferPointer(start: bytes, count: count))
        target.storeBytes(of: digest.littleEndian, as: UInt32.self)
    }

    /// H2CData PDUs for the R2Ts received, as far as the send buffer has room.
    private func pumpH2C() {
        let overhead = alignedDataOffset(TCPPDU.dataHeaderBytes) + (dataDigest ? TCPPDU.digestBytes : 0)
        while h2cCount > 0 {
            let slot = h2cRing[h2cHead]
            if !h2cPending[slot] {  // completed (with an error) before its data went out
                h2cHead = (h2cHead + 1) % slotCount
                h2cCount -= 1
                continue
            }
            let remaining = h2cEnd[slot] - h2cOffset[slot]
            // PDUs as large as MAXH2CDATA allows, never cut smaller for want of buffer
            // room (they wait for it): Linux 6.1's nvmet checks a data digest against
            // the whole transfer, so with digests it accepts only one H2CData PDU per R2T
            // when the R2T fits MAXH2CDATA, as its own host sends them.
            let chunk = min(remaining, maxH2CDataBytes)
            guard let pdu = reserve(overhead + chunk) else { return }
            let last = chunk == remaining
            let dataOffset = alignedDataOffset(TCPPDU.dataHeaderBytes)
            var flags: UInt8 = last ? TCPPDU.flagLastPDU : 0
            if headerDigest { flags |= TCPPDU.flagHeaderDigest }
            if dataDigest { flags |= TCPPDU.flagDataDigest }
            TCPPDU.storeCommonHeader(pdu, type: .h2cData, flags: flags, headerBytes: TCPPDU.dataHeaderBytes,
                                     dataOffset: dataOffset, totalBytes: overhead + chunk)
            TCPDataHeader(commandID: UInt16(slot), transferTag: h2cTag[slot], dataOffset: h2cOffset[slot],
                          dataBytes: chunk).store(to: pdu)
            if headerDigest { storeDigest(pdu, bytes: TCPPDU.dataHeaderBytes, at: pdu + TCPPDU.dataHeaderBytes) }
            let padding = dataOffset - TCPPDU.dataHeaderBytes - (headerDigest ? 4 : 0)
            if padding > 0 { (pdu + dataOffset - padding).initializeMemory(as: UInt8.self, repeating: 0, count: padding) }
            copyOut(slotData[slot], offset: h2cOffset[slot], bytes: chunk, to: pdu + dataOffset)
            if dataDigest { storeDigest(pdu + dataOffset, bytes: chunk, at: pdu + dataOffset + chunk) }
            sendTail += overhead + chunk
            h2cOffset[slot] += chunk
            if last {
                h2cPending[slot] = false
                h2cHead = (h2cHead + 1) % slotCount
                h2cCount -= 1
            }
        }
    }

    /// Sends what the socket takes; true when bytes are still waiting for room.
    private func flush() throws(NVMeTCPError) -> Bool {
        guard let socket else { return false }
        while sendHead < sendTail {
            let sent = try socket.send(sendBuffer + sendHead, count: sendTail - sendHead)
            if sent == 0 { return true }
            sendHead += sent
        }
        sendHead = 0
        sendTail = 0
        return false
    }

    // MARK: - Polling

    enum Progress { case idle, busy, blocked }

    /// Moves bytes both ways: finishes a connect, sends what waits, parses what arrived
    /// (calling the delegate for completions). `.blocked`: bytes wait for socket room (or
    /// the connect), so the caller keeps polling; `.idle`: nothing moved. Throws when the
    /// connection failed; the caller then `close()`s it.
    func poll() throws(NVMeTCPError) -> Progress {
        guard let socket else { return .idle }
        if connectPending {
            guard try socket.isConnected(endpoint: endpoint) else { return .blocked }
            connectPending = false
            guard let pdu = reserve(TCPPDU.icBytes) else { preconditionFailure("empty send buffer has no room") }
            TCPInitializeRequest(headerDigest: wantHeaderDigest, dataDigest: wantDataDigest).store(to: pdu)
            sendTail += TCPPDU.icBytes
        }
        var busy = false
        let startTail = sendTail
        if isInitialized { pumpH2C() }
        if sendTail != startTail { busy = true }
        var blocked = try flush()
        var rounds = 0
        while rounds < 4 {  // bounded: a fast sender does not starve the reactor's other pollers
            let received = try socket.receive(into: receiveBuffer, count: Limits.receiveBufferBytes)
            if received == 0 { break }
            busy = true
            try parse(count: received)
            rounds += 1
            if received < Limits.receiveBufferBytes { break }
        }
        if busy && isInitialized {
            pumpH2C()  // R2Ts that just arrived
            blocked = try flush()
        }
        if blocked { return .blocked }
        return busy || rounds == 4 ? .busy : .idle
    }

    // MARK: - Receiving

    private func parse(count: Int) throws(NVMeTCPError) {
        var offset = 0
        while offset < count {
            let available = count - offset
            switch phase {
            case .header:
                let take = min(available, headerNeed - headerHave)
                (header + headerHave).copyMemory(from: receiveBuffer + offset, byteCount: take)
                headerHave += take
                offset += take
                if headerHave == headerNeed { try headerProgress() }
            case .padding:
                let take = min(available, paddingLeft)
                paddingLeft -= take
                offset += take
                if paddingLeft == 0 { try enterData() }
            case .data:
                let take = min(available, dataLeft)
                let bytes = receiveBuffer + offset
                if current.hasDataDigest { dataCRC.update(UnsafeRawBufferPointer(start: bytes, count: take)) }
                if dataSlot >= 0 { copyIn(slotData[dataSlot], offset: dataCursor, bytes: take, from: bytes) }
                dataCursor += take
                dataLeft -= take
                offset += take
                if dataLeft == 0 { try enterDataDigest() }
            case .dataDigest:
                while digestHave < 4 && offset < count {
                    digestBytes |= UInt32(receiveBuffer.load(fromByteOffset: offset, as: UInt8.self)) << (8 * UInt32(digestHave))
                    digestHave += 1
                    offset += 1
                }
                if digestHave == 4 {
                    guard digestBytes == dataCRC.value else { throw .digestMismatch("data (PDU type \(current.rawType))") }
                    phase = .header
                    try pduDone()
                }
            }
        }
    }

    /// A piece of header is complete: the common header (which says how long the rest
    /// is) or the whole header with its digest.
    private func headerProgress() throws(NVMeTCPError) {
        if headerNeed == TCPPDU.commonHeaderBytes {
            current = TCPCommonHeader(loadingFrom: header)
            let hasDigest = current.hasHeaderDigest
            guard let type = current.type else { throw .protocolViolation("PDU type 0x\(String(current.rawType, radix: 16))") }
            let expected: Int = switch type {
            case .icResp: TCPPDU.icBytes
            case .capsuleResponse: TCPPDU.capsuleResponseHeaderBytes
            case .c2hData, .r2t, .c2hTermReq: TCPPDU.dataHeaderBytes
            default: -1
            }
            guard expected > 0 else { throw .protocolViolation("a host never receives PDU type \(type)") }
            guard current.headerBytes == expected else {
                throw .protocolViolation("PDU type \(type) with HLEN \(current.headerBytes), expected \(expected)")
            }
            guard isInitialized == (type == .icResp ? false : true) || type == .c2hTermReq else {
                throw .protocolViolation("PDU type \(type) \(isInitialized ? "after" : "before") ICResp")
            }
            guard !hasDigest || (headerDigest && type != .icResp) else {
                throw .protocolViolation("header digest that was not negotiated (PDU type \(type))")
            }
            headerNeed = expected + (hasDigest ? TCPPDU.digestBytes : 0)
            guard current.totalBytes >= headerNeed else {
                throw .protocolViolation("PLEN \(current.totalBytes) shorter than the header (\(headerNeed))")
            }
            if headerHave < headerNeed { return }
        }
        if current.hasHeaderDigest {
            let stored = UInt32(littleEndian: header.loadUnaligned(fromByteOffset: current.headerBytes, as: UInt32.self))
            guard stored == CRC32C.checksum(UnsafeRawBufferPointer(start: header, count: current.headerBytes)) else {
                throw .digestMismatch("header (PDU type \(current.rawType))")
            }
        }
        headerHave = 0
        headerNeed = TCPPDU.commonHeaderBytes
        try headerComplete()
    }

    private func headerComplete() throws(NVMeTCPError) {
        let headerEnd = current.headerBytes + (current.hasHeaderDigest ? TCPPDU.digestBytes : 0)
        var dataBytes = 0
        if current.dataOffset > 0 {
            guard current.dataOffset >= headerEnd, current.dataOffset <= current.totalBytes else {
                throw .protocolViolation("PDO \(current.dataOffset) outside the PDU (header ends at \(headerEnd), PLEN \(current.totalBytes))")
            }
            dataBytes = current.totalBytes - current.dataOffset - (current.hasDataDigest ? TCPPDU.digestBytes : 0)
            guard dataBytes >= 0 else { throw .protocolViolation("PLEN \(current.totalBytes) too short for its data digest") }
            guard !current.hasDataDigest || dataDigest else { throw .protocolViolation("data digest that was not negotiated") }
        } else {
            guard current.totalBytes == headerEnd else {
                throw .protocolViolation("PLEN \(current.totalBytes) with no data (header ends at \(headerEnd))")
            }
        }
        paddingLeft = current.dataOffset > 0 ? current.dataOffset - headerEnd : 0
        dataLeft = dataBytes
        dataSlot = -1
        dataCRC = CRC32C()
        switch current.type! {
        case .icResp: try initializeResponse()
        case .capsuleResponse: break
        case .r2t: try readyToTransfer()
        case .c2hData:
            let data = TCPDataHeader(loadingFrom: header)
            let slot = Int(data.commandID)
            guard slot < slotCount, slotActive[slot], !slotData[slot].toController else {
                throw .protocolViolation("C2HData for command \(slot), which is not a read in flight")
            }
            guard data.dataBytes == dataBytes, data.dataOffset == slotReceived[slot],
                  data.dataOffset + data.dataBytes <= slotData[slot].bytes else {
                throw .protocolViolation("C2HData for command \(slot): DATAO \(data.dataOffset) DATAL \(data.dataBytes) "
                                         + "(PDU data \(dataBytes), received \(slotReceived[slot]) of \(slotData[slot].bytes))")
            }
            dataSlot = slot
            dataCursor = data.dataOffset
            slotReceived[slot] += dataBytes
        case .c2hTermReq:
            guard dataBytes <= TCPPDU.termReqBytesMax else { throw .protocolViolation("C2HTermReq of \(dataBytes) bytes") }
        default: preconditionFailure("PDU type checked in headerProgress")
        }
        if paddingLeft > 0 {
            phase = .padding
        } else if current.dataOffset > 0 {
            try enterData()
        } else {
            phase = .header
            try pduDone()
        }
    }

    /// After the header and its padding: the data, then its digest, then the next PDU.
    private func enterData() throws(NVMeTCPError) {
        if dataLeft > 0 {
            phase = .data
        } else {
            try enterDataDigest()
        }
    }

    private func enterDataDigest() throws(NVMeTCPError) {
        if current.hasDataDigest {
            phase = .dataDigest
            digestHave = 0
            digestBytes = 0
        } else {
            phase = .header
            try pduDone()
        }
    }

    /// A whole PDU (header, data and digests) arrived and checked.
    private func pduDone() throws(NVMeTCPError) {
        switch current.type! {
        case .capsuleResponse:
            let completion = CompletionEntry(loadingFrom: header + TCPPDU.commonHeaderBytes)
            let slot = Int(completion.commandID)
            guard slot < slotCount, slotActive[slot] else {
                throw .protocolViolation("response for command \(slot), which is not in flight")
            }
            finish(slot: slot, completion: completion)
        case .c2hData:
            let slot = dataSlot
            if current.flags & TCPPDU.flagSuccess != 0 {
                guard current.flags & TCPPDU.flagLastPDU != 0, slotReceived[slot] == slotData[slot].bytes else {
                    throw .protocolViolation("C2HData SUCCESS before all data of command \(slot)")
                }
                var completion = CompletionEntry()
                completion.commandID = UInt16(slot)
                finish(slot: slot, completion: completion)
            }
        case .c2hTermReq:
            let status = UInt16(littleEndian: header.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
            throw .terminatedByTarget(TCPTermReq.describe(status: status))
        default: break
        }
    }

    private func finish(slot: Int, completion: CompletionEntry) {
        slotActive[slot] = false
        h2cPending[slot] = false
        commandsInFlight -= 1
        delegate?.tcpCommandCompleted(slot: slot, completion: completion)
    }

    private func initializeResponse() throws(NVMeTCPError) {
        let response = TCPInitializeResponse(loadingFrom: header)
        guard current.totalBytes == TCPPDU.icBytes else { throw .protocolViolation("ICResp PLEN \(current.totalBytes)") }
        guard response.version == 0 else { throw .unsupported("NVMe/TCP PDU format version \(response.version)") }
        guard response.maxH2CDataBytes >= TCPPDU.maxH2CDataMin else {
            throw .protocolViolation("MAXH2CDATA \(response.maxH2CDataBytes) below \(TCPPDU.maxH2CDataMin)")
        }
        guard response.controllerDataAlignment <= 31 else { throw .protocolViolation("CPDA \(response.controllerDataAlignment)") }
        // The controller may turn down a digest we asked for, never enable one we did not.
        guard (!response.headerDigest || wantHeaderDigest) && (!response.dataDigest || wantDataDigest) else {
            throw .protocolViolation("ICResp enables a digest the host did not ask for")
        }
        headerDigest = response.headerDigest
        dataDigest = response.dataDigest
        maxH2CDataBytes = min(response.maxH2CDataBytes, Limits.sendBufferBytes / 2)
        controllerAlignmentBytes = response.controllerDataAlignment == 0 ? 0 : (Int(response.controllerDataAlignment) + 1) * 4
        isInitialized = true
    }

    private func readyToTransfer() throws(NVMeTCPError) {
        let r2t = TCPDataHeader(loadingFrom: header)
        let slot = Int(r2t.commandID)
        guard slot < slotCount, slotActive[slot], slotData[slot].toController else {
            throw .protocolViolation("R2T for command \(slot), which is not a write in flight")
        }
        guard !h2cPending[slot] else { throw .protocolViolation("second R2T for command \(slot) (MAXR2T is 1)") }
        guard r2t.dataBytes > 0, r2t.dataOffset + r2t.dataBytes <= slotData[slot].bytes else {
            throw .protocolViolation("R2T for command \(slot): R2TO \(r2t.dataOffset) R2TL \(r2t.dataBytes) of \(slotData[slot].bytes)")
        }
        h2cPending[slot] = true
        h2cTag[slot] = r2t.transferTag
        h2cOffset[slot] = r2t.dataOffset
        h2cEnd[slot] = r2t.dataOffset + r2t.dataBytes
        h2cRing[(h2cHead + h2cCount) % slotCount] = slot
        h2cCount += 1
    }

    // MARK: - Command memory (the one place that walks iovecs)

    /// Copies `bytes` of the command's data, from `offset`, to `target`.
    @inline(__always)
    private func copyOut(_ data: TCPCommandData, offset: Int, bytes: Int, to target: UnsafeMutableRawPointer) {
        walk(data, offset: offset, bytes: bytes) { segment, done, length in
            (target + done).copyMemory(from: segment, byteCount: length)
        }
    }

    /// Copies `bytes` from `source` into the command's data at `offset`.
    @inline(__always)
    private func copyIn(_ data: TCPCommandData, offset: Int, bytes: Int, from source: UnsafeRawPointer) {
        walk(data, offset: offset, bytes: bytes) { segment, done, length in
            segment.copyMemory(from: source + done, byteCount: length)
        }
    }

    @inline(__always)
    private func walk(_ data: TCPCommandData, offset: Int, bytes: Int,
                      _ body: (UnsafeMutableRawPointer, Int, Int) -> Void) {
        guard let iovecs = data.iovecs else { return }
        var skip = data.skipBytes + offset
        var done = 0
        var index = 0
        while done < bytes && index < data.segmentCount {
            let vector = iovecs[index]
            index += 1
            if skip >= vector.iov_len {
                skip -= vector.iov_len
                continue
            }
            let length = min(vector.iov_len - skip, bytes - done)
            body(vector.iov_base! + skip, done, length)
            done += length
            skip = 0
        }
        precondition(done == bytes, "NVMe/TCP: command memory shorter than its transfer")
    }
}
