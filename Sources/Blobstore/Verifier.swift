import Bdev
import Env

/// The blob store's consistency check (fsck logic, shared with blobcli later). It reads
/// the device as it is — both super block slots, the active table and bitmap copy, every
/// metadata chain — and reports every damaged structure, every cluster or metadata page
/// owned twice, and every difference between the bitmaps and what the metadata says.
/// Committed log transactions after the checkpoint are counted, not applied.
public struct VerifyReport: Sendable {
    public var problems: [String] = []
    public var blobCount = 0
    public var clustersInUse: UInt64 = 0
    public var metadataPagesInUse: UInt64 = 0
    public var pendingTransactions = 0
    /// Blobs that are snapshots, and blobs that are clones (have a parent).
    public var snapshotCount = 0
    public var cloneCount = 0
    public var isConsistent: Bool { problems.isEmpty }
}

public enum Verifier {
    public static func verify(_ io: BdevSyncIO) -> VerifyReport {
        var pass = VerifyPass(io: io)
        guard let (slot, block) = pass.currentSuperBlock(), pass.checkCapacity(block) else { return pass.report }
        let roots = pass.readTable(block)
        let owners = pass.walkChains(roots, block)
        pass.checkParents(block)
        pass.checkBitmaps(block, slot: slot, owners: owners, roots: roots)
        pass.checkLog(block)
        return pass.report
    }
}

/// One run of the verifier over a device: the steps of `Verifier.verify`, each adding the
/// problems it finds to `report`.
private struct VerifyPass {
    let io: BdevSyncIO
    var report = VerifyReport()
    let pageBytes = SuperBlock.pageBytes

    /// What the chains own: each cluster's and each metadata page's blob.
    struct Owners {
        var clusters: [UInt64: BlobID] = [:]
        var pages: [UInt32: BlobID] = [:]
        /// Clusters found owned twice (one problem each up to `doublyOwnedListed`, then a count).
        var doublyOwned: UInt64 = 0
    }

    static let doublyOwnedListed: UInt64 = 32
    /// Each decoded blob's parent link and whether it is a snapshot (`checkParents`).
    var links: [BlobID: (parent: BlobID?, isSnapshot: Bool)] = [:]

    init(io: BdevSyncIO) { self.io = io }

    /// Every parent exists and is a snapshot, and no chain of parents loops (a clone's
    /// shared clusters are read through them).
    mutating func checkParents(_ block: SuperBlock) {
        let hasClones = links.values.contains { $0.parent != nil || $0.isSnapshot }
        if hasClones && block.incompatibleFeatures & SuperBlock.Features.clones == 0 {
            report.problems.append("the store has snapshots or clones but its super block lacks the clones feature (incompatible bit 2)")
        }
        for (id, link) in links.sorted(by: { $0.key < $1.key }) {
            if link.isSnapshot { report.snapshotCount += 1 }
            guard let parent = link.parent else { continue }
            report.cloneCount += 1
            guard let parentLink = links[parent] else {
                report.problems.append("blob \(id) is a clone of blob \(parent), which does not exist")
                continue
            }
            if !parentLink.isSnapshot { report.problems.append("blob \(id) is a clone of blob \(parent), which is not a snapshot") }
            var next: BlobID? = parent
            var steps = 0
            while let ancestor = next {
                if ancestor == id || steps > links.count {
                    report.problems.append("blob \(id): its chain of parents loops back to it")
                    break
                }
                next = links[ancestor]?.parent
                steps += 1
            }
        }
    }

    mutating func read(_ page: UInt64, _ count: UInt64) -> [UInt8]? {
        do { return try BlobStore.readPages(io, at: page, count: count) } catch {
            report.problems.append("cannot read pages \(page)+\(count): \(error)")
            return nil
        }
    }

