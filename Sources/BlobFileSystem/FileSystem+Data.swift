#if canImport(Glibc)
import Glibc
#endif
import Blobstore

/// File data: the blob's clusters hold the file's bytes at the same offsets. Bytes past
/// the size are never trusted: whenever a file grows, what lies between the old size and
/// the new bytes is zeroed first (`expose`), so neither a crash between a data write and
/// its size update nor an earlier truncate can make old bytes reappear.
extension FileSystem {
    /// The largest file: what a blob's cluster count can describe.
    public var fileBytesMax: UInt64 { UInt64(UInt32.max) * 16 * clusterBytes }

    public func open(ino: InodeNumber, truncate: Bool = false) throws(FSError) {
        let id = ino.blobID
        let inode = try inode(ino)
        if inode.attributes.isDirectory { throw FSError(EISDIR) }
        if truncate, inode.attributes.isRegular, inode.attributes.size > 0 {
            try self.truncate(id, inode, to: 0)
            inode.attributes.mtimeNs = realtimeNs()
            inode.attributes.ctimeNs = inode.attributes.mtimeNs
            inode.dirty = true
        }
        inode.opens += 1
    }

    /// Creates a regular file and opens it.
    public func create(parent: InodeNumber, name: [UInt8], mode: UInt32, caller: Caller) throws(FSError) -> Attributes {
        let attributes = try make(parent: parent, name: name, mode: UInt32(S_IFREG) | (mode & 0o7777), caller: caller)
        inodes[attributes.ino.blobID]?.opens += 1
        return attributes
    }

    public func release(ino: InodeNumber) {
        let id = ino.blobID
        guard let inode = inodes[id] else { return }
        inode.opens -= min(inode.opens, 1)
        releaseIfUnused(id, inode)
    }

    func regular(_ ino: InodeNumber) throws(FSError) -> (BlobID, Inode) {
        let inode = try inode(ino)
        guard inode.attributes.isRegular else {
            throw FSError(inode.attributes.isDirectory ? EISDIR : EINVAL, "not a regular file")
        }
        return (ino.blobID, inode)
    }

    // MARK: - Read and write

    /// The whole io units a read of `count` bytes at `offset` covers (`start..<alignedEnd`),
    /// the part of them inside the blob (`start..<readEnd`; past it, zeros) and the bytes
    /// it answers (`offset..<end`); nil at or past the end of the file.
    private func readWindow(_ id: BlobID, _ inode: Inode, offset: UInt64, count: Int)
        -> (start: UInt64, end: UInt64, alignedEnd: UInt64, readEnd: UInt64)? {
        let size = inode.attributes.size
        guard offset < size, count > 0 else { return nil }
        let end = min(size, offset + UInt64(count))
        let start = offset / unitBytes * unitBytes
        let alignedEnd = (end + unitBytes - 1) / unitBytes * unitBytes
        let capacityBytes = (store.blob(id)?.clusterCount ?? 0) * clusterBytes
        return (start, end, alignedEnd, max(start, min(alignedEnd, capacityBytes)))
    }

    public func read(ino: InodeNumber, offset: UInt64, count: Int) throws(FSError) -> [UInt8] {
        let (id, inode) = try regular(ino)
        guard let window = readWindow(id, inode, offset: offset, count: count) else { return [] }
        let (start, end, alignedEnd, readEnd) = window
        var bytes: [UInt8] = []
        if readEnd > start {
            bytes = try storeCall { try store.read(blob: id, offsetUnits: start / unitBytes, countUnits: (readEnd - start) / unitBytes) }
        }
        if readEnd < alignedEnd { bytes += [UInt8](repeating: 0, count: Int(alignedEnd - readEnd)) }
        touchAccess(inode)
        if start == offset, alignedEnd == end { return bytes }
        return Array(bytes[Int(offset - start)..<Int(end - start)])
    }

    /// Where an asynchronous read of `count` bytes at `offset` goes (`FileSystemService`):
    /// the file's blob and the window of whole io units it covers; nil at or past the end
    /// of the file. The access time is updated as for a read.
    func readWindow(ino: InodeNumber, offset: UInt64, count: Int) throws(FSError)
        -> (id: BlobID, start: UInt64, end: UInt64, alignedEnd: UInt64, readEnd: UInt64)? {
        let (id, inode) = try regular(ino)
        guard let window = readWindow(id, inode, offset: offset, count: count) else { return nil }
        touchAccess(inode)
        return (id, window.start, window.end, window.alignedEnd, window.readEnd)
    }

