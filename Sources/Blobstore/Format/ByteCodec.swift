import Env

// Little-endian, bounds-checked encoding and decoding of on-disk structures. Every
// structure is built field by field here; no Swift memory layout ever reaches the disk.
// docs/FORMAT.md gives the layouts.

/// What is wrong with an on-disk structure, and where: the structure's name and the
/// byte offset on the device (or in the buffer, for standalone decoding) of the field.
public struct FormatError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Problem: Equatable, Sendable {
        case badMagic(found: UInt64)
        case badChecksum(stored: UInt32, computed: UInt32)
        case unsupportedVersion(UInt32)
        case unknownIncompatibleFeatures(UInt64)
        case truncated(needed: Int, available: Int)
        case invalidField(name: String, value: UInt64)
        case sequenceGap(expected: UInt64, found: UInt64)
        case reservedNotZero
    }

    public let structure: String
    public let offset: UInt64
    public let problem: Problem

    public init(_ structure: String, offset: UInt64, _ problem: Problem) {
        self.structure = structure
        self.offset = offset
        self.problem = problem
    }

    public var description: String {
        let what: String
        switch problem {
        case let .badMagic(found): what = "bad magic 0x\(String(found, radix: 16))"
        case let .badChecksum(stored, computed):
            what = "CRC32C mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))"
        case let .unsupportedVersion(version): what = "unsupported version \(version)"
        case let .unknownIncompatibleFeatures(mask): what = "unknown incompatible features 0x\(String(mask, radix: 16))"
        case let .truncated(needed, available): what = "truncated: needs \(needed) bytes, has \(available)"
        case let .invalidField(name, value): what = "invalid \(name) \(value)"
        case let .sequenceGap(expected, found): what = "sequence \(found) where \(expected) was expected"
        case .reservedNotZero: what = "reserved bytes are not zero"
        }
        return "\(structure) at byte \(offset): \(what)"
    }
}

/// Writes little-endian fields into a fixed-size byte array.
struct ByteWriter {
    private(set) var bytes: [UInt8]
    private(set) var position = 0

    init(count: Int) { bytes = [UInt8](repeating: 0, count: count) }

    var remaining: Int { bytes.count - position }

    mutating func seek(_ offset: Int) {
        precondition(offset >= 0 && offset <= bytes.count)
        position = offset
    }

    mutating func u8(_ value: UInt8) { put(UInt64(value), width: 1) }
    mutating func u16(_ value: UInt16) { put(UInt64(value), width: 2) }
    mutating func u32(_ value: UInt32) { put(UInt64(value), width: 4) }
    mutating func u64(_ value: UInt64) { put(value, width: 8) }
    /// A blob id is its raw value; `nil` (no blob) is all ones.
    mutating func blobID(_ id: BlobID?) { u64(id?.rawValue ?? UInt64.max) }

    mutating func raw(_ data: some Collection<UInt8>) {
        precondition(data.count <= remaining, "encoder overflow: \(data.count) bytes, \(remaining) left")
        bytes.replaceSubrange(position..<(position + data.count), with: data)
        position += data.count
    }

    private mutating func put(_ value: UInt64, width: Int) {
        precondition(width <= remaining, "encoder overflow at \(position)")
        for index in 0..<width { bytes[position + index] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(index))) }
        position += width
    }

    /// CRC32C of `range`, stored little-endian at `at`.
    mutating func sealChecksum(over range: Range<Int>, at: Int) {
        let crc = bytes[range].withUnsafeBytes { CRC32C.checksum($0) }
        for index in 0..<4 { bytes[at + index] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(index))) }
    }
}

/// Reads little-endian fields with bounds checks; every failure names the structure and
/// the absolute offset (`base` + position).
struct ByteReader {
    let bytes: ArraySlice<UInt8>
    let structure: String
    let base: UInt64
    private(set) var position = 0

