import XCTest
@testable import NVMe

/// Sizes and field positions against the NVMe base specification 2.0.
final class SpecTests: XCTestCase {
    func testSubmissionEntryLayout() {
        var entry = SubmissionEntry()
        entry.opcode = 0x02
        entry.fuse = 1
        entry.commandID = 0xBEEF
        entry.namespaceID = 0x11223344
        entry.metadataPointer = 0x0102030405060708
        entry.prp1 = 0xA0A0A0A0B0B0B0B0
        entry.prp2 = 0xC0C0C0C0D0D0D0D0
        entry.startingLBA = 0x0000_0001_0000_0002
        entry.blockCount = 8
        entry.cdw13 = 13; entry.cdw14 = 14; entry.cdw15 = 15
        var bytes = [UInt8](repeating: 0, count: SubmissionEntry.bytes)
        bytes.withUnsafeMutableBytes { entry.store(to: $0.baseAddress!) }
        XCTAssertEqual(SubmissionEntry.bytes, 64)
        XCTAssertEqual(bytes[0], 0x02)                       // CDW0 opcode
        XCTAssertEqual(bytes[1], 0x01)                       // FUSE in bits 9:8
        XCTAssertEqual(Array(bytes[2..<4]), [0xEF, 0xBE])    // CID in bits 31:16
        XCTAssertEqual(Array(bytes[4..<8]), [0x44, 0x33, 0x22, 0x11])  // NSID
        XCTAssertEqual(bytes[16], 0x08)                      // MPTR at 16
        XCTAssertEqual(bytes[24], 0xB0)                      // PRP1 at 24
        XCTAssertEqual(bytes[32], 0xD0)                      // PRP2 at 32
        XCTAssertEqual(Array(bytes[40..<48]), [2, 0, 0, 0, 1, 0, 0, 0])  // SLBA in CDW10-11
        XCTAssertEqual(Array(bytes[48..<50]), [7, 0])        // NLB 0-based in CDW12
        XCTAssertEqual(bytes[60], 15)                        // CDW15 at 60
        XCTAssertEqual(bytes.withUnsafeBytes { SubmissionEntry(loadingFrom: $0.baseAddress!) }, entry)
    }

    func testCompletionEntryLayout() {
        var entry = CompletionEntry()
        entry.commandSpecific = 0xDEADBEEF
        entry.submissionQueueHead = 5
        entry.submissionQueueID = 3
        entry.commandID = 0x1234
        entry.phase = true
        entry.status = .lbaOutOfRange
        var bytes = [UInt8](repeating: 0, count: CompletionEntry.bytes)
        bytes.withUnsafeMutableBytes { entry.store(to: $0.baseAddress!) }
        XCTAssertEqual(CompletionEntry.bytes, 16)
        XCTAssertEqual(Array(bytes[8..<12]), [5, 0, 3, 0])   // SQHD, SQID
        XCTAssertEqual(Array(bytes[12..<14]), [0x34, 0x12])  // CID
        // DW3 bit 16 phase, bits 31:17 status: SC 0x80 in bits 24:17, DNR bit 31.
        let dword3 = UInt32(bytes[12]) | UInt32(bytes[13]) << 8 | UInt32(bytes[14]) << 16 | UInt32(bytes[15]) << 24
        XCTAssertEqual(dword3 >> 16 & 1, 1)
        XCTAssertEqual(dword3 >> 17 & 0xFF, 0x80)
        XCTAssertEqual(dword3 >> 25 & 0x7, 0)
        XCTAssertEqual(dword3 >> 31, 1)
        XCTAssertEqual(bytes.withUnsafeBytes { CompletionEntry(loadingFrom: $0.baseAddress!) }, entry)
    }

    func testRegistersAndDoorbells() {
        XCTAssertEqual(NVMeRegister.cc, 0x14)
        XCTAssertEqual(NVMeRegister.csts, 0x1C)
        XCTAssertEqual(NVMeRegister.aqa, 0x24)
        XCTAssertEqual(NVMeRegister.asq, 0x28)
        XCTAssertEqual(NVMeRegister.acq, 0x30)
        XCTAssertEqual(NVMeRegister.doorbell(queue: 0, completion: false, strideShift: 0), 0x1000)
        XCTAssertEqual(NVMeRegister.doorbell(queue: 0, completion: true, strideShift: 0), 0x1004)
        XCTAssertEqual(NVMeRegister.doorbell(queue: 3, completion: true, strideShift: 2), 0x1000 + 7 * 16)
        let cap = ControllerCapabilities.make(maxQueueEntries: 1024, timeoutUnits: 20, strideShift: 0)
        XCTAssertEqual(cap.maxQueueEntries, 1024)
        XCTAssertEqual(cap.timeoutMs, 10_000)
        XCTAssertTrue(cap.supportsNVMCommandSet)
        XCTAssertEqual(ControllerConfiguration.standard.submissionEntrySizeShift, 6)
        XCTAssertEqual(ControllerConfiguration.standard.completionEntrySizeShift, 4)
        XCTAssertEqual(ControllerConfiguration.standard.memoryPageSizeShift, 12)
    }

    func testIdentifyOffsets() {
        var controller = IdentifyController()
        controller.serialNumber = "SN1"
        controller.modelNumber = "MODEL"
        controller.maxDataTransferShift = 5
        controller.namespaceCount = 1
        controller.optionalCommands = 0x000C
        let bytes = controller.encode()
        XCTAssertEqual(bytes.count, 4096)
        XCTAssertEqual(Array(bytes[4..<7]), Array("SN1".utf8))
        XCTAssertEqual(bytes[7], 0x20, "serial number is space padded")
        XCTAssertEqual(Array(bytes[24..<29]), Array("MODEL".utf8))
        XCTAssertEqual(bytes[77], 5)        // MDTS
        XCTAssertEqual(bytes[516], 1)       // NN
        XCTAssertEqual(bytes[520], 0x0C)    // ONCS
        XCTAssertEqual(bytes.withUnsafeBytes { IdentifyController(decoding: $0) }, controller)
        var namespace = IdentifyNamespace()
        namespace.size = 0x1_0000_0000
        namespace.lbaDataSizeShifts = [9]
        let nsBytes = namespace.encode()
        XCTAssertEqual(nsBytes[4], 1)       // NSZE bit 32
        XCTAssertEqual(nsBytes[128 + 2], 9) // LBAF0.LBADS
        XCTAssertEqual(nsBytes.withUnsafeBytes { IdentifyNamespace(decoding: $0) }.blockSizeBytes, 512)
        namespace.deallocatedReadsZeros = true
        namespace.writeZeroesDeallocates = true
        XCTAssertEqual(namespace.encode()[33], 0x09, "DLFEAT: read zeros (001b), Write Zeroes deallocates (bit 3)")
        XCTAssertEqual(namespace.encode().withUnsafeBytes { IdentifyNamespace(decoding: $0) }, namespace)
    }
}
