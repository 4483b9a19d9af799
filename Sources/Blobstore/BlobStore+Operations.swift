import Bdev

extension BlobStore {
    // MARK: - Metadata operations (each one durable transaction)

    /// Creates a blob of `clusterCount` clusters, all unallocated (thin).
    @discardableResult
    public func createBlob(clusterCount: UInt64 = 0, xattrs: [(name: String, value: [UInt8])] = []) throws(BlobStoreError) -> BlobID {
        guard let free = blobIDs.firstClear() else { throw .noSpace("all \(superBlock.blobIDLimit) blob ids are in use") }
        let id = BlobID(rawValue: free)
        for (name, value) in xattrs { try Self.validateXattr(name, value) }
        var records: [LogRecord] = [.createBlob(id: id)]
        if clusterCount > 0 { records.append(.resizeBlob(id: id, clusterCount: clusterCount)) }
        records += xattrs.map { .setXattr(id: id, internal: false, name: $0.name, value: $0.value) }
        try commit(records)
        precondition(blobs[id]?.clusterCount == clusterCount && blobIDs[id.rawValue], "createBlob: blob \(id) exists, thin, its id taken")
        return id
    }

    /// Deletes a blob. A snapshot with one clone is merged into it (the clusters the clone
    /// reads from it become the clone's); with more clones it is refused.
    public func deleteBlob(_ id: BlobID) throws(BlobStoreError) {
        guard blobs[id] != nil else { throw .noSuchBlob(id) }
        let clones = cloneSet(id) ?? []
        guard clones.count <= 1 else { throw .hasClones(blob: id, count: clones.count) }
        try commit([clones.first.map { .mergeIntoChild(id: id, child: $0) } ?? .deleteBlob(id: id)])
        precondition(blobs[id] == nil, "deleteBlob: blob \(id) is gone")
    }

    /// Grows (thin) or shrinks (releasing clusters past the new end) a blob.
    public func resizeBlob(_ id: BlobID, clusterCount: UInt64) throws(BlobStoreError) {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        guard !blob.isSnapshot else { throw .snapshotReadOnly(id) }
        guard clusterCount <= UInt64(UInt32.max) * 16 else { throw .invalidArgument("blob size \(clusterCount) clusters") }
        try commit([.resizeBlob(id: id, clusterCount: clusterCount)])
        precondition(blobs[id]?.clusterCount == clusterCount, "resizeBlob: blob \(id) has \(clusterCount) clusters")
        assert(blobs[id]!.extents.allSatisfy { $0.clusterIndex + UInt64($0.count) <= clusterCount },
               "resizeBlob: no extent past the end")
    }

    public func setXattr(_ id: BlobID, name: String, value: [UInt8], isInternal: Bool = false) throws(BlobStoreError) {
        guard blobs[id] != nil else { throw .noSuchBlob(id) }
        try Self.validateXattr(name, value)
        try commit([.setXattr(id: id, internal: isInternal, name: name, value: value)])
        assert(xattr(id, name: name, isInternal: isInternal) == value, "setXattr: the value reads back")
    }

    /// Removes an xattr; false when the blob had none of that name.
    @discardableResult
    public func removeXattr(_ id: BlobID, name: String, isInternal: Bool = false) throws(BlobStoreError) -> Bool {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        guard (isInternal ? blob.internalXattrs : blob.xattrs).contains(name: name) else { return false }
        try commit([.removeXattr(id: id, internal: isInternal, name: name)])
        assert(xattr(id, name: name, isInternal: isInternal) == nil, "removeXattr: the name is gone")
        return true
    }

    public func xattr(_ id: BlobID, name: String, isInternal: Bool = false) -> [UInt8]? {
        guard let blob = blobs[id] else { return nil }
        return (isInternal ? blob.internalXattrs : blob.xattrs)[name]
    }

    public func setSuperBlob(_ id: BlobID?) throws(BlobStoreError) {
        if let id, blobs[id] == nil { throw .noSuchBlob(id) }
        try commit([.setSuperBlob(id: id)])
        precondition(superBlobID == id, "setSuperBlob: the super blob is \(String(describing: id))")
    }

