import Bdev
import Env

/// One change a repair makes (or, in a dry run, would make).
public struct RepairChange: Sendable, Equatable {
    /// What kind of change, in snake_case: `super_block`, `table_page`, `blob_recovered`,
    /// `blob_cut`, `blob_removed`, `clusters_unmapped`, `super_blob`, `log_replayed`,
    /// `log_records_dropped`, `log_cleared`, and the file system's (`FileSystem.repair`).
    public var kind: String
    /// The blob it concerns, if one.
    public var blob: BlobID?
    public var text: String

    public init(_ kind: String, blob: BlobID? = nil, _ text: String) {
        self.kind = kind
        self.blob = blob
        self.text = text
    }
}

/// What `BlobStore.salvage` found and changed in memory.
public struct SalvageReport: Sendable {
    /// The super block slot the salvage started from.
    public var superBlockSlot: Int
    public var changes: [RepairChange] = []
    /// Blobs whose content (data, xattrs, size) may differ from what they held before the
    /// damage: removed, cut to their readable metadata pages, clusters taken from them,
    /// log records about them dropped.
    public var affectedBlobs: Set<BlobID> = []
    public var removedBlobs: Set<BlobID> = []
    public var replayedTransactions = 0
    public var discardedRecords = 0
    public var droppedRecords = 0
    /// The first LSN replay did not reach: transactions from there on are lost.
    public var replayEndLSN: UInt64 = 0
    public var logStop: FormatError?
    /// The super blob as the super block named it (the file system's root is blob 0).
    public var superBlobBefore: BlobID?
}

extension BlobStore {
    /// Loads what can be read of a damaged store, for `fsck --repair`: where a load refuses,
    /// this drops what is unreadable and keeps the rest, and says what it did. Nothing is
    /// written; the caller checkpoints the result (both copies of the table and bitmaps
    /// are written whole: `copyDifferences` is empty).
    ///
    /// - Super block: the valid slot with the higher sequence; without one, the fields of a
    ///   checkpoint's announcement (they are the super block it announced from). Refused
    ///   (typed error) when neither slot decodes or the device is smaller than the store.
    /// - Blob table: a page that does not decode is taken from the other copy when the
    ///   last checkpoint left that page the same there, else rebuilt from the metadata
    ///   chains (the newest first page of each blob id it covers that the persisted
    ///   bitmaps do not show free).
    /// - Chains: a chain is read up to its first page that is unreadable, outside the
    ///   store, of another blob, out of order, already in another chain or written after
    ///   this super block; the blob keeps what the pages before it hold (its chain is
    ///   rewritten) or, without them, is removed.
    /// - Ownership: metadata pages come first; a cluster two blobs map, or that holds a
    ///   metadata page, is unmapped from every blob that maps it (reads as zeros): no blob
    ///   reads another's bytes.
    /// - Log: committed transactions are replayed record by record; a record that does
    ///   not apply (its blob is gone, its cluster is taken) is dropped. A `create blob`
    ///   for an id in use, or an extent over another blob's cluster, wins over the
    ///   checkpoint: the log is the newer of the two.
    public static func salvage(_ io: BdevSyncIO) throws(BlobStoreError) -> (BlobStore, SalvageReport) {
        let chosen = try chooseSuperBlock(io)
        let store = BlobStore(io: io, superBlock: chosen.block)
        var report = SalvageReport(superBlockSlot: chosen.slot)
        report.changes = chosen.changes
        report.superBlobBefore = chosen.block.superBlobID
        let differing = inactiveCopyDifferences(chosen.block, otherSlot: chosen.other).map { pages in
            let tablePages = chosen.block.table.pageCount
            return (table: Set(pages.filter { UInt64($0) < tablePages }.map(Int.init)),
                    bitmap: Set(pages.filter { UInt64($0) >= tablePages }.map { Int(UInt64($0) - tablePages) }))
        }
        let roots = try store.salvageTable(otherTableDiffers: differing?.table, otherBitmapDiffers: differing?.bitmap,
                                           report: &report)
        let walks = try store.walkChainsSalvaging(roots)
        store.adoptSalvaged(walks, report: &report)
        store.salvageCloneLinks(report: &report)
        try store.replaySalvaging(report: &report)
        store.affectClonesOfAffected(&report)
        _ = store.clusters.takeChangedPages()
        _ = store.metadataPageBits.takeChangedPages()
        _ = store.blobIDs.takeChangedPages()
        store.copyDifferences = [:]
        return (store, report)
    }

