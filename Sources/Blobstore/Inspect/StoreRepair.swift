import Bdev

/// The allocation bitmaps of the active copy, as persisted by the last checkpoint.
public struct PersistedBitmaps: Sendable {
    public var clusters: Bitmap
    public var metadataPages: Bitmap
    public var blobIDs: Bitmap

    /// nil when a page of the active copy does not decode, or the super block's regions do
    /// not fit the device or cannot hold the three bitmaps.
    public static func read(_ io: BdevSyncIO, _ block: SuperBlock) -> PersistedBitmaps? {
        let (deviceBytes, overflow) = block.devicePages.multipliedReportingOverflow(by: UInt64(SuperBlock.pageBytes))
        guard !overflow, deviceBytes <= io.geometry.capacityBytes, block.bitmapRegionError(slotOffset: 0) == nil else { return nil }
        let start = block.bitmaps.startPage + UInt64(block.activeCopy) * block.bitmaps.pageCount
        guard let raw = try? BlobStore.readPages(io, at: start, count: block.bitmaps.pageCount) else { return nil }
        return decode(raw, at: start, block).bitmaps
    }

    /// The active copy's pages, read as `raw` from page `start`, split into the three
    /// bitmaps; nil, with every page that does not decode in `errors`, when one does not.
    static func decode(_ raw: [UInt8], at start: UInt64, _ block: SuperBlock)
        -> (bitmaps: PersistedBitmaps?, errors: [FormatError]) {
        let pageBytes = SuperBlock.pageBytes
        var payload: [UInt8] = []
        payload.reserveCapacity(Int(block.bitmaps.pageCount) * ArrayPage.payloadBytes)
        var errors: [FormatError] = []
        for index in 0..<Int(block.bitmaps.pageCount) {
            do throws(FormatError) {
                payload += try ArrayPage.decode(raw[(index * pageBytes)..<((index + 1) * pageBytes)], kind: .bitmap,
                                                pageIndex: UInt32(index),
                                                offset: (start + UInt64(index)) * UInt64(pageBytes)).payload
            } catch { errors.append(error) }
        }
        guard errors.isEmpty else { return (nil, errors) }
        var sections: [Bitmap] = []
        var offset = 0
        for count in [block.clusterCount, block.metadataPages.pageCount, block.blobIDLimit] {
            sections.append(Bitmap(count: count, bytes: payload[offset...]))
            offset += Int(BitmapPage.pages(forBits: count)) * ArrayPage.payloadBytes
        }
        return (PersistedBitmaps(clusters: sections[0], metadataPages: sections[1], blobIDs: sections[2]), [])
    }
}

/// What a repair changed in one persisted bitmap.
public struct BitmapChange: Sendable, Equatable {
    public enum Section: String, Sendable, CaseIterable {
        case clusters = "cluster"
        case metadataPages = "metadata page"
        case blobIDs = "blob id"
    }

    public var section: Section
    /// Bits that were set and are now clear: leaked (or released by a replayed transaction).
    public var freedCount: UInt64
    /// Bits that were clear and are now set: in use but free in the old bitmap (or
    /// allocated by a replayed transaction).
    public var markedCount: UInt64
    /// The first `listLimit` of each, ascending.
    public var freed: [UInt64]
    public var marked: [UInt64]
    public static let listLimit = 64

    static func between(_ old: Bitmap, _ new: Bitmap, _ section: Section) -> BitmapChange? {
        var change = BitmapChange(section: section, freedCount: 0, markedCount: 0, freed: [], marked: [])
        let (oldBytes, newBytes) = (old.bytes(), new.bytes())
        // Byte by byte, bit by bit only where they differ: a bitmap has a bit per cluster.
        for byte in 0..<min(oldBytes.count, newBytes.count) where oldBytes[byte] != newBytes[byte] {
            for bit in 0..<8 {
                let index = UInt64(byte * 8 + bit)
                guard index < min(old.count, new.count) else { break }
                let (was, now) = (oldBytes[byte] >> bit & 1 == 1, newBytes[byte] >> bit & 1 == 1)
                if was && !now {
                    change.freedCount += 1
                    if change.freed.count < listLimit { change.freed.append(index) }
                } else if now && !was {
                    change.markedCount += 1
                    if change.marked.count < listLimit { change.marked.append(index) }
                }
            }
        }
        return change.freedCount + change.markedCount > 0 ? change : nil
    }
}