    static func validateXattr(_ name: String, _ value: [UInt8]) throws(BlobStoreError) {
        let nameBytes = name.utf8.count
        guard nameBytes > 0, nameBytes <= MetadataPage.xattrNameBytesMax else {
            throw .invalidArgument("xattr name of \(nameBytes) bytes (1...\(MetadataPage.xattrNameBytesMax))")
        }
        guard nameBytes + value.count <= MetadataPage.xattrBytesMax else {
            throw .invalidArgument("xattr of \(nameBytes + value.count) bytes, name and value (at most \(MetadataPage.xattrBytesMax))")
        }
    }

    // MARK: - Data

    /// Device cluster holding blob cluster `index`, if allocated (binary search: the
    /// extents are sorted by cluster index).
    func physicalCluster(_ blob: BlobMetadata, _ index: UInt64) -> UInt64? {
        var low = 0
        var high = blob.extents.count
        while low < high {
            let middle = (low + high) / 2
            let extent = blob.extents[middle]
            if index < extent.clusterIndex {
                high = middle
            } else if index >= extent.clusterIndex + UInt64(extent.count) {
                low = middle + 1
            } else {
                return extent.firstCluster + (index - extent.clusterIndex)
            }
        }
        return nil
    }

    private func deviceBlock(cluster: UInt64, byteInCluster: UInt64) -> UInt64 {
        (superBlock.dataStartPage * UInt64(Self.pageBytes) + cluster * UInt64(clusterSizeBytes) + byteInCluster)
            / UInt64(ioUnitBytes)
    }

    /// Blob bytes [start, end) cut into runs that are one device range each: physically
    /// contiguous allocated clusters (`cluster` the first one's device cluster), or
    /// unallocated ones (`cluster` nil).
    /// `resolved`: clusters the blob reads from its ancestors count (reads); else only its own.
    func runs(_ blob: BlobMetadata, _ start: UInt64, _ end: UInt64, resolved: Bool = false) -> [(start: UInt64, end: UInt64, cluster: UInt64?)] {
        let clusterBytes = UInt64(clusterSizeBytes)
        var result: [(start: UInt64, end: UInt64, cluster: UInt64?)] = []
        for index in (start / clusterBytes)...((end - 1) / clusterBytes) {
            let sliceStart = max(start, index * clusterBytes)
            let sliceEnd = min(end, (index + 1) * clusterBytes)
            let cluster = resolved ? resolvedCluster(blob, index) : physicalCluster(blob, index)
            if let last = result.last, last.end == sliceStart {
                let lastClusters = (last.end - 1) / clusterBytes - last.start / clusterBytes
                let contiguous: Bool = switch (last.cluster, cluster) {
                case (nil, nil): true
                case let (first?, next?): first + lastClusters + 1 == next
                default: false
                }
                if contiguous {
                    result[result.count - 1].end = sliceEnd
                    continue
                }
            }
            result.append((sliceStart, sliceEnd, cluster))
        }
        return result
    }

    private func checkRange(_ blob: BlobMetadata, _ offsetUnits: UInt64, _ bytes: Int) throws(BlobStoreError) -> (UInt64, UInt64) {
        guard bytes > 0, bytes % ioUnitBytes == 0 else {
            throw .invalidArgument("length \(bytes) is not a positive multiple of the \(ioUnitBytes)-byte io unit")
        }
        let start = offsetUnits * UInt64(ioUnitBytes)
        let end = start + UInt64(bytes)
        guard end <= blob.clusterCount * UInt64(clusterSizeBytes) else {
            throw .invalidArgument("bytes \(start)..<\(end) beyond blob \(blob.id) of \(blob.clusterCount) clusters")
        }
        return (start, end)
    }

