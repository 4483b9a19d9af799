import Bdev
import BdevMalloc
import BdevURing
import NVMe
import PCI
import Env

/// A device named on a command line: `malloc:SIZE`, `file:PATH`, or a bare path (a file
/// or block device served by the uring module).
public indirect enum DeviceSpec: Equatable, Sendable, CustomStringConvertible {
    case malloc(bytes: UInt64)
    case file(path: String)
    /// The NVMe driver over the in-process software controller, whose namespace is the
    /// inner device (`nvme-emu:malloc:SIZE`, `nvme-emu:PATH`).
    case nvmeEmulated(namespace: DeviceSpec)
    /// The NVMe driver over a PCIe controller bound to vfio-pci or uio_pci_generic.
    case pcie(address: String)
    /// The NVMe driver over NVMe/TCP: namespace 1 of a remote subsystem
    /// (`nvme-tcp:HOST:PORT/SUBSYSTEM-NQN[?option=value&...]`, `NVMeTCPTarget`).
    case nvmeTCP(NVMeTCPTarget)

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case empty
        case unknownKind(String)
        case badSize(String)
        case badAddress(String)
        case badTarget(String)

        public var description: String {
            switch self {
            case .empty: "empty device spec"
            case let .unknownKind(kind):
                "unknown device kind '\(kind)' (expected malloc:SIZE, file:PATH, nvme-emu:SPEC, pcie:BDF or a path)"
            case let .badSize(text): "bad size '\(text)' (expected a number with an optional K, M, G or T suffix)"
            case let .badAddress(text): "bad PCI address '\(text)' (expected DDDD:BB:DD.F)"
            case let .badTarget(why): "bad nvme-tcp target: \(why) (expected nvme-tcp:HOST:PORT/SUBSYSTEM-NQN[?hostnqn=NQN&hdgst=1&ddgst=1&kato=MS&ctrl_loss_tmo=S&io_timeout=S])"
            }
        }
    }

    public init(parsing text: String) throws(ParseError) {
        guard !text.isEmpty else { throw .empty }
        if text.hasPrefix("/") || text.hasPrefix(".") || !text.contains(":") {
            self = .file(path: text)
            return
        }
        let colon = text.firstIndex(of: ":")!
        let kind = String(text[..<colon])
        let argument = String(text[text.index(after: colon)...])
        switch kind {
        case "malloc": self = .malloc(bytes: try Self.parseSize(argument))
        case "file", "uring":
            guard !argument.isEmpty else { throw .empty }
            self = .file(path: argument)
        case "nvme-emu":
            let inner = try DeviceSpec(parsing: argument)
            if case .nvmeEmulated = inner { throw .unknownKind("nvme-emu inside nvme-emu") }
            if case .pcie = inner { throw .unknownKind("pcie inside nvme-emu") }
            if case .nvmeTCP = inner { throw .unknownKind("nvme-tcp inside nvme-emu") }
            self = .nvmeEmulated(namespace: inner)
        case "pcie":
            guard PCIAddress(argument) != nil else { throw .badAddress(argument) }
            self = .pcie(address: argument)
        case "nvme-tcp": self = .nvmeTCP(try NVMeTCPTarget(parsing: argument))
        default: throw .unknownKind(kind)
        }
    }

    /// "4096", "64K", "512M", "1G", "1T" (binary units).
    public static func parseSize(_ text: String) throws(ParseError) -> UInt64 {
        var digits = Substring(text)
        var multiplier: UInt64 = 1
        if let last = digits.last?.uppercased() {
            let units: [String: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
            if let unit = units[last] {
                multiplier = unit
                digits = digits.dropLast()
                if digits.last?.uppercased() == "I" { throw .badSize(text) }
            }
        }
        guard let value = UInt64(digits), value > 0 else { throw .badSize(text) }
        let (bytes, overflow) = value.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { throw .badSize(text) }
        return bytes
    }

    public var description: String {
        switch self {
        case let .malloc(bytes): "malloc:\(bytes)"
        case let .file(path): "file:\(path)"
        case let .nvmeEmulated(namespace): "nvme-emu:\(namespace)"
        case let .pcie(address): "pcie:\(address)"
        case let .nvmeTCP(target): "nvme-tcp:\(target)"
        }
    }

    /// Opens the device. `createSizeBytes` creates a missing image file of that size.
    public func open(blockSizeBytes: Int = 4096, createSizeBytes: UInt64? = nil) throws(BdevError) -> Bdev {
        switch self {
        case let .malloc(bytes):
            guard bytes % UInt64(blockSizeBytes) == 0 else {
                throw .invalidConfiguration("malloc size \(bytes) is not a multiple of the block size \(blockSizeBytes)")
            }
            return Bdev(backend: try MallocBdev(blockCount: bytes / UInt64(blockSizeBytes), blockSizeBytes: blockSizeBytes))
        case let .file(path):
            return Bdev(backend: try URingBdev(path: path, blockSizeBytes: blockSizeBytes, createSizeBytes: createSizeBytes))
        case let .nvmeEmulated(namespace):
            let inner = try namespace.open(blockSizeBytes: blockSizeBytes, createSizeBytes: createSizeBytes)
            do { return Bdev(backend: try NVMeBdev.emulated(namespace: inner)) } catch {
                inner.close()
                throw .invalidConfiguration("nvme-emu: \(error)")
            }
        case let .pcie(address):
            do { return Bdev(backend: try NVMeBdev.pcie(PCIAddress(address)!)) } catch {
                throw .invalidConfiguration("pcie:\(address): \(error)")
            }
        case let .nvmeTCP(target):
            do {
                return Bdev(backend: try NVMeTCPBdev(endpoint: target.endpoint, subsystemNQN: target.subsystemNQN,
                                                     options: target.options))
            } catch {
                throw .invalidConfiguration("nvme-tcp:\(target): \(error)")
            }
        }
    }
}