/// What `StoreRepair.repair` found, did and left.
public struct RepairReport: Sendable {
    public enum Outcome: String, Sendable {
        /// Nothing to repair; nothing was written.
        case clean
        /// Rebuilt; the verifier is clean now.
        case repaired
        /// Not rebuilt: the store cannot be read at all (no super block, a truncated image,
        /// a device error before anything was written; `refusal` says why); nothing written.
        case notRepairable = "not-repairable"
        /// Rebuilt, yet the verifier still reports problems (`after`), or the rebuild
        /// stopped part way (`refusal`; the undo file has what it overwrote).
        case incomplete
        /// A dry run: `changes` is what a repair would do; nothing was written.
        case planned
    }

    public var outcome: Outcome
    public var before: VerifyReport
    public var after: VerifyReport?
    public var refusal: BlobStoreError?
    public var dryRun = false
    /// Committed log transactions the rebuild applied, and uncommitted records it discarded.
    public var replayedTransactions = 0
    public var discardedRecords = 0
    /// Bits of the persisted bitmaps the rebuild changed. Empty with
    /// `bitmapsWereUnreadable` when the old bitmaps did not decode (they were rewritten whole).
    public var bitmapChanges: [BitmapChange] = []
    public var bitmapsWereUnreadable = false
    /// Super block slots that did not decode before and were rewritten, with what was wrong.
    public var rewrittenSuperBlockSlots: [(slot: Int, problem: FormatError)] = []
    /// Every change, in the order it was made: the blob store's, then the layer above's.
    public var changes: [RepairChange] = []
    /// Blobs whose content may differ from what it was before the damage (see
    /// `SalvageReport.affectedBlobs`), the blob store's and the layer above's.
    public var affectedBlobs: Set<BlobID> = []
    public var removedBlobs: Set<BlobID> = []
    /// The first LSN the log replay did not reach (transactions from there on are lost).
    public var replayEndLSN: UInt64 = 0
    /// Log pages past the new tail that were zeroed (their sequences).
    public var clearedLogPages: [UInt64] = []
    /// The undo file written and how many device pages it holds.
    public var undoPath: String?
    public var undoPageCount = 0
    /// Problems of `before` that are gone, and those that remain.
    public var fixed: [String] = []
    public var remaining: [String] = []
}

/// How `StoreRepair.repair` runs.
public struct RepairOptions {
    /// Work out every change without writing a byte.
    public var dryRun = false
    /// Keep the old bytes of every page overwritten in this new file (`UndoFile`).
    public var undoPath: String?
    /// Repair even when the blob store verifies (the layer above reported problems).
    public var force = false
    /// The layer above (the file system): runs on the salvaged store after its first
    /// checkpoint; returns its changes and the blobs whose content they touched.
    public var upperLayer: ((BlobStore, SalvageReport) throws -> (changes: [RepairChange], affected: Set<BlobID>))?

    public init(dryRun: Bool = false, undoPath: String? = nil, force: Bool = false,
                upperLayer: ((BlobStore, SalvageReport) throws -> (changes: [RepairChange], affected: Set<BlobID>))? = nil) {
        self.dryRun = dryRun
        self.undoPath = undoPath
        self.force = force
        self.upperLayer = upperLayer
    }
}