    /// Writes whole io units. Clusters not yet allocated are allocated, written whole
    /// (zeros around the data, so no stale bytes are ever readable), flushed, and only
    /// then mapped by a committed transaction. Overwrites of allocated clusters are in
    /// place and durable after `sync()`. Physically contiguous clusters go to the device
    /// as one write.
    ///
    /// In a clone, a cluster read from an ancestor is copied: the new cluster gets the
    /// ancestor's bytes around the data (copy-on-write), and the ancestor is left as it was.
    public func write(blob id: BlobID, offsetUnits: UInt64, data: [UInt8]) throws(BlobStoreError) {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        guard !blob.isSnapshot else { throw .snapshotReadOnly(id) }
        let (start, end) = try checkRange(blob, offsetUnits, data.count)
        let clusterBytes = UInt64(clusterSizeBytes)
        var reserved: Set<UInt64> = []
        var mapped: [Extent] = []
        var hint: UInt64 = 0
        reclaimReleasedClusters()
        // Device cluster of each blob cluster touched, allocating the missing ones.
        var placement: [(index: UInt64, cluster: UInt64, isNew: Bool)] = []
        for index in (start / clusterBytes)...((end - 1) / clusterBytes) {
            if let cluster = physicalCluster(blob, index) {
                placement.append((index, cluster, false))
                hint = cluster + 1
                continue
            }
            guard let cluster = allocateCluster(near: hint, excluding: reserved)
                ?? (waitForReleasedClusters() ? allocateCluster(near: hint, excluding: reserved) : nil) else {
                throw .noSpace("no free cluster (\(clusterCount) in the store)")
            }
            reserved.insert(cluster)
            placement.append((index, cluster, true))
            mapped.append(Extent(clusterIndex: index, count: 1, firstCluster: cluster))
            hint = cluster + 1
        }
        // From here until they are mapped, no checkpoint may put metadata pages in the
        // chosen clusters (they are clear in the bitmap): making a release durable below,
        // or the commit, may write the waiting transactions and checkpoint (a full log).
        clustersBeingMapped = reserved
        defer { clustersBeingMapped = [] }
        // Released clusters may be among the new ones: their release must be durable first.
        if !mapped.isEmpty { try prepareToReuseReleasedClusters() }
        var runStart = 0
        while runStart < placement.count {
            var runEnd = runStart + 1
            while runEnd < placement.count, placement[runEnd].cluster == placement[runEnd - 1].cluster + 1 { runEnd += 1 }
            // Bytes of the run: whole new clusters (zeros around the data), slices of old ones.
            let first = placement[runStart], last = placement[runEnd - 1]
            let runByteStart = first.isNew ? first.index * clusterBytes : max(start, first.index * clusterBytes)
            let runByteEnd = last.isNew ? (last.index + 1) * clusterBytes : min(end, (last.index + 1) * clusterBytes)
            var bytes: [UInt8]
            let dataStart = max(start, runByteStart), dataEnd = min(end, runByteEnd)
            if runByteStart == dataStart && runByteEnd == dataEnd {
                bytes = Array(data[Int(dataStart - start)..<Int(dataEnd - start)])
            } else {
                bytes = [UInt8](repeating: 0, count: Int(runByteEnd - runByteStart))
                try copyFromAncestors(blob, placement[runStart..<runEnd], into: &bytes, runByteStart: runByteStart,
                                      skipping: start..<end)
                bytes.replaceSubrange(Int(dataStart - runByteStart)..<Int(dataEnd - runByteStart),
                                      with: data[Int(dataStart - start)..<Int(dataEnd - start)])
            }
            try writeBlocks(bytes, at: deviceBlock(cluster: first.cluster, byteInCluster: runByteStart - first.index * clusterBytes))
            runStart = runEnd
        }
        guard !mapped.isEmpty else { return }
        // The data is durable before the metadata that points at it: flushed now, or in
        // deferred mode before the commit's records are written (`writePendingLog`).
        if deferCommitFlush { metadataLog.pendingNeedsDataFlush = true } else { try flush() }
        try commit(Self.merged(mapped).map { .mapExtent(id: id, extent: $0) })
        assert(mapped.allSatisfy { physicalCluster(blobs[id]!, $0.clusterIndex) == $0.firstCluster && clusters[$0.firstCluster] },
               "write: every new cluster is mapped where it was written and marked used")
    }

