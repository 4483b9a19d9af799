// NVMe over Fabrics (NVMe base specification 2.0, section 6, and the NVMe over Fabrics
// specification 1.1): the Fabrics command set (Connect, Property Get/Set) and the SGL
// descriptors a fabrics host puts in DPTR. Every fabrics command is a 64-byte SQE whose
// opcode is 0x7F and whose byte 4 (the low byte of the NSID field) is the command type.
// Field positions are checked in Tests/NVMeTests/FabricsSpecTests.swift.

/// Admin opcodes a fabrics host uses besides those of `AdminOpcode` (kept apart so the
/// software controller's exhaustive switch over `AdminOpcode` stays as it is).
public enum FabricsOpcode {
    /// Every Fabrics command (Connect, Property Get/Set...): the type is in byte 4.
    public static let fabrics: UInt8 = 0x7F
    /// Keep Alive (admin): resets the controller's keep-alive timer (KATO).
    public static let keepAlive: UInt8 = 0x18
}

public enum FabricsCommandType: UInt8, Sendable {
    case propertySet = 0x00
    case connect = 0x01
    case propertyGet = 0x04
    case disconnect = 0x08
}

/// Status codes of command-specific type (SCT 1) that Connect returns.
public enum FabricsConnectStatus: UInt8, Sendable {
    case incompatibleFormat = 0x80
    case controllerBusy = 0x81
    case invalidParameter = 0x82
    case restartDiscovery = 0x83
    case invalidHost = 0x84
}

/// SGL descriptors (base spec 4.3.2): 16 bytes at SQE offset 24 (the PRP1/PRP2 fields),
/// an address, a length and an identifier byte (type in bits 7:4, subtype in 3:0).
public enum SGLDescriptor {
    /// Data block, subtype offset: data sits in the command capsule, `address` bytes after
    /// the capsule's data offset (ICDOFF).
    public static let inCapsuleIdentifier: UInt8 = 0x01
    /// Transport SGL data block, transport-specific subtype: NVMe/TCP moves the data in
    /// C2HData PDUs (reads) or H2CData PDUs after an R2T (writes).
    public static let transportIdentifier: UInt8 = 0x5A

    /// Puts the descriptor into the SQE's DPTR (bytes 24-39).
    public static func store(into entry: inout SubmissionEntry, address: UInt64, length: UInt32, identifier: UInt8) {
        entry.prp1 = address
        entry.prp2 = UInt64(length) | UInt64(identifier) << 56
    }
}

/// Builders of the Fabrics commands the host sends.
public enum FabricsCommand {
    /// PSDT = 01b: fabrics carry data by SGL only, and targets (Linux nvmet) refuse
    /// any other value with Invalid Field, on every queue and every command.
    public static let sglDataTransfer: UInt8 = 1

    /// Connect (type 0x01): RECFMT 0 in bytes 40-41, QID in 42-43, SQSIZE (0-based) in
    /// 44-45, CATTR in 46, KATO (ms; admin queue only) in 48-51. The 1,024-byte
    /// `ConnectData` travels as in-capsule data.
    public static func connect(queueID: UInt16, submissionQueueEntries: Int, keepAliveTimeoutMs: UInt32) -> SubmissionEntry {
        precondition(submissionQueueEntries >= 2 && submissionQueueEntries <= 65536, "SQSIZE out of range")
        var entry = fabrics(.connect)
        entry.cdw10 = UInt32(queueID) << 16
        entry.cdw11 = UInt32(submissionQueueEntries - 1)
        entry.cdw12 = keepAliveTimeoutMs
        SGLDescriptor.store(into: &entry, address: 0, length: UInt32(ConnectData.bytes),
                            identifier: SGLDescriptor.inCapsuleIdentifier)
        return entry
    }

    /// Property Get (type 0x04): ATTRIB (size: 0 for 4 bytes, 1 for 8) in byte 40, OFST
    /// in 44-47; the value comes back in DW0 (and DW1) of the completion.
    public static func propertyGet(offset: Int, eightBytes: Bool) -> SubmissionEntry {
        var entry = fabrics(.propertyGet)
        entry.cdw10 = eightBytes ? 1 : 0
        entry.cdw11 = UInt32(offset)
        return entry
    }

    /// Property Set (type 0x00): ATTRIB in byte 40, OFST in 44-47, VALUE in 48-55.
    public static func propertySet(offset: Int, value: UInt64, eightBytes: Bool) -> SubmissionEntry {
        var entry = fabrics(.propertySet)
        entry.cdw10 = eightBytes ? 1 : 0
        entry.cdw11 = UInt32(offset)
        entry.cdw12 = UInt32(truncatingIfNeeded: value)
        entry.cdw13 = UInt32(truncatingIfNeeded: value >> 32)
        return entry
    }

    private static func fabrics(_ type: FabricsCommandType) -> SubmissionEntry {
        var entry = SubmissionEntry()
        entry.opcode = FabricsOpcode.fabrics
        entry.dataTransfer = sglDataTransfer
        entry.namespaceID = UInt32(type.rawValue)  // FCTYPE is byte 4
        SGLDescriptor.store(into: &entry, address: 0, length: 0, identifier: SGLDescriptor.transportIdentifier)
        return entry
    }

    /// The controller ID a successful Connect returns (DW0 bits 15:0).
    public static func controllerID(ofConnect completion: CompletionEntry) -> UInt16 {
        UInt16(truncatingIfNeeded: completion.commandSpecific)
    }
}

/// Connect command data (1,024 bytes): HOSTID at 0 (16 bytes), CNTLID at 16 (0xFFFF on
/// the admin queue: any controller of the dynamic model), SUBNQN at 256 and HOSTNQN at
/// 512 (256 bytes each, NUL-terminated UTF-8).
public struct ConnectData: Equatable, Sendable {
    public static let bytes = 1024
    public static let nqnBytesMax = 223  // NQNs are at most 223 bytes (base spec 4.5)
    public var hostID: [UInt8]  // 16 bytes
    public var controllerID: UInt16
    public var subsystemNQN: String
    public var hostNQN: String

    public init(hostID: [UInt8], controllerID: UInt16, subsystemNQN: String, hostNQN: String) {
        precondition(hostID.count == 16, "HOSTID is 16 bytes")
        precondition(subsystemNQN.utf8.count <= Self.nqnBytesMax && hostNQN.utf8.count <= Self.nqnBytesMax,
                     "NQN longer than \(Self.nqnBytesMax) bytes")
        self.hostID = hostID
        self.controllerID = controllerID
        self.subsystemNQN = subsystemNQN
        self.hostNQN = hostNQN
    }

    public func encode(into memory: UnsafeMutableRawBufferPointer) {
        precondition(memory.count >= Self.bytes)
        memory.baseAddress!.initializeMemory(as: UInt8.self, repeating: 0, count: Self.bytes)
        for (index, byte) in hostID.enumerated() { memory[index] = byte }
        memory.storeBytes(of: controllerID.littleEndian, toByteOffset: 16, as: UInt16.self)
        for (index, byte) in subsystemNQN.utf8.enumerated() { memory[256 + index] = byte }
        for (index, byte) in hostNQN.utf8.enumerated() { memory[512 + index] = byte }
    }
}
