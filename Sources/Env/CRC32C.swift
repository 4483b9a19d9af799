import CISAL

/// CRC32C (Castagnoli), computed by ISA-L's `crc32_iscsi` (SSE4.2 / PCLMUL paths).
///
/// Conventions match the usual definition (RFC 3720 appendix B.4): initial value
/// 0xFFFFFFFF, final XOR 0xFFFFFFFF. `update` chains across buffers.
public struct CRC32C: Sendable, Equatable {
    /// The running (non-inverted) register.
    private var register: UInt32 = 0xFFFF_FFFF

    public init() {}

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        var offset = 0
        // crc32_iscsi takes an Int32 length.
        while offset < bytes.count {
            let chunk = min(bytes.count - offset, Int(Int32.max) & ~4095)
            register = crc32_iscsi(
                UnsafeMutablePointer(mutating: (base + offset).assumingMemoryBound(to: UInt8.self)),
                Int32(chunk), register)
            offset += chunk
        }
    }

    public var value: UInt32 { register ^ 0xFFFF_FFFF }

    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var crc = CRC32C()
        crc.update(bytes)
        return crc.value
    }

    public static func checksum<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        if let result = bytes.withContiguousStorageIfAvailable({ checksum(UnsafeRawBufferPointer($0)) }) {
            return result
        }
        return Array(bytes).withUnsafeBytes { checksum($0) }
    }
}
