import ArgumentParser
import ToolSupport
import Bdev
import DeviceSpec
import Env
import Foundation
import Logging
import AllocationCounting
import NVMe
import Synchronization

/// An in-process I/O benchmark of the bdev layer, after SPDK's tool of the same name.
@main
struct BdevPerf: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(
        commandName: "bdevperf",
        abstract: "Measure a block device through the bdev layer: IOPS, bandwidth, latency, CPU, allocations per I/O.")

    @Option(name: [.customShort("w"), .long], help: "read, write, randread, randwrite, rw or randrw.")
    var workload: String = "randread"

    @Option(name: [.customShort("M"), .long], help: "Read percentage for rw and randrw.")
    var mix: Int = 50

    @Option(name: [.customShort("q"), .long], help: "Requests kept in flight per reactor.")
    var queueDepth: Int = 32

    @Option(name: [.customShort("o"), .long], help: "I/O size in bytes (K, M suffixes allowed).")
    var ioSize: String = "4096"

    @Option(name: [.customShort("t"), .long], help: "Measured seconds.")
    var time: Double = 5

    @Option(name: .long, help: "Unmeasured seconds before measuring.")
    var warmup: Double = 1

    @Option(name: .long, help: "malloc:SIZE, file:PATH or a path.")
    var device: String

    @Option(name: .long, help: "Block size of the device: 512 or 4096.")
    var blockSize: Int = 4096

    @Option(name: .long, help: "Create a missing image file of this size (e.g. 1G).")
    var size: String?

    @Option(name: [.customShort("m"), .long], help: "Number of reactors (one job each).")
    var reactors: Int = 1

    @Option(name: .long, help: "Idle time before a reactor sleeps, in microseconds.")
    var idleUs: UInt64 = 200

    @Flag(inversion: .prefixedNo, help: "Write the whole device once before a workload that reads.")
    var prefill = true

    @Flag(name: .long, help: "Also measure a plain memcpy of the same I/O size (the machine's memory limit).")
    var memcpyBaseline = false

    @Flag(name: .long, help: "Run the jobs on one blob spanning a freshly formatted blob store on the device (its data path), instead of the raw device.")
    var blob = false

    @Flag(name: .long, help: "Print the NVMe controller's and namespace's identify data (nvme-emu:, pcie: and nvme-tcp: devices) and exit.")
    var identify = false

    @Flag(name: .long, help: "Print one JSON object instead of text.")
    var json = false

    func validate() throws {
        guard Workload(rawValue: workload) != nil else {
            throw ValidationError("unknown workload '\(workload)' (\(Workload.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        guard (0...100).contains(mix) else { throw ValidationError("-M \(mix): a percentage 0...100") }
        guard (1...BdevLimits.queueDepthMax).contains(queueDepth) else {
            throw ValidationError("-q \(queueDepth): 1...\(BdevLimits.queueDepthMax)")
        }
        guard time > 0, time <= 3600, warmup >= 0, warmup <= 600 else { throw ValidationError("-t/--warmup out of range") }
        guard BdevGeometry.supportedBlockSizes.contains(blockSize) else {
            throw ValidationError("--block-size \(blockSize): 512 or 4096")
        }
        guard (1...256).contains(reactors) else { throw ValidationError("-m \(reactors): 1...256") }
        let bytes = try parseSize(ioSize, "-o")
        guard bytes % UInt64(blockSize) == 0, bytes <= 64 << 20 else {
            throw ValidationError("-o \(ioSize): a multiple of the block size (\(blockSize)), at most 64M")
        }
        do { _ = try DeviceSpec(parsing: device) } catch { throw ValidationError("--device \(device): \(error)") }
        if let size { _ = try parseSize(size, "--size") }
    }

    private func parseSize(_ text: String, _ option: String) throws -> UInt64 {
        do { return try DeviceSpec.parseSize(text) } catch { throw ValidationError("\(option): \(error)") }
    }

    func run() throws {
        LoggingSystem.bootstrap(StreamLogHandler.standardError)
        AllocationCounter.ensureInterposed()
        let spec = try DeviceSpec(parsing: device)
        let createSize = try size.map { try parseSize($0, "--size") }
        let bdev: Bdev
        do { bdev = try spec.open(blockSizeBytes: blockSize, createSizeBytes: createSize) } catch {
            throw ValidationError("cannot open \(device): \(error)")
        }
        defer { bdev.close() }
        if identify {
            let identity: any NVMeControllerIdentity
            if let nvme = bdev.backend as? NVMeBdev {
                identity = nvme.identity
            } else if let tcp = bdev.backend as? NVMeTCPBdev {
                identity = tcp.identity
            } else {
                throw ValidationError("--identify needs an nvme-emu:, pcie: or nvme-tcp: device")
            }
            print(identifyText(identity))
            return
        }
        let ioBytes = Int(try parseSize(ioSize, "-o"))
        guard UInt64(ioBytes / blockSize) <= bdev.geometry.blockCount else {
            throw ValidationError("-o \(ioSize) is larger than the device")
        }
        let parameters = JobParameters(
            workload: Workload(rawValue: workload)!, readPercent: mix, queueDepth: queueDepth, ioBytes: ioBytes,
            durationNs: UInt64(time * 1e9), warmupNs: UInt64(warmup * 1e9), seed: 0x2545_F491_4F6C_DD1D)
        let blobSetup: BlobSetup?
        do { blobSetup = blob ? try BlobSetup(bdev: bdev) : nil } catch {
            throw ValidationError("cannot set up a blob store on \(device): \(error)")
        }
        let runner = Runner(bdev: bdev, parameters: parameters, reactorCount: reactors, idleNs: idleUs * 1000,
                            prefill: prefill && parameters.workload.reads, blob: blobSetup)
        let result = try runner.run()
        let memcpy = memcpyBaseline ? MemcpyBaseline.measure(ioBytes: ioBytes, seconds: min(time, 2), random: parameters.workload.isRandom) : nil
        let report = Report(device: blob ? "blob:" + device : device, blockSize: blockSize, parameters: parameters, reactors: reactors,
                            result: result, memcpy: memcpy)
        print(json ? report.json() : report.text())
        if result.errors > 0 { throw ExitCode(1) }
    }
}

func identifyText(_ controller: any NVMeControllerIdentity) -> String {
    let c = controller.controllerData
    let n = controller.namespaceData
    let cap = controller.capabilities
    return """
    controller \(controller.name)
      vendor 0x\(String(c.vendorID, radix: 16)) subsystem vendor 0x\(String(c.subsystemVendorID, radix: 16))
      model '\(c.modelNumber)' serial '\(c.serialNumber)' firmware '\(c.firmwareRevision)'
      version \(c.version >> 16).\(c.version >> 8 & 0xFF) controller id \(c.controllerID) namespaces \(c.namespaceCount)
      MDTS \(c.maxDataTransferShift) (max transfer \(controller.maxTransferBytes) B) volatile write cache \(c.volatileWriteCache & 1 == 1)
      optional commands: dataset management \(c.supportsDatasetManagement), write zeroes \(c.supportsWriteZeroes)
      CAP: max queue entries \(cap.maxQueueEntries), timeout \(cap.timeoutMs) ms, doorbell stride \(4 << cap.doorbellStrideShift) B
      I/O queue pairs granted \(controller.ioQueuesGranted)
    namespace 1
      size \(n.size) blocks, capacity \(n.capacity), utilization \(n.utilization)
      formats \(n.formatCount), in use \(n.formatIndex): \(n.blockSizeBytes)-byte blocks
      deallocated blocks read as zeros: \(n.deallocatedReadsZeros)
    """
}