    // MARK: - Super block

    private static func chooseSuperBlock(_ io: BdevSyncIO) throws(BlobStoreError)
        -> (slot: Int, block: SuperBlock, other: SuperBlock?, changes: [RepairChange]) {
        let decoded = try readSuperBlockSlots(io)
        // Regular slots, newer first, then announcements: an announcement carries the fields
        // of the super block it was announced from (which is current unless it is lost).
        var candidates: [(slot: Int, block: SuperBlock, announced: Bool)] = []
        for (slot, result) in decoded.enumerated() {
            if case let .success(block) = result { candidates.append((slot, block, block.isCheckpointIntent)) }
        }
        candidates.sort { ($0.announced ? 1 : 0, $1.block.sequence) < ($1.announced ? 1 : 0, $0.block.sequence) }
        guard !candidates.isEmpty else {
            guard case let .failure(first) = decoded[0], case let .failure(second) = decoded[1] else {
                throw .corrupt("no super block slot decodes")
            }
            throw .noSuperBlock(slot0: first, slot1: second)
        }
        let capacityPages = io.geometry.capacityBytes / UInt64(pageBytes)
        var refusals: [String] = []
        for candidate in candidates {
            var block = candidate.block
            let offset = UInt64(candidate.slot * pageBytes)
            guard Int(block.blockSizeBytes) == io.geometry.blockSizeBytes else {
                refusals.append("super block slot \(candidate.slot): formatted with \(block.blockSizeBytes)-byte blocks; the device has \(io.geometry.blockSizeBytes)")
                continue
            }
            guard block.devicePages <= capacityPages else {
                refusals.append("super block slot \(candidate.slot): a store of \(block.devicePages) pages on a device of \(io.geometry.capacityBytes) bytes (truncated image?)")
                continue
            }
            if let error = block.bitmapRegionError(slotOffset: offset) {
                refusals.append("\(error)")
                continue
            }
            var changes: [RepairChange] = []
            let otherSlot = 1 - candidate.slot
            var other = try? decoded[otherSlot].get()
            if candidate.announced {
                guard block.sequence > 1 else { continue }
                block.isCheckpointIntent = false
                block.sequence -= 1
                block.changedSincePrevious = nil
                other = nil
                changes.append(RepairChange("super_block", "super block slot \(candidate.slot) holds only the announcement of checkpoint \(block.sequence + 1): the super block it was announced from (sequence \(block.sequence)) is rebuilt from it"))
            }
            switch decoded[otherSlot] {
            case let .failure(error):
                changes.append(RepairChange("super_block", "\(error): slot \(otherSlot) is rewritten; the store is read from slot \(candidate.slot) (sequence \(block.sequence)), its log replayed from there"))
            case let .success(otherBlock) where !otherBlock.isCheckpointIntent && otherBlock.sequence > block.sequence:
                changes.append(RepairChange("super_block", "super block slot \(otherSlot) (sequence \(otherBlock.sequence)) cannot serve (\(refusals.first ?? "unusable")): the store is read from slot \(candidate.slot) (sequence \(block.sequence)); slot \(otherSlot) is rewritten"))
            default:
                break
            }
            return (candidate.slot, block, other, changes)
        }
        throw .geometry(refusals.joined(separator: "; "))
    }

    // MARK: - Blob table

    /// Pages from `page` on, read in one request, or page by page where that fails (an
    /// unreadable page is nil: a bad sector damages one page, not the whole read).
    func readPagesTolerant(at page: UInt64, count: UInt64) -> [[UInt8]?] {
        if let bytes = try? readPages(at: page, count: count) {
            return (0..<Int(count)).map { Array(bytes[($0 * Self.pageBytes)..<(($0 + 1) * Self.pageBytes)]) }
        }
        return (0..<count).map { try? readPages(at: page + $0, count: 1) }
    }

