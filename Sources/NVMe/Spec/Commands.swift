import Synchronization

// Submission and completion queue entries (NVMe base spec 2.0, sections 4.2 and 4.6),
// read and written field by field in queue memory.

public enum AdminOpcode: UInt8, Sendable {
    case deleteIOSubmissionQueue = 0x00
    case createIOSubmissionQueue = 0x01
    case getLogPage = 0x02
    case deleteIOCompletionQueue = 0x04
    case createIOCompletionQueue = 0x05
    case identify = 0x06
    case abort = 0x08
    case setFeatures = 0x09
    case getFeatures = 0x0A
}

public enum NVMOpcode: UInt8, Sendable {
    case flush = 0x00
    case write = 0x01
    case read = 0x02
    case writeZeroes = 0x08
    case datasetManagement = 0x09
}

public enum FeatureID: UInt8, Sendable {
    case numberOfQueues = 0x07
}

public enum IdentifyCNS: UInt32, Sendable {
    case namespace = 0x00
    case controller = 0x01
    case activeNamespaces = 0x02
}

/// A 64-byte submission queue entry.
public struct SubmissionEntry: Equatable, Sendable {
    public static let bytes = 64
    public var opcode: UInt8 = 0
    public var fuse: UInt8 = 0
    /// PRP or SGL selection (PSDT); 0: PRPs.
    public var dataTransfer: UInt8 = 0
    public var commandID: UInt16 = 0
    public var namespaceID: UInt32 = 0
    public var cdw2: UInt32 = 0
    public var cdw3: UInt32 = 0
    public var metadataPointer: UInt64 = 0
    public var prp1: UInt64 = 0
    public var prp2: UInt64 = 0
    public var cdw10: UInt32 = 0
    public var cdw11: UInt32 = 0
    public var cdw12: UInt32 = 0
    public var cdw13: UInt32 = 0
    public var cdw14: UInt32 = 0
    public var cdw15: UInt32 = 0

    public init() {}

    /// Starting LBA of I/O commands (CDW10-11).
    public var startingLBA: UInt64 {
        get { UInt64(cdw10) | UInt64(cdw11) << 32 }
        set { cdw10 = UInt32(truncatingIfNeeded: newValue); cdw11 = UInt32(truncatingIfNeeded: newValue >> 32) }
    }

    /// Number of logical blocks of I/O commands (CDW12 bits 15:0, 0-based).
    public var blockCount: Int {
        get { Int(cdw12 & 0xFFFF) + 1 }
        set { cdw12 = (cdw12 & ~0xFFFF) | UInt32(newValue - 1) }
    }

    public func store(to memory: UnsafeMutableRawPointer) {
        let dword0 = UInt32(opcode) | UInt32(fuse & 0x3) << 8 | UInt32(dataTransfer & 0x3) << 14 | UInt32(commandID) << 16
        let words: [(Int, UInt32)] = [(0, dword0), (4, namespaceID), (8, cdw2), (12, cdw3), (40, cdw10), (44, cdw11),
                                      (48, cdw12), (52, cdw13), (56, cdw14), (60, cdw15)]
        for (offset, value) in words { memory.storeBytes(of: value.littleEndian, toByteOffset: offset, as: UInt32.self) }
        memory.storeBytes(of: metadataPointer.littleEndian, toByteOffset: 16, as: UInt64.self)
        memory.storeBytes(of: prp1.littleEndian, toByteOffset: 24, as: UInt64.self)
        memory.storeBytes(of: prp2.littleEndian, toByteOffset: 32, as: UInt64.self)
    }