    /// The blob of a write of `count` bytes at `offset` that may go straight to its
    /// clusters (`FileSystemService`): whole io units inside the file; nil when the write
    /// needs more (growth, read-modify-write), which the synchronous `write` does.
    func overwriteTarget(ino: InodeNumber, offset: UInt64, count: Int) throws(FSError) -> BlobID? {
        // Overwrites go to the device without the store: its read-only state is checked here.
        guard !store.refusesChanges else { throw FSError(EROFS, store.deviceFailure ?? "read-only") }
        let (id, inode) = try regular(ino)
        guard count > 0, offset % unitBytes == 0, UInt64(count) % unitBytes == 0,
              offset + UInt64(count) <= inode.attributes.size else { return nil }
        return id
    }

    /// An overwrite went to the device: the file's times change as for a write (also for
    /// the writeback cache's writes: this kernel does not stamp a FUSE file's mtime on a
    /// cached write itself, so the stamp is ours).
    func overwritten(_ id: BlobID) {
        guard let inode = inodes[id] else { return }
        stampDataWrite(inode)
    }

    /// A data write's times, the way Linux 6.13's multigrain timestamps do it (ext4,
    /// xfs, tmpfs): the coarse clock (one tick, a few ms) unless someone saw the current
    /// times, then the fine one. Writes within one tick that nobody looked at between
    /// leave the inode clean, so an fsync after them has no attributes to commit and
    /// costs one device flush, as on ext4. The clock is compared with ctime, which only
    /// ever takes the current time (a chmod may have stamped it finer), never with
    /// mtime: utimensat can put mtime anywhere, and a write after it must still set it
    /// to now. Set-user-ID is dropped as for any write.
    func stampDataWrite(_ inode: Inode) {
        let mode = inode.attributes.mode & ~UInt32(S_ISUID)
        if mode != inode.attributes.mode {
            inode.attributes.mode = mode
            inode.dirty = true
        }
        let last = inode.attributes.ctimeNs
        var now = coarseRealtimeNs()
        if now <= last {
            guard inode.timesObserved else { return }
            now = max(realtimeNs(), last + 1)
        }
        inode.attributes.mtimeNs = now
        inode.attributes.ctimeNs = now
        inode.timesObserved = false
        inode.dirty = true
    }

    /// relatime: the access time moves when it is older than the modification or a day old.
    private func touchAccess(_ inode: Inode) {
        let attributes = inode.attributes
        let now = realtimeNs()
        if attributes.atimeNs <= attributes.mtimeNs || attributes.atimeNs <= attributes.ctimeNs
            || now - attributes.atimeNs > 86_400_000_000_000 {
            inode.attributes.atimeNs = now
            inode.dirty = true
        }
    }

    /// Writes `data` at `offset` (any alignment); returns the bytes written. A write-back
    /// write (the kernel's page cache writing dirty pages) may use the write-back
    /// reserve; any other write that may need more clusters than are free beyond it fails
    /// with ENOSPC before anything changes.
    @discardableResult
    public func write(ino: InodeNumber, offset: UInt64, data: [UInt8], append: Bool = false,
                      writeBack: Bool = false) throws(FSError) -> Int {
        let (id, inode) = try regular(ino)
        guard !data.isEmpty else { return 0 }
        let offset = append ? inode.attributes.size : offset
        let end = offset + UInt64(data.count)
        guard end <= fileBytesMax else { throw FSError(EFBIG) }
        if !writeBack, writebackReserveClusters > 0, let blob = store.blob(id) {
            // The clusters of the range the file does not have yet (zeroing a gap before
            // it writes only into clusters it already has).
            let missing = missingClusters(blob.extents, offset / clusterBytes, (end + clusterBytes - 1) / clusterBytes)
            if missing > freeClustersForWriting() { throw FSError(ENOSPC, "the rest is held for the page cache's write-back") }
        }
        if offset > inode.attributes.size { try expose(id, inode, from: inode.attributes.size, to: offset) }
        try ensureCapacity(id, bytes: end)
        let start = offset / unitBytes * unitBytes
        let alignedEnd = (end + unitBytes - 1) / unitBytes * unitBytes
        var buffer: [UInt8]
        if start == offset && alignedEnd == end {
            buffer = data
        } else {
            // Read-modify-write of the partial io units at either end.
            buffer = [UInt8](repeating: 0, count: Int(alignedEnd - start))
            if start != offset {
                let head = try storeCall { try store.read(blob: id, offsetUnits: start / unitBytes, countUnits: 1) }
                buffer.replaceSubrange(0..<Int(unitBytes), with: head)
            }
            if alignedEnd != end, alignedEnd - unitBytes >= start + (start != offset ? unitBytes : 0) {
                let tail = try storeCall { try store.read(blob: id, offsetUnits: (alignedEnd - unitBytes) / unitBytes, countUnits: 1) }
                buffer.replaceSubrange((buffer.count - Int(unitBytes))..<buffer.count, with: tail)
            }
            buffer.replaceSubrange(Int(offset - start)..<Int(end - start), with: data)
        }
        try storeCall { try store.write(blob: id, offsetUnits: start / unitBytes, data: buffer) }
        if end > inode.attributes.size {
            inode.sizeGrowths &+= 1
            inode.attributes.size = end
            inode.dirty = true
        }
        stampDataWrite(inode)
        assert(inode.attributes.size >= end, "write: the size covers the bytes written")
        return data.count
    }

