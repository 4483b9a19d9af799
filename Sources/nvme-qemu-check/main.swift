// The NVMe driver against a controller nobody here wrote: QEMU's -device nvme in the guest
// of Tests/qemu/nvme-qemu.sh (--bdf: PCIe through uio or vfio), or Linux nvmet in the
// guest of Tests/qemu/nvme-tcp-qemu.sh (--device nvme-tcp:...: NVMe/TCP from the host).
// Identify, the bdev conformance suite, and a short random read/write run. Prints one
// line per step; exits 0 only if every step passed.
#if canImport(Glibc)
import Glibc
#endif
import Bdev
import BdevConformance
import DeviceSpec
import Env
import NVMe
import PCI

var mode = "?"
var bdfText = ""
var deviceText = ""
var seconds = 2.0
var arguments = CommandLine.arguments.dropFirst().makeIterator()
while let argument = arguments.next() {
    switch argument {
    case "--mode": mode = arguments.next() ?? "?"
    case "--bdf": bdfText = arguments.next() ?? ""
    case "--device": deviceText = arguments.next() ?? ""
    case "--seconds": seconds = Double(arguments.next() ?? "") ?? 2
    default:
        print("usage: nvme-qemu-check --mode uio|vfio --bdf DDDD:BB:DD.F | --mode NAME --device SPEC [--seconds S]")
        exit(2)
    }
}
/// Opens the device under test: a PCIe function or any device spec.
let openBackend: () throws -> any BdevBackend
let identity: (any BdevBackend) -> (any NVMeControllerIdentity)?
if !deviceText.isEmpty {
    let spec: DeviceSpec
    do { spec = try DeviceSpec(parsing: deviceText) } catch {
        print("nvme-qemu-check: \(error)")
        exit(2)
    }
    openBackend = { try spec.open().backend }
} else {
    guard let address = PCIAddress(bdfText) else {
        print("nvme-qemu-check: bad or missing --bdf '\(bdfText)'")
        exit(2)
    }
    openBackend = { try NVMeBdev.pcie(address) }
}
identity = { backend in
    if let nvme = backend as? NVMeBdev { return nvme.identity }
    if let tcp = backend as? NVMeTCPBdev { return tcp.identity }
    return nil
}

@MainActor
func step(_ name: String, _ body: () throws -> String) -> Bool {
    do {
        let detail = try body()
        print("check \(mode) \(name): ok \(detail)")
        return true
    } catch {
        print("check \(mode) \(name): FAILED \(error)")
        return false
    }
}

final class Counter: BdevCompletionHandler {
    var done = 0
    var failed = 0
    func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        done += 1
        if status != .success { failed += 1 }
    }
}

var passed = true
passed = step("identify") {
    let backend = try openBackend()
    defer { backend.close() }
    guard let controller = identity(backend) else { return "(not an NVMe device)" }
    let data = controller.controllerData
    return "model '\(data.modelNumber)' serial '\(data.serialNumber)' firmware '\(data.firmwareRevision)' "
        + "MDTS \(data.maxDataTransferShift) queues \(controller.ioQueuesGranted) "
        + "namespace \(controller.namespaceData.size) × \(controller.namespaceData.blockSizeBytes) B"
} && passed

passed = step("conformance") {
    let reactor = try Reactor()
    let checks = try BdevConformance(reactor: reactor) { Bdev(backend: try openBackend()) }.run()
    return "(\(checks.joined(separator: ", ")))"
} && passed

passed = step("randrw-q32") {
    let bdev = Bdev(backend: try openBackend())
    defer { bdev.close() }
    let reactor = try Reactor()
    let channel = try bdev.makeChannel(reactor: reactor, queueDepth: 32)
    defer { channel.close() }
    let counter = Counter()
    let buffer = try DMABuffer.allocate(bytes: 32 * 4096)
    buffer.fill(0x3C)
    let blocks = bdev.geometry.blockCount / UInt64(4096 / bdev.geometry.blockSizeBytes)
    var random: UInt64 = 0x9E37_79B9_7F4A_7C15
    var submitted = 0
    let start = MonotonicClock.nowNs()
    let end = start + UInt64(seconds * 1e9)
    func submit(_ slot: Int) throws {
        random ^= random << 13; random ^= random >> 7; random ^= random << 17
        let perBlock = UInt64(4096 / bdev.geometry.blockSizeBytes)
        let offset = (random % blocks) * perBlock
        if random & 1 == 0 {
            try channel.read(into: buffer, bufferOffset: slot * 4096, offsetBlocks: offset, countBlocks: perBlock, handler: counter, tag: UInt64(slot))
        } else {
            try channel.write(from: buffer, bufferOffset: slot * 4096, offsetBlocks: offset, countBlocks: perBlock, handler: counter, tag: UInt64(slot))
        }
        submitted += 1
    }
    for slot in 0..<32 { try submit(slot) }
    var seen = 0
    while MonotonicClock.nowNs() < end {
        reactor.runOnce()
        while seen < counter.done {
            seen += 1
            if MonotonicClock.nowNs() < end { try submit(seen % 32) }
        }
    }
    reactor.run(until: { channel.inFlight == 0 })
    guard counter.failed == 0 else { throw BdevError.io(errno: EIO) }
    let seconds = Double(MonotonicClock.nowNs() - start) / 1e9
    return "\(counter.done) I/Os of 4 KiB in \(Int(seconds * 1000)) ms (\(Int(Double(counter.done) / seconds)) IOPS under TCG)"
} && passed

print(passed ? "nvme-qemu-check \(mode): PASS" : "nvme-qemu-check \(mode): FAIL")
exit(passed ? 0 : 1)
