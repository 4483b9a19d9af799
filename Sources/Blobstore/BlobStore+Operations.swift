import Bdev

extension BlobStore {
    // MARK: - Metadata operations (each one durable transaction)

    /// Creates a blob of `clusterCount` clusters, all unallocated (thin).
    @discardableResult
    public func createBlob(clusterCount: UInt64 = 0, xattrs: [(name: String, value: [UInt8])] = []) throws(BlobStoreError) -> UInt64 {
        guard let id = blobIDs.firstClear() else { throw .noSpace("all \(superBlock.blobIDLimit) blob ids are in use") }
        for (name, value) in xattrs { try Self.validateXattr(name, value) }
        var records: [LogRecord] = [.createBlob(id: id)]
        if clusterCount > 0 { records.append(.resizeBlob(id: id, clusterCount: clusterCount)) }
        records += xattrs.map { .setXattr(id: id, internal: false, name: $0.name, value: $0.value) }
        try commit(records)
        return id
    }

    public func deleteBlob(_ id: UInt64) throws(BlobStoreError) {
        guard blobs[id] != nil else { throw .noSuchBlob(id) }
        try commit([.deleteBlob(id: id)])
    }

    /// Grows (thin) or shrinks (releasing clusters past the new end) a blob.
    public func resizeBlob(_ id: UInt64, clusterCount: UInt64) throws(BlobStoreError) {
        guard blobs[id] != nil else { throw .noSuchBlob(id) }
        guard clusterCount <= UInt64(UInt32.max) * 16 else { throw .invalidArgument("blob size \(clusterCount) clusters") }
        try commit([.resizeBlob(id: id, clusterCount: clusterCount)])
    }

    public func setXattr(_ id: UInt64, name: String, value: [UInt8], isInternal: Bool = false) throws(BlobStoreError) {
        guard blobs[id] != nil else { throw .noSuchBlob(id) }
        try Self.validateXattr(name, value)
        try commit([.setXattr(id: id, internal: isInternal, name: name, value: value)])
    }

    /// Removes an xattr; false when the blob had none of that name.
    @discardableResult
    public func removeXattr(_ id: UInt64, name: String, isInternal: Bool = false) throws(BlobStoreError) -> Bool {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        guard (isInternal ? blob.internalXattrs : blob.xattrs).contains(name: name) else { return false }
        try commit([.removeXattr(id: id, internal: isInternal, name: name)])
        return true
    }

    public func xattr(_ id: UInt64, name: String, isInternal: Bool = false) -> [UInt8]? {
        guard let blob = blobs[id] else { return nil }
        return (isInternal ? blob.internalXattrs : blob.xattrs)[name]
    }

