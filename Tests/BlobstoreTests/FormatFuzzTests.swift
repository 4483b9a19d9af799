import XCTest
import Env
@testable import Blobstore

/// Bounded mutation fuzzing of every decoder: random byte edits (half of them with the
/// checksum recomputed, so the edit reaches field validation) and truncations. Each
/// input must decode or give a FormatError; a trap fails the run. Iterations per
/// structure: BLOBFS_FUZZ_ITERATIONS (default 20000, seeded, reproducible).
final class FormatFuzzTests: XCTestCase {
    private var iterations: Int {
        ProcessInfo.processInfo.environment["BLOBFS_FUZZ_ITERATIONS"].flatMap(Int.init) ?? 20000
    }

    private func below(_ random: inout SplitMix64, _ bound: Int) -> Int { Int(random.next() % UInt64(bound)) }

    private func fuzz(_ name: String, seed: [UInt8], checksum: (range: Range<Int>, at: Int),
                      decode: ([UInt8]) throws -> Void) {
        var random = SplitMix64(seed: name.utf8.reduce(UInt64(0)) { $0 &* 31 &+ UInt64($1) })
        var decodedCount = 0
        var rejected = 0
        for _ in 0..<iterations {
            var bytes = seed
            // Edits cluster in the header and first records, where the parsing is.
            for _ in 0..<(1 + below(&random, 6)) {
                let position = below(&random, 4) == 0 ? below(&random, bytes.count) : below(&random, min(bytes.count, 256))
                bytes[position] = below(&random, 3) == 0 ? 0xFF : UInt8(truncatingIfNeeded: random.next())
            }
            if below(&random, 2) == 0 { FormatTests.reseal(&bytes, over: checksum.range, at: checksum.at) }
            if below(&random, 16) == 0 { bytes = Array(bytes[0..<below(&random, bytes.count)]) }
            do {
                try decode(bytes)
                decodedCount += 1
            } catch is FormatError {
                rejected += 1
            } catch {
                XCTFail("\(name): non-format error \(error)")
            }
        }
        XCTAssertGreaterThan(rejected, iterations / 4, "\(name): mutations are rejected")
        print("fuzz \(name): \(iterations) inputs, \(rejected) rejected, \(decodedCount) decoded")
    }

    func testSuperBlockDecoder() {
        fuzz("super block", seed: FormatTests.sampleSuperBlock().encode(), checksum: (0..<4092, 4092)) {
            _ = try SuperBlock.decode($0[...], offset: 0)
        }
    }

    func testMetadataPageDecoder() {
        let blob = FormatTests.sampleBlob(extents: 40)
        let page = MetadataPage.encodeChain(blob, pageIDs: [9], checkpointSequence: 3)[0]
        fuzz("metadata page", seed: page, checksum: (8..<4096, 4)) {
            let decoded = try MetadataPage.decodePage($0[...], offset: 9 * 4096, pageID: 9)
            _ = try MetadataPage.decodeBlob([decoded], pageIDs: [9], offsets: [9 * 4096])
        }
    }

    func testLogPageDecoderAndScanner() {
        let page = LogPage.encode(sequence: 0, storeTag: 1,
                                  records: FormatTests.transaction(1, firstLSN: 1, FormatTests.everyRecordKind))
        fuzz("log page", seed: page, checksum: (8..<4096, 4)) { bytes in
            _ = try LogPage.decode(bytes[...], offset: 0)
            let scan = LogScanner.scan(tailSequence: 0, logPages: 2, storeTag: 1, firstLSN: 1) {
                ($0 == 0 ? bytes : [UInt8](repeating: 0, count: 4096), $0 * 4096)
            }
            XCTAssertLessThanOrEqual(scan.transactions.count, 1)
        }
    }

    func testArrayPageDecoder() {
        let page = ArrayPage.encode(kind: .table, checkpointSequence: 1, pageIndex: 0,
                                    payload: ArraySlice(repeating: 7, count: ArrayPage.payloadBytes))
        fuzz("table page", seed: page, checksum: (8..<4096, 4)) {
            _ = try ArrayPage.decode($0[...], kind: .table, pageIndex: 0, offset: 0)
        }
    }
}
