#if canImport(Glibc)
import Glibc
#endif
import Env
import Synchronization
@testable import NVMe

/// A small NVMe/TCP target on 127.0.0.1 for tests of the initiator's protocol paths that
/// Linux nvmet (Tests/qemu/nvme-tcp-qemu.sh) does not choose to exercise: C2H data split
/// over several PDUs, a small MAXH2CDATA (several H2CData PDUs per R2T), a CPDA that pads
/// data, digests, a corrupted digest, responses held back, connections dropped, a target
/// that goes away and comes back. One blocking thread per connection; a RAM namespace.
final class FakeTCPTarget: @unchecked Sendable {
    struct Configuration {
        var blockBytes = 4096
        var blockCount = 2048
        var maxH2CDataBytes = 8192
        var c2hChunkBytes = 4096
        var inCapsuleBytes = 4096
        /// PDUs the target sends are padded to (CPDA+1)*4 bytes; the host must honour it
        /// for its own PDUs too (CPDA is the controller's requirement).
        var controllerAlignment: UInt8 = 1
    }

    let configuration: Configuration
    private(set) var port: UInt16 = 0
    private var listener: Int32 = -1
    private let media: UnsafeMutableRawPointer
    private let lock = Mutex(())
    private let connections = Mutex<[Int32]>([])
    private let flags = Mutex(Flags())
    private var acceptThread: pthread_t?

    struct Flags {
        var holdIO = false
        var corruptNextC2HDigest = false
        var ioCommandsSeen = 0
        var heldCount = 0
        var connectsSeen = 0
        /// Every I/O command ends its connection (a command the target cannot take).
        var dropOnIO = false
        /// H2CData PDUs that carried less than their whole R2T although it fit MAXH2CDATA
        /// (Linux 6.1's nvmet then checks the data digest against the whole transfer).
        var splitH2CPDUs = 0
        var keepAlivesSeen = 0
        /// CSTS.CFS reads 1 until a controller is enabled again (a new association).
        var fatal = false
    }

    init(configuration: Configuration = Configuration(), port: UInt16 = 0) throws {
        self.configuration = configuration
        media = .allocate(byteCount: configuration.blockBytes * configuration.blockCount, alignment: 4096)
        media.initializeMemory(as: UInt8.self, repeating: 0, count: configuration.blockBytes * configuration.blockCount)
        try listen(port: port)
    }

    deinit { media.deallocate() }

    func update(_ body: (inout Flags) -> Void) { flags.withLock { body(&$0) } }
    var state: Flags { flags.withLock { $0 } }

