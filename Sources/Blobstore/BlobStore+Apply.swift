import Bdev
import Env

// The applier of log records: one record's change to the in-memory state, the same for a
// live commit and for replay at load.
extension BlobStore {
    /// Applies one record to the in-memory state. Live operations validate before they
    /// commit, so a failure here while replaying means the log contradicts the checkpoint.
    func apply(_ record: LogRecord, replaying: Bool) throws(BlobStoreError) {
        releases.byRecord.removeAll(keepingCapacity: true)
        func fail(_ what: String) -> BlobStoreError { .corrupt("replaying \(record): \(what)") }
        switch record {
        case let .createBlob(id):
            guard superBlock.covers(id), blobs[id] == nil else { throw fail("blob id in use or out of range") }
            blobs[id] = BlobMetadata(id: id)
            blobIDs.set(id.rawValue)
        case let .deleteBlob(id):
            guard let blob = blobs[id] else { throw fail("no such blob") }
            guard cloneSet(id) == nil else { throw fail("the blob has clones") }
            if blob.isSnapshot { ancestorViews.removeAll() }  // its id may come back as another snapshot
            for extent in blob.extents { release(extent) }
            if let parent = blob.parent { unlinkClone(id, from: parent) }
            blobs[id] = nil
            blobIDs.clear(id.rawValue)
            if superBlock.superBlobID == id { superBlock.superBlobID = nil }
        case let .resizeBlob(id, count):
            guard var blob = blobs[id] else { throw fail("no such blob") }
            guard count <= MetadataPage.blobClustersMax else { throw fail("blob size out of range") }
            if count < blob.clusterCount { unmap(&blob, from: count, count: blob.clusterCount - count) }
            blob.clusterCount = count
            blob.backedClusters = min(blob.backedClusters, count)
            blobs[id] = blob
        case let .mapExtent(id, extent):
            guard var blob = blobs[id] else { throw fail("no such blob") }
            // Without overflow, whatever the record holds.
            guard extent.clusterIndex <= blob.clusterCount, UInt64(extent.count) <= blob.clusterCount - extent.clusterIndex,
                  extent.firstCluster <= superBlock.clusterCount,
                  UInt64(extent.count) <= superBlock.clusterCount - extent.firstCluster else { throw fail("extent out of range") }
            for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) {
                guard !clusters[cluster] else { throw fail("cluster \(cluster) already owned") }
            }
            guard !blob.extents.contains(where: {
                $0.clusterIndex < extent.clusterIndex + UInt64(extent.count) && extent.clusterIndex < $0.clusterIndex + UInt64($0.count)
            }) else { throw fail("blob clusters already mapped") }
            for cluster in extent.firstCluster..<(extent.firstCluster + UInt64(extent.count)) { clusters.set(cluster) }
            blob.extents.append(extent)
            blob.extents.sort { $0.clusterIndex < $1.clusterIndex }
            blob.extents = Self.merged(blob.extents)
            blobs[id] = blob
        case let .unmapClusters(id, index, count):
            guard var blob = blobs[id] else { throw fail("no such blob") }
            unmap(&blob, from: index, count: UInt64(count))
            blobs[id] = blob
        case let .setXattr(id, isInternal, name, value):
            guard blobs[id] != nil else { throw fail("no such blob") }
            // What a checkpoint can encode (the log decoder refuses more; this keeps it so).
            let nameBytes = name.utf8.count
            guard nameBytes > 0, nameBytes <= MetadataPage.xattrNameBytesMax,
                  nameBytes + value.count <= MetadataPage.xattrBytesMax else { throw fail("xattr too large") }
            // In place: a directory's blob holds up to 100,000 entries.
            if isInternal { blobs[id]!.internalXattrs.set(name, value) } else { blobs[id]!.xattrs.set(name, value) }
        case let .removeXattr(id, isInternal, name):
            guard blobs[id] != nil else { throw fail("no such blob") }
            if isInternal { blobs[id]!.internalXattrs.remove(name) } else { blobs[id]!.xattrs.remove(name) }
        case let .setFlags(id, flags):
            guard var blob = blobs[id] else { throw fail("no such blob") }
            blob.flags = flags
            blobs[id] = blob
        case let .setSuperBlob(id):
            if let id, blobs[id] == nil { throw fail("no such blob") }
            superBlock.superBlobID = id
        case let .snapshot(id, snapshotID):
            if let problem = applySnapshot(id, snapshotID) { throw fail(problem) }
        case let .setParent(id, parent, backed):
            if let problem = applySetParent(id, parent, backed) { throw fail(problem) }
        case let .mergeIntoChild(id, child):
            if let problem = applyMerge(id, into: child) { throw fail(problem) }
        case .commit:
            break
        }
        if let id = record.blobID { changed(id, replaying: replaying) }
        if let other = record.otherBlobID {
            // The first call took care of the released clusters (a merge's).
            releases.byRecord.removeAll(keepingCapacity: true)
            changed(other, replaying: replaying)
        }
        releases.byRecord.removeAll(keepingCapacity: true)
        precondition(blobIDs.setCount == UInt64(blobs.count), "a blob id is in use exactly while its blob exists")
        precondition(countedDirty.count <= dirtyBlobs.count, "the blobs counted for the next checkpoint are dirty")
    }

    /// After a record changed blob `id`: the next checkpoint rewrites its chain, the
    /// clusters the record released go back (or wait for the blob's open handles), and
    /// the handles take the new map.
    private func changed(_ id: BlobID, replaying: Bool) {
        dirtyBlobs.insert(id)
        // The next checkpoint writes this blob's chain afresh if it exists.
        let estimate = chainPagesEstimate(id)
        if blobs[id] != nil, !countedDirty.contains(id) {
            countedDirty.insert(id)
            dirtyChainPages += estimate
        } else if blobs[id] == nil, countedDirty.remove(id) != nil {
            dirtyChainPages -= estimate
        }
        let handles = openHandles[id] ?? []
        // Released clusters go back to allocation now, or once every open handle has
        // stopped using them (see `ReleaseTicket`).
        var ticket: ReleaseTicket?
        if !releases.byRecord.isEmpty && !handles.isEmpty {
            let held = ReleaseTicket(handles: handles.count)
            releases.hold(releases.byRecord, until: held)
            ticket = held
        } else {
            for extent in releases.byRecord {
                if replaying { clearClusters(extent) } else { returnReleased(extent, epoch: releases.epoch) }
            }
        }
        if !handles.isEmpty {
            let snapshot = blobs[id] ?? BlobMetadata(id: id)
            let shared = ancestorView(snapshot)
            for handle in handles { handle.update(snapshot, shared: shared, releasing: ticket) }
        }
        // Clones read through this blob: their handles take the new view too.
        for clone in cloneSet(id) ?? [] { refreshHandles(ofCloneTree: clone) }
    }

    /// Removes the mapping of blob clusters [from, from + count), releasing their clusters.
    private func unmap(_ blob: inout BlobMetadata, from: UInt64, count: UInt64) {
        let end = from > UInt64.max - count ? UInt64.max : from + count
        var kept: [Extent] = []
        for extent in blob.extents {
            let extentEnd = extent.clusterIndex + UInt64(extent.count)
            if extentEnd <= from || extent.clusterIndex >= end {
                kept.append(extent)
                continue
            }
            let cutStart = max(from, extent.clusterIndex)
            let cutEnd = min(end, extentEnd)
            release(Extent(clusterIndex: cutStart, count: UInt32(cutEnd - cutStart),
                           firstCluster: extent.firstCluster + (cutStart - extent.clusterIndex)))
            if extent.clusterIndex < cutStart {
                kept.append(Extent(clusterIndex: extent.clusterIndex, count: UInt32(cutStart - extent.clusterIndex),
                                   firstCluster: extent.firstCluster))
            }
            if cutEnd < extentEnd {
                kept.append(Extent(clusterIndex: cutEnd, count: UInt32(extentEnd - cutEnd),
                                   firstCluster: extent.firstCluster + (cutEnd - extent.clusterIndex)))
            }
        }
        blob.extents = kept
    }

    static func merged(_ extents: [Extent]) -> [Extent] {
        var result: [Extent] = []
        for extent in extents {
            if let last = result.last, last.clusterIndex + UInt64(last.count) == extent.clusterIndex,
               last.firstCluster + UInt64(last.count) == extent.firstCluster, UInt64(last.count) + UInt64(extent.count) <= UInt64(UInt32.max) {
                result[result.count - 1].count += extent.count
            } else {
                result.append(extent)
            }
        }
        return result
    }
}