    /// The blob covers at least `bytes`: grown (thinly, nothing allocated) by doubling.
    private func ensureCapacity(_ id: BlobID, bytes: UInt64) throws(FSError) {
        let needed = (bytes + clusterBytes - 1) / clusterBytes
        guard let current = store.blob(id)?.clusterCount, current < needed else { return }
        let grown = min(max(needed, current * 2, 16), UInt64(UInt32.max) * 16)
        try storeCall { try store.resizeBlob(id, clusterCount: grown) }
    }

    /// Before a file grows from `from` to `to`: zeroes the bytes past `from` in its last
    /// cluster and releases any whole cluster in between that still holds old bytes.
    private func expose(_ id: BlobID, _ inode: Inode, from: UInt64, to: UInt64) throws(FSError) {
        guard to > from, let blob = store.blob(id) else { return }
        let capacityBytes = blob.clusterCount * clusterBytes
        guard from < capacityBytes else { return }
        let limit = min(to, capacityBytes)
        let firstWhole = (from + clusterBytes - 1) / clusterBytes
        if from % clusterBytes != 0 {
            try zero(id, from: from, to: min(limit, firstWhole * clusterBytes))
        }
        let lastWhole = limit / clusterBytes  // clusters [firstWhole, lastWhole) lie wholly inside
        if lastWhole > firstWhole, allocated(blob, from: firstWhole, to: lastWhole) {
            try unmapClusters(id, from: firstWhole, to: lastWhole)
        }
        if limit % clusterBytes != 0, lastWhole >= firstWhole, limit > lastWhole * clusterBytes {
            try zero(id, from: max(from, lastWhole * clusterBytes), to: limit)
        }
    }

    /// Whether clusters [from, to) hold data: the file's own or shared (read from a snapshot).
    private func allocated(_ blob: BlobMetadata, from: UInt64, to: UInt64) -> Bool {
        store.hasData(blob.id, from: from, to: to)
    }

    private func unmapClusters(_ id: BlobID, from: UInt64, to: UInt64) throws(FSError) {
        var index = from
        while index < to {
            let count = UInt32(min(to - index, UInt64(UInt32.max)))
            try storeCall { try store.unmap(blob: id, clusterIndex: index, count: count) }
            index += UInt64(count)
        }
    }

    /// Zeroes bytes [from, to) of the blob (within its capacity): whole io units with the
    /// device's write-zeroes, partial ones by read-modify-write; unallocated clusters
    /// already read as zeros.
    func zero(_ id: BlobID, from: UInt64, to: UInt64) throws(FSError) {
        guard to > from else { return }
        let firstUnit = from / unitBytes
        let endUnit = (to + unitBytes - 1) / unitBytes
        for unit in Set([firstUnit, endUnit - 1]) where unit * unitBytes < from || (unit + 1) * unitBytes > to {
            var bytes = try storeCall { try store.read(blob: id, offsetUnits: unit, countUnits: 1) }
            guard bytes.contains(where: { $0 != 0 }) else { continue }
            let lower = Int(max(from, unit * unitBytes) - unit * unitBytes)
            let upper = Int(min(to, (unit + 1) * unitBytes) - unit * unitBytes)
            for index in lower..<upper { bytes[index] = 0 }
            try storeCall { try store.write(blob: id, offsetUnits: unit, data: bytes) }
        }
        let wholeStart = (from + unitBytes - 1) / unitBytes
        let wholeEnd = to / unitBytes
        if wholeEnd > wholeStart {
            try storeCall { try store.writeZeroes(blob: id, offsetUnits: wholeStart, countUnits: wholeEnd - wholeStart) }
        }
    }

