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
        /// Not rebuilt: loading refused the store (`refusal` says why); nothing was written.
        case notRepairable = "not-repairable"
        /// Rebuilt, yet the verifier still reports problems (`after`).
        case incomplete
    }

    public var outcome: Outcome
    public var before: VerifyReport
    public var after: VerifyReport?
    public var refusal: BlobStoreError?
    /// Committed log transactions the rebuild applied, and uncommitted records it discarded.
    public var replayedTransactions = 0
    public var discardedRecords = 0
    /// Bits of the persisted bitmaps the rebuild changed. Empty with
    /// `bitmapsWereUnreadable` when the old bitmaps did not decode (they were rewritten whole).
    public var bitmapChanges: [BitmapChange] = []
    public var bitmapsWereUnreadable = false
    /// Super block slots that did not decode before and were rewritten, with what was wrong.
    public var rewrittenSuperBlockSlots: [(slot: Int, problem: FormatError)] = []
    /// Problems of `before` that are gone, and those that remain.
    public var fixed: [String] = []
    public var remaining: [String] = []
}

/// fsck --repair for the blob store: fixes what can be fixed without losing anything —
/// leaked clusters, metadata pages and blob ids, stale or damaged bitmap pages, a damaged
/// super block slot, an unreplayed log — by rebuilding the checkpoint from the metadata:
/// the store is loaded for writing (the log is replayed; the bitmaps are derived from the
/// metadata chains, and a damaged chain or a cluster or page owned twice makes the load
/// refuse) and unloaded clean, which writes two checkpoints: both copies of the table and
/// bitmaps and both super block slots are rewritten. A damaged chain, a doubly-owned
/// cluster, a damaged active table page are not repaired: which owner is right is not
/// knowable here, and guessing loses data.
///
/// The caller holds the device lock (`ToolSupport.Device.lock()`): this writes.
public enum StoreRepair {
    public static func repair(_ io: BdevSyncIO) -> RepairReport {
        let before = Verifier.verify(io)
        var report = RepairReport(outcome: .clean, before: before)
        let slotsBefore = try? SuperBlockSlots.read(io)
        let current = slotsBefore?.current?.block
        let capacityPages = io.geometry.capacityBytes / UInt64(SuperBlock.pageBytes)
        if let current, current.devicePages > capacityPages {
            // A truncated image: what is missing cannot be rebuilt.
            report.outcome = .notRepairable
            report.refusal = .geometry("store of \(current.devicePages) pages on a device of \(io.geometry.capacityBytes) bytes (truncated image?)")
            report.remaining = before.problems
            return report
        }
        guard !before.isConsistent else { return report }
        let oldBitmaps = current.flatMap { PersistedBitmaps.read(io, $0) }
        do {
            let (store, loaded) = try BlobStore.load(io, rewriteArrays: true)
            report.replayedTransactions = loaded.replayedTransactions
            report.discardedRecords = loaded.discardedRecords
            try store.unload()
        } catch {
            report.outcome = .notRepairable
            report.refusal = error
            report.remaining = before.problems
            return report
        }
        let after = Verifier.verify(io)
        report.after = after
        report.outcome = after.isConsistent ? .repaired : .incomplete
        report.fixed = before.problems.filter { !after.problems.contains($0) }
        report.remaining = after.problems
        let slotsAfter = try? SuperBlockSlots.read(io)
        if let slotsBefore, let slotsAfter {
            for (slot, result) in slotsBefore.slots.enumerated() {
                guard case let .failure(problem) = result, case .success = slotsAfter.slots[slot] else { continue }
                report.rewrittenSuperBlockSlots.append((slot, problem))
            }
        }
        if let oldBitmaps, let block = slotsAfter?.current?.block,
           let newBitmaps = PersistedBitmaps.read(io, block) {
            report.bitmapChanges = [
                BitmapChange.between(oldBitmaps.clusters, newBitmaps.clusters, .clusters),
                BitmapChange.between(oldBitmaps.metadataPages, newBitmaps.metadataPages, .metadataPages),
                BitmapChange.between(oldBitmaps.blobIDs, newBitmaps.blobIDs, .blobIDs),
            ].compactMap { $0 }
        } else {
            report.bitmapsWereUnreadable = true
        }
        return report
    }
}
