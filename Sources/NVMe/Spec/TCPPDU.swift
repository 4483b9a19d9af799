// NVMe/TCP transport PDUs (NVM Express TCP Transport Specification 1.0, section 3.6).
// Every PDU starts with an 8-byte common header (CH): type, flags, HLEN (header length
// without its digest), PDO (offset of the data from the PDU's start, 0 without data) and
// PLEN (the whole PDU: header, header digest, padding, data, data digest). Digests are
// CRC32C, little-endian, after the header (HDGST) and after the data (DDGST), present
// when the connection negotiated them and flagged in CH.FLAGS. Field positions are
// checked in Tests/NVMeTests/FabricsSpecTests.swift.

public enum TCPPDUType: UInt8, Sendable {
    case icReq = 0x00
    case icResp = 0x01
    case h2cTermReq = 0x02
    case c2hTermReq = 0x03
    case capsuleCommand = 0x04
    case capsuleResponse = 0x05
    case h2cData = 0x06
    case c2hData = 0x07
    case r2t = 0x09
}

public enum TCPPDU {
    public static let commonHeaderBytes = 8
    public static let digestBytes = 4

    /// CH.FLAGS bits.
    public static let flagHeaderDigest: UInt8 = 1 << 0
    public static let flagDataDigest: UInt8 = 1 << 1
    /// H2CData and C2HData: the last PDU of the transfer (of the R2T, for H2C).
    public static let flagLastPDU: UInt8 = 1 << 2
    /// C2HData: the command completed successfully, no CapsuleResp follows.
    public static let flagSuccess: UInt8 = 1 << 3

    /// Header lengths (HLEN) by type.
    public static let icBytes = 128
    public static let capsuleCommandHeaderBytes = commonHeaderBytes + SubmissionEntry.bytes  // 72
    public static let capsuleResponseHeaderBytes = commonHeaderBytes + CompletionEntry.bytes  // 24
    public static let dataHeaderBytes = 24  // H2CData, C2HData, R2T, TermReq
    /// A TermReq carries at most 152 bytes in all (header and the offending header).
    public static let termReqBytesMax = 152

    /// ICReq/ICResp DGST bits.
    public static let digestHeaderEnable: UInt8 = 1 << 0
    public static let digestDataEnable: UInt8 = 1 << 1
    /// MAXH2CDATA below this is a protocol error.
    public static let maxH2CDataMin = 4096

    /// Writes a common header at `memory`.
    @inline(__always)
    public static func storeCommonHeader(_ memory: UnsafeMutableRawPointer, type: TCPPDUType, flags: UInt8,
                                         headerBytes: Int, dataOffset: Int, totalBytes: Int) {
        memory.storeBytes(of: type.rawValue, toByteOffset: 0, as: UInt8.self)
        memory.storeBytes(of: flags, toByteOffset: 1, as: UInt8.self)
        memory.storeBytes(of: UInt8(headerBytes), toByteOffset: 2, as: UInt8.self)
        memory.storeBytes(of: UInt8(dataOffset), toByteOffset: 3, as: UInt8.self)
        memory.storeBytes(of: UInt32(totalBytes).littleEndian, toByteOffset: 4, as: UInt32.self)
    }
}

/// A decoded common header.
public struct TCPCommonHeader: Equatable, Sendable {
    public var rawType: UInt8
    public var flags: UInt8
    public var headerBytes: Int
    public var dataOffset: Int
    public var totalBytes: Int

    public init(rawType: UInt8, flags: UInt8, headerBytes: Int, dataOffset: Int, totalBytes: Int) {
        self.rawType = rawType
        self.flags = flags
        self.headerBytes = headerBytes
        self.dataOffset = dataOffset
        self.totalBytes = totalBytes
    }

    public static let empty = TCPCommonHeader(rawType: 0, flags: 0, headerBytes: 0, dataOffset: 0, totalBytes: 0)

    public init(loadingFrom memory: UnsafeRawPointer) {
        rawType = memory.load(fromByteOffset: 0, as: UInt8.self)
        flags = memory.load(fromByteOffset: 1, as: UInt8.self)
        headerBytes = Int(memory.load(fromByteOffset: 2, as: UInt8.self))
        dataOffset = Int(memory.load(fromByteOffset: 3, as: UInt8.self))
        totalBytes = Int(UInt32(littleEndian: memory.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
    }

    public var type: TCPPDUType? { TCPPDUType(rawValue: rawType) }
    public var hasHeaderDigest: Bool { flags & TCPPDU.flagHeaderDigest != 0 }
    public var hasDataDigest: Bool { flags & TCPPDU.flagDataDigest != 0 }
}

/// ICReq (host to controller, 128 bytes): PFV at 8 (0), HPDA at 10 (host PDU data
/// alignment, (HPDA+1)*4 bytes), DGST at 11, MAXR2T at 12 (0-based R2Ts per command).
public struct TCPInitializeRequest: Equatable, Sendable {
    public var headerDigest: Bool
    public var dataDigest: Bool
    public var hostDataAlignment: UInt8 = 0
    public var maxR2TPerCommand: UInt32 = 0

    public init(headerDigest: Bool, dataDigest: Bool) {
        self.headerDigest = headerDigest
        self.dataDigest = dataDigest
    }

    public func store(to memory: UnsafeMutableRawPointer) {
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: TCPPDU.icBytes)
        TCPPDU.storeCommonHeader(memory, type: .icReq, flags: 0, headerBytes: TCPPDU.icBytes, dataOffset: 0,
                                 totalBytes: TCPPDU.icBytes)
        memory.storeBytes(of: UInt16(0), toByteOffset: 8, as: UInt16.self)
        memory.storeBytes(of: hostDataAlignment, toByteOffset: 10, as: UInt8.self)
        let digests = (headerDigest ? TCPPDU.digestHeaderEnable : 0) | (dataDigest ? TCPPDU.digestDataEnable : 0)
        memory.storeBytes(of: digests, toByteOffset: 11, as: UInt8.self)
        memory.storeBytes(of: maxR2TPerCommand.littleEndian, toByteOffset: 12, as: UInt32.self)
    }
}

/// ICResp (controller to host, 128 bytes): PFV at 8, CPDA at 10 (controller PDU data
/// alignment for the host's PDUs), DGST at 11 (what the controller enabled), MAXH2CDATA
/// at 12 (bytes of data per H2CData PDU).
public struct TCPInitializeResponse: Equatable, Sendable {
    public var version: UInt16
    public var controllerDataAlignment: UInt8
    public var headerDigest: Bool
    public var dataDigest: Bool
    public var maxH2CDataBytes: Int