    /// The current super block and its slot, nil when there is none.
    mutating func currentSuperBlock() -> (Int, SuperBlock)? {
        guard let slots = read(0, 2) else { return nil }
        var decoded: [Result<SuperBlock, FormatError>] = []
        for slot in 0..<2 {
            do throws(FormatError) {
                decoded.append(.success(try SuperBlock.decode(slots[(slot * pageBytes)..<((slot + 1) * pageBytes)],
                                                              offset: UInt64(slot * pageBytes))))
            } catch {
                report.problems.append("\(error)")
                decoded.append(.failure(error))
            }
        }
        // (A slot holding the announcement of a checkpoint that a crash stopped is not a problem.)
        guard let current = SuperBlock.current(decoded) else {
            if !decoded.contains(where: { if case .failure = $0 { true } else { false } }) {
                report.problems.append("no regular super block (only announcements of checkpoints)")
            }
            return nil
        }
        return current
    }

    /// The store against the device: a cut image (its data region, or more, missing) is not
    /// clean even when every metadata structure still reads. Without the metadata regions
    /// there is nothing more to check (false).
    mutating func checkCapacity(_ block: SuperBlock) -> Bool {
        let capacityPages = io.geometry.capacityBytes / UInt64(pageBytes)
        guard block.devicePages > capacityPages else { return true }
        report.problems.append("store of \(block.devicePages) pages on a device of \(capacityPages) pages "
            + "(\(io.geometry.capacityBytes) bytes): truncated image?")
        guard block.regionsEndPage <= capacityPages else {
            report.problems.append("the metadata regions end at page \(block.regionsEndPage), beyond the device")
            return false
        }
        return true
    }

    /// The active table: blob id -> first metadata page.
    mutating func readTable(_ block: SuperBlock) -> [BlobID: UInt32] {
        let tableStart = block.table.startPage + UInt64(block.activeCopy) * block.table.pageCount
        var roots: [BlobID: UInt32] = [:]
        guard let table = read(tableStart, block.table.pageCount) else { return roots }
        for index in 0..<Int(block.table.pageCount) {
            do {
                let payload = try ArrayPage.decode(table[(index * pageBytes)..<((index + 1) * pageBytes)], kind: .table,
                                                   pageIndex: UInt32(index),
                                                   offset: (tableStart + UInt64(index)) * UInt64(pageBytes)).payload
                for (id, root) in TablePage.decode(payload, pageIndex: index, blobIDLimit: block.blobIDLimit) { roots[id] = root }
            } catch { report.problems.append("\(error)") }
        }
        return roots
    }

    /// Chains and what they own. The first page of each chain is read ahead, a batch of
    /// chains at a time with all the batch's reads in flight (most chains are one page);
    /// the walk takes pages from there, and reads the rest, and any read-ahead that
    /// failed, one by one.
    mutating func walkChains(_ roots: [BlobID: UInt32], _ block: SuperBlock) -> Owners {
        var owners = Owners()
        let sortedRoots = roots.sorted(by: { $0.key < $1.key })
        let batch = BlobStore.chainReadBatch
        var readAhead: [UInt32: ArraySlice<UInt8>] = [:]
        for (position, (id, root)) in sortedRoots.enumerated() {
            if position % batch == 0 {
                readAhead = Verifier.readPagesAhead(io, block, sortedRoots[position..<min(sortedRoots.count, position + batch)].map(\.value))
            }
            let (pages, ids) = walkChain(of: id, from: root, block, readAhead: readAhead, owners: &owners)
            guard !pages.isEmpty else { continue }
            claimClusters(of: id, pages: pages, ids: ids, block, owners: &owners)
        }
        if owners.doublyOwned > Self.doublyOwnedListed {
            report.problems.append("\(owners.doublyOwned) clusters are owned twice (the first \(Self.doublyOwnedListed) listed)")
        }
        report.clustersInUse = UInt64(owners.clusters.count)
        report.metadataPagesInUse = UInt64(owners.pages.count)
        return owners
    }

