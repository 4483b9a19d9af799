import Bdev
import Env
import PCI

/// The NVMe bdev module: namespace 1 of a controller reached through any transport,
/// one I/O queue pair per channel.
public final class NVMeBdev: BdevBackend, @unchecked Sendable {
    public let controller: NVMeController
    public let name: String
    public let geometry: BdevGeometry
    private let softController: NVMeSoftController?
    private let ownedNamespace: Bdev?
    private let queueEntries: Int
    private let timeoutNs: UInt64

    public init(transport: NVMeTransport, persistent: Bool, queueEntries: Int = 256,
                timeoutNs: UInt64 = 10_000_000_000) throws {
        controller = try NVMeController(transport: transport)
        name = transport.name
        let namespace = controller.namespaceData
        // Dword alignment is what PRPs need; anything else goes through a bounce buffer.
        geometry = BdevGeometry(blockSizeBytes: namespace.blockSizeBytes, blockCount: namespace.size,
                                bufferAlignmentBytes: 4, isPersistent: persistent)
        self.queueEntries = queueEntries
        self.timeoutNs = timeoutNs
        softController = nil
        ownedNamespace = nil
    }

    private init(controller: NVMeController, softController: NVMeSoftController, namespace: Bdev,
                 queueEntries: Int, timeoutNs: UInt64) {
        self.controller = controller
        name = controller.transport.name
        geometry = BdevGeometry(blockSizeBytes: controller.namespaceData.blockSizeBytes,
                                blockCount: controller.namespaceData.size, bufferAlignmentBytes: 4,
                                isPersistent: namespace.geometry.isPersistent)
        self.softController = softController
        ownedNamespace = namespace
        self.queueEntries = queueEntries
        self.timeoutNs = timeoutNs
    }

    /// The driver over the in-process software controller serving `namespace`.
    public static func emulated(namespace: Bdev, configuration: NVMeSoftController.Configuration = .init(),
                                queueEntries: Int = 256, timeoutNs: UInt64 = 10_000_000_000) throws -> NVMeBdev {
        let device = try NVMeSoftController(namespace: namespace, configuration: configuration)
        do {
            let controller = try NVMeController(transport: device.makeTransport())
            return NVMeBdev(controller: controller, softController: device, namespace: namespace,
                            queueEntries: queueEntries, timeoutNs: timeoutNs)
        } catch {
            device.shutdown()
            throw error
        }
    }

    /// The driver over a PCIe function bound to vfio-pci or uio_pci_generic.
    public static func pcie(_ address: PCIAddress, queueEntries: Int = 256) throws -> NVMeBdev {
        let device = try openPCIDevice(address)
        return try NVMeBdev(transport: PCIeTransport(device: device), persistent: true, queueEntries: queueEntries)
    }

    /// The software controller behind this bdev (tests use its fault hooks).
    public var emulator: NVMeSoftController? { softController }

    public func makeChannel(reactor: Reactor) throws(BdevError) -> any BdevBackendChannel {
        do {
            return try NVMeQueuePair(controller: controller, reactor: reactor, entries: queueEntries, timeoutNs: timeoutNs)
        } catch let error as BdevError {
            throw error
        } catch {
            throw .invalidConfiguration("\(name): cannot create an I/O queue pair: \(error)")
        }
    }

    public func close() {
        controller.shutdown()
        softController?.shutdown()
        ownedNamespace?.close()
        controller.transport.close()
    }
}

/// BAR0 and bus addresses of a PCIe function.
final class PCIeTransport: NVMeTransport, @unchecked Sendable {
    let device: any PCIDevice
    init(device: any PCIDevice) { self.device = device }
    var registers: UnsafeMutableRawPointer { device.bar0 }
    var name: String { "pcie:\(device.address)" }
    func busAddress(of pointer: UnsafeRawPointer) -> UInt64? { device.busAddress(of: pointer) }
    func close() { device.close() }
}
