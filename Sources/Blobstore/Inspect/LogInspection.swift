import Bdev

/// Both super block slots as they are on the device, read without loading the store.
public struct SuperBlockSlots: Sendable {
    /// Slot 0 and slot 1: the decoded super block, or what is wrong with it.
    public var slots: [Result<SuperBlock, FormatError>]

    /// The valid regular slot with the higher sequence (what a load uses).
    public var current: (slot: Int, block: SuperBlock)? { SuperBlock.current(slots) }

    /// Reads pages 0 and 1. Throws only when the device cannot be read; damaged slots are
    /// reported in `slots`.
    public static func read(_ io: BdevSyncIO) throws(BlobStoreError) -> SuperBlockSlots {
        let pageBytes = SuperBlock.pageBytes
        let raw = try BlobStore.readPages(io, at: 0, count: 2)
        var slots: [Result<SuperBlock, FormatError>] = []
        for slot in 0..<SuperBlock.slotCount {
            do throws(FormatError) {
                slots.append(.success(try SuperBlock.decode(raw[(slot * pageBytes)..<((slot + 1) * pageBytes)],
                                                            offset: UInt64(slot * pageBytes))))
            } catch { slots.append(.failure(error)) }
        }
        return SuperBlockSlots(slots: slots)
    }

    /// The current super block, or `.noSuperBlock` naming what is wrong with each slot.
    public func requireCurrent() throws(BlobStoreError) -> (slot: Int, block: SuperBlock) {
        if let current { return current }
        guard case let .failure(first) = slots[0], case let .failure(second) = slots[1] else {
            throw .corrupt("no super block slot decodes")
        }
        throw .noSuperBlock(slot0: first, slot1: second)
    }
}

/// The metadata log from the checkpoint on, as replay sees it, page by page and record by
/// record — read without loading the store: only the super block is needed, so the log of
/// a store whose metadata pages are damaged can still be read (crash forensics). The
/// verdict (what is committed, where the valid log ends and why) is `LogScanner`'s own.
public struct LogInspection: Sendable {
    /// What replay does with a record.
    public enum RecordStatus: String, Sendable {
        /// Part of a committed transaction after the checkpoint: replay applies it.
        case committed
        /// Of the transaction open at the end of the valid log (no commit record): discarded.
        case uncommitted
        /// On a page that decodes, at or after the point where the scan stopped: not read.
        case ignored
    }

    public struct Record: Sendable {
        public var pageSequence: UInt64
        /// Position of the record on its page.
        public var index: Int
        public var lsn: UInt64
        public var transaction: UInt64
        public var record: LogRecord
        public var status: RecordStatus
    }

    public struct Page: Sendable {
        /// The sequence replay expects at this position.
        public var sequence: UInt64
        /// Index of the page within the log region, and its device byte offset.
        public var slot: UInt64
        public var offset: UInt64
        /// nil: the page decodes and belongs to this log at this sequence. Otherwise why it
        /// does not (torn or never written, another store's, an earlier lap's).
        public var problem: FormatError?
        /// The sequence the page carries, when it decodes.
        public var foundSequence: UInt64?
        public var records: [Record]
    }

    public struct Transaction: Sendable {
        /// The LSN of its first record.
        public var id: UInt64
        public var firstLSN: UInt64
        public var lastLSN: UInt64
        /// Records, the commit record included when there is one.
        public var recordCount: Int
        public var committed: Bool
        public var firstPage: UInt64
        public var lastPage: UInt64
    }

    public var superBlockSlot: Int
    public var superBlockSequence: UInt64
    public var isClean: Bool
    public var tailSequence: UInt64
    public var checkpointLSN: UInt64
    public var logStartPage: UInt64
    public var logPages: UInt64
    /// The pages replay read, from the tail through the one where it stopped.
    public var pages: [Page]
    /// Committed transactions in log order, then the uncommitted one at the end, if any.
    public var transactions: [Transaction]
    /// Why the valid log ends; nil when it fills the whole region.
    public var stop: FormatError?
    /// Sequence of the first page after the valid log (where appending resumes).
    public var endSequence: UInt64
    /// The LSN the next commit gets.
    public var nextLSN: UInt64
    public var uncommittedRecords: Int
    /// Pages of this store beyond the end of the valid log that carry a sequence newer
    /// than where replay stopped. Normally there are none (the rest of the region is an
    /// earlier lap); one here means commits after a page that did not reach the device —
    /// replay ignores them. At most `laterPagesLimit` are listed; `laterPageCount` counts all.
    public var laterPages: [Page]
    public var laterPageCount: Int
    public static let laterPagesLimit = 16