    // MARK: - Size

    func truncate(_ id: BlobID, _ inode: Inode, to size: UInt64) throws(FSError) {
        guard size <= fileBytesMax else { throw FSError(EFBIG) }
        let old = inode.attributes.size
        var release: Range<UInt64>?
        if size > old {
            try expose(id, inode, from: old, to: size)
            try ensureCapacity(id, bytes: size)
        } else if size < old, let blob = store.blob(id) {
            let keep = (size + clusterBytes - 1) / clusterBytes
            if keep < blob.clusterCount, allocated(blob, from: keep, to: blob.clusterCount) { release = keep..<blob.clusterCount }
        }
        let now = realtimeNs()
        // The new size and the release of the clusters past it: one transaction, so a
        // crash never leaves the old size over released (zero) clusters.
        try updateAttributes(id, inode, { attributes in
            attributes.size = size
            attributes.mtimeNs = now
            attributes.ctimeNs = now
        }, also: { tx throws(BlobStoreError) in
            guard let release else { return }
            var index = release.lowerBound
            while index < release.upperBound {
                let count = UInt32(min(release.upperBound - index, UInt64(UInt32.max)))
                try tx.unmap(id, clusterIndex: index, count: count)
                index += UInt64(count)
            }
            // Cut to nothing, a copy reads nothing of the shared data any more: it lets go of it.
            if release.lowerBound == 0 { try detachFromSharedData(&tx, id) }
        })
        precondition(inode.attributes.size == size && !inode.dirty, "truncate: the new size is committed")
    }

    // MARK: - fallocate

