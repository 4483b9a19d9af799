/// Reads the log from the checkpoint's tail: FORMAT.md, section "Replay". Stops at the
/// first page or record that is not valid (torn, stale from a previous lap, another
/// store's, out of sequence); hands back the committed transactions before that point.
public struct LogScan: Sendable {
    /// Committed transactions in log order, without their commit records.
    public var transactions: [[LoggedRecord]] = []
    /// The sequence of the first page not part of the valid log: where appending resumes.
    public var endSequence: UInt64
    /// The LSN the next record gets.
    public var nextLSN: UInt64
    /// Why the scan stopped (nil when it read the whole region).
    public var stop: FormatError?
    /// Records of a transaction without its commit record at the end of the log.
    public var uncommittedRecords = 0
}

public enum LogScanner {
    /// - Parameters:
    ///   - tailSequence: sequence of the first page to read (from the super block).
    ///   - logPages: size of the circular region; page `s` lives at index `s % logPages`.
    ///   - firstLSN: the LSN the first record must carry (checkpoint LSN + 1). A transaction's
    ///     id is the LSN of its first record.
    ///   - read: returns the page with sequence `s` and its device byte offset.
    public static func scan(tailSequence: UInt64, logPages: UInt64, storeTag: UInt64, firstLSN: UInt64,
                            read: (UInt64) throws -> (bytes: [UInt8], offset: UInt64)) -> LogScan {
        var scan = LogScan(endSequence: tailSequence, nextLSN: firstLSN)
        var open: [LoggedRecord] = []
        var validEnd = (sequence: tailSequence, lsn: firstLSN)
        // The super block bounds both (SuperBlock.sequenceMax); a caller that does not still
        // gets a scan, never an overflow.
        let (end, overflow) = tailSequence.addingReportingOverflow(logPages)
        pages: for sequence in tailSequence..<(overflow ? UInt64.max : end) {
            let page: LogPage.Decoded
            let offset: UInt64
            do {
                let (bytes, at) = try read(sequence)
                offset = at
                page = try LogPage.decode(bytes[...], offset: at)
            } catch let error as FormatError {
                scan.stop = error
                break
            } catch {
                scan.stop = FormatError("log page \(sequence)", offset: 0, .invalidField(name: "read failed", value: 0))
                break
            }
            guard page.storeTag == storeTag else {
                scan.stop = FormatError("log page \(sequence)", offset: offset + 16, .invalidField(name: "store tag", value: page.storeTag))
                break
            }
            guard page.sequence == sequence else {
                scan.stop = FormatError("log page \(sequence)", offset: offset + 8,
                                        .sequenceGap(expected: sequence, found: page.sequence))
                break
            }
            for (index, logged) in page.records.enumerated() {
                let recordName = "log page \(sequence) record \(index)"
                guard logged.lsn == scan.nextLSN else {
                    scan.stop = FormatError(recordName, offset: offset, .sequenceGap(expected: scan.nextLSN, found: logged.lsn))
                    break pages
                }
                let expectedTransaction = open.first?.transaction ?? logged.lsn
                guard logged.transaction == expectedTransaction else {
                    scan.stop = FormatError(recordName, offset: offset,
                                            .sequenceGap(expected: expectedTransaction, found: logged.transaction))
                    break pages
                }
                guard scan.nextLSN < UInt64.max else {
                    scan.stop = FormatError(recordName, offset: offset, .invalidField(name: "LSN", value: logged.lsn))
                    break pages
                }
                scan.nextLSN += 1
                if case let .commit(count) = logged.record {
                    guard Int(count) == open.count + 1 else {
                        scan.stop = FormatError(recordName, offset: offset, .invalidField(name: "commit record count", value: UInt64(count)))
                        break pages
                    }
                    scan.transactions.append(open)
                    open = []
                    validEnd = (sequence + 1, scan.nextLSN)
                } else {
                    open.append(logged)
                }
            }
            if open.isEmpty { validEnd = (sequence + 1, scan.nextLSN) }
        }
        // Appending resumes after the last page that ended a transaction: an uncommitted
        // tail is discarded and its pages overwritten.
        scan.uncommittedRecords = open.count
        scan.endSequence = validEnd.sequence
        scan.nextLSN = validEnd.lsn
        return scan
    }
}
