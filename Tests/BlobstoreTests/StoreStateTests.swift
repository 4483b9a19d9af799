import XCTest
@testable import Blobstore

/// The owned parts of `BlobStore`'s state on their own: the log writer's state
/// (`MetadataLog`) and release tracking (`ReleaseTracking`).
final class StoreStateTests: XCTestCase {
    func testMetadataLogNumbersTransactionsFromTheCheckpoint() {
        var log = MetadataLog(FormatTests.sampleSuperBlock())  // checkpoint LSN 99, tail 12
        XCTAssertEqual(log.head, 12)
        let first = log.numbered([.createBlob(id: BlobID(rawValue: 1)), .setSuperBlob(id: BlobID(rawValue: 1))])
        XCTAssertEqual(first.map(\.lsn), [100, 101, 102])
        XCTAssertEqual(Set(first.map(\.transaction)), [100])
        XCTAssertEqual(first.last?.record, .commit(recordCount: 3))
        XCTAssertEqual(log.nextLSN, 100, "numbering alone gives nothing out")
        log.enqueue(first, bytes: 60)
        XCTAssertEqual(log.nextLSN, 103)
        XCTAssertEqual(log.commitEpoch, 1)
        let second = log.numbered([.deleteBlob(id: BlobID(rawValue: 1))])
        XCTAssertEqual(second.first?.lsn, 103)
        log.enqueue(second, bytes: 20)

        // A failed write puts what it took back ahead of what was queued since.
        let taken = log.takePending()
        XCTAssertTrue(log.pending.isEmpty)
        XCTAssertEqual(log.pendingBytes, 0)
        let third = log.numbered([.createBlob(id: BlobID(rawValue: 2))])
        log.enqueue(third, bytes: 20)
        log.putBack(taken, dataFlush: true)
        XCTAssertEqual(log.pending.map(\.lsn), Array(100...106))
        XCTAssertEqual(log.pendingBytes, 100)
    }

    func testMetadataLogPacksPagesAndJoinsTheOpenPage() {
        var log = MetadataLog(FormatTests.sampleSuperBlock())
        let capacity = BlobStore.pageBytes - LogPage.headerBytes
        let value = [UInt8](repeating: 7, count: 1500)
        let records = log.numbered([.setXattr(id: BlobID(rawValue: 1), internal: false, name: "a", value: value),
                                    .setXattr(id: BlobID(rawValue: 1), internal: false, name: "b", value: value),
                                    .setXattr(id: BlobID(rawValue: 1), internal: false, name: "c", value: value)])
        let fresh = log.pages(for: records, reopened: nil)
        XCTAssertEqual(fresh.firstSequence, 12)
        XCTAssertEqual(fresh.pages.map(\.count), [2, 2], "two xattrs of 1500 bytes fill a page")
        XCTAssertEqual(Array(fresh.pages.joined()), records)
        XCTAssertLessThanOrEqual(fresh.lastUsed, capacity)

        // The open page is the one before the head: records that fit join it.
        log.head = 14
        let small = log.numbered([.createBlob(id: BlobID(rawValue: 2))])
        let joined = log.pages(for: small, reopened: (records, 100))
        XCTAssertEqual(joined.firstSequence, 13)
        XCTAssertEqual(joined.pages.count, 1)
        XCTAssertEqual(joined.pages[0], records + small)
        // Records that do not fit leave the open page as it is.
        let full = log.pages(for: small, reopened: (records, capacity))
        XCTAssertEqual(full.firstSequence, 14)
        XCTAssertEqual(full.pages, [small])
    }

    func testReleaseTrackingEpochsAndQuarantine() {
        var releases = ReleaseTracking()
        let a = Extent(clusterIndex: 0, count: 2, firstCluster: 10)
        let b = Extent(clusterIndex: 5, count: 3, firstCluster: 40)
        releases.note(a, deferred: false)
        XCTAssertEqual(releases.epoch, 0, "an immediate release is durable with its commit")
        XCTAssertFalse(releases.sinceFlush)
        releases.note(b, deferred: true)
        XCTAssertEqual(releases.epoch, 1)
        XCTAssertTrue(releases.sinceFlush)
        XCTAssertEqual(releases.unlogged, [b])
        XCTAssertEqual(releases.byRecord, [a, b])

        let ticket = ReleaseTicket(handles: 2)
        releases.hold(releases.byRecord, until: ticket)
        XCTAssertEqual(releases.quarantinedClusterCount, 5)
        ticket.acknowledge()
        XCTAssertTrue(releases.takeSettled().isEmpty, "one handle has not acknowledged")
        ticket.acknowledge()
        let settled = releases.takeSettled()
        XCTAssertEqual(settled.map(\.extents), [[a, b]])
        XCTAssertEqual(settled.map(\.epoch), [1])
        XCTAssertEqual(releases.quarantinedClusterCount, 0)

        releases.becameDurable(through: 1)
        releases.becameDurable(through: 0)
        XCTAssertEqual(releases.durableEpoch, 1, "durability never moves back")
    }
}
