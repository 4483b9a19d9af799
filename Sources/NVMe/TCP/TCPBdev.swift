import Bdev
import Env

/// The NVMe bdev module over NVMe/TCP: namespace 1 of a remote controller (a subsystem
/// NQN at a host and port), one I/O queue (one TCP connection) per channel.
public final class NVMeTCPBdev: BdevBackend, @unchecked Sendable {
    public let controller: NVMeTCPController
    public let name: String
    public let geometry: BdevGeometry

    public init(endpoint: TCPEndpoint, subsystemNQN: String, options: NVMeTCPOptions = NVMeTCPOptions()) throws {
        controller = try NVMeTCPController(endpoint: endpoint, subsystemNQN: subsystemNQN, options: options)
        name = controller.name
        let namespace = controller.namespaceData
        // Data is copied to and from the socket: any alignment does.
        geometry = BdevGeometry(blockSizeBytes: namespace.blockSizeBytes, blockCount: namespace.size,
                                bufferAlignmentBytes: 1, isPersistent: true)
    }

    public func makeChannel(reactor: Reactor) throws(BdevError) -> any BdevBackendChannel {
        do {
            return try NVMeTCPQueuePair(controller: controller, reactor: reactor)
        } catch {
            throw .invalidConfiguration("\(name): cannot connect an I/O queue: \(error)")
        }
    }

    public func close() { controller.close() }
}

/// What Identify and the registers say about a controller, whatever its transport
/// (bdevperf --identify, nvme-qemu-check).
public protocol NVMeControllerIdentity: AnyObject {
    var name: String { get }
    var capabilities: ControllerCapabilities { get }
    var controllerData: IdentifyController { get }
    var namespaceData: IdentifyNamespace { get }
    var maxTransferBytes: Int { get }
    var ioQueuesGranted: Int { get }
}

extension NVMeController: NVMeControllerIdentity {
    public var name: String { transport.name }
}

extension NVMeTCPController: NVMeControllerIdentity {}

extension NVMeBdev {
    public var identity: any NVMeControllerIdentity { controller }
}

extension NVMeTCPBdev {
    public var identity: any NVMeControllerIdentity { controller }
}