    /// Copy-on-write: the bytes of each new cluster of a run that an ancestor maps (and
    /// that the data does not cover whole) are read from the ancestor's cluster into `bytes`.
    private func copyFromAncestors(_ blob: BlobMetadata, _ run: ArraySlice<(index: UInt64, cluster: UInt64, isNew: Bool)>,
                                   into bytes: inout [UInt8], runByteStart: UInt64, skipping data: Range<UInt64>) throws(BlobStoreError) {
        guard blob.parent != nil else { return }
        let clusterBytes = UInt64(clusterSizeBytes)
        for place in run where place.isNew {
            let clusterStart = place.index * clusterBytes
            guard !(data.lowerBound <= clusterStart && clusterStart + clusterBytes <= data.upperBound),
                  let source = resolvedCluster(blob, place.index) else { continue }
            let old: [UInt8]
            do {
                old = try io.readBytes(offsetBlocks: deviceBlock(cluster: source, byteInCluster: 0),
                                       countBlocks: clusterBytes / UInt64(ioUnitBytes))
            } catch { throw .device(error) }
            let at = Int(clusterStart - runByteStart)
            bytes.replaceSubrange(at..<(at + Int(clusterBytes)), with: old)
        }
    }

    /// A free cluster at or after `hint` (wrapping around) that is not in `reserved`; nil
    /// when every free cluster is reserved. Visits each clear bit at most once: with more
    /// than `reserved.count` of them visited, one is not reserved.
    private func allocateCluster(near hint: UInt64, excluding reserved: Set<UInt64>) -> UInt64? {
        let allocatable = clusters.count - clusters.setCount
        // Clusters reserved by this write are still clear in the bitmap.
        guard allocatable > metadataClusterReserve + UInt64(reserved.count) else { return nil }
        var cursor = hint
        for _ in 0..<min(allocatable, UInt64(reserved.count) + 1) {
            guard let free = clusters.firstClear(from: cursor) else { return nil }
            if !reserved.contains(free) { return free }
            cursor = free + 1
        }
        return nil
    }

    /// Reads whole io units; unallocated clusters read as zeros (in a clone: as the
    /// ancestor that maps them has them). Physically contiguous
    /// clusters are one device read.
    public func read(blob id: BlobID, offsetUnits: UInt64, countUnits: UInt64) throws(BlobStoreError) -> [UInt8] {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        let (start, end) = try checkRange(blob, offsetUnits, Int(countUnits) * ioUnitBytes)
        let clusterBytes = UInt64(clusterSizeBytes)
        let pieces = runs(blob, start, end, resolved: true)
        if pieces.count == 1, let cluster = pieces[0].cluster {
            do {
                return try io.readBytes(offsetBlocks: deviceBlock(cluster: cluster, byteInCluster: start - start / clusterBytes * clusterBytes),
                                        countBlocks: (end - start) / UInt64(ioUnitBytes))
            } catch { throw .device(error) }
        }
        var result = [UInt8](repeating: 0, count: Int(end - start))
        for piece in pieces {
            guard let cluster = piece.cluster else { continue }
            let bytes: [UInt8]
            do {
                bytes = try io.readBytes(offsetBlocks: deviceBlock(cluster: cluster, byteInCluster: piece.start % clusterBytes),
                                         countBlocks: (piece.end - piece.start) / UInt64(ioUnitBytes))
            } catch { throw .device(error) }
            result.replaceSubrange(Int(piece.start - start)..<Int(piece.end - start), with: bytes)
        }
        return result
    }

