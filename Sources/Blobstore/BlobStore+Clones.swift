import Bdev

// Snapshots and clones, with SPDK's semantics (FORMAT.md, "Snapshots and clones").
//
// A snapshot takes a blob's clusters and becomes read-only; the blob becomes its clone:
// it maps nothing of its own, and each cluster it does not map reads from its parent
// (up the chain of parents, within each blob's backed count). A write to such a cluster
// copies it first (`write`). A cluster is owned by exactly one blob, always, so the
// allocator, the bitmaps, the verifier and discard know nothing of sharing; what is shared
// is read through the parent links. Deleting a snapshot with one clone merges it into
// that clone; with more, it is refused.
extension BlobStore {
    // MARK: - Queries

    /// The snapshot blob `id` is a clone of.
    public func parent(of id: BlobID) -> BlobID? { blobs[id]?.parent }

    /// The blobs that are clones of `id`, sorted.
    public func clones(of id: BlobID) -> [BlobID] { (cloneSet(id) ?? []).sorted() }

    /// Device cluster that blob cluster `index` reads from: the blob's own, else its
    /// parent's within the backed count, up the chain; nil: the cluster reads as zeros.
    func resolvedCluster(_ blob: BlobMetadata, _ index: UInt64) -> UInt64? {
        if let own = physicalCluster(blob, index) { return own }
        var limit = blob.backedClusters
        var next = blob.parent
        while let id = next, index < limit, let ancestor = blobs[id] {
            if let cluster = physicalCluster(ancestor, index) { return cluster }
            limit = min(limit, ancestor.backedClusters)
            next = ancestor.parent
        }
        return nil
    }

    /// Whether any of blob clusters [from, to) holds data: its own or one it reads from a parent.
    public func hasData(_ id: BlobID, from: UInt64, to: UInt64) -> Bool {
        guard let blob = blobs[id], to > from else { return false }
        func overlaps<C: RandomAccessCollection<Extent>>(_ extents: C) -> Bool where C.Index == Int {
            // First extent that ends after `from` (sorted, disjoint), then whether it starts before `to`.
            var low = extents.startIndex, high = extents.endIndex
            while low < high {
                let middle = (low + high) / 2
                if extents[middle].clusterIndex + UInt64(extents[middle].count) <= from { low = middle + 1 } else { high = middle }
            }
            return low < extents.endIndex && extents[low].clusterIndex < to
        }
        if overlaps(blob.extents) { return true }
        guard blob.parent != nil else { return false }
        // Shared clusters under own ones read the own ones: both hold data either way.
        return overlaps(ancestorView(blob))
    }

    /// Every cluster of blob `id` that holds data, its own and those it reads from its
    /// ancestors, sorted by cluster index.
    public func dataExtents(_ id: BlobID) -> [Extent] {
        guard let blob = blobs[id] else { return [] }
        guard blob.parent != nil else { return blob.extents }
        return (blob.extents + sharedExtents(blob)).sorted { $0.clusterIndex < $1.clusterIndex }
    }

    /// How many clusters of blob `id` hold data, its own and those it reads from its
    /// ancestors (st_blocks): one walk over the two sorted maps, nothing allocated.
    public func dataClusterCount(_ id: BlobID) -> UInt64 {
        guard let blob = blobs[id] else { return 0 }
        let own = blob.extents
        var total = own.reduce(UInt64(0)) { $0 + UInt64($1.count) }
        guard blob.parent != nil else { return total }
        var next = 0  // first own extent that may overlap the current shared one
        for extent in ancestorView(blob) {
            let start = extent.clusterIndex, end = start + UInt64(extent.count)
            while next < own.count, own[next].clusterIndex + UInt64(own[next].count) <= start { next += 1 }
            var covered: UInt64 = 0
            var index = next
            while index < own.count, own[index].clusterIndex < end {
                let lower = max(start, own[index].clusterIndex)
                let upper = min(end, own[index].clusterIndex + UInt64(own[index].count))
                covered += upper - lower
                index += 1
            }
            total += UInt64(extent.count) - covered
        }
        return total
    }

