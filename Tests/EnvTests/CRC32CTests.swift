import XCTest
@testable import Env

final class CRC32CTests: XCTestCase {
    // Published check values: the CRC catalogue's "123456789" check for CRC-32C, and
    // the vectors of RFC 3720 appendix B.4 (32 bytes of 0x00, of 0xFF, ascending, descending).
    func testPublishedVectors() {
        XCTAssertEqual(CRC32C.checksum(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)), 0x62A8_AB43)
        XCTAssertEqual(CRC32C.checksum((0..<32).map { UInt8($0) }), 0x46DD_794E)
        XCTAssertEqual(CRC32C.checksum((0..<32).reversed().map { UInt8($0) }), 0x113F_DB5C)
        XCTAssertEqual(CRC32C.checksum([UInt8]()), 0)
    }

    func testChainedUpdatesEqualOneShot() {
        let bytes = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        var crc = CRC32C()
        bytes[0..<3].withUnsafeBytes { crc.update($0) }
        bytes[3..<4097].withUnsafeBytes { crc.update($0) }
        bytes[4097...].withUnsafeBytes { crc.update($0) }
        XCTAssertEqual(crc.value, CRC32C.checksum(bytes))
    }
}