/// fsck --repair for the blob store: `BlobStore.salvage` reads what can be read and drops
/// what cannot (see there: super block, table, chains, ownership, log), the result is
/// checkpointed twice (both copies of the table and bitmaps and both super block slots
/// rewritten whole), the layer above repairs itself in between, and log pages past the
/// new tail are zeroed. Every change is listed. Only a store without a usable super block
/// (both slots damaged, a truncated image) is refused, with nothing written.
///
/// The caller holds the device lock (`ToolSupport.Device.lock()`): this writes.
public enum StoreRepair {
    public static func repair(_ io: BdevSyncIO, options: RepairOptions = RepairOptions()) -> RepairReport {
        let before = Verifier.verify(io)
        var report = RepairReport(outcome: .clean, before: before)
        report.dryRun = options.dryRun
        guard !before.isConsistent || options.force else { return report }
        let slotsBefore = try? SuperBlockSlots.read(io)
        let oldBitmaps = slotsBefore?.current.flatMap { PersistedBitmaps.read(io, $0.block) }
        let store: BlobStore
        let salvage: SalvageReport
        do { (store, salvage) = try BlobStore.salvage(io) } catch {
            report.outcome = .notRepairable
            report.refusal = error
            report.remaining = before.problems
            return report
        }
        var recorder: UndoRecorder?
        if let path = options.undoPath, !options.dryRun {
            do { recorder = try UndoRecorder(path: path, io: io, storeID: store.superBlock.storeID) } catch {
                report.outcome = .notRepairable
                report.refusal = .invalidArgument("undo file: \(error)")
                report.remaining = before.problems
                return report
            }
            store.writeObserver = recorder
            report.undoPath = path
        }
        store.discardsWrites = options.dryRun
        report.replayedTransactions = salvage.replayedTransactions
        report.discardedRecords = salvage.discardedRecords
        report.replayEndLSN = salvage.replayEndLSN
        report.removedBlobs = salvage.removedBlobs
        var changes = salvage.changes
        var affected = salvage.affectedBlobs
        do {
            try store.checkpoint()
            if let upperLayer = options.upperLayer {
                let (upperChanges, upperAffected) = try upperLayer(store, salvage)
                changes += upperChanges
                affected.formUnion(upperAffected)
            }
            try store.unload()
            report.clearedLogPages = try store.clearStaleLogPages()
            if !report.clearedLogPages.isEmpty {
                let listed = report.clearedLogPages.prefix(16).map(String.init).joined(separator: ", ")
                changes.append(RepairChange("log_cleared", "log: zeroed \(report.clearedLogPages.count) pages past the new tail that still held records of this store (sequences \(listed)\(report.clearedLogPages.count > 16 ? ", …" : ""))"))
            }
            try recorder?.finish()
        } catch {
            report.outcome = .incomplete
            report.refusal = (error as? BlobStoreError) ?? .corrupt("\(error)")
        }
        report.changes = changes
        report.affectedBlobs = affected
        report.undoPageCount = recorder?.savedPageCount ?? 0
        if let slotsBefore {
            for (slot, result) in slotsBefore.slots.enumerated() {
                guard case let .failure(problem) = result else { continue }
                report.rewrittenSuperBlockSlots.append((slot, problem))
            }
        }
        if let oldBitmaps {
            let now = store.bitmapsInMemory
            report.bitmapChanges = [
                BitmapChange.between(oldBitmaps.clusters, now.clusters, .clusters),
                BitmapChange.between(oldBitmaps.metadataPages, now.metadataPages, .metadataPages),
                BitmapChange.between(oldBitmaps.blobIDs, now.blobIDs, .blobIDs),
            ].compactMap { $0 }
        } else {
            report.bitmapsWereUnreadable = true
        }
        if options.dryRun {
            if report.outcome != .incomplete { report.outcome = .planned }
            report.remaining = before.problems
            return report
        }
        let after = Verifier.verify(io)
        report.after = after
        if report.outcome != .incomplete { report.outcome = after.isConsistent ? .repaired : .incomplete }
        report.fixed = before.problems.filter { !after.problems.contains($0) }
        report.remaining = after.problems
        return report
    }
}
