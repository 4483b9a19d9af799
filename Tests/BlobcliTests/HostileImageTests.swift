import XCTest
import Bdev
import BdevMalloc
import Env
@testable import Blobstore

/// Images mutated behind their checksums: random edits in the metadata structures with
/// every CRC recomputed, so that the edits reach the field checks (what a random bit flip
/// rarely makes). Every reader blobcli has must answer with a report or a typed error,
/// never trap or hang.
final class HostileImageTests: XCTestCase {
    /// Bounded fuzz: random edits in the metadata structures of a store with a pending
    /// log, checksums recomputed so that the edits reach the field checks. Every reader
    /// blobcli has must answer (a report, a typed error) and a writable load must either
    /// refuse or leave a store that verifies.
    func testResealedMutationsNeverTrapOrHang() throws {
        let iterations = ProcessInfo.processInfo.environment["BLOBCLI_FUZZ_ITERATIONS"].flatMap(Int.init) ?? 300
        let image = try TestImage.populated(clean: false)
        let pristine = try image.snapshot()
        let block = try image.superBlock()
        let logPages = (0..<block.log.pageCount).map { block.log.startPage + $0 }
        let chainPages = try image.with { io in
            try BlobStore.load(io, readOnly: true).0.metadataPageOwners.map { block.metadataPages.startPage + UInt64($0.page) }
        }
        let targets: [UInt64] = [0, 1] + logPages.prefix(8) + chainPages
            + (0..<(2 * block.table.pageCount)).map { block.table.startPage + $0 }
            + (0..<(2 * block.bitmaps.pageCount)).map { block.bitmaps.startPage + $0 }
        var random = SplitMix64(seed: 0x5EA1)
        var outcomes: [String: Int] = [:]
        let started = ContinuousClock.now
        for iteration in 0..<iterations {
            let page = targets[Int(random.next() % UInt64(targets.count))]
            try image.edit(page: page) { bytes in
                for _ in 0..<(1 + Int(random.next() % 4)) {
                    // Headers and first descriptors/records, where the parsing is.
                    let at = random.next() % 3 == 0 ? Int(random.next() % 4096) : Int(random.next() % 256)
                    bytes[at] = random.next() % 3 == 0 ? 0xFF : UInt8(truncatingIfNeeded: random.next())
                }
                TestImage.resealPage(&bytes)
            }
            let iterationStart = ContinuousClock.now
            _ = try image.with { Verifier.verify($0) }
            try image.with { io in
                do {
                    let (store, _) = try BlobStore.load(io, readOnly: true)
                    for id in store.blobIDList.prefix(8) { _ = store.chainPages(id) }
                    outcomes["read-only load", default: 0] += 1
                } catch {
                    outcomes["read-only refused", default: 0] += 1
                }
                _ = try? LogInspection.inspect(io)
            }
            if iteration % 2 == 0 {
                try image.with { io in
                    do {
                        let (store, _) = try BlobStore.load(io)
                        try store.unload()
                        outcomes["writable load", default: 0] += 1
                    } catch {
                        outcomes["writable refused", default: 0] += 1
                        return
                    }
                    let after = Verifier.verify(io)
                    XCTAssertTrue(after.isConsistent, "iteration \(iteration), page \(page): a rebuilt store verifies: \(after.problems)")
                }
            }
            XCTAssertLessThan(ContinuousClock.now - iterationStart, .seconds(5), "iteration \(iteration), page \(page)")
            try image.restore(pristine)
        }
        print("resealed fuzz: \(iterations) images in \(ContinuousClock.now - started): \(outcomes.sorted { $0.key < $1.key })")
    }
}
