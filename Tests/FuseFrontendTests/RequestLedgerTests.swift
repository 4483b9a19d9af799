import XCTest
@testable import FuseFrontend

/// The ledger of requests taken and not yet answered: what it counts, warns about and
/// reports at unmount.
final class RequestLedgerTests: XCTestCase {
    func testAnsweredRequestsLeaveNothingToReport() {
        let ledger = RequestLedger()
        let tickets = (0..<100).map { ledger.take(opcode: FuseOpcode.read.rawValue, nodeID: UInt64($0), nowNs: 0) }
        XCTAssertEqual(ledger.count, 100)
        for ticket in tickets.reversed() { ledger.answer(ticket) }
        XCTAssertEqual(ledger.count, 0)
        XCTAssertNil(ledger.unmountReport(nowNs: 1))
        // Slots are reused: a second round takes the same table.
        let again = (0..<100).map { ledger.take(opcode: FuseOpcode.write.rawValue, nodeID: UInt64($0), nowNs: 0) }
        again.forEach(ledger.answer)
        XCTAssertNil(ledger.unmountReport(nowNs: 1))
    }

    func testARequestHeldTooLongIsReportedOnceAndAtUnmount() {
        let ledger = RequestLedger()
        let second: UInt64 = 1_000_000_000
        let quick = ledger.take(opcode: FuseOpcode.getattr.rawValue, nodeID: 1, nowNs: 0)
        let stuck = ledger.take(opcode: FuseOpcode.fsync.rawValue, nodeID: 42, nowNs: 1 * second)
        ledger.answer(quick)
        XCTAssertEqual(ledger.warnAboutOverdue(limitNs: 30 * second, nowNs: 20 * second), 0)
        XCTAssertEqual(ledger.warnAboutOverdue(limitNs: 30 * second, nowNs: 40 * second), 1)
        XCTAssertEqual(ledger.warnAboutOverdue(limitNs: 30 * second, nowNs: 41 * second), 1, "still overdue")
        XCTAssertEqual(ledger.outstanding().map(\.description), ["FSYNC node 42"])
        let report = ledger.unmountReport(nowNs: 61 * second)
        XCTAssertEqual(report, "1 FUSE requests never answered: FSYNC node 42 (60.0 s)")
        ledger.answer(stuck)
        XCTAssertNil(ledger.unmountReport(nowNs: 62 * second))
    }

    func testASecondAnswerIsCountedNotMistakenForAnotherRequest() {
        let ledger = RequestLedger()
        let first = ledger.take(opcode: FuseOpcode.write.rawValue, nodeID: 7, nowNs: 0)
        ledger.answer(first)
        // The slot is reused by the next request; the stale ticket must not answer it.
        let next = ledger.take(opcode: FuseOpcode.read.rawValue, nodeID: 8, nowNs: 0)
        ledger.answer(first)
        XCTAssertEqual(ledger.doubleAnswers, 1)
        XCTAssertEqual(ledger.count, 1, "the next request is still held")
        XCTAssertEqual(ledger.unmountReport(nowNs: 0), "1 FUSE requests never answered: READ node 8 (0.0 s); 1 answered twice")
        ledger.answer(next)
        XCTAssertEqual(ledger.unmountReport(nowNs: 0), "1 answered twice")
    }

    func testOpcodeNamesAreTheKernels() {
        XCTAssertEqual(FuseOpcode.batchForget.name, "BATCH_FORGET")
        XCTAssertEqual(FuseOpcode.fsyncdir.name, "FSYNCDIR")
        XCTAssertEqual(FuseOpcode.name(16), "WRITE")
        XCTAssertEqual(FuseOpcode.name(9999), "OPCODE_9999")
    }
}