    /// The table's roots, every page taken from the active copy, the other copy or the chains.
    private func salvageTable(otherTableDiffers: Set<Int>?, otherBitmapDiffers: Set<Int>?,
                              report: inout SalvageReport) throws(BlobStoreError) -> [(id: BlobID, root: UInt32)] {
        let block = superBlock
        let count = block.table.pageCount
        let active = block.activeCopy
        let activeStart = block.table.startPage + UInt64(active) * count
        let otherStart = block.table.startPage + UInt64(1 - active) * count
        let activePages = readPagesTolerant(at: activeStart, count: count)
        var otherPages: [[UInt8]?]?
        var roots: [(id: BlobID, root: UInt32)] = []
        var lost: [(index: Int, problem: String)] = []
        for index in 0..<Int(count) {
            let problem: String
            do throws(FormatError) {
                guard let bytes = activePages[index] else {
                    throw FormatError("blob table page \(index)", offset: (activeStart + UInt64(index)) * UInt64(Self.pageBytes),
                                      .invalidField(name: "device read failed", value: 0))
                }
                let payload = try ArrayPage.decode(bytes[...], kind: .table, pageIndex: UInt32(index),
                                                   offset: (activeStart + UInt64(index)) * UInt64(Self.pageBytes)).payload
                roots += tableEntries(payload, page: index)
                continue
            } catch { problem = "\(error)" }
            if let otherTableDiffers, !otherTableDiffers.contains(index) {
                if otherPages == nil { otherPages = readPagesTolerant(at: otherStart, count: count) }
                if let bytes = otherPages?[index],
                   let payload = try? ArrayPage.decode(bytes[...], kind: .table, pageIndex: UInt32(index),
                                                       offset: (otherStart + UInt64(index)) * UInt64(Self.pageBytes)).payload {
                    roots += tableEntries(payload, page: index)
                    report.changes.append(RepairChange("table_page", "\(problem): rebuilt from copy \(1 - active), which the last checkpoint left the same"))
                    continue
                }
            }
            lost.append((index, problem))
        }
        guard !lost.isEmpty else { return roots }
        let perPage = UInt64(TablePage.entriesPerPage)
        let lostPages = Set(lost.map(\.index))
        let bits = PersistedBitLookup(self, otherDiffers: otherBitmapDiffers)
        let found = scanChainHeads(wanted: { lostPages.contains(TablePage.pageIndex(of: $0)) }, bits: bits)
        for (index, problem) in lost {
            let ids = found.keys.filter { TablePage.pageIndex(of: $0) == index }.sorted()
            let listed = ids.prefix(32).map { "\($0) (page \(found[$0]!.page))" }.joined(separator: ", ")
            report.changes.append(RepairChange("table_page", "\(problem): rebuilt from the metadata chains: \(ids.count) blobs found"
                + (ids.isEmpty ? "" : ": " + listed + (ids.count > 32 ? ", …" : ""))))
            for id in ids {
                roots.append((id, found[id]!.page))
                report.changes.append(RepairChange("blob_recovered", blob: id, "blob \(id): found by the first page of its chain (metadata page \(found[id]!.page), written by checkpoint \(found[id]!.sequence))"))
            }
            // Blobs the bitmap (or the other copy's page, however old) says existed, whose
            // first page the scan did not find: lost with their table entry. Named, so
            // that nobody takes what they held for intact.
            var known = Set<BlobID>()
            let first = UInt64(index) * perPage
            for id in (first..<min(first + perPage, block.blobIDLimit)).lazy.map(BlobID.init(rawValue:)) where bits.blobID(id) == true {
                known.insert(id)
            }
            if otherPages == nil { otherPages = readPagesTolerant(at: otherStart, count: count) }
            if let bytes = otherPages?[index],
               let payload = try? ArrayPage.decode(bytes[...], kind: .table, pageIndex: UInt32(index),
                                                   offset: (otherStart + UInt64(index)) * UInt64(Self.pageBytes)).payload {
                known.formUnion(tableEntries(payload, page: index).map(\.id))
            }
            for id in known.subtracting(ids).sorted() {
                report.removedBlobs.insert(id)
                report.affectedBlobs.insert(id)
                report.changes.append(RepairChange("blob_lost", blob: id, "blob \(id): in use as far as the bitmaps or the other table copy say, but neither its table entry nor the first page of its chain can be read: lost"))
            }
        }
        return roots.sorted { $0.id < $1.id }
    }