    init(_ bytes: ArraySlice<UInt8>, structure: String, base: UInt64) {
        self.bytes = bytes
        self.structure = structure
        self.base = base
    }

    var remaining: Int { bytes.count - position }
    var absoluteOffset: UInt64 { base + UInt64(position) }

    func error(_ problem: FormatError.Problem, at offset: Int? = nil) -> FormatError {
        FormatError(structure, offset: base + UInt64(offset ?? position), problem)
    }

    mutating func seek(_ offset: Int) throws(FormatError) {
        guard offset >= 0 && offset <= bytes.count else { throw error(.truncated(needed: offset, available: bytes.count)) }
        position = offset
    }

    mutating func u8() throws(FormatError) -> UInt8 { UInt8(try take(1)) }
    mutating func u16() throws(FormatError) -> UInt16 { UInt16(try take(2)) }
    mutating func u32() throws(FormatError) -> UInt32 { UInt32(try take(4)) }
    mutating func u64() throws(FormatError) -> UInt64 { try take(8) }
    mutating func blobID() throws(FormatError) -> BlobID { BlobID(rawValue: try take(8)) }
    /// All ones is no blob (`ByteWriter.blobID`).
    mutating func optionalBlobID() throws(FormatError) -> BlobID? {
        let raw = try take(8)
        return raw == UInt64.max ? nil : BlobID(rawValue: raw)
    }

    mutating func raw(_ count: Int) throws(FormatError) -> [UInt8] {
        guard count >= 0, count <= remaining else { throw error(.truncated(needed: count, available: remaining)) }
        let start = bytes.startIndex + position
        position += count
        return Array(bytes[start..<(start + count)])
    }

    private mutating func take(_ width: Int) throws(FormatError) -> UInt64 {
        guard width <= remaining else { throw error(.truncated(needed: width, available: remaining)) }
        var value: UInt64 = 0
        let start = bytes.startIndex + position
        for index in 0..<width { value |= UInt64(bytes[start + index]) << (8 * UInt64(index)) }
        position += width
        return value
    }

    /// Checks the CRC32C stored at `at` against `range` (offsets relative to the structure).
    func verifyChecksum(over range: Range<Int>, at: Int) throws(FormatError) {
        guard range.upperBound <= bytes.count, at + 4 <= bytes.count else {
            throw error(.truncated(needed: max(range.upperBound, at + 4), available: bytes.count), at: 0)
        }
        let start = bytes.startIndex
        var stored: UInt32 = 0
        for index in 0..<4 { stored |= UInt32(bytes[start + at + index]) << (8 * UInt32(index)) }
        let computed = bytes[(start + range.lowerBound)..<(start + range.upperBound)].withUnsafeBytes {
            CRC32C.checksum($0)
        }
        guard stored == computed else { throw error(.badChecksum(stored: stored, computed: computed), at: at) }
    }

    /// Bytes `range` (from the start of the structure) must all be zero; the offset of the
    /// first that is not is in the error. Eight bytes at a time: every metadata page's
    /// unused tail is checked, and a load or fsck decodes every page.
    func requireZero(_ range: Range<Int>) throws(FormatError) {
        precondition(range.lowerBound >= 0 && range.upperBound <= bytes.count, "\(range) outside \(bytes.count) bytes")
        let nonZero: Int? = bytes.withUnsafeBufferPointer { buffer in
            guard let base = buffer.baseAddress else { return nil }
            var index = range.lowerBound
            while index < range.upperBound, Int(bitPattern: base + index) & 7 != 0 {
                if base[index] != 0 { return index }
                index += 1
            }
            while index + 8 <= range.upperBound, UnsafeRawPointer(base + index).load(as: UInt64.self) == 0 { index += 8 }
            while index < range.upperBound {
                if base[index] != 0 { return index }
                index += 1
            }
            return nil
        }
        if let nonZero { throw error(.reservedNotZero, at: nonZero) }
    }
}
