#if canImport(Glibc)
import Glibc
#endif
import Env
import Synchronization

/// A PCI function address, "DDDD:BB:DD.F".
public struct PCIAddress: Equatable, Sendable, CustomStringConvertible {
    public let text: String

    public init?(_ text: String) {
        let parts = text.split(separator: ":")
        var full = text
        if parts.count == 2 { full = "0000:" + text }
        let fields = full.split(whereSeparator: { $0 == ":" || $0 == "." })
        guard fields.count == 4, fields[0].count == 4, fields[1].count == 2, fields[2].count == 2, fields[3].count == 1,
              fields.allSatisfy({ $0.allSatisfy(\.isHexDigit) }) else { return nil }
        self.text = full.lowercased()
    }

    public var description: String { text }
    public var sysfsPath: String { "/sys/bus/pci/devices/\(text)" }
}

public struct PCIError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// A PCI function whose BAR0 is mapped into this process and whose DMA addresses are
/// known: what an NVMe PCIe transport needs.
public protocol PCIDevice: AnyObject, Sendable {
    var address: PCIAddress { get }
    /// BAR0 mapped read/write (device registers).
    var bar0: UnsafeMutableRawPointer { get }
    var bar0Length: Int { get }
    /// The address the device uses for `pointer`, which must lie in the DMA pool.
    func busAddress(of pointer: UnsafeRawPointer) -> UInt64?
    func close()
}

/// Opens the device with whatever driver it is bound to (vfio-pci or uio_pci_generic).
public func openPCIDevice(_ address: PCIAddress, pool: DMAPool = .shared) throws -> any PCIDevice {
    let driverLink = address.sysfsPath + "/driver"
    var buffer = [CChar](repeating: 0, count: 4096)
    let length = readlink(driverLink, &buffer, buffer.count - 1)
    guard length > 0 else {
        throw PCIError("\(address): bound to no driver; bind it to vfio-pci or uio_pci_generic first")
    }
    let target = String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    let driver = target.split(separator: "/").last.map(String.init) ?? target
    switch driver {
    case "vfio-pci": return try VFIOPCIDevice(address: address, pool: pool)
    case "uio_pci_generic": return try UIOPCIDevice(address: address, pool: pool)
    default:
        throw PCIError("\(address): bound to \(driver); bind it to vfio-pci or uio_pci_generic first")
    }
}

/// PCI configuration space command register: memory space and bus mastering on.
func enableBusMastering(readConfig: (Int, Int) throws -> [UInt8], writeConfig: (Int, [UInt8]) throws -> Void) throws {
    let command = try readConfig(4, 2)
    guard command.count == 2 else { throw PCIError("short read of the PCI command register") }
    var value = UInt16(command[0]) | UInt16(command[1]) << 8
    value |= 0x0002 | 0x0004  // memory space, bus master
    value &= ~UInt16(0x0400)  // INTx disabled: completions are polled
    try writeConfig(4, [UInt8(value & 0xFF), UInt8(value >> 8)])
}

func preadAll(_ fd: Int32, count: Int, offset: Int) throws -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    let result = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
    guard result == count else { throw PCIError("pread of \(count) bytes at \(offset): errno \(errno)") }
    return bytes
}

func pwriteAll(_ fd: Int32, _ bytes: [UInt8], offset: Int) throws {
    let result = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, bytes.count, off_t(offset)) }
    guard result == bytes.count else { throw PCIError("pwrite of \(bytes.count) bytes at \(offset): errno \(errno)") }
}

/// Virtual-to-bus address ranges of DMA memory, for devices whose bus addresses are not
/// the virtual ones (UIO: physical; VFIO: IOVAs handed out from `reserve`).
final class TranslationTable: Sendable {
    private struct Range {
        var virtual: UInt
        var bus: UInt64
        var bytes: Int
    }
    private let ranges = Mutex<(list: [Range], nextIOVA: UInt64)>(([], 1 << 32))

    /// The next free IOVA range of `bytes` (2 MiB aligned), starting at 4 GiB.
    func reserve(bytes: Int) -> UInt64 {
        ranges.withLock { state in
            let iova = state.nextIOVA
            state.nextIOVA += UInt64((bytes + (2 << 20) - 1) / (2 << 20) * (2 << 20))
            return iova
        }
    }

    func add(virtual: UInt, bus: UInt64, bytes: Int) {
        ranges.withLock { $0.list.append(Range(virtual: virtual, bus: bus, bytes: bytes)) }
    }

    func lookup(_ virtual: UInt) -> UInt64? {
        ranges.withLock { state in
            for range in state.list where virtual >= range.virtual && virtual < range.virtual + UInt(range.bytes) {
                return range.bus + UInt64(virtual - range.virtual)
            }
            return nil
        }
    }
}