    private func tableEntries(_ payload: ArraySlice<UInt8>, page: Int) -> [(id: BlobID, root: UInt32)] {
        TablePage.decode(payload, pageIndex: page, blobIDLimit: superBlock.blobIDLimit)
    }

    /// The first pages of chains whose blob `wanted` takes, in the metadata page region and
    /// (with the feature) in clusters the persisted bitmap does not show free: for each
    /// blob, the one the latest checkpoint wrote, not after this super block's, whose blob
    /// id and page the persisted bitmaps do not show free.
    private func scanChainHeads(wanted: (BlobID) -> Bool, bits: PersistedBitLookup) -> [BlobID: (page: UInt32, sequence: UInt64)] {
        var best: [BlobID: (page: UInt32, sequence: UInt64)] = [:]
        let block = superBlock
        func consider(_ pageID: UInt32, _ bytes: [UInt8]) {
            let offset = block.metadataPageAddress(pageID) * UInt64(Self.pageBytes)
            guard let page = try? MetadataPage.decodePage(bytes[...], offset: offset, pageID: pageID), page.chainIndex == 0,
                  block.covers(page.blobID), wanted(page.blobID), page.checkpointSequence <= block.sequence,
                  bits.blobID(page.blobID) != false, bits.metadataPage(pageID, block) != false else { return }
            if let known = best[page.blobID], known.sequence >= page.checkpointSequence { return }
            best[page.blobID] = (pageID, page.checkpointSequence)
        }
        let region = block.metadataPages.pageCount
        for start in stride(from: UInt64(0), to: region, by: Self.chainReadBatch) {
            let count = min(UInt64(Self.chainReadBatch), region - start)
            for (offset, bytes) in readPagesTolerant(at: block.metadataPages.startPage + start, count: count).enumerated() {
                if let bytes { consider(UInt32(start) + UInt32(offset), bytes) }
            }
        }
        let inClusters = block.metadataPageIDLimit - region
        var cluster: UInt64 = 0
        while cluster < inClusters {
            guard bits.cluster(cluster) != false else {
                cluster += 1
                continue
            }
            var end = cluster + 1
            while end < inClusters, end - cluster < UInt64(Self.chainReadBatch), bits.cluster(end) != false { end += 1 }
            for (offset, bytes) in readPagesTolerant(at: block.dataStartPage + cluster, count: end - cluster).enumerated() {
                if let bytes { consider(UInt32(region + cluster) + UInt32(offset), bytes) }
            }
            cluster = end
        }
        return best
    }

    // MARK: - Log