    public init(loadingFrom memory: UnsafeRawPointer) {
        func u32(_ offset: Int) -> UInt32 { UInt32(littleEndian: memory.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
        func u64(_ offset: Int) -> UInt64 { UInt64(littleEndian: memory.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
        let dword0 = u32(0)
        opcode = UInt8(dword0 & 0xFF)
        fuse = UInt8(dword0 >> 8 & 0x3)
        dataTransfer = UInt8(dword0 >> 14 & 0x3)
        commandID = UInt16(dword0 >> 16)
        namespaceID = u32(4)
        cdw2 = u32(8)
        cdw3 = u32(12)
        metadataPointer = u64(16)
        prp1 = u64(24)
        prp2 = u64(32)
        cdw10 = u32(40); cdw11 = u32(44); cdw12 = u32(48); cdw13 = u32(52); cdw14 = u32(56); cdw15 = u32(60)
    }
}

/// A 16-byte completion queue entry.
public struct CompletionEntry: Equatable, Sendable {
    public static let bytes = 16
    public var commandSpecific: UInt32 = 0
    /// DW1: reserved in NVMe over PCIe; the high half of an 8-byte Fabrics Property Get value.
    public var commandSpecificHigh: UInt32 = 0
    public var submissionQueueHead: UInt16 = 0
    public var submissionQueueID: UInt16 = 0
    public var commandID: UInt16 = 0
    public var phase: Bool = false
    public var status: NVMeStatus = .success

    public init() {}

    public func store(to memory: UnsafeMutableRawPointer) {
        memory.storeBytes(of: commandSpecific.littleEndian, toByteOffset: 0, as: UInt32.self)
        memory.storeBytes(of: commandSpecificHigh.littleEndian, toByteOffset: 4, as: UInt32.self)
        memory.storeBytes(of: (UInt32(submissionQueueHead) | UInt32(submissionQueueID) << 16).littleEndian,
                          toByteOffset: 8, as: UInt32.self)
        // The dword holding the phase bit goes last, after a release fence: the host polls it.
        let dword3 = UInt32(commandID) | (phase ? 1 << 16 : 0) | UInt32(status.raw) << 17
        atomicMemoryFence(ordering: .releasing)
        memory.storeBytes(of: dword3.littleEndian, toByteOffset: 12, as: UInt32.self)
    }

    public init(loadingFrom memory: UnsafeRawPointer) {
        commandSpecific = UInt32(littleEndian: memory.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        commandSpecificHigh = UInt32(littleEndian: memory.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        let dword2 = UInt32(littleEndian: memory.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        let dword3 = UInt32(littleEndian: memory.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
        submissionQueueHead = UInt16(dword2 & 0xFFFF)
        submissionQueueID = UInt16(dword2 >> 16)
        commandID = UInt16(dword3 & 0xFFFF)
        phase = dword3 >> 16 & 1 == 1
        status = NVMeStatus(raw: UInt16(dword3 >> 17))
    }

    /// Phase bit of the entry at `memory`, read alone (what the host polls).
    @inline(__always)
    public static func phase(at memory: UnsafeRawPointer) -> Bool {
        UInt32(littleEndian: memory.loadUnaligned(fromByteOffset: 12, as: UInt32.self)) >> 16 & 1 == 1
    }
}

/// The status field of a completion (15 bits: SC, SCT, CRD, More, DNR).
public struct NVMeStatus: Equatable, Sendable, CustomStringConvertible {
    public var raw: UInt16
    public init(raw: UInt16) { self.raw = raw & 0x7FFF }
    public init(type: StatusCodeType, code: UInt8, doNotRetry: Bool = true) {
        raw = UInt16(code) | UInt16(type.rawValue) << 8 | (doNotRetry ? 1 << 14 : 0)
    }

    public enum StatusCodeType: UInt8, Sendable {
        case generic = 0, commandSpecific = 1, mediaError = 2, path = 3, vendor = 7
    }

    public var code: UInt8 { UInt8(raw & 0xFF) }
    public var type: UInt8 { UInt8(raw >> 8 & 0x7) }
    public var doNotRetry: Bool { raw >> 14 & 1 == 1 }
    public var isSuccess: Bool { raw & 0x7FF == 0 }

    public static let success = NVMeStatus(raw: 0)
    public static let invalidOpcode = NVMeStatus(type: .generic, code: 0x01)
    public static let invalidField = NVMeStatus(type: .generic, code: 0x02)
    public static let commandIDConflict = NVMeStatus(type: .generic, code: 0x03)
    public static let dataTransferError = NVMeStatus(type: .generic, code: 0x04)
    public static let internalError = NVMeStatus(type: .generic, code: 0x06)
    public static let abortRequested = NVMeStatus(type: .generic, code: 0x07)
    public static let invalidNamespace = NVMeStatus(type: .generic, code: 0x0B)
    public static let lbaOutOfRange = NVMeStatus(type: .generic, code: 0x80)
    public static let capacityExceeded = NVMeStatus(type: .generic, code: 0x81)
    public static let namespaceNotReady = NVMeStatus(type: .generic, code: 0x82, doNotRetry: false)
    public static let invalidQueueIdentifier = NVMeStatus(type: .commandSpecific, code: 0x01)
    public static let invalidQueueSize = NVMeStatus(type: .commandSpecific, code: 0x02)
    public static let completionQueueInvalid = NVMeStatus(type: .commandSpecific, code: 0x00)

    public var description: String {
        let names: [UInt16: String] = [
            NVMeStatus.invalidOpcode.raw & 0x7FF: "invalid opcode", NVMeStatus.invalidField.raw & 0x7FF: "invalid field",
            NVMeStatus.commandIDConflict.raw & 0x7FF: "command id conflict",
            NVMeStatus.dataTransferError.raw & 0x7FF: "data transfer error",
            NVMeStatus.internalError.raw & 0x7FF: "internal error", NVMeStatus.abortRequested.raw & 0x7FF: "aborted",
            NVMeStatus.invalidNamespace.raw & 0x7FF: "invalid namespace", NVMeStatus.lbaOutOfRange.raw & 0x7FF: "LBA out of range",
            NVMeStatus.capacityExceeded.raw & 0x7FF: "capacity exceeded",
            NVMeStatus.namespaceNotReady.raw & 0x7FF: "namespace not ready",
            NVMeStatus.invalidQueueIdentifier.raw & 0x7FF: "invalid queue identifier",
            NVMeStatus.invalidQueueSize.raw & 0x7FF: "invalid queue size",
        ]
        if isSuccess { return "success" }
        return "\(names[raw & 0x7FF] ?? "status") (SCT \(type), SC 0x\(String(code, radix: 16)))"
    }
}

/// A failed NVMe command, surfaced as a typed error.
public struct NVMeError: Error, Equatable, Sendable, CustomStringConvertible {
    public let status: NVMeStatus
    public let opcode: UInt8
    public init(status: NVMeStatus, opcode: UInt8) {
        self.status = status
        self.opcode = opcode
    }
    public var description: String { "NVMe command 0x\(String(opcode, radix: 16)) failed: \(status)" }
}