    /// Releases blob clusters [clusterIndex, clusterIndex + count): they read as zeros after.
    /// In a clone, a range that reaches the end of what its parent backs lowers the backed
    /// count in the same commit; clusters inside it that an ancestor maps get zeros
    /// written instead (allocated: the clone cannot hide its parent's cluster otherwise).
    public func unmap(blob id: BlobID, clusterIndex: UInt64, count: UInt32) throws(BlobStoreError) {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        guard !blob.isSnapshot else { throw .snapshotReadOnly(id) }
        guard count > 0, clusterIndex + UInt64(count) <= blob.clusterCount else {
            throw .invalidArgument("clusters \(clusterIndex)+\(count) beyond blob \(id) of \(blob.clusterCount)")
        }
        let end = clusterIndex + UInt64(count)
        let inside = blob.parent != nil && clusterIndex < blob.backedClusters && end < blob.backedClusters
        guard inside else {
            try transaction { (tx) throws(BlobStoreError) in try tx.unmap(id, clusterIndex: clusterIndex, count: count) }
            assert((clusterIndex..<end).allSatisfy { resolvedCluster(blobs[id]!, $0) == nil }, "unmap: the range reads as a hole")
            return
        }
        let shared = sharedExtents(blob)
        try commit([.unmapClusters(id: id, clusterIndex: clusterIndex, count: count)])
        try writeZeroClusters(id, covering: shared, within: clusterIndex..<end)
    }

    /// Writes zeros (allocating) over the clusters of `shared` within `range`: a clone's
    /// way to make clusters its ancestors map read as zeros.
    private func writeZeroClusters(_ id: BlobID, covering shared: [Extent], within range: Range<UInt64>) throws(BlobStoreError) {
        let units = UInt64(clusterSizeBytes / ioUnitBytes)
        try forEachRun(of: shared.map { $0.clusterIndex..<($0.clusterIndex + UInt64($0.count)) }, within: range) {
            (index, count) throws(BlobStoreError) in
            try write(blob: id, offsetUnits: index * units, data: [UInt8](repeating: 0, count: Int(count) * clusterSizeBytes))
        }
    }

    /// Zeroes whole io units: allocated clusters get zeros written (a device write-zeroes
    /// per contiguous run); unallocated ones already read as zeros and stay unallocated.
    public func writeZeroes(blob id: BlobID, offsetUnits: UInt64, countUnits: UInt64) throws(BlobStoreError) {
        guard !isReadOnly, !discardsWrites, writeObserver == nil else { throw .readOnly }
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        guard !blob.isSnapshot else { throw .snapshotReadOnly(id) }
        let (start, end) = try checkRange(blob, offsetUnits, Int(countUnits) * ioUnitBytes)
        var sharedPieces: [(start: UInt64, end: UInt64)] = []
        for piece in runs(blob, start, end) {
            guard let cluster = piece.cluster else {
                if blob.parent != nil { sharedPieces.append((piece.start, piece.end)) }
                continue
            }
            do {
                try io.writeZeroes(offsetBlocks: deviceBlock(cluster: cluster, byteInCluster: piece.start % UInt64(clusterSizeBytes)),
                                   countBlocks: (piece.end - piece.start) / UInt64(ioUnitBytes))
            } catch { throw deviceWriteFailed(error, "write-zeroes of blob \(id)") }
        }
        // In a clone, what an ancestor maps reads as zeros only once zeros are written over it.
        let clusterBytes = UInt64(clusterSizeBytes)
        for piece in sharedPieces {
            var cursor = piece.start
            while cursor < piece.end {
                let index = cursor / clusterBytes
                let sliceEnd = min(piece.end, (index + 1) * clusterBytes)
                if resolvedCluster(blobs[id]!, index) != nil {
                    try write(blob: id, offsetUnits: cursor / UInt64(ioUnitBytes), data: [UInt8](repeating: 0, count: Int(sliceEnd - cursor)))
                }
                cursor = sliceEnd
            }
        }
    }

    /// Makes completed overwrites durable (a device flush).
    public func sync() throws(BlobStoreError) {
        guard !isReadOnly else { return }
        try flush()
    }

    private func writeBlocks(_ bytes: [UInt8], at block: UInt64) throws(BlobStoreError) {
        guard !isReadOnly, !discardsWrites, writeObserver == nil else { throw .readOnly }
        try refuseIfDeviceLost()
        do { try io.writeBytes(bytes, offsetBlocks: block) } catch { throw deviceWriteFailed(error, "data write at block \(block)") }
    }
}