    private func replaySalvaging(report: inout SalvageReport) throws(BlobStoreError) {
        let block = superBlock
        let scan = LogScanner.scan(tailSequence: block.logTailSequence, logPages: block.log.pageCount,
                                   storeTag: block.storeID.0, firstLSN: block.checkpointLSN + 1) { sequence in
            let page = block.log.startPage + sequence % block.log.pageCount
            return (try self.readPages(at: page, count: 1), page * UInt64(Self.pageBytes))
        }
        var dropped: [BlobID: (count: Int, first: UInt64, last: UInt64, why: String)] = [:]
        var storeWide: [String] = []
        for transaction in scan.transactions {
            for logged in transaction {
                do { try applySalvaging(logged.record, report: &report) } catch {
                    report.droppedRecords += 1
                    guard let id = logged.record.blobID else {
                        storeWide.append("LSN \(logged.lsn) (\(logged.record)): \(error)")
                        continue
                    }
                    report.affectedBlobs.insert(id)
                    if let known = dropped[id] {
                        dropped[id] = (known.count + 1, known.first, logged.lsn, known.why)
                    } else {
                        dropped[id] = (1, logged.lsn, logged.lsn, "\(error)")
                    }
                }
            }
        }
        metadataLog.head = scan.endSequence
        metadataLog.nextLSN = scan.nextLSN
        lastScan = scan
        report.replayedTransactions = scan.transactions.count
        report.discardedRecords = scan.uncommittedRecords
        report.replayEndLSN = scan.nextLSN
        report.logStop = scan.stop
        if !scan.transactions.isEmpty || scan.uncommittedRecords > 0 {
            let lsns = scan.transactions.first.flatMap { first in scan.transactions.last.map { (first.first?.lsn, $0.last?.lsn) } }
            report.changes.append(RepairChange("log_replayed",
                "log: replayed \(scan.transactions.count) committed transactions"
                    + (lsns.flatMap { pair in pair.0.flatMap { a in pair.1.map { " (LSN \(a)–\($0))" } } } ?? "")
                    + (scan.uncommittedRecords > 0 ? ", discarded \(scan.uncommittedRecords) records of a transaction without its commit" : "")
                    + "; the valid log ends there" + (scan.stop.map { " (\($0))" } ?? "")))
        }
        for (id, entry) in dropped.sorted(by: { $0.key < $1.key }) {
            report.changes.append(RepairChange("log_records_dropped", blob: id,
                "log: dropped \(entry.count) record\(entry.count == 1 ? "" : "s") about blob \(id) (LSN \(entry.first)\(entry.count > 1 ? "–\(entry.last)" : "")): \(entry.why)"))
        }
        for text in storeWide { report.changes.append(RepairChange("log_records_dropped", "log: dropped \(text)")) }
    }

    /// Applies one replayed record to a salvaged state; throws, changing nothing, when it
    /// does not apply. Where the record and the checkpoint disagree about who owns an id
    /// or a cluster, the record wins: it is the newer.
    private func applySalvaging(_ record: LogRecord, report: inout SalvageReport) throws(BlobStoreError) {
        switch record {
        case let .createBlob(id) where superBlock.covers(id) && blobs[id] != nil:
            for clone in clones(of: id) {
                try apply(.setParent(id: clone, parent: nil, backedClusters: 0), replaying: true)
                report.affectedBlobs.insert(clone)
                report.changes.append(RepairChange("parent_dropped", blob: clone,
                    "blob \(clone): its parent \(id) is replaced by a blob the log creates: it reads its own clusters only (the shared ones read as zeros)"))
            }
            try apply(.deleteBlob(id: id), replaying: true)
            report.affectedBlobs.insert(id)
            report.changes.append(RepairChange("blob_removed", blob: id,
                "blob \(id): the log creates it anew after the checkpoint, so the blob the checkpoint had under that id is stale: removed"))
        case let .mapExtent(id, extent) where blobs[id] != nil && extent.firstCluster <= superBlock.clusterCount
            && UInt64(extent.count) <= superBlock.clusterCount - extent.firstCluster:
            var taken: [(cluster: UInt64, owner: BlobID, index: UInt64)] = []
            for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) where clusters[cluster] {
                guard let (owner, index) = extentOwner(of: cluster), owner != id else {
                    throw .corrupt("replaying \(record): cluster \(cluster) holds a metadata page or is the blob's already")
                }
                taken.append((cluster, owner, index))
            }
            for (cluster, owner, index) in taken {
                try apply(.unmapClusters(id: owner, clusterIndex: index, count: 1), replaying: true)
                report.affectedBlobs.insert(owner)
                report.changes.append(RepairChange("clusters_unmapped", blob: owner,
                    "blob \(owner): cluster \(cluster) (its cluster \(index)) is mapped to blob \(id) by the log after the checkpoint: unmapped from blob \(owner) (reads as zeros)"))
            }
        default:
            break
        }
        try apply(record, replaying: true)
    }

    /// The blob whose extents map device cluster `cluster`, and the blob cluster it maps
    /// (a walk over every blob: only for the rare conflict).
    private func extentOwner(of cluster: UInt64) -> (BlobID, UInt64)? {
        for (id, blob) in blobs {
            for extent in blob.extents where cluster >= extent.firstCluster && cluster - extent.firstCluster < UInt64(extent.count) {
                return (id, extent.clusterIndex + (cluster - extent.firstCluster))
            }
        }
        return nil
    }

    /// After a repair's checkpoint: overwrites with zeros every page of the log region that
    /// holds a page of this store at or after the tail. Replay stops before them today,
    /// but after new commits fill the pages before them they could line up with the next
    /// sequence and LSN and be replayed as if they were new. Returns the sequences cleared.
    public func clearStaleLogPages() throws(BlobStoreError) -> [UInt64] {
        let block = superBlock
        var cleared: [UInt64] = []
        let zeros = [UInt8](repeating: 0, count: Self.pageBytes)
        for start in stride(from: UInt64(0), to: block.log.pageCount, by: Self.chainReadBatch) {
            let count = min(UInt64(Self.chainReadBatch), block.log.pageCount - start)
            for (offset, bytes) in readPagesTolerant(at: block.log.startPage + start, count: count).enumerated() {
                let page = block.log.startPage + start + UInt64(offset)
                guard let bytes, let decoded = try? LogPage.decode(bytes[...], offset: page * UInt64(Self.pageBytes)),
                      decoded.storeTag == block.storeID.0, decoded.sequence >= block.logTailSequence else { continue }
                try writePages(at: page, zeros)
                cleared.append(decoded.sequence)
            }
        }
        if !cleared.isEmpty { try flush() }
        return cleared.sorted()
    }

    /// Bitmaps as the store holds them in memory (after a checkpoint: as persisted).
    public var bitmapsInMemory: PersistedBitmaps {
        PersistedBitmaps(clusters: clusters, metadataPages: metadataPageBits, blobIDs: blobIDs)
    }
}

