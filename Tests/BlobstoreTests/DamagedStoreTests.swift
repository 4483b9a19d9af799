import XCTest
import Bdev
import BdevMalloc
import Env
@testable import Blobstore

/// Loading damaged stores: a typed error naming the structure and offset, never a crash;
/// a damaged super block slot falls back to the other one.
final class DamagedStoreTests: XCTestCase {
    private func formatted() throws -> (Bdev, Reactor, BlobID) {
        let bdev = Bdev(backend: try MallocBdev(blockCount: 2048))
        let reactor = try Reactor()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let store = try BlobStore.format(io, options: BlobStoreTests.options)
        let id = try store.createBlob(clusterCount: 2, xattrs: [("name", [1, 2, 3])])
        try store.write(blob: id, offsetUnits: 0, data: [UInt8](repeating: 9, count: 4096))
        try store.unload()
        io.close()
        return (bdev, reactor, id)
    }

    private func edit(_ bdev: Bdev, _ reactor: Reactor, page: UInt64, _ change: (inout [UInt8]) -> Void) throws {
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        var bytes = try io.readBytes(offsetBlocks: page, countBlocks: 1)
        change(&bytes)
        try io.writeBytes(bytes, offsetBlocks: page)
    }

    private func load(_ bdev: Bdev, _ reactor: Reactor) throws -> (BlobStore, BlobStore.LoadReport) {
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        return try BlobStore.load(io)
    }

    func testOneDamagedSuperBlockSlotFallsBackToTheOther() throws {
        let (bdev, reactor, id) = try formatted()
        let current = try load(bdev, reactor).1.superBlockSlot  // (this load writes the other slot)
        try edit(bdev, reactor, page: UInt64(1 - current)) { $0[100] ^= 0xFF }
        let (store, report) = try load(bdev, reactor)
        XCTAssertEqual(report.superBlockSlot, current)
        XCTAssertEqual(store.xattr(id, name: "name"), [1, 2, 3])
    }

    func testBothSuperBlocksDamaged() throws {
        let (bdev, reactor, _) = try formatted()
        try edit(bdev, reactor, page: 0) { $0[0] = 0 }
        try edit(bdev, reactor, page: 1) { $0[4092] ^= 1 }
        XCTAssertThrowsError(try load(bdev, reactor)) { error in
            guard case let .noSuperBlock(slot0, slot1) = error as? BlobStoreError else { return XCTFail("\(error)") }
            XCTAssertEqual(slot0.offset, 0)
            guard case .badMagic = slot0.problem else { return XCTFail("\(slot0)") }
            XCTAssertEqual(slot1.offset, 4096 + 4092)
            guard case .badChecksum = slot1.problem else { return XCTFail("\(slot1)") }
        }
    }

    func testDamagedMetadataPageNamesItsPage() throws {
        let (bdev, reactor, _) = try formatted()
        let (store, _) = try load(bdev, reactor)
        let block = store.superBlock
        // Every chain page in the region: damage them all; reading the chains must name one.
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        for page in 0..<block.metadataPages.pageCount {
            var bytes = try io.readBytes(offsetBlocks: block.metadataPages.startPage + page, countBlocks: 1)
            if bytes[0..<4] == [0x42, 0x4D, 0x44, 0x50] {  // "BMDP"
                bytes[200] ^= 0xFF
                try io.writeBytes(bytes, offsetBlocks: block.metadataPages.startPage + page)
            }
        }
        io.close()
        // The load reads no chain; reading them names the page.
        XCTAssertThrowsError(try load(bdev, reactor).0.readAllChains()) { error in
            guard case let .format(formatError) = error as? BlobStoreError else { return XCTFail("\(error)") }
            XCTAssertTrue(formatError.structure.hasPrefix("metadata page"), "\(formatError)")
            guard case .badChecksum = formatError.problem else { return XCTFail("\(formatError)") }
        }
    }

    func testTruncatedImageIsAGeometryError() throws {
        let (bdev, reactor, _) = try formatted()
        // The same bytes on a smaller device: the store says it is larger.
        let source = try BdevSyncIO(bdev: bdev, reactor: reactor)
        let head = try source.readBytes(offsetBlocks: 0, countBlocks: 1024)
        source.close()
        let small = Bdev(backend: try MallocBdev(blockCount: 1024))
        let io = try BdevSyncIO(bdev: small, reactor: reactor)
        try io.writeBytes(head, offsetBlocks: 0)
        XCTAssertThrowsError(try BlobStore.load(io)) { error in
            guard case let .geometry(message) = error as? BlobStoreError else { return XCTFail("\(error)") }
            XCTAssertTrue(message.contains("truncated"), message)
        }
        io.close()
    }

    func testAnEmptyDeviceIsNotAStore() throws {
        let bdev = Bdev(backend: try MallocBdev(blockCount: 64))
        let io = try BdevSyncIO(bdev: bdev, reactor: try Reactor())
        defer { io.close() }
        XCTAssertThrowsError(try BlobStore.load(io)) { error in
            guard case .noSuperBlock = error as? BlobStoreError else { return XCTFail("\(error)") }
        }
    }
}