    /// What a clone reads from its ancestors, under its own extents too (a lookup tries
    /// its own first): cached per parent and backed count (`ancestorViews`). Handles hold it.
    func ancestorView(_ blob: BlobMetadata) -> ContiguousArray<Extent> {
        guard let parent = blob.parent, blob.backedClusters > 0 else { return [] }
        let key = AncestorKey(parent: parent, backed: blob.backedClusters)
        if let view = ancestorViews[key] { return view }
        var covered: [Range<UInt64>] = []
        var result: ContiguousArray<Extent> = []
        var limit = blob.backedClusters
        var next: BlobID? = parent
        var depth = 0
        while let id = next, limit > 0, let ancestor = blobs[id], depth <= blobs.count {
            var found: [Range<UInt64>] = []
            for extent in ancestor.extents where extent.clusterIndex < limit {
                let end = min(limit, extent.clusterIndex + UInt64(extent.count))
                for piece in Self.subtract(covered, from: extent.clusterIndex..<end) {
                    result.append(Extent(clusterIndex: piece.lowerBound, count: UInt32(piece.count),
                                         firstCluster: extent.firstCluster + (piece.lowerBound - extent.clusterIndex)))
                    found.append(piece)
                }
            }
            if !found.isEmpty { covered = Self.union(covered, found) }
            limit = min(limit, ancestor.backedClusters)
            next = ancestor.parent
            depth += 1
        }
        result.sort { $0.clusterIndex < $1.clusterIndex }
        ancestorViews[key] = result
        return result
    }

    /// The extents blob `blob` reads from its ancestors (clusters it does not map, within
    /// the backed counts), sorted by cluster index.
    func sharedExtents(_ blob: BlobMetadata) -> [Extent] {
        let view = ancestorView(blob)
        guard !view.isEmpty else { return [] }
        let own = blob.extents.map { $0.clusterIndex..<($0.clusterIndex + UInt64($0.count)) }
        var result: [Extent] = []
        for extent in view {
            for piece in Self.subtract(own, from: extent.clusterIndex..<(extent.clusterIndex + UInt64(extent.count))) {
                result.append(slice(extent, piece))
            }
        }
        return result
    }

    /// Two sorted lists of disjoint ranges, disjoint from each other, merged in order.
    static func union(_ a: [Range<UInt64>], _ b: [Range<UInt64>]) -> [Range<UInt64>] {
        var result: [Range<UInt64>] = []
        result.reserveCapacity(a.count + b.count)
        var i = 0, j = 0
        while i < a.count || j < b.count {
            if j == b.count || (i < a.count && a[i].lowerBound < b[j].lowerBound) {
                result.append(a[i]); i += 1
            } else {
                result.append(b[j]); j += 1
            }
        }
        return result
    }

    /// `range` minus the sorted, disjoint `ranges`.
    static func subtract(_ ranges: [Range<UInt64>], from range: Range<UInt64>) -> [Range<UInt64>] {
        var pieces: [Range<UInt64>] = []
        var cursor = range.lowerBound
        // First range that ends after the start (binary search: ranges are sorted and disjoint).
        var low = 0, high = ranges.count
        while low < high {
            let middle = (low + high) / 2
            if ranges[middle].upperBound <= cursor { low = middle + 1 } else { high = middle }
        }
        var index = low
        while cursor < range.upperBound {
            guard index < ranges.count, ranges[index].lowerBound < range.upperBound else {
                pieces.append(cursor..<range.upperBound)
                break
            }
            if ranges[index].lowerBound > cursor { pieces.append(cursor..<ranges[index].lowerBound) }
            cursor = max(cursor, ranges[index].upperBound)
            index += 1
        }
        return pieces
    }

    // MARK: - Operations (each one durable transaction, or a copy followed by one)

    /// Makes a snapshot of blob `id` (SPDK's create_snapshot): a new read-only blob takes
    /// its clusters, and `id` becomes the snapshot's clone, reading them through it until
    /// it writes its own. Returns the snapshot's id. A snapshot, or a blob with clones,
    /// cannot be snapshotted.
    @discardableResult
    public func snapshotBlob(_ id: BlobID, xattrs: [(name: String, value: [UInt8])] = []) throws(BlobStoreError) -> BlobID {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        guard !blob.isSnapshot else { throw .snapshotReadOnly(id) }
        try enableClones()
        let snapshot = try transaction { (tx) throws(BlobStoreError) -> BlobID in
            let snapshot = try tx.snapshot(id)
            for (name, value) in xattrs { try tx.setXattr(snapshot, name: name, value: value) }
            return snapshot
        }
        precondition(blobs[id]!.parent == snapshot && blobs[id]!.extents.isEmpty && blobs[snapshot]!.isSnapshot,
                     "snapshotBlob: \(id) maps nothing and reads through snapshot \(snapshot)")
        return snapshot
    }