    public struct AllocateMode: OptionSet, Sendable {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }
        public static let keepSize = AllocateMode(rawValue: 0x01)
        public static let punchHole = AllocateMode(rawValue: 0x02)
        public static let zeroRange = AllocateMode(rawValue: 0x10)
    }

    public func allocate(ino: InodeNumber, mode: AllocateMode, offset: UInt64, length: UInt64) throws(FSError) {
        let (id, inode) = try regular(ino)
        guard length > 0 else { throw FSError(EINVAL, "fallocate of 0 bytes") }
        let end = offset + length
        guard end <= fileBytesMax else { throw FSError(EFBIG) }
        guard mode.rawValue & ~(AllocateMode.keepSize.rawValue | AllocateMode.punchHole.rawValue | AllocateMode.zeroRange.rawValue) == 0 else {
            throw FSError(EOPNOTSUPP, "fallocate mode \(mode.rawValue)")
        }
        let size = inode.attributes.size
        if mode.contains(.punchHole) {
            guard mode.contains(.keepSize), !mode.contains(.zeroRange) else { throw FSError(EOPNOTSUPP, "punch hole without keep size") }
            try punch(id, from: offset, to: min(end, size))
        } else {
            // Everything past the old size that the file may come to cover reads as zeros first,
            // also with keep-size (a later size change will not expose it again).
            if end > size { try expose(id, inode, from: size, to: end) }
            try ensureCapacity(id, bytes: end)
            if mode.contains(.zeroRange) { try punch(id, from: offset, to: end) }
            try reserve(id, from: offset, to: end)
            if !mode.contains(.keepSize), end > size {
                inode.attributes.size = end
                inode.sizeGrowths &+= 1
            }
        }
        let now = realtimeNs()
        inode.attributes.mtimeNs = now
        inode.attributes.ctimeNs = now
        inode.dirty = true
        try writeBack()
    }

    /// Bytes [from, to) read as zeros after; whole clusters inside are released.
    private func punch(_ id: BlobID, from: UInt64, to: UInt64) throws(FSError) {
        guard to > from, let blob = store.blob(id) else { return }
        let limit = min(to, blob.clusterCount * clusterBytes)
        guard limit > from else { return }
        let firstWhole = (from + clusterBytes - 1) / clusterBytes
        let lastWhole = limit / clusterBytes
        if lastWhole > firstWhole {
            try zero(id, from: from, to: firstWhole * clusterBytes)
            if allocated(blob, from: firstWhole, to: lastWhole) { try unmapClusters(id, from: firstWhole, to: lastWhole) }
            try zero(id, from: lastWhole * clusterBytes, to: limit)
        } else {
            try zero(id, from: from, to: limit)
        }
    }

    /// Allocates every cluster of [from, to) that is not (zero-filled, so nothing stale shows).
    private func reserve(_ id: BlobID, from: UInt64, to: UInt64) throws(FSError) {
        guard store.blob(id) != nil else { return }
        // Shared clusters hold data: they are not reserved (a write to one copies it, as
        // on XFS without FALLOC_FL_UNSHARE_RANGE).
        let blob = store.dataExtents(id)
        let first = from / clusterBytes
        let last = (to + clusterBytes - 1) / clusterBytes
        guard freeClustersForWriting() >= missingClusters(blob, first, last) else {
            throw FSError(ENOSPC, "fallocate needs more clusters than are free")
        }
        var index = first
        while index < last {
            if isAllocated(blob, index) { index += 1; continue }
            var runEnd = index + 1
            while runEnd < last, runEnd - index < 4096, !isAllocated(blob, runEnd) { runEnd += 1 }
            let zeros = [UInt8](repeating: 0, count: Int((runEnd - index) * clusterBytes))
            try storeCall { try store.write(blob: id, offsetUnits: index * clusterBytes / unitBytes, data: zeros) }
            index = runEnd
        }
    }

    private func isAllocated(_ extents: [Extent], _ index: UInt64) -> Bool {
        extents.contains { index >= $0.clusterIndex && index < $0.clusterIndex + UInt64($0.count) }
    }

    private func missingClusters(_ extents: [Extent], _ first: UInt64, _ last: UInt64) -> UInt64 {
        var present: UInt64 = 0
        for extent in extents {
            let lower = max(first, extent.clusterIndex)
            let upper = min(last, extent.clusterIndex + UInt64(extent.count))
            if upper > lower { present += upper - lower }
        }
        return (last - first) - present
    }

    // MARK: - Durability

    /// What an asynchronous fsync (`FileSystemService.fsync`) of `ino` must do: whether
    /// the inode has attributes to commit, and whether its data must be flushed before
    /// they are (`dataFirst`: the size grew in memory since the last such flush, and the
    /// new size must not become durable before the bytes under it; the count of growths
    /// to hand back to `dataFlushed`). Without growth, attributes and data are made
    /// durable by one flush.
    public func fsyncPlan(ino: InodeNumber) throws(FSError) -> (needsAttributes: Bool, dataFirst: UInt64?) {
        let inode = try inode(ino)
        let needsAttributes = inode.dirty && store.blob(ino.blobID) != nil
        let grown = inode.sizeGrowths != inode.sizeGrowthsFlushed
        return (needsAttributes, needsAttributes && grown ? inode.sizeGrowths : nil)
    }

    /// The data of every growth up to `growths` (from `fsyncPlan`) is durable.
    public func dataFlushed(ino: InodeNumber, growths: UInt64) {
        guard let inode = inodes[ino.blobID] else { return }
        inode.sizeGrowthsFlushed = max(inode.sizeGrowthsFlushed, growths)
    }

    /// The second half: commits the attributes (durable at the next flush).
    public func commitAttributes(ino: InodeNumber) throws(FSError) {
        let id = ino.blobID
        guard let inode = inodes[id], inode.dirty, store.blob(id) != nil else { return }
        try updateAttributes(id, inode) { _ in }
    }

    /// fsync/fdatasync: the file's data flushed, then its attributes committed.
    public func fsync(ino: InodeNumber, dataOnly: Bool = false) throws(FSError) {
        let id = ino.blobID
        let inode = try inode(ino)
        // The data (and every commit before it) first, then the attributes, then their flush.
        try storeCall { try store.sync() }
        guard inode.dirty, store.blob(id) != nil else { return }
        try updateAttributes(id, inode) { _ in }
        try storeCall { try store.sync() }
    }
}
