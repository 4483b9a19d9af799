import XCTest
@testable import NVMe

/// Field positions of the Fabrics commands (NVMe over Fabrics 1.1, section 3) and the
/// NVMe/TCP PDUs (NVMe/TCP transport specification 1.0, section 3.6).
final class FabricsSpecTests: XCTestCase {
    private func bytes(of entry: SubmissionEntry) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: SubmissionEntry.bytes)
        bytes.withUnsafeMutableBytes { entry.store(to: $0.baseAddress!) }
        return bytes
    }

    func testConnectCommandLayout() {
        let bytes = bytes(of: FabricsCommand.connect(queueID: 3, submissionQueueEntries: 128, keepAliveTimeoutMs: 10_000))
        XCTAssertEqual(bytes[0], 0x7F)                      // fabrics opcode
        XCTAssertEqual(bytes[1], 0x40)                      // PSDT 01b: SGL
        XCTAssertEqual(bytes[4], 0x01)                      // FCTYPE Connect
        XCTAssertEqual(Array(bytes[24..<32]), [0, 0, 0, 0, 0, 0, 0, 0])  // SGL address: offset 0 in the capsule
        XCTAssertEqual(Array(bytes[32..<36]), [0x00, 0x04, 0, 0])        // SGL length 1024
        XCTAssertEqual(bytes[39], 0x01)                     // data block, offset subtype
        XCTAssertEqual(Array(bytes[40..<42]), [0, 0])       // RECFMT 0
        XCTAssertEqual(Array(bytes[42..<44]), [3, 0])       // QID
        XCTAssertEqual(Array(bytes[44..<46]), [127, 0])     // SQSIZE, 0-based
        XCTAssertEqual(Array(bytes[48..<52]), [0x10, 0x27, 0, 0])        // KATO 10,000 ms
    }

    func testPropertyCommandsLayout() {
        let get = bytes(of: FabricsCommand.propertyGet(offset: NVMeRegister.cap, eightBytes: true))
        XCTAssertEqual(get[4], 0x04)
        XCTAssertEqual(get[40], 1)                          // ATTRIB size: 8 bytes
        XCTAssertEqual(Array(get[44..<48]), [0, 0, 0, 0])   // OFST CAP
        XCTAssertEqual(get[39], 0x5A)                       // transport SGL, no data
        let set = bytes(of: FabricsCommand.propertySet(offset: NVMeRegister.cc, value: 0x0046_0001, eightBytes: false))
        XCTAssertEqual(set[4], 0x00)
        XCTAssertEqual(set[40], 0)
        XCTAssertEqual(Array(set[44..<48]), [0x14, 0, 0, 0])
        XCTAssertEqual(Array(set[48..<56]), [0x01, 0x00, 0x46, 0x00, 0, 0, 0, 0])
    }

    func testPropertyGetValueSpansDwordsZeroAndOne() {
        var bytes = [UInt8](repeating: 0, count: CompletionEntry.bytes)
        bytes[0] = 0xFF; bytes[3] = 0x0F; bytes[4] = 0x20; bytes[7] = 0x01
        let entry = bytes.withUnsafeBytes { CompletionEntry(loadingFrom: $0.baseAddress!) }
        XCTAssertEqual(entry.commandSpecific, 0x0F00_00FF)
        XCTAssertEqual(entry.commandSpecificHigh, 0x0100_0020)
    }

    func testConnectDataLayout() {
        let data = ConnectData(hostID: Array(1...16), controllerID: 0xFFFF, subsystemNQN: "nqn.a:sub", hostNQN: "nqn.h:host")
        var bytes = [UInt8](repeating: 0xEE, count: ConnectData.bytes)
        bytes.withUnsafeMutableBytes { data.encode(into: $0) }
        XCTAssertEqual(Array(bytes[0..<16]), Array(1...16))
        XCTAssertEqual(Array(bytes[16..<18]), [0xFF, 0xFF])
        XCTAssertEqual(Array(bytes[256..<265]), Array("nqn.a:sub".utf8))
        XCTAssertEqual(bytes[265], 0)                       // NUL-terminated, zero-filled
        XCTAssertEqual(Array(bytes[512..<522]), Array("nqn.h:host".utf8))
        XCTAssertEqual(bytes[1023], 0)
    }

    func testInitializeRequestAndResponse() {
        var bytes = [UInt8](repeating: 0xEE, count: TCPPDU.icBytes)
        bytes.withUnsafeMutableBytes { TCPInitializeRequest(headerDigest: true, dataDigest: false).store(to: $0.baseAddress!) }
        XCTAssertEqual(Array(bytes[0..<8]), [0x00, 0, 128, 0, 128, 0, 0, 0])  // type, flags, HLEN, PDO, PLEN
        XCTAssertEqual(Array(bytes[8..<10]), [0, 0])       // PFV
        XCTAssertEqual(bytes[10], 0)                        // HPDA
        XCTAssertEqual(bytes[11], 0x01)                     // DGST: header digest only
        XCTAssertEqual(Array(bytes[12..<16]), [0, 0, 0, 0]) // MAXR2T 0-based: one
        XCTAssertEqual(bytes[127], 0)
        let response = TCPInitializeResponse(controllerDataAlignment: 3, headerDigest: true, dataDigest: true,
                                             maxH2CDataBytes: 0x40_0000)
        bytes.withUnsafeMutableBytes { response.store(to: $0.baseAddress!) }
        XCTAssertEqual(bytes[0], 0x01)
        XCTAssertEqual(bytes[10], 3)                        // CPDA
        XCTAssertEqual(bytes[11], 0x03)
        XCTAssertEqual(Array(bytes[12..<16]), [0, 0, 0x40, 0])
        XCTAssertEqual(bytes.withUnsafeBytes { TCPInitializeResponse(loadingFrom: $0.baseAddress!) }, response)
    }

    func testDataHeaderLayout() {
        var bytes = [UInt8](repeating: 0xEE, count: TCPPDU.dataHeaderBytes)
        bytes.withUnsafeMutableBytes { memory in
            TCPPDU.storeCommonHeader(memory.baseAddress!, type: .h2cData, flags: TCPPDU.flagLastPDU | TCPPDU.flagDataDigest,
                                     headerBytes: 24, dataOffset: 28, totalBytes: 28 + 8192 + 4)
            TCPDataHeader(commandID: 0x1234, transferTag: 0xBEEF, dataOffset: 0x10000, dataBytes: 8192).store(to: memory.baseAddress!)
        }
        XCTAssertEqual(Array(bytes[0..<8]), [0x06, 0x06, 24, 28, 0x20, 0x20, 0, 0])
        XCTAssertEqual(Array(bytes[8..<10]), [0x34, 0x12])  // CCCID
        XCTAssertEqual(Array(bytes[10..<12]), [0xEF, 0xBE]) // TTAG
        XCTAssertEqual(Array(bytes[12..<16]), [0, 0, 1, 0]) // DATAO
        XCTAssertEqual(Array(bytes[16..<20]), [0, 0x20, 0, 0])  // DATAL
        XCTAssertEqual(Array(bytes[20..<24]), [0, 0, 0, 0])
        let header = bytes.withUnsafeBytes { TCPCommonHeader(loadingFrom: $0.baseAddress!) }
        XCTAssertEqual(header.type, .h2cData)
        XCTAssertTrue(header.hasDataDigest)
        XCTAssertFalse(header.hasHeaderDigest)
        XCTAssertEqual(header.totalBytes, 28 + 8192 + 4)
    }

    func testIdentifyFabricsFields() {
        var controller = IdentifyController()
        controller.ioCommandCapsuleUnits = 1028  // 64 + 16 KiB
        controller.sglSupport = 1 | 1 << 20
        controller.keepAliveSupport = 100
        let bytes = controller.encode()
        XCTAssertEqual(Array(bytes[1792..<1796]), [0x04, 0x04, 0, 0])
        XCTAssertEqual(Array(bytes[536..<540]), [1, 0, 0x10, 0])
        XCTAssertEqual(Array(bytes[320..<322]), [100, 0])
        let decoded = bytes.withUnsafeBytes { IdentifyController(decoding: $0) }
        XCTAssertEqual(decoded.inCapsuleDataBytes, 16384)
        XCTAssertEqual(decoded, controller)
    }
}