    /// A new thin clone of snapshot `snapshot` (SPDK's create_clone), of the snapshot's size.
    @discardableResult
    public func cloneBlob(_ snapshot: BlobID, xattrs: [(name: String, value: [UInt8])] = []) throws(BlobStoreError) -> BlobID {
        try enableClones()
        let clone = try transaction { (tx) throws(BlobStoreError) -> BlobID in
            let clone = try tx.createClone(of: snapshot)
            for (name, value) in xattrs { try tx.setXattr(clone, name: name, value: value) }
            return clone
        }
        precondition(blobs[clone]?.parent == snapshot && cloneSet(snapshot)?.contains(clone) == true,
                     "cloneBlob: \(clone) is a clone of \(snapshot)")
        return clone
    }

    /// Copies into blob `id` every cluster it reads from its ancestors and then drops its
    /// parent (SPDK's inflate, except that clusters no ancestor maps stay thin: they read
    /// as zeros either way). The copy goes before the one commit that drops the parent, so
    /// a crash part way leaves a clone that reads the same.
    public func inflateBlob(_ id: BlobID) throws(BlobStoreError) {
        try copyShared(id, upTo: nil)
        guard blobs[id]?.parent != nil else { return }
        try commit([.setParent(id: id, parent: nil, backedClusters: 0)])
        precondition(blobs[id]?.parent == nil, "inflateBlob: \(id) has no parent")
    }

    /// Copies into blob `id` the clusters its parent maps and then makes the parent's
    /// parent its own (SPDK's decouple_parent): the blob no longer depends on its parent.
    public func decoupleParent(_ id: BlobID) throws(BlobStoreError) {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        guard let parentID = blob.parent, let parent = blobs[parentID] else { return }
        try copyShared(id, upTo: parentID)
        let after = blobs[id]!
        let backed = parent.parent == nil ? 0 : min(after.backedClusters, parent.backedClusters)
        try commit([.setParent(id: id, parent: parent.parent, backedClusters: backed)])
        precondition(blobs[id]?.parent == parent.parent, "decoupleParent: \(id) reads through \(String(describing: parent.parent))")
    }

    /// Writes into blob `id` the clusters it reads from its ancestors (only from `upTo`
    /// itself when given), in runs of up to 256 clusters.
    private func copyShared(_ id: BlobID, upTo onlyFrom: BlobID?) throws(BlobStoreError) {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        guard !blob.isSnapshot else { throw .snapshotReadOnly(id) }
        var ranges: [Range<UInt64>]
        if let onlyFrom, let parent = blobs[onlyFrom] {
            // What the parent itself maps, within the backed count, where the blob maps nothing.
            let own = blob.extents.map { $0.clusterIndex..<($0.clusterIndex + UInt64($0.count)) }
            ranges = parent.extents.filter { $0.clusterIndex < blob.backedClusters }.flatMap { extent in
                Self.subtract(own, from: extent.clusterIndex..<min(blob.backedClusters, extent.clusterIndex + UInt64(extent.count)))
            }
        } else {
            ranges = sharedExtents(blob).map { $0.clusterIndex..<($0.clusterIndex + UInt64($0.count)) }
        }
        try forEachRun(of: ranges, within: 0..<blob.clusterCount) { (index, count) throws(BlobStoreError) in
            let units = UInt64(clusterSizeBytes / ioUnitBytes)
            try write(blob: id, offsetUnits: index * units, data: try read(blob: id, offsetUnits: index * units, countUnits: count * units))
        }
    }

    /// Calls `body` with each piece of `ranges` (cluster ranges) inside `window`, at most
    /// 256 clusters at a time: the copies and zero writes of clones go through `write`,
    /// one allocating write each.
    func forEachRun(of ranges: [Range<UInt64>], within window: Range<UInt64>,
                    _ body: (UInt64, UInt64) throws(BlobStoreError) -> Void) throws(BlobStoreError) {
        for range in ranges {
            var index = max(window.lowerBound, range.lowerBound)
            let end = min(window.upperBound, range.upperBound)
            while index < end {
                let count = min(end - index, 256)
                try body(index, count)
                index += count
            }
        }
    }