    public var committedTransactions: Int { transactions.filter(\.committed).count }
}

extension LogInspection {
    /// Reads the super block and the log. Throws only when there is no valid super block or
    /// the device cannot be read at all; a damaged log is described, not thrown.
    public static func inspect(_ io: BdevSyncIO) throws(BlobStoreError) -> LogInspection {
        let (slot, block) = try SuperBlockSlots.read(io).requireCurrent()
        let pageBytes = UInt64(SuperBlock.pageBytes)
        let capacityPages = io.geometry.capacityBytes / pageBytes
        let logPages = block.log.pageCount
        // The scanner counts sequences and LSNs from these: values that would overflow are
        // damage, not a log (a super block with a valid CRC can still carry them).
        guard block.logTailSequence <= UInt64.max - logPages, block.checkpointLSN < UInt64.max - (1 << 32) else {
            throw .format(FormatError("super block", offset: UInt64(slot * SuperBlock.pageBytes) + 184,
                                      .invalidField(name: "checkpoint LSN or log tail sequence",
                                                    value: max(block.checkpointLSN, block.logTailSequence))))
        }
        var read: [UInt64: [UInt8]] = [:]
        var attempted: UInt64 = 0
        let firstLSN = block.checkpointLSN &+ 1
        let scan = LogScanner.scan(tailSequence: block.logTailSequence, logPages: logPages, storeTag: block.storeID.0,
                                   firstLSN: firstLSN) { sequence in
            attempted += 1
            let page = location(sequence, block).page
            guard page < capacityPages else {
                throw FormatError("log page \(sequence)", offset: page * pageBytes,
                                  .truncated(needed: Int(pageBytes), available: 0))
            }
            let bytes = try BlobStore.readPages(io, at: page, count: 1)
            read[sequence] = bytes
            return (bytes, page * pageBytes)
        }
        let pages = scannedPages(block, scan: scan, read: read, attempted: attempted, firstLSN: firstLSN)
        let stopSequence = block.logTailSequence &+ attempted &- 1
        let (later, laterCount) = laterPages(io, block, scanned: attempted, stopSequence: stopSequence)
        return LogInspection(superBlockSlot: slot, superBlockSequence: block.sequence, isClean: block.isClean,
                             tailSequence: block.logTailSequence, checkpointLSN: block.checkpointLSN,
                             logStartPage: block.log.startPage, logPages: logPages, pages: pages,
                             transactions: transactions(of: pages), stop: scan.stop, endSequence: scan.endSequence,
                             nextLSN: scan.nextLSN, uncommittedRecords: scan.uncommittedRecords,
                             laterPages: later, laterPageCount: laterCount)
    }

    /// Log page `sequence`'s slot in the region and its device page.
    private static func location(_ sequence: UInt64, _ block: SuperBlock) -> (slot: UInt64, page: UInt64) {
        let slot = sequence % block.log.pageCount
        return (slot, block.log.startPage + slot)
    }