    private func listen(port wanted: UInt16) throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(4))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = wanted.bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, Glibc.listen(fd, 16) == 0 else { throw SystemError("bind/listen") }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        port = UInt16(bigEndian: address.sin_port)
        listener = fd
        let context = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        pthread_create(&thread, nil, { raw in
            let target = Unmanaged<FakeTCPTarget>.fromOpaque(raw!).takeRetainedValue()
            target.acceptLoop()
            return nil
        }, context)
        acceptThread = thread
    }

    /// Stops listening and drops every connection: the target is gone.
    func stop() {
        if listener >= 0 {
            shutdown(listener, Int32(SHUT_RDWR))
            close(listener)
            listener = -1
        }
        if let thread = acceptThread { pthread_join(thread, nil) }
        acceptThread = nil
        dropConnections()
    }

    /// Listens again on the same port.
    func restart() throws { try listen(port: port) }

    /// Resets every open connection (the host sees EOF or a reset).
    func dropConnections() {
        connections.withLock { fds in
            for fd in fds { shutdown(fd, Int32(SHUT_RDWR)) }
            fds.removeAll()
        }
    }

    private func acceptLoop() {
        let fd = listener
        while true {
            let connection = accept(fd, nil, nil)
            if connection < 0 {
                if errno == EINTR { continue }
                return
            }
            var one: Int32 = 1
            setsockopt(connection, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(4))
            connections.withLock { $0.append(connection) }
            let box = Unmanaged.passRetained(Session(target: self, fd: connection)).toOpaque()
            var thread = pthread_t()
            pthread_create(&thread, nil, { raw in
                let session = Unmanaged<Session>.fromOpaque(raw!).takeRetainedValue()
                session.run()
                return nil
            }, box)
            pthread_detach(thread)
        }
    }

    fileprivate func withMedia<T>(_ body: (UnsafeMutableRawPointer) -> T) -> T { lock.withLock { _ in body(media) } }

    /// One connection: blocking reads and writes, one command at a time.
    private final class Session {
        let target: FakeTCPTarget
        let fd: Int32
        var headerDigest = false
        var dataDigest = false
        var enabled = false
        var shutdownRequested = false
        var isAdmin = true
        var held: [(SubmissionEntry, [UInt8])] = []
        /// Capsules that arrived while an R2T's data was awaited (the host pipelines).
        var backlog: [([UInt8], [UInt8])] = []

        init(target: FakeTCPTarget, fd: Int32) {
            self.target = target
            self.fd = fd
        }

        var alignment: Int { Int(target.configuration.controllerAlignment) == 0 ? 0 : (Int(target.configuration.controllerAlignment) + 1) * 4 }

        func run() {
            defer { close(fd) }
            guard let ic = readExact(128), ic[0] == 0 else { return note("no ICReq") }
            headerDigest = ic[11] & 1 != 0
            dataDigest = ic[11] & 2 != 0
            var response = [UInt8](repeating: 0, count: 128)
            response.withUnsafeMutableBytes {
                TCPInitializeResponse(controllerDataAlignment: target.configuration.controllerAlignment, headerDigest: headerDigest,
                                      dataDigest: dataDigest, maxH2CDataBytes: target.configuration.maxH2CDataBytes)
                    .store(to: $0.baseAddress!)
            }
            guard writeAll(response) else { return }
            while let (header, data) = backlog.isEmpty ? readPDU() : backlog.removeFirst() {
                guard header[0] == TCPPDUType.capsuleCommand.rawValue else { return note("PDU type \(header[0]) where a capsule belongs") }
                let command = header.withUnsafeBytes { SubmissionEntry(loadingFrom: $0.baseAddress! + 8) }
                guard handle(command, inCapsule: data) else { return note("command 0x\(String(command.opcode, radix: 16)) failed") }
            }
            note("connection ended (EOF or a short PDU)")
        }

        // MARK: PDU I/O

        func note(_ what: String) {
            if getenv("FAKE_TCP_TARGET_DEBUG") != nil {
                let line = "fake target: \(what)\n"
                _ = line.withCString { write(2, $0, strlen($0)) }
            }
        }

        func readExact(_ count: Int) -> [UInt8]? {
            var bytes = [UInt8](repeating: 0, count: count)
            var done = 0
            while done < count {
                let got = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, count - done, 0) }
                if got <= 0 { return nil }
                done += got
            }
            return bytes
        }

        func writeAll(_ bytes: [UInt8]) -> Bool {
            var done = 0
            while done < bytes.count {
                let sent = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
                if sent <= 0 { return false }
                done += sent
            }
            return true
        }

        func crc(_ bytes: ArraySlice<UInt8>) -> [UInt8] {
            let value = CRC32C.checksum(bytes)
            return [UInt8(value & 0xFF), UInt8(value >> 8 & 0xFF), UInt8(value >> 16 & 0xFF), UInt8(value >> 24)]
        }

        /// Header (with its digest checked and dropped) and data (digest checked) of the next PDU.
        func readPDU() -> ([UInt8], [UInt8])? {
            guard let common = readExact(8) else { return nil }
            let hlen = Int(common[2]), pdo = Int(common[3])
            let plen = Int(common[4]) | Int(common[5]) << 8 | Int(common[6]) << 16 | Int(common[7]) << 24
            guard let rest = readExact(plen - 8) else { return nil }
            let pdu = common + rest
            let hasHeaderDigest = common[1] & 1 != 0, hasDataDigest = common[1] & 2 != 0
            precondition(hasHeaderDigest == headerDigest, "fake target: header digest flag \(hasHeaderDigest)")
            if hasHeaderDigest { precondition(Array(pdu[hlen..<(hlen + 4)]) == crc(pdu[0..<hlen]), "fake target: bad header digest") }
            var data: [UInt8] = []
            if pdo > 0 {
                if alignment > 0 { precondition(pdo % alignment == 0, "fake target: PDO \(pdo) not aligned to \(alignment)") }
                let end = plen - (hasDataDigest ? 4 : 0)
                data = Array(pdu[pdo..<end])
                precondition(hasDataDigest == dataDigest, "fake target: data digest flag")
                if hasDataDigest { precondition(Array(pdu[end..<plen]) == crc(data[...]), "fake target: bad data digest") }
            }
            return (Array(pdu[0..<hlen]), data)
        }

        func sendPDU(type: TCPPDUType, flags: UInt8, header: [UInt8], data: [UInt8] = [], corruptDigest: Bool = false) -> Bool {
            let hlen = 8 + header.count
            var pdu = [UInt8](repeating: 0, count: 8) + header
            var pduFlags = flags | (headerDigest ? TCPPDU.flagHeaderDigest : 0)
            if !data.isEmpty && dataDigest { pduFlags |= TCPPDU.flagDataDigest }
            var pdo = 0
            if !data.isEmpty {
                pdo = hlen + (headerDigest ? 4 : 0)
                if alignment > 0 { pdo = (pdo + alignment - 1) / alignment * alignment }
            }
            let plen = (data.isEmpty ? hlen + (headerDigest ? 4 : 0) : pdo + data.count + (dataDigest ? 4 : 0))
            pdu.withUnsafeMutableBytes {
                TCPPDU.storeCommonHeader($0.baseAddress!, type: type, flags: pduFlags, headerBytes: hlen, dataOffset: pdo, totalBytes: plen)
            }
            if headerDigest { pdu += crc(pdu[0..<hlen]) }
            if !data.isEmpty {
                pdu += [UInt8](repeating: 0, count: pdo - pdu.count)
                pdu += data
                if dataDigest {
                    var digest = crc(data[...])
                    if corruptDigest { digest[0] ^= 0x01 }
                    pdu += digest
                }
            }
            return writeAll(pdu)
        }

        func respond(_ command: SubmissionEntry, status: NVMeStatus = .success, dword0: UInt32 = 0, dword1: UInt32 = 0) -> Bool {
            var completion = CompletionEntry()
            completion.commandID = command.commandID
            completion.status = status
            completion.commandSpecific = dword0
            completion.commandSpecificHigh = dword1
            var bytes = [UInt8](repeating: 0, count: 16)
            bytes.withUnsafeMutableBytes { completion.store(to: $0.baseAddress!) }
            return sendPDU(type: .capsuleResponse, flags: 0, header: bytes)
        }

        func sendData(_ command: SubmissionEntry, _ data: [UInt8]) -> Bool {
            let corrupt = target.flags.withLock { flags -> Bool in
                defer { flags.corruptNextC2HDigest = false }
                return flags.corruptNextC2HDigest
            }
            var offset = 0
            while offset < data.count {
                let chunk = min(target.configuration.c2hChunkBytes, data.count - offset)
                var header = [UInt8](repeating: 0, count: 16)
                header.withUnsafeMutableBytes { memory in
                    let base = memory.baseAddress! - 8  // TCPDataHeader's offsets count from the PDU's start
                    TCPDataHeader(commandID: command.commandID, transferTag: 0, dataOffset: offset, dataBytes: chunk)
                        .store(to: base)
                }
                let last = offset + chunk == data.count
                guard sendPDU(type: .c2hData, flags: last ? TCPPDU.flagLastPDU : 0, header: header,
                              data: Array(data[offset..<(offset + chunk)]), corruptDigest: corrupt && last) else { return false }
                offset += chunk
            }
            return true
        }

        /// Write data after an R2T for all of it, in H2CData PDUs of at most MAXH2CDATA.
        func receiveWriteData(_ command: SubmissionEntry, bytes: Int) -> [UInt8]? {
            var header = [UInt8](repeating: 0, count: 16)
            header.withUnsafeMutableBytes {
                TCPDataHeader(commandID: command.commandID, transferTag: 0x7700 | command.commandID & 0xFF, dataOffset: 0,
                              dataBytes: bytes).store(to: $0.baseAddress! - 8)
            }
            guard sendPDU(type: .r2t, flags: 0, header: header) else { return nil }
            var data: [UInt8] = []
            while data.count < bytes {
                guard let (pduHeader, chunk) = readPDU() else { return nil }
                if pduHeader[0] == TCPPDUType.capsuleCommand.rawValue {
                    backlog.append((pduHeader, chunk))
                    continue
                }
                guard pduHeader[0] == TCPPDUType.h2cData.rawValue else {
                    note("PDU type \(pduHeader[0]) while H2CData was awaited")
                    return nil
                }
                let fields = pduHeader.withUnsafeBytes { TCPDataHeader(loadingFrom: $0.baseAddress!) }
                precondition(fields.transferTag == 0x7700 | command.commandID & 0xFF && fields.dataOffset == data.count
                             && fields.dataBytes == chunk.count && chunk.count <= target.configuration.maxH2CDataBytes,
                             "fake target: bad H2CData \(fields)")
                precondition((pduHeader[1] & TCPPDU.flagLastPDU != 0) == (data.count + chunk.count == bytes), "fake target: LAST_PDU")
                if chunk.count < bytes && bytes <= target.configuration.maxH2CDataBytes { target.update { $0.splitH2CPDUs += 1 } }
                data += chunk
            }
            return data
        }

        // MARK: Commands

        func handle(_ command: SubmissionEntry, inCapsule: [UInt8]) -> Bool {
            if command.opcode == FabricsOpcode.fabrics {
                switch FabricsCommandType(rawValue: UInt8(command.namespaceID & 0xFF)) {
                case .connect:
                    isAdmin = command.cdw10 >> 16 == 0
                    target.update { $0.connectsSeen += 1 }
                    return respond(command, dword0: 1)
                case .propertyGet:
                    switch Int(command.cdw11) {
                    case NVMeRegister.cap:
                        let cap = ControllerCapabilities.make(maxQueueEntries: 128, timeoutUnits: 1, strideShift: 0)
                        return respond(command, dword0: UInt32(truncatingIfNeeded: cap.raw), dword1: UInt32(cap.raw >> 32))
                    case NVMeRegister.cc: return respond(command, dword0: enabled ? ControllerConfiguration.standard.raw : 0)
                    case NVMeRegister.csts:
                        let fatal = target.state.fatal ? UInt32(2) : 0
                        return respond(command, dword0: (enabled ? 1 : 0) | fatal | (shutdownRequested ? 2 << 2 : 0))
                    default: return respond(command, status: .invalidField)
                    }
                case .propertySet:
                    if command.cdw11 == UInt32(NVMeRegister.cc) {
                        enabled = command.cdw12 & 1 == 1
                        shutdownRequested = command.cdw12 >> 14 & 3 != 0
                        if enabled { target.update { $0.fatal = false } }
                    }
                    return respond(command)
                default: return respond(command, status: .invalidOpcode)
                }
            }
            if isAdmin {
                switch command.opcode {
                case AdminOpcode.identify.rawValue:
                    var bytes: [UInt8]
                    if command.cdw10 == IdentifyCNS.controller.rawValue {
                        var data = IdentifyController()
                        data.modelNumber = "blobfs fake target"
                        data.namespaceCount = 1
                        data.optionalCommands = 1 << 3
                        data.sglSupport = 1 | 1 << 20
                        data.ioCommandCapsuleUnits = UInt32(64 + target.configuration.inCapsuleBytes) / 16
                        bytes = data.encode()
                    } else {
                        var data = IdentifyNamespace()
                        data.size = UInt64(target.configuration.blockCount)
                        data.capacity = data.size
                        data.lbaDataSizeShifts = [UInt8(target.configuration.blockBytes.trailingZeroBitCount)]
                        bytes = data.encode()
                    }
                    return sendData(command, bytes) && respond(command)
                case AdminOpcode.setFeatures.rawValue: return respond(command, dword0: 3 | 3 << 16)
                case FabricsOpcode.keepAlive:
                    target.update { $0.keepAlivesSeen += 1 }
                    return respond(command)
                default: return respond(command, status: .invalidOpcode)
                }
            }
            return io(command, inCapsule: inCapsule)
        }

        func io(_ command: SubmissionEntry, inCapsule: [UInt8]) -> Bool {
            let blockBytes = target.configuration.blockBytes
            let offset = Int(command.startingLBA) * blockBytes
            let bytes = command.blockCount * blockBytes
            target.update { $0.ioCommandsSeen += 1 }
            if target.state.dropOnIO { return false }
            var payload: [UInt8] = []
            if command.opcode == NVMOpcode.write.rawValue {
                let identifier = UInt8(command.prp2 >> 56)
                if identifier == SGLDescriptor.inCapsuleIdentifier {
                    precondition(inCapsule.count == bytes && bytes <= target.configuration.inCapsuleBytes, "fake target: in-capsule size")
                    payload = inCapsule
                } else {
                    guard let data = receiveWriteData(command, bytes: bytes) else { return false }
                    payload = data
                }
            }
            let hold = target.flags.withLock { flags -> Bool in
                if flags.holdIO { flags.heldCount += 1 }
                return flags.holdIO
            }
            if hold {
                held.append((command, payload))  // never answered on this connection
                return true
            }
            switch command.opcode {
            case NVMOpcode.read.rawValue:
                let data = target.withMedia { Array(UnsafeRawBufferPointer(start: $0 + offset, count: bytes)) }
                return sendData(command, data) && respond(command)
            case NVMOpcode.write.rawValue:
                target.withMedia { media in payload.withUnsafeBytes { (media + offset).copyMemory(from: $0.baseAddress!, byteCount: bytes) } }
                return respond(command)
            case NVMOpcode.writeZeroes.rawValue:
                target.withMedia { ($0 + offset).initializeMemory(as: UInt8.self, repeating: 0, count: bytes) }
                return respond(command)
            case NVMOpcode.flush.rawValue: return respond(command)
            default: return respond(command, status: .invalidOpcode)
            }
        }
    }
}