    /// The first blob up the parent chain from `start` (itself included) for which
    /// `matches` holds; nil when none does, or when the chain loops without one doing
    /// (a walk never takes more steps than there are blobs).
    func firstAncestor(from start: BlobID?, where matches: (BlobID) -> Bool) -> BlobID? {
        var next = start
        var steps = 0
        while let id = next, steps <= blobs.count {
            if matches(id) { return id }
            next = blobs[id]?.parent
            steps += 1
        }
        return nil
    }

    /// Whether the parent chain from `start` comes to `id`, or loops.
    func chainReaches(_ id: BlobID, from start: BlobID?) -> Bool {
        firstAncestor(from: start, where: { $0 == id }) != nil || chainLoops(from: start)
    }

    private func chainLoops(from start: BlobID?) -> Bool {
        var seen: Set<BlobID> = []
        var next = start
        while let id = next {
            guard seen.insert(id).inserted else { return true }
            next = blobs[id]?.parent
        }
        return false
    }

    /// Stores formatted before snapshots existed get the feature bit (a checkpoint writes
    /// it) before their first snapshot or clone record.
    func enableClones() throws(BlobStoreError) {
        guard superBlock.incompatibleFeatures & SuperBlock.Features.clones == 0 else { return }
        guard !refusesChanges else { throw .readOnly }
        superBlock.incompatibleFeatures |= SuperBlock.Features.clones
        try checkpoint(clean: false)
    }

    // MARK: - Applying the records (BlobStore+Apply.swift calls these)

    /// `.snapshot(id, snapshotID)`; nil when applied, else what is wrong.
    func applySnapshot(_ id: BlobID, _ snapshotID: BlobID) -> String? {
        ancestorViews.removeAll()
        guard var source = blobs[id] else { return "no such blob" }
        guard superBlock.covers(snapshotID), blobs[snapshotID] == nil else { return "snapshot id in use or out of range" }
        guard !source.isSnapshot, cloneSet(id) == nil else { return "the blob is a snapshot or has clones" }
        let snapshot = BlobMetadata(id: snapshotID, clusterCount: source.clusterCount,
                                    flags: BlobFlags(readOnlyData: BlobFlags.snapshot), extents: source.extents,
                                    parent: source.parent, backedClusters: source.backedClusters)
        if let parent = source.parent {
            unlinkClone(id, from: parent)
            clones[parent, default: []].insert(snapshotID)
        }
        source.extents = []
        source.parent = snapshotID
        source.backedClusters = source.clusterCount
        clones[snapshotID] = [id]
        blobs[snapshotID] = snapshot
        blobIDs.set(snapshotID.rawValue)
        blobs[id] = source
        return nil
    }

    /// `.setParent(id, parent, backed)`.
    func applySetParent(_ id: BlobID, _ parent: BlobID?, _ backed: UInt64) -> String? {
        ancestorViews.removeAll()
        guard var blob = blobs[id] else { return "no such blob" }
        guard backed <= blob.clusterCount else { return "backed clusters beyond the blob" }
        if let parent {
            guard let snapshot = blobs[parent], snapshot.isSnapshot else { return "the parent is not a snapshot" }
            // No cycle: the new parent does not read through this blob.
            guard !chainReaches(id, from: parent) else { return "the parent reads through the blob (a cycle)" }
        }
        if let old = blob.parent { unlinkClone(id, from: old) }
        if let parent { clones[parent, default: []].insert(id) }
        blob.parent = parent
        blob.backedClusters = parent == nil ? 0 : backed
        blobs[id] = blob
        return nil
    }

    /// `.mergeIntoChild(id, child)`: the clusters the child reads from snapshot `id`
    /// move to it, the snapshot's others are released, the child takes its parent, and
    /// the snapshot is deleted.
    func applyMerge(_ id: BlobID, into child: BlobID) -> String? {
        ancestorViews.removeAll()
        guard let snapshot = blobs[id], var clone = blobs[child] else { return "no such blob" }
        guard clone.parent == id, cloneSet(id) == [child] else { return "the child is not the snapshot's only clone" }
        let owned = clone.extents.map { $0.clusterIndex..<($0.clusterIndex + UInt64($0.count)) }
        var moved: [Extent] = []
        for extent in snapshot.extents {
            let end = extent.clusterIndex + UInt64(extent.count)
            var kept: [Range<UInt64>] = []
            if extent.clusterIndex < clone.backedClusters {
                kept = Self.subtract(owned, from: extent.clusterIndex..<min(end, clone.backedClusters))
            }
            var cursor = extent.clusterIndex
            for piece in kept {
                if piece.lowerBound > cursor { release(slice(extent, cursor..<piece.lowerBound)) }
                moved.append(slice(extent, piece))
                cursor = piece.upperBound
            }
            if cursor < end { release(slice(extent, cursor..<end)) }
        }
        clone.extents = Self.merged((clone.extents + moved).sorted { $0.clusterIndex < $1.clusterIndex })
        clone.parent = snapshot.parent
        clone.backedClusters = snapshot.parent == nil ? 0 : min(clone.backedClusters, snapshot.backedClusters)
        clones[id] = nil
        if let grandparent = snapshot.parent {
            unlinkClone(id, from: grandparent)
            clones[grandparent, default: []].insert(child)
        }
        blobs[child] = clone
        blobs[id] = nil
        blobIDs.clear(id.rawValue)
        if superBlock.superBlobID == id { superBlock.superBlobID = nil }
        return nil
    }