    /// The pages of blob `id`'s chain that decode, up to the first that does not, each
    /// claimed (with its cluster, when it is in one) for `id`.
    mutating func walkChain(of id: BlobID, from root: UInt32, _ block: SuperBlock, readAhead: [UInt32: ArraySlice<UInt8>],
                            owners: inout Owners) -> (pages: [MetadataPage.Page], ids: [UInt32]) {
        var next: UInt32? = root
        var pages: [MetadataPage.Page] = []
        var ids: [UInt32] = []
        while let pageID = next {
            guard UInt64(pageID) < block.metadataPageIDLimit else {
                report.problems.append("blob \(id): chain points at metadata page \(pageID), outside the metadata pages")
                break
            }
            if let other = owners.pages[pageID] {
                report.problems.append("metadata page \(pageID) is in the chains of blobs \(other) and \(id)")
                break
            }
            owners.pages[pageID] = id
            if let cluster = block.metadataPageCluster(pageID) {
                // A metadata page in a data cluster: the cluster is the chain's.
                if let other = owners.clusters[cluster] {
                    report.problems.append("cluster \(cluster) holds metadata page \(pageID) of blob \(id) and belongs to blob \(other)")
                }
                owners.clusters[cluster] = id
            }
            let page = block.metadataPageAddress(pageID)
            guard let bytes = readAhead[pageID] ?? read(page, 1)?[...] else { break }
            do {
                let decoded = try MetadataPage.decodePage(bytes, offset: page * UInt64(pageBytes), pageID: pageID)
                // Chains are written before the super block that names them: a newer page
                // was reused by a later checkpoint (or an older super block is current).
                guard decoded.checkpointSequence <= block.sequence else {
                    report.problems.append("blob \(id): metadata page \(pageID) at byte \(page * UInt64(pageBytes) + 24) was written by checkpoint \(decoded.checkpointSequence), after the current super block's \(block.sequence)")
                    break
                }
                pages.append(decoded)
                ids.append(pageID)
                next = decoded.nextPage
            } catch {
                report.problems.append("blob \(id): \(error)")
                next = nil
            }
        }
        return (pages, ids)
    }

