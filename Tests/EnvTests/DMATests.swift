import XCTest
@testable import Env

final class DMATests: XCTestCase {
    func testBuffersAreAlignedAndZeroInitiallyUsable() throws {
        let pool = DMAPool(numaNode: nil)
        for size in [1, 4096, 5000, 65536, 2 << 20, (2 << 20) + 1, 5 << 20] {
            let buffer = try pool.allocate(bytes: size)
            XCTAssertEqual(buffer.count, size)
            buffer.withUnsafeBytes { XCTAssertEqual(Int(bitPattern: $0.baseAddress!) % 4096, 0, "size \(size)") }
            buffer.fill(0xA5)
            XCTAssertEqual(buffer.bytes(at: size - 1, count: 1), [0xA5])
        }
        XCTAssertNotNil(pool.usesHugepages)
    }

    func testFreedSlotIsReusedWithNewGeneration() throws {
        let pool = DMAPool(numaNode: nil)
        var first: DMABuffer? = try pool.allocate(bytes: 4096)
        let segment = first!.segment()
        let address = segment.base
        first = nil
        let second = try pool.allocate(bytes: 4096)
        XCTAssertEqual(second.segment().base, address, "the freed slot is reused")
        XCTAssertNotEqual(segment.generation, second.segment().generation, "a stale segment is detectable")
        _ = second
    }

    func testPinsCountInFlightUses() throws {
        let buffer = try DMABuffer.allocate(bytes: 8192)
        let segment = buffer.segment(offset: 4096, count: 4096)
        segment.pin()
        segment.pin()
        XCTAssertEqual(segment.header!.pointee.pins, 2)
        segment.unpin()
        segment.unpin()
        XCTAssertEqual(segment.header!.pointee.pins, 0)
    }
}