    func slice(_ extent: Extent, _ range: Range<UInt64>) -> Extent {
        Extent(clusterIndex: range.lowerBound, count: UInt32(range.count),
               firstCluster: extent.firstCluster + (range.lowerBound - extent.clusterIndex))
    }

    func unlinkClone(_ id: BlobID, from parent: BlobID) {
        clones[parent]?.remove(id)
        if clones[parent]?.isEmpty == true { clones[parent] = nil }
    }

    /// Gives the handles of `id` and of every blob that reads through it their new view.
    func refreshHandles(ofCloneTree id: BlobID) {
        if let handles = openHandles[id], let blob = blobs[id] {
            let shared = ancestorView(blob)
            for handle in handles { handle.update(blob, shared: shared, releasing: nil) }
        }
        for clone in cloneSet(id) ?? [] { refreshHandles(ofCloneTree: clone) }
    }

    /// The clones of `id` (nil: none). Only a snapshot has clones; when `clones` is
    /// partial (chains read on demand) the first question about a snapshot reads every
    /// chain and builds it whole. A chain that cannot be read leaves the store refusing
    /// changes (`chainReadFailure`), so an answer missing a clone commits nothing.
    func cloneSet(_ id: BlobID) -> Set<BlobID>? {
        if !clonesComplete {
            guard blobs[id]?.isSnapshot == true else { return nil }
            // The rebuild walks every blob: all of them in memory until it is done.
            blobs.suspendEviction()
            defer { blobs.resumeEviction() }
            do throws(BlobStoreError) {
                try readEveryChain()
                try rebuildCloneIndex()
            } catch {
                chainReadFailed(error, "the clones of snapshot \(id)")
                return clones[id]
            }
        }
        return clones[id]
    }

    /// Salvage: builds `clones`, dropping parent links to a blob that is gone or not a
    /// snapshot, and links that loop (the blob then reads its own clusters only).
    func salvageCloneLinks(report: inout SalvageReport) {
        clones = [:]
        clonesComplete = true
        ancestorViews = [:]
        for id in blobs.ids.sorted() {
            guard let parent = blobs[id]!.parent else { continue }
            var why: String?
            if blobs[parent]?.isSnapshot != true {
                why = "its parent \(parent) is gone or not a snapshot"
            } else if chainReaches(id, from: parent) {
                why = "its parents loop back to it"
            }
            guard let why else {
                clones[parent, default: []].insert(id)
                continue
            }
            blobs[id]!.parent = nil
            blobs[id]!.backedClusters = 0
            markRewritten(id)
            report.affectedBlobs.insert(id)
            report.changes.append(RepairChange("parent_dropped", blob: id,
                "blob \(id): \(why): it reads its own clusters only (the shared ones read as zeros)"))
        }
    }

    /// Salvage: a blob reads through its ancestors, so it is affected when any of them is.
    func affectClonesOfAffected(_ report: inout SalvageReport) {
        let affected = report.affectedBlobs
        for (id, blob) in blobs where firstAncestor(from: blob.parent, where: affected.contains) != nil {
            report.affectedBlobs.insert(id)
        }
    }

    /// Builds `clones` from the loaded blobs' parent links and checks them: every parent
    /// exists and is a snapshot, and no chain of parents loops.
    func rebuildCloneIndex() throws(BlobStoreError) {
        clones = [:]
        clonesComplete = true
        ancestorViews = [:]
        for (id, blob) in blobs {
            guard let parent = blob.parent else { continue }
            guard let snapshot = blobs[parent], snapshot.isSnapshot else {
                throw .corrupt("blob \(id) is a clone of \(parent), which is not a snapshot")
            }
            clones[parent, default: []].insert(id)
        }
        for (id, blob) in blobs where chainReaches(id, from: blob.parent) {
            throw .corrupt("blob \(id) reads through itself (a cycle of parents)")
        }
    }
}