/// Bits of the persisted bitmaps, page by page: from the active copy, or from the other
/// copy where the active page does not decode and the last checkpoint left the two the
/// same; nil where neither says.
struct PersistedBitLookup {
    private var pages: [ArraySlice<UInt8>?]
    private let clusterStart: Int
    private let metadataStart: Int
    private let idStart: Int

    init(_ store: BlobStore, otherDiffers: Set<Int>?) {
        let block = store.superBlock
        let count = block.bitmaps.pageCount
        let activeStart = block.bitmaps.startPage + UInt64(block.activeCopy) * count
        let otherStart = block.bitmaps.startPage + UInt64(1 - block.activeCopy) * count
        let layout = BlobStore.BitmapLayout(block)
        clusterStart = 0
        metadataStart = layout.metadataStart
        idStart = layout.idStart
        var pages: [ArraySlice<UInt8>?] = []
        var other: [[UInt8]?]?
        for (index, bytes) in store.readPagesTolerant(at: activeStart, count: count).enumerated() {
            let offset = (activeStart + UInt64(index)) * UInt64(SuperBlock.pageBytes)
            if let bytes, let payload = try? ArrayPage.decode(bytes[...], kind: .bitmap, pageIndex: UInt32(index), offset: offset).payload {
                pages.append(payload)
                continue
            }
            if let otherDiffers, !otherDiffers.contains(index) {
                if other == nil { other = store.readPagesTolerant(at: otherStart, count: count) }
                if let bytes = other?[index],
                   let payload = try? ArrayPage.decode(bytes[...], kind: .bitmap, pageIndex: UInt32(index), offset: 0).payload {
                    pages.append(payload)
                    continue
                }
            }
            pages.append(nil)
        }
        self.pages = pages
    }

    private func bit(_ index: UInt64, from start: Int) -> Bool? {
        let page = start + Int(index / UInt64(BitmapPage.bitsPerPage))
        guard page < pages.count, let payload = pages[page] else { return nil }
        let within = Int(index % UInt64(BitmapPage.bitsPerPage))
        return payload[payload.startIndex + within / 8] >> (within % 8) & 1 == 1
    }

    func cluster(_ cluster: UInt64) -> Bool? { bit(cluster, from: clusterStart) }
    func blobID(_ id: BlobID) -> Bool? { bit(id.rawValue, from: idStart) }
    func metadataPage(_ page: UInt32, _ block: SuperBlock) -> Bool? {
        if let cluster = block.metadataPageCluster(page) { return self.cluster(cluster) }
        return bit(UInt64(page), from: metadataStart)
    }
}