    public func setSuperBlob(_ id: UInt64?) throws(BlobStoreError) {
        if let id, blobs[id] == nil { throw .noSuchBlob(id) }
        try commit([.setSuperBlob(id: id)])
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

    /// Device cluster holding blob cluster `index`, if allocated.
    func physicalCluster(_ blob: BlobMetadata, _ index: UInt64) -> UInt64? {
        for extent in blob.extents where index >= extent.clusterIndex && index < extent.clusterIndex + UInt64(extent.count) {
            return extent.firstCluster + (index - extent.clusterIndex)
        }
        return nil
    }

    private func deviceBlock(cluster: UInt64, byteInCluster: UInt64) -> UInt64 {
        (superBlock.dataStartPage * UInt64(Self.pageBytes) + cluster * UInt64(clusterSizeBytes) + byteInCluster)
            / UInt64(ioUnitBytes)
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
    /// place and durable after `sync()`.
    public func write(blob id: UInt64, offsetUnits: UInt64, data: [UInt8]) throws(BlobStoreError) {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        let (start, end) = try checkRange(blob, offsetUnits, data.count)
        let clusterBytes = UInt64(clusterSizeBytes)
        var reserved: Set<UInt64> = []
        var mapped: [Extent] = []
        var hint: UInt64 = 0
        for index in (start / clusterBytes)...((end - 1) / clusterBytes) {
            let sliceStart = max(start, index * clusterBytes)
            let sliceEnd = min(end, (index + 1) * clusterBytes)
            let slice = data[Int(sliceStart - start)..<Int(sliceEnd - start)]
            if let cluster = physicalCluster(blob, index) {
                try writeBlocks(Array(slice), at: deviceBlock(cluster: cluster, byteInCluster: sliceStart - index * clusterBytes))
                hint = cluster + 1
                continue
            }
            guard let cluster = allocateCluster(near: hint, excluding: reserved) else {
                throw .noSpace("no free cluster (\(clusterCount) in the store)")
            }
            reserved.insert(cluster)
            var whole = [UInt8](repeating: 0, count: clusterSizeBytes)
            whole.replaceSubrange(Int(sliceStart - index * clusterBytes)..<Int(sliceEnd - index * clusterBytes), with: slice)
            try writeBlocks(whole, at: deviceBlock(cluster: cluster, byteInCluster: 0))
            mapped.append(Extent(clusterIndex: index, count: 1, firstCluster: cluster))
            hint = cluster + 1
        }
        guard !mapped.isEmpty else { return }
        try flush()  // the data is durable before the metadata that points at it
        try commit(Self.merged(mapped).map { .mapExtent(id: id, extent: $0) })
    }

    private func allocateCluster(near hint: UInt64, excluding reserved: Set<UInt64>) -> UInt64? {
        var cursor = hint
        for _ in 0..<(reserved.count + 1) {
            guard let free = clusters.firstClear(from: cursor) else { return nil }
            if !reserved.contains(free) { return free }
            cursor = free + 1
        }
        var candidate = clusters.firstClear(from: 0)
        while let free = candidate, reserved.contains(free) { candidate = clusters.firstClear(from: free + 1) }
        return candidate
    }

    /// Reads whole io units; unallocated clusters read as zeros.
    public func read(blob id: UInt64, offsetUnits: UInt64, countUnits: UInt64) throws(BlobStoreError) -> [UInt8] {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        let (start, end) = try checkRange(blob, offsetUnits, Int(countUnits) * ioUnitBytes)
        let clusterBytes = UInt64(clusterSizeBytes)
        var result = [UInt8](repeating: 0, count: Int(end - start))
        for index in (start / clusterBytes)...((end - 1) / clusterBytes) {
            guard let cluster = physicalCluster(blob, index) else { continue }
            let sliceStart = max(start, index * clusterBytes)
            let sliceEnd = min(end, (index + 1) * clusterBytes)
            let bytes: [UInt8]
            do {
                bytes = try io.readBytes(offsetBlocks: deviceBlock(cluster: cluster, byteInCluster: sliceStart - index * clusterBytes),
                                         countBlocks: (sliceEnd - sliceStart) / UInt64(ioUnitBytes))
            } catch { throw .device(error) }
            result.replaceSubrange(Int(sliceStart - start)..<Int(sliceEnd - start), with: bytes)
        }
        return result
    }

    /// Releases blob clusters [clusterIndex, clusterIndex + count): they read as zeros after.
    public func unmap(blob id: UInt64, clusterIndex: UInt64, count: UInt32) throws(BlobStoreError) {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        guard count > 0, clusterIndex + UInt64(count) <= blob.clusterCount else {
            throw .invalidArgument("clusters \(clusterIndex)+\(count) beyond blob \(id) of \(blob.clusterCount)")
        }
        try commit([.unmapClusters(id: id, clusterIndex: clusterIndex, count: count)])
    }

    /// Zeroes whole io units: allocated clusters get zeros written (a device write-zeroes
    /// per contiguous run); unallocated ones already read as zeros and stay unallocated.
    public func writeZeroes(blob id: UInt64, offsetUnits: UInt64, countUnits: UInt64) throws(BlobStoreError) {
        guard let blob = blobs[id] else { throw .noSuchBlob(id) }
        let (start, end) = try checkRange(blob, offsetUnits, Int(countUnits) * ioUnitBytes)
        let clusterBytes = UInt64(clusterSizeBytes)
        for index in (start / clusterBytes)...((end - 1) / clusterBytes) {
            guard let cluster = physicalCluster(blob, index) else { continue }
            let sliceStart = max(start, index * clusterBytes)
            let sliceEnd = min(end, (index + 1) * clusterBytes)
            do {
                try io.writeZeroes(offsetBlocks: deviceBlock(cluster: cluster, byteInCluster: sliceStart - index * clusterBytes),
                                   countBlocks: (sliceEnd - sliceStart) / UInt64(ioUnitBytes))
            } catch { throw .device(error) }
        }
    }

    /// Makes completed overwrites durable (a device flush).
    public func sync() throws(BlobStoreError) { try flush() }

    private func writeBlocks(_ bytes: [UInt8], at block: UInt64) throws(BlobStoreError) {
        do { try io.writeBytes(bytes, offsetBlocks: block) } catch { throw .device(error) }
    }
}