extension BlobTransaction {
    // What the transaction's earlier records make of the clone relation.

    public func parentInTransaction(_ id: BlobID) -> BlobID? {
        if let overlay = parents[id] { return overlay }
        return created.contains(id) ? nil : store.blobs[id]?.parent
    }

    public func clonesInTransaction(_ id: BlobID) -> Set<BlobID> {
        cloneSets[id] ?? (created.contains(id) ? [] : store.cloneSet(id) ?? [])
    }

    public func isSnapshotInTransaction(_ id: BlobID) -> Bool {
        snapshotsMade.contains(id) || (!created.contains(id) && store.blobs[id]?.isSnapshot == true)
    }

    public func sizeInTransaction(_ id: BlobID) -> UInt64 {
        sizes[id] ?? (created.contains(id) ? 0 : store.blobs[id]?.clusterCount ?? 0)
    }

    /// Records that `id` now reads through `parent` (nil: nothing).
    mutating func link(_ id: BlobID, to parent: BlobID?) {
        if let old = parentInTransaction(id) {
            var set = clonesInTransaction(old)
            set.remove(id)
            cloneSets[old] = set
        }
        if let parent {
            var set = clonesInTransaction(parent)
            set.insert(id)
            cloneSets[parent] = set
        }
        parents[id] = .some(parent)
    }

    /// A snapshot of blob `id` (see `BlobStore.snapshotBlob`); its id is usable in later records.
    public mutating func snapshot(_ id: BlobID) throws(BlobStoreError) -> BlobID {
        try require(id)
        guard !isSnapshotInTransaction(id) else { throw .snapshotReadOnly(id) }
        let clones = clonesInTransaction(id)
        guard clones.isEmpty else { throw .hasClones(blob: id, count: clones.count) }
        let snapshot = try newBlobID()
        records.append(.snapshot(id: id, snapshot: snapshot))
        snapshotsMade.insert(snapshot)
        sizes[snapshot] = sizeInTransaction(id)
        link(snapshot, to: parentInTransaction(id))
        link(id, to: snapshot)
        return snapshot
    }

    /// A new thin clone of snapshot `snapshot`, of its size.
    public mutating func createClone(of snapshot: BlobID) throws(BlobStoreError) -> BlobID {
        try require(snapshot)
        guard isSnapshotInTransaction(snapshot) else { throw .invalidArgument("blob \(snapshot) is not a snapshot") }
        let size = sizeInTransaction(snapshot)
        let clone = try createBlob(clusterCount: size)
        try setParent(clone, parent: snapshot, backedClusters: size)
        return clone
    }

    /// Makes blob `id` a clone of snapshot `parent` (nil: of nothing), its first
    /// `backedClusters` clusters backed by it. `id` may not be a snapshot or have clones.
    public mutating func setParent(_ id: BlobID, parent: BlobID?, backedClusters: UInt64) throws(BlobStoreError) {
        try require(id)
        guard !isSnapshotInTransaction(id), clonesInTransaction(id).isEmpty else { throw .snapshotReadOnly(id) }
        if let parent {
            try require(parent)
            guard isSnapshotInTransaction(parent) else { throw .invalidArgument("blob \(parent) is not a snapshot") }
        }
        guard backedClusters <= sizeInTransaction(id) else {
            throw .invalidArgument("blob \(id): \(backedClusters) backed clusters beyond its \(sizeInTransaction(id))")
        }
        link(id, to: parent)
        records.append(.setParent(id: id, parent: parent, backedClusters: parent == nil ? 0 : backedClusters))
    }

    /// Deletes snapshot `id` by merging it into its only clone `child`.
    public mutating func mergeIntoChild(_ id: BlobID, child: BlobID) throws(BlobStoreError) {
        try require(id)
        try require(child)
        guard isSnapshotInTransaction(id), clonesInTransaction(id) == [child], parentInTransaction(child) == id else {
            throw .invalidArgument("blob \(child) is not the only clone of snapshot \(id)")
        }
        link(child, to: parentInTransaction(id))
        link(id, to: nil)
        cloneSets[id] = []
        created.remove(id)
        deleted.insert(id)
        records.append(.mergeIntoChild(id: id, child: child))
    }
}