    /// The `attempted` pages the scan read (`read`, by sequence), each record marked with
    /// what replay makes of it.
    private static func scannedPages(_ block: SuperBlock, scan: LogScan, read: [UInt64: [UInt8]], attempted: UInt64,
                                     firstLSN: UInt64) -> [Page] {
        let pageBytes = UInt64(SuperBlock.pageBytes)
        // Records in the order the scanner met them: the first `committed` were accepted
        // into committed transactions, the next `uncommitted` into the open one (LSNs are
        // consecutive from the checkpoint's, so acceptance is a prefix of the stream).
        let committedCount = Int(scan.nextLSN &- firstLSN)
        var accepted = 0
        var pages: [Page] = []
        let stopSequence = block.logTailSequence &+ attempted &- 1
        for step in 0..<attempted {
            let sequence = block.logTailSequence &+ step
            let (slotIndex, page) = location(sequence, block)
            var entry = Page(sequence: sequence, slot: slotIndex, offset: page * pageBytes, records: [])
            guard let bytes = read[sequence] else {
                entry.problem = scan.stop
                pages.append(entry)
                continue
            }
            do throws(FormatError) {
                let decoded = try LogPage.decode(bytes[...], offset: entry.offset)
                entry.foundSequence = decoded.sequence
                if decoded.storeTag != block.storeID.0 {
                    entry.problem = FormatError("log page \(sequence)", offset: entry.offset + 16,
                                                .invalidField(name: "store tag", value: decoded.storeTag))
                } else if decoded.sequence != sequence {
                    entry.problem = FormatError("log page \(sequence)", offset: entry.offset + 8,
                                                .sequenceGap(expected: sequence, found: decoded.sequence))
                }
                for (index, logged) in decoded.records.enumerated() {
                    var status = RecordStatus.ignored
                    if entry.problem == nil {
                        if accepted < committedCount {
                            status = .committed
                        } else if accepted < committedCount + scan.uncommittedRecords {
                            status = .uncommitted
                        }
                        if status != .ignored { accepted += 1 }
                    }
                    entry.records.append(Record(pageSequence: sequence, index: index, lsn: logged.lsn,
                                                transaction: logged.transaction, record: logged.record, status: status))
                }
            } catch {
                entry.problem = error
            }
            if sequence == stopSequence, entry.problem == nil, scan.stop != nil {
                // The page decodes but a record on it broke the chain (LSN, transaction id,
                // commit count): the scan's reason is the page's.
                entry.problem = scan.stop
            }
            pages.append(entry)
        }
        return pages
    }

    /// Accepted records are consecutive: a transaction runs from the record after a commit
    /// through its own commit record (the last one may have none).
    private static func transactions(of pages: [Page]) -> [Transaction] {
        var transactions: [Transaction] = []
        for page in pages {
            for record in page.records where record.status != .ignored {
                if let last = transactions.last, !last.committed {
                    transactions[transactions.count - 1].lastLSN = record.lsn
                    transactions[transactions.count - 1].recordCount += 1
                    transactions[transactions.count - 1].lastPage = page.sequence
                } else {
                    transactions.append(Transaction(id: record.transaction, firstLSN: record.lsn, lastLSN: record.lsn,
                                                    recordCount: 1, committed: false, firstPage: page.sequence,
                                                    lastPage: page.sequence))
                }
                if case .commit = record.record { transactions[transactions.count - 1].committed = true }
            }
        }
        return transactions
    }

    /// The rest of the region after the `scanned` pages: pages of this store newer than
    /// where the valid log ends (`stopSequence`), the first `laterPagesLimit` of them and
    /// their count.
    private static func laterPages(_ io: BdevSyncIO, _ block: SuperBlock, scanned: UInt64,
                                   stopSequence: UInt64) -> (pages: [Page], count: Int) {
        let pageBytes = UInt64(SuperBlock.pageBytes)
        let capacityPages = io.geometry.capacityBytes / pageBytes
        let logPages = block.log.pageCount
        var later: [Page] = []
        var laterCount = 0
        guard scanned < logPages, block.log.endPage <= capacityPages else { return (later, laterCount) }
        for step in scanned..<logPages {
            let sequence = block.logTailSequence &+ step
            let (slotIndex, page) = location(sequence, block)
            guard page < capacityPages, let bytes = try? BlobStore.readPages(io, at: page, count: 1),
                  let decoded = try? LogPage.decode(bytes[...], offset: page * pageBytes),
                  decoded.storeTag == block.storeID.0, decoded.sequence > stopSequence else { continue }
            laterCount += 1
            guard later.count < laterPagesLimit else { continue }
            later.append(Page(sequence: sequence, slot: slotIndex, offset: page * pageBytes,
                              problem: decoded.sequence == sequence ? nil
                                  : FormatError("log page \(sequence)", offset: page * pageBytes + 8,
                                                .sequenceGap(expected: sequence, found: decoded.sequence)),
                              foundSequence: decoded.sequence,
                              records: decoded.records.enumerated().map {
                                  Record(pageSequence: sequence, index: $0.offset, lsn: $0.element.lsn,
                                         transaction: $0.element.transaction, record: $0.element.record, status: .ignored)
                              }))
        }
        return (later, laterCount)
    }
}
