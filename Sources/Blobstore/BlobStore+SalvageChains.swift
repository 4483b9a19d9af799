import Bdev
import Env

// Salvage (BlobStore+Salvage.swift): the chains the salvaged table names, walked as far as
// they read and adopted with their conflicts resolved.
extension BlobStore {
    /// One blob's chain as far as it reads.
    struct SalvageWalk {
        let id: BlobID
        var pages: [MetadataPage.Page] = []
        var ids: [UInt32] = []
        var next: UInt32?
        /// Why the walk stopped before the chain's end.
        var problem: String?
    }

    func walkChainsSalvaging(_ roots: [(id: BlobID, root: UInt32)]) throws(BlobStoreError) -> [SalvageWalk] {
        let buffer: DMABuffer
        do { buffer = try DMABuffer.allocate(bytes: Self.chainReadBatch * Self.pageBytes) } catch { throw .device(.system(error)) }
        let block = superBlock
        var claimed: [UInt32: BlobID] = [:]
        var result: [SalvageWalk] = []
        result.reserveCapacity(roots.count)
        for batchStart in stride(from: 0, to: roots.count, by: Self.chainReadBatch) {
            var walks = roots[batchStart..<min(roots.count, batchStart + Self.chainReadBatch)].map { SalvageWalk(id: $0.id, next: $0.root) }
            while true {
                var step: [Int] = []
                for index in walks.indices {
                    guard let pageID = walks[index].next else { continue }
                    guard UInt64(pageID) < block.metadataPageIDLimit else {
                        walks[index].problem = "blob \(walks[index].id): chain points at metadata page \(pageID), outside the store's \(block.metadataPageIDLimit)"
                        walks[index].next = nil
                        continue
                    }
                    step.append(index)
                }
                if step.isEmpty { break }
                let pageIDs = step.map { walks[$0].next! }
                let pages: [[UInt8]?]
                if let bytes = try? Self.readMetadataPages(io, block, pageIDs, buffer: buffer) {
                    pages = pageIDs.indices.map { Array(bytes[($0 * Self.pageBytes)..<(($0 + 1) * Self.pageBytes)]) }
                } else {
                    pages = pageIDs.map { try? readPages(at: block.metadataPageAddress($0), count: 1) }
                }
                for (slot, index) in step.enumerated() {
                    let pageID = pageIDs[slot]
                    let id = walks[index].id
                    let offset = block.metadataPageAddress(pageID) * UInt64(Self.pageBytes)
                    walks[index].next = nil
                    if let owner = claimed[pageID] {
                        walks[index].problem = "blob \(id): metadata page \(pageID) at byte \(offset) is in the chain of blob \(owner)"
                        continue
                    }
                    guard let bytes = pages[slot] else {
                        walks[index].problem = "blob \(id): metadata page \(pageID) at byte \(offset): the device cannot read it"
                        continue
                    }
                    let page: MetadataPage.Page
                    do throws(FormatError) { page = try MetadataPage.decodePage(bytes[...], offset: offset, pageID: pageID) } catch {
                        walks[index].problem = "blob \(id): \(error)"
                        continue
                    }
                    let position = walks[index].pages.count
                    if page.blobID != id {
                        walks[index].problem = "blob \(id): metadata page \(pageID) at byte \(offset + 8) belongs to blob \(page.blobID)"
                    } else if page.chainIndex != UInt32(truncatingIfNeeded: position) {
                        walks[index].problem = "blob \(id): metadata page \(pageID) at byte \(offset + 16) is page \(page.chainIndex) of a chain, where page \(position) was expected"
                    } else if page.checkpointSequence > block.sequence {
                        walks[index].problem = "blob \(id): metadata page \(pageID) at byte \(offset + 24) was written by checkpoint \(page.checkpointSequence), after this super block's \(block.sequence) (the page was reused)"
                    } else {
                        claimed[pageID] = id
                        walks[index].pages.append(page)
                        walks[index].ids.append(pageID)
                        walks[index].next = page.nextPage
                    }
                }
            }
            result += walks
        }
        return result
    }