    /// Decodes blob `id` from its chain's pages and claims its clusters.
    mutating func claimClusters(of id: BlobID, pages: [MetadataPage.Page], ids: [UInt32], _ block: SuperBlock,
                                owners: inout Owners) {
        do {
            // Decoding checks every extent against the device (O(extents)): the loop below
            // runs over clusters that exist.
            let blob = try MetadataPage.decodeBlob(pages, pageIDs: ids, offsets: ids.map {
                block.metadataPageAddress($0) * UInt64(pageBytes)
            }, clusterLimit: block.clusterCount)
            if blob.id != id { report.problems.append("blob table entry \(id) names the chain of blob \(blob.id)") }
            report.blobCount += 1
            links[id] = (blob.parent, blob.isSnapshot)
            for extent in blob.extents {
                for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) {
                    if let other = owners.clusters[cluster] {
                        owners.doublyOwned += 1
                        if owners.doublyOwned <= Self.doublyOwnedListed {
                            report.problems.append("cluster \(cluster) is owned by blobs \(other) and \(id)")
                        }
                    } else {
                        owners.clusters[cluster] = id
                    }
                }
            }
        } catch { report.problems.append("blob \(id): \(error)") }
    }

    /// The persisted bitmaps against what the metadata says.
    mutating func checkBitmaps(_ block: SuperBlock, slot: Int, owners: Owners, roots: [BlobID: UInt32]) {
        // A load that reads chains on demand takes this count from the super block.
        if let recorded = block.metadataPagesInClusters {
            let counted = UInt64(owners.pages.keys.lazy.filter { block.metadataPageCluster($0) != nil }.count)
            if recorded != counted {
                report.problems.append("the super block records \(recorded) metadata pages in data clusters; the chains hold \(counted)")
            }
        }
        let bitmapStart = block.bitmaps.startPage + UInt64(block.activeCopy) * block.bitmaps.pageCount
        let bitmapRegionError = block.bitmapRegionError(slotOffset: UInt64(slot * pageBytes))
        if let bitmapRegionError { report.problems.append("\(bitmapRegionError)") }
        guard bitmapRegionError == nil, let raw = read(bitmapStart, block.bitmaps.pageCount) else { return }
        let (bitmaps, errors) = PersistedBitmaps.decode(raw, at: bitmapStart, block)
        report.problems += errors.map { "\($0)" }
        guard let bitmaps else { return }
        // What the metadata says is in use, as bitmaps, compared a word at a time.
        func inUse<K: BinaryInteger>(_ keys: some Sequence<K>, count: UInt64) -> Bitmap {
            var bitmap = Bitmap(count: count)
            for key in keys where UInt64(key) < count { bitmap.set(UInt64(key)) }
            return bitmap
        }
        let sections: [(String, Bitmap, Bitmap)] = [
            ("cluster", bitmaps.clusters, inUse(owners.clusters.keys, count: bitmaps.clusters.count)),
            ("metadata page", bitmaps.metadataPages, inUse(owners.pages.keys, count: bitmaps.metadataPages.count)),
            ("blob id", bitmaps.blobIDs, inUse(roots.keys.lazy.map(\.rawValue), count: bitmaps.blobIDs.count)),
        ]
        for (name, persisted, used) in sections {
            let (leaked, unmarked) = persisted.differences(from: used, listing: 5)
            if leaked.count > 0 {
                report.problems.append("\(leaked.count) \(name)s marked used but owned by nothing (first: \(leaked.first))")
            }
            if unmarked.count > 0 {
                report.problems.append("\(unmarked.count) \(name)s in use but free in the bitmap (first: \(unmarked.first))")
            }
        }
    }

    /// Counts the committed transactions after the checkpoint. They must apply to it (a
    /// load replays them): a record that contradicts it (a blob created twice, a cluster
    /// mapped twice) refuses every load.
    mutating func checkLog(_ block: SuperBlock) {
        let io = io, pageBytes = pageBytes
        let scan = LogScanner.scan(tailSequence: block.logTailSequence, logPages: block.log.pageCount,
                                   storeTag: block.storeID.0, firstLSN: block.checkpointLSN + 1) { sequence in
            let page = block.log.startPage + sequence % block.log.pageCount
            return (try BlobStore.readPages(io, at: page, count: 1), page * UInt64(pageBytes))
        }
        report.pendingTransactions = scan.transactions.count
        if report.problems.isEmpty, !scan.transactions.isEmpty {
            do throws(BlobStoreError) { _ = try BlobStore.load(io, readOnly: true) } catch {
                report.problems.append("the log after the checkpoint does not replay: \(error)")
            }
        }
    }
}

extension Verifier {
    /// Metadata pages `pageIDs` (those inside the device), read with every read in flight
    /// at once; empty when a read fails (the caller then reads page by page and reports).
    static func readPagesAhead(_ io: BdevSyncIO, _ block: SuperBlock, _ pageIDs: [UInt32]) -> [UInt32: ArraySlice<UInt8>] {
        let pageBytes = SuperBlock.pageBytes
        let capacityPages = io.geometry.capacityBytes / UInt64(pageBytes)
        let wanted = pageIDs.filter { UInt64($0) < block.metadataPageIDLimit && block.metadataPageAddress($0) < capacityPages }
        guard !wanted.isEmpty, let buffer = try? DMABuffer.allocate(bytes: wanted.count * pageBytes),
              let bytes = try? BlobStore.readMetadataPages(io, block, wanted, buffer: buffer) else { return [:] }
        var pages: [UInt32: ArraySlice<UInt8>] = [:]
        for (slot, pageID) in wanted.enumerated() { pages[pageID] = bytes[(slot * pageBytes)..<((slot + 1) * pageBytes)] }
        return pages
    }
}

extension BlobStore {
    /// The verifier over this store's device (its last checkpoint and the log after it).
    public func verify() -> VerifyReport { Verifier.verify(io) }
}
