// Identify Controller and Identify Namespace data (NVMe base spec 2.0, 5.17.2.1 and
// NVM command set spec 4.1.5.1): the fields this project uses, at their offsets.

public struct IdentifyController: Equatable, Sendable {
    public static let bytes = 4096
    public var vendorID: UInt16 = 0
    public var subsystemVendorID: UInt16 = 0
    public var serialNumber = ""
    public var modelNumber = ""
    public var firmwareRevision = ""
    /// Maximum data transfer size as 2^MDTS memory pages; 0: no limit.
    public var maxDataTransferShift: UInt8 = 0
    public var controllerID: UInt16 = 0
    public var version: UInt32 = 0
    public var submissionEntrySizes: UInt8 = 0x66
    public var completionEntrySizes: UInt8 = 0x44
    public var namespaceCount: UInt32 = 0
    /// Optional NVM command support (bit 2: dataset management, bit 3: write zeroes).
    public var optionalCommands: UInt16 = 0
    public var volatileWriteCache: UInt8 = 0
    /// Keep-alive granularity (KAS, 100 ms units; 0: keep alive unsupported).
    public var keepAliveSupport: UInt16 = 0
    /// SGL support (SGLS): bits 1:0 non-zero when SGLs are supported, bit 20 for offset
    /// (in-capsule) data blocks.
    public var sglSupport: UInt32 = 0
    /// NVMe over Fabrics: I/O queue command capsule size in 16-byte units (IOCCSZ, 64
    /// bytes of command plus the in-capsule data the controller accepts) and the offset
    /// of in-capsule data (ICDOFF, 16-byte units).
    public var ioCommandCapsuleUnits: UInt32 = 0
    public var inCapsuleDataOffsetUnits: UInt16 = 0

    public init() {}

    /// Bytes of write data an I/O command capsule may carry (0: none).
    public var inCapsuleDataBytes: Int { max(0, Int(ioCommandCapsuleUnits) * 16 - SubmissionEntry.bytes) }

    public var supportsDatasetManagement: Bool { optionalCommands >> 2 & 1 == 1 }
    public var supportsWriteZeroes: Bool { optionalCommands >> 3 & 1 == 1 }

    public func encode() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.bytes)
        put16(&bytes, 0, vendorID); put16(&bytes, 2, subsystemVendorID)
        putASCII(&bytes, 4, 20, serialNumber); putASCII(&bytes, 24, 40, modelNumber); putASCII(&bytes, 64, 8, firmwareRevision)
        bytes[77] = maxDataTransferShift
        put16(&bytes, 78, controllerID)
        put32(&bytes, 80, version)
        bytes[512] = submissionEntrySizes
        bytes[513] = completionEntrySizes
        put32(&bytes, 516, namespaceCount)
        put16(&bytes, 520, optionalCommands)
        bytes[525] = volatileWriteCache
        put16(&bytes, 320, keepAliveSupport)
        put32(&bytes, 536, sglSupport)
        put32(&bytes, 1792, ioCommandCapsuleUnits)
        put16(&bytes, 1800, inCapsuleDataOffsetUnits)
        return bytes
    }

    public init(decoding bytes: UnsafeRawBufferPointer) {
        vendorID = get16(bytes, 0); subsystemVendorID = get16(bytes, 2)
        serialNumber = getASCII(bytes, 4, 20); modelNumber = getASCII(bytes, 24, 40); firmwareRevision = getASCII(bytes, 64, 8)
        maxDataTransferShift = bytes[77]
        controllerID = get16(bytes, 78)
        version = get32(bytes, 80)
        submissionEntrySizes = bytes[512]
        completionEntrySizes = bytes[513]
        namespaceCount = get32(bytes, 516)
        optionalCommands = get16(bytes, 520)
        volatileWriteCache = bytes[525]
        keepAliveSupport = get16(bytes, 320)
        sglSupport = get32(bytes, 536)
        ioCommandCapsuleUnits = get32(bytes, 1792)
        inCapsuleDataOffsetUnits = get16(bytes, 1800)
    }
}

public struct IdentifyNamespace: Equatable, Sendable {
    public static let bytes = 4096
    public var size: UInt64 = 0
    public var capacity: UInt64 = 0
    public var utilization: UInt64 = 0
    /// Formats described (NLBAF is 0-based).
    public var formatCount: Int = 1
    /// Index of the format in use (FLBAS bits 3:0).
    public var formatIndex: Int = 0
    /// Per format: log2 of the LBA data size (LBADS).
    public var lbaDataSizeShifts: [UInt8] = [12]
    /// DLFEAT bits 2:0 = 001b: deallocated blocks read as zeros.
    public var deallocatedReadsZeros = false
    /// DLFEAT bit 3: Write Zeroes honours its deallocate bit (DEAC).
    public var writeZeroesDeallocates = false

    public init() {}

    public var blockSizeBytes: Int { 1 << Int(lbaDataSizeShifts[formatIndex]) }

    public func encode() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.bytes)
        put64(&bytes, 0, size); put64(&bytes, 8, capacity); put64(&bytes, 16, utilization)
        bytes[25] = UInt8(formatCount - 1)
        bytes[26] = UInt8(formatIndex & 0xF)
        bytes[33] = (deallocatedReadsZeros ? 1 : 0) | (writeZeroesDeallocates ? 1 << 3 : 0)
        for (index, shift) in lbaDataSizeShifts.enumerated() { bytes[128 + index * 4 + 2] = shift }
        return bytes
    }

    public init(decoding bytes: UnsafeRawBufferPointer) {
        size = get64(bytes, 0); capacity = get64(bytes, 8); utilization = get64(bytes, 16)
        formatCount = Int(bytes[25]) + 1
        formatIndex = Int(bytes[26] & 0xF)
        deallocatedReadsZeros = bytes[33] & 0x7 == 1
        writeZeroesDeallocates = bytes[33] & 0x8 != 0
        lbaDataSizeShifts = (0..<min(formatCount, 64)).map { bytes[128 + $0 * 4 + 2] }
        if formatIndex >= lbaDataSizeShifts.count { formatIndex = 0 }
    }
}

private func put16(_ bytes: inout [UInt8], _ at: Int, _ value: UInt16) { for i in 0..<2 { bytes[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt16(i))) } }
private func put32(_ bytes: inout [UInt8], _ at: Int, _ value: UInt32) { for i in 0..<4 { bytes[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) } }
private func put64(_ bytes: inout [UInt8], _ at: Int, _ value: UInt64) { for i in 0..<8 { bytes[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) } }
private func putASCII(_ bytes: inout [UInt8], _ at: Int, _ width: Int, _ text: String) {
    let ascii = Array(text.utf8.prefix(width))
    for i in 0..<width { bytes[at + i] = i < ascii.count ? ascii[i] : 0x20 }  // space-padded
}
private func get16(_ bytes: UnsafeRawBufferPointer, _ at: Int) -> UInt16 { UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8 }
private func get32(_ bytes: UnsafeRawBufferPointer, _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[at + $1]) << (8 * UInt32($1)) } }
private func get64(_ bytes: UnsafeRawBufferPointer, _ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) } }
private func getASCII(_ bytes: UnsafeRawBufferPointer, _ at: Int, _ width: Int) -> String {
    String(decoding: bytes[at..<(at + width)], as: UTF8.self).trimmingSpaces()
}

extension String {
    fileprivate func trimmingSpaces() -> String {
        var text = Substring(self)
        while text.last == " " || text.last == "\0" { text = text.dropLast() }
        while text.first == " " { text = text.dropFirst() }
        return String(text)
    }
}