    public init(version: UInt16 = 0, controllerDataAlignment: UInt8 = 0, headerDigest: Bool, dataDigest: Bool,
                maxH2CDataBytes: Int) {
        self.version = version
        self.controllerDataAlignment = controllerDataAlignment
        self.headerDigest = headerDigest
        self.dataDigest = dataDigest
        self.maxH2CDataBytes = maxH2CDataBytes
    }

    public init(loadingFrom memory: UnsafeRawPointer) {
        version = UInt16(littleEndian: memory.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
        controllerDataAlignment = memory.load(fromByteOffset: 10, as: UInt8.self)
        let digests = memory.load(fromByteOffset: 11, as: UInt8.self)
        headerDigest = digests & TCPPDU.digestHeaderEnable != 0
        dataDigest = digests & TCPPDU.digestDataEnable != 0
        maxH2CDataBytes = Int(UInt32(littleEndian: memory.loadUnaligned(fromByteOffset: 12, as: UInt32.self)))
    }

    public func store(to memory: UnsafeMutableRawPointer) {
        memory.initializeMemory(as: UInt8.self, repeating: 0, count: TCPPDU.icBytes)
        TCPPDU.storeCommonHeader(memory, type: .icResp, flags: 0, headerBytes: TCPPDU.icBytes, dataOffset: 0,
                                 totalBytes: TCPPDU.icBytes)
        memory.storeBytes(of: version.littleEndian, toByteOffset: 8, as: UInt16.self)
        memory.storeBytes(of: controllerDataAlignment, toByteOffset: 10, as: UInt8.self)
        let digests = (headerDigest ? TCPPDU.digestHeaderEnable : 0) | (dataDigest ? TCPPDU.digestDataEnable : 0)
        memory.storeBytes(of: digests, toByteOffset: 11, as: UInt8.self)
        memory.storeBytes(of: UInt32(maxH2CDataBytes).littleEndian, toByteOffset: 12, as: UInt32.self)
    }
}

/// The part after CH of H2CData, C2HData and R2T (24-byte headers): CCCID at 8 (the
/// command's CID), TTAG at 10 (R2T and H2CData), DATAO/R2TO at 12, DATAL/R2TL at 16.
public struct TCPDataHeader: Equatable, Sendable {
    public var commandID: UInt16
    public var transferTag: UInt16
    public var dataOffset: Int
    public var dataBytes: Int

    public init(commandID: UInt16, transferTag: UInt16, dataOffset: Int, dataBytes: Int) {
        self.commandID = commandID
        self.transferTag = transferTag
        self.dataOffset = dataOffset
        self.dataBytes = dataBytes
    }

    public init(loadingFrom memory: UnsafeRawPointer) {
        commandID = UInt16(littleEndian: memory.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
        transferTag = UInt16(littleEndian: memory.loadUnaligned(fromByteOffset: 10, as: UInt16.self))
        dataOffset = Int(UInt32(littleEndian: memory.loadUnaligned(fromByteOffset: 12, as: UInt32.self)))
        dataBytes = Int(UInt32(littleEndian: memory.loadUnaligned(fromByteOffset: 16, as: UInt32.self)))
    }

    public func store(to memory: UnsafeMutableRawPointer) {
        memory.storeBytes(of: commandID.littleEndian, toByteOffset: 8, as: UInt16.self)
        memory.storeBytes(of: transferTag.littleEndian, toByteOffset: 10, as: UInt16.self)
        memory.storeBytes(of: UInt32(dataOffset).littleEndian, toByteOffset: 12, as: UInt32.self)
        memory.storeBytes(of: UInt32(dataBytes).littleEndian, toByteOffset: 16, as: UInt32.self)
        memory.storeBytes(of: UInt32(0), toByteOffset: 20, as: UInt32.self)
    }
}

/// H2CTermReq / C2HTermReq: FES (fatal error status) at 8, FEI (field information) at 10.
public enum TCPTermReq {
    public static let invalidHeaderField: UInt16 = 0x01
    public static let pduSequenceError: UInt16 = 0x02
    public static let headerDigestError: UInt16 = 0x03
    public static let dataOutOfRange: UInt16 = 0x04
    public static let dataLimitExceeded: UInt16 = 0x05
    public static let unsupportedParameter: UInt16 = 0x06

    public static func describe(status: UInt16) -> String {
        switch status {
        case invalidHeaderField: "invalid PDU header field"
        case pduSequenceError: "PDU sequence error"
        case headerDigestError: "header digest error"
        case dataOutOfRange: "data transfer out of range"
        case dataLimitExceeded: "data transfer limit exceeded"
        case unsupportedParameter: "unsupported parameter"
        default: "fatal error status 0x\(String(status, radix: 16))"
        }
    }
}