    /// Decodes each walk into its blob (cut to the pages that decode together), takes
    /// ownership of pages and clusters with conflicts resolved, and installs the result.
    func adoptSalvaged(_ walks: [SalvageWalk], report: inout SalvageReport) {
        var kept: [(blob: BlobMetadata, chain: [UInt32])] = []
        for walk in walks {
            guard let salvaged = decodeSalvaged(walk, report: &report) else { continue }
            kept.append(salvaged)
        }
        let metadataClusters = claimSalvagedMetadataPages(kept)
        var contested: Set<UInt64> = []
        for (blob, _) in kept {
            for extent in blob.extents {
                for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) {
                    if clusters[cluster] { contested.insert(cluster) } else { clusters.set(cluster) }
                }
            }
        }
        if !contested.isEmpty {
            unmapContested(contested, from: &kept, metadataClusters: metadataClusters, report: &report)
        }
        for (blob, chain) in kept {
            blobs[blob.id] = blob
            durableChains[blob.id] = chain
            blobIDs.set(blob.id.rawValue)
            if report.affectedBlobs.contains(blob.id) { markRewritten(blob.id) }
        }
        if let superBlob = superBlock.superBlobID, blobs[superBlob] == nil {
            superBlock.superBlobID = nil
            report.changes.append(RepairChange("super_blob", blob: superBlob, "super blob \(superBlob) is gone: the store names none"))
        }
    }

    /// The blob of `walk`'s longest prefix of pages that decodes together, with that
    /// prefix; nil (reported as removed) when none does.
    private func decodeSalvaged(_ walk: SalvageWalk, report: inout SalvageReport) -> (blob: BlobMetadata, chain: [UInt32])? {
        var keep = walk.pages.count
        var problem = walk.problem
        var blob: BlobMetadata?
        while keep > 0 {
            let ids = Array(walk.ids[0..<keep])
            let offsets = ids.map { superBlock.metadataPageAddress($0) * UInt64(Self.pageBytes) }
            do throws(FormatError) {
                blob = try MetadataPage.decodeBlob(Array(walk.pages[0..<keep]), pageIDs: ids, offsets: offsets,
                                                   clusterLimit: superBlock.clusterCount)
                break
            } catch {
                // The page the error names goes, with those after it.
                problem = "blob \(walk.id): \(error)"
                if let page = offsets.firstIndex(where: { $0 <= error.offset && error.offset < $0 + UInt64(Self.pageBytes) }),
                   page < keep - 1 {
                    keep = page
                } else {
                    keep -= 1
                }
            }
        }
        guard let blob else {
            report.removedBlobs.insert(walk.id)
            report.affectedBlobs.insert(walk.id)
            report.changes.append(RepairChange("blob_removed", blob: walk.id,
                "\(problem ?? "blob \(walk.id): no readable metadata"): the blob is removed from the table; its clusters and metadata pages are free"))
            return nil
        }
        if let problem {
            report.affectedBlobs.insert(walk.id)
            let mapped = blob.extents.reduce(UInt64(0)) { $0 + UInt64($1.count) }
            report.changes.append(RepairChange("blob_cut", blob: walk.id,
                "\(problem): the blob keeps what its first \(keep) metadata page\(keep == 1 ? "" : "s") hold (\(blob.clusterCount) clusters of size, \(mapped) mapped, \(blob.xattrs.count) xattrs, \(blob.internalXattrs.count) internal xattrs); what the rest held is lost and its chain is rewritten"))
        }
        return (blob, Array(walk.ids[0..<keep]))
    }

    /// Metadata pages first: a cluster holding a live chain page is the chain's. Returns
    /// those clusters.
    private func claimSalvagedMetadataPages(_ kept: [(blob: BlobMetadata, chain: [UInt32])]) -> Set<UInt64> {
        var metadataClusters: Set<UInt64> = []
        for (_, chain) in kept {
            for page in chain {
                if let cluster = superBlock.metadataPageCluster(page) {
                    clusters.set(cluster)
                    metadataClusters.insert(cluster)
                    metadataPagesInClusterCount += 1
                } else {
                    metadataPageBits.set(UInt64(page))
                }
            }
        }
        return metadataClusters
    }

    /// Clusters claimed twice (`contested`) are unmapped from every blob that maps them,
    /// and free unless a chain page is in them; each blob that lost some is reported.
    private func unmapContested(_ contested: Set<UInt64>, from kept: inout [(blob: BlobMetadata, chain: [UInt32])],
                                metadataClusters: Set<UInt64>, report: inout SalvageReport) {
        var claimants: [UInt64: [BlobID]] = [:]
        for index in kept.indices {
            var blob = kept[index].blob
            var lost: [UInt64] = []
            blob.extents = blob.extents.flatMap { Self.pieces(of: $0, without: contested, lost: &lost) }
            guard !lost.isEmpty else { continue }
            for cluster in lost { claimants[cluster, default: []].append(blob.id) }
            kept[index].blob = blob
        }
        for cluster in contested where !metadataClusters.contains(cluster) { clusters.clear(cluster) }
        var byBlob: [BlobID: [UInt64]] = [:]
        for (cluster, owners) in claimants { for owner in owners { byBlob[owner, default: []].append(cluster) } }
        for (id, lost) in byBlob.sorted(by: { $0.key < $1.key }) {
            let sorted = lost.sorted()
            let others = Set(sorted.flatMap { cluster in
                (claimants[cluster] ?? []).filter { $0 != id }.map { "blob \($0)" } + (metadataClusters.contains(cluster) ? ["a metadata page"] : [])
            }).sorted()
            report.affectedBlobs.insert(id)
            report.changes.append(RepairChange("clusters_unmapped", blob: id,
                "blob \(id): \(sorted.count) cluster\(sorted.count == 1 ? "" : "s") it maps \(sorted.count == 1 ? "is" : "are") also claimed by \(others.joined(separator: ", ")) — unmapped from every blob (\(sorted.count == 1 ? "it reads" : "they read") as zeros): \(sorted.prefix(32).map(String.init).joined(separator: ", "))\(sorted.count > 32 ? ", …" : "")"))
        }
    }

    /// `extent` without the clusters in `removed` (appended to `lost`), as the extents of
    /// what remains.
    private static func pieces(of extent: Extent, without removed: Set<UInt64>, lost: inout [UInt64]) -> [Extent] {
        var pieces: [Extent] = []
        var start: UInt64?
        for offset in 0..<UInt64(extent.count) {
            let cluster = extent.firstCluster + offset
            if removed.contains(cluster) {
                lost.append(cluster)
                if let first = start {
                    pieces.append(Extent(clusterIndex: extent.clusterIndex + first, count: UInt32(offset - first),
                                         firstCluster: extent.firstCluster + first))
                    start = nil
                }
            } else if start == nil {
                start = offset
            }
        }
        if let first = start {
            pieces.append(Extent(clusterIndex: extent.clusterIndex + first, count: UInt32(UInt64(extent.count) - first),
                                 firstCluster: extent.firstCluster + first))
        }
        return pieces
    }

    /// The next checkpoint writes the blob's chain afresh (as after a change by a record).
    func markRewritten(_ id: BlobID) {
        dirtyBlobs.insert(id)
        guard blobs[id] != nil, countedDirty.insert(id).inserted else { return }
        dirtyChainPages += chainPagesEstimate(id)
    }
}
