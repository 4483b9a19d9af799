#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env

/// The software controller's admin command set: identify, queue creation and deletion,
/// features, log pages and the rest the driver sends on the admin queue.
extension NVMeSoftController {
    // MARK: - Admin commands

    func executeAdmin(_ command: SubmissionEntry) {
        let id = command.commandID
        guard let opcode = AdminOpcode(rawValue: command.opcode) else {
            return complete(queue: 0, commandID: id, status: .invalidOpcode)
        }
        switch opcode {
        case .identify:
            guard let target = hostMemory(command.prp1) else { return complete(queue: 0, commandID: id, status: .invalidField) }
            let data: [UInt8]
            switch IdentifyCNS(rawValue: command.cdw10 & 0xFF) {
            case .controller: data = identifyController().encode()
            case .namespace:
                guard command.namespaceID == 1 else { return complete(queue: 0, commandID: id, status: .invalidNamespace) }
                data = identifyNamespace().encode()
            case .activeNamespaces:
                var list = [UInt8](repeating: 0, count: 4096)
                if command.namespaceID < 1 { list[0] = 1 }
                data = list
            case nil: return complete(queue: 0, commandID: id, status: .invalidField)
            }
            data.withUnsafeBytes { target.copyMemory(from: $0.baseAddress!, byteCount: 4096) }
            complete(queue: 0, commandID: id, status: .success)
        case .setFeatures, .getFeatures:
            guard command.cdw10 & 0xFF == UInt32(FeatureID.numberOfQueues.rawValue) else {
                return complete(queue: 0, commandID: id, status: .invalidField)
            }
            let offered = UInt32(configuration.queueCount - 1)
            complete(queue: 0, commandID: id, status: .success, result: offered | offered << 16)
        case .createIOCompletionQueue:
            let queueID = Int(command.cdw10 & 0xFFFF)
            let entries = Int(command.cdw10 >> 16) + 1
            guard queueID >= 1, queueID <= configuration.queueCount, !hasCompletionQueue(queueID) else {
                return complete(queue: 0, commandID: id, status: .invalidQueueIdentifier)
            }
            guard entries >= 2, entries <= configuration.maxQueueEntries else {
                return complete(queue: 0, commandID: id, status: .invalidQueueSize)
            }
            guard command.cdw11 & 1 == 1, let base = hostMemory(command.prp1) else {
                return complete(queue: 0, commandID: id, status: .invalidField)
            }
            let vector = Int(command.cdw11 >> 16)
            interrupts[queueID] = command.cdw11 & 2 != 0 ? interruptRoutes.withLock { $0[vector] } : nil
            completionQueues[queueID] = CompletionQueue(base: base, entries: entries)
            queuesChanged()
            complete(queue: 0, commandID: id, status: .success)
        case .createIOSubmissionQueue:
            let queueID = Int(command.cdw10 & 0xFFFF)
            let entries = Int(command.cdw10 >> 16) + 1
            let cqID = Int(command.cdw11 >> 16)
            guard queueID >= 1, queueID <= configuration.queueCount, !hasSubmissionQueue(queueID) else {
                return complete(queue: 0, commandID: id, status: .invalidQueueIdentifier)
            }
            guard hasCompletionQueue(cqID), cqID != 0 else {
                return complete(queue: 0, commandID: id, status: .completionQueueInvalid)
            }
            guard entries >= 2, entries <= configuration.maxQueueEntries else {
                return complete(queue: 0, commandID: id, status: .invalidQueueSize)
            }
            guard command.cdw11 & 1 == 1, let base = hostMemory(command.prp1) else {
                return complete(queue: 0, commandID: id, status: .invalidField)
            }
            submissionQueues[queueID] = SubmissionQueue(base: base, entries: entries, completionQueue: cqID)
            queuesChanged()
            complete(queue: 0, commandID: id, status: .success)
        case .deleteIOSubmissionQueue:
            let queueID = Int(command.cdw10 & 0xFFFF)
            guard queueID >= 1, hasSubmissionQueue(queueID) else {
                return complete(queue: 0, commandID: id, status: .invalidQueueIdentifier)
            }
            submissionQueues[queueID] = nil
            queuesChanged()
            MMIO.write32(bar, NVMeRegister.doorbell(queue: queueID, completion: false, strideShift: 0), 0)
            complete(queue: 0, commandID: id, status: .success)
        case .deleteIOCompletionQueue:
            let queueID = Int(command.cdw10 & 0xFFFF)
            guard queueID >= 1, hasCompletionQueue(queueID) else {
                return complete(queue: 0, commandID: id, status: .invalidQueueIdentifier)
            }
            completionQueues[queueID] = nil
            interrupts[queueID] = nil
            queuesChanged()
            MMIO.write32(bar, NVMeRegister.doorbell(queue: queueID, completion: true, strideShift: 0), 0)
            complete(queue: 0, commandID: id, status: .success)
        case .abort:
            // Commands here are either done or in the medium's hands; DW0 bit 0 set: not aborted.
            complete(queue: 0, commandID: id, status: .success, result: 1)
        case .getLogPage:
            complete(queue: 0, commandID: id, status: .invalidField)
        }
    }

    func identifyController() -> IdentifyController {
        var data = IdentifyController()
        data.vendorID = 0x1B36  // the vendor id QEMU's emulated devices use; no real vendor's
        data.subsystemVendorID = 0x1B36
        data.serialNumber = configuration.serialNumber
        data.modelNumber = configuration.modelNumber
        data.firmwareRevision = "1.0"
        data.maxDataTransferShift = configuration.maxTransferShift
        data.controllerID = 1
        data.version = 0x0002_0000
        data.namespaceCount = 1
        data.optionalCommands = 1 << 2 | 1 << 3  // dataset management, write zeroes
        data.volatileWriteCache = namespace.geometry.isPersistent ? 1 : 0
        return data
    }

    func identifyNamespace() -> IdentifyNamespace {
        var data = IdentifyNamespace()
        let geometry = namespace.geometry
        data.size = geometry.blockCount
        data.capacity = geometry.blockCount
        data.utilization = geometry.blockCount
        data.lbaDataSizeShifts = [UInt8(geometry.blockSizeBytes.trailingZeroBitCount)]
        data.deallocatedReadsZeros = true  // every bdev module here reads unmapped blocks as zeros
        data.writeZeroesDeallocates = true  // DEAC becomes the namespace's unmap (a hole in a file)
        return data
    }
}
