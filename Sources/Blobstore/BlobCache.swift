/// The blobs of a loaded store: those whose metadata is in memory, and those the blob
/// table names whose chains have not been read yet. A load that knows the bitmaps and
/// counts without the chains (`BlobStore+Load`) leaves every blob unread; the first use
/// of one (`subscript`) reads its chain through `reader`. Blob metadata changes only in
/// memory after it is read, so an unread blob is as the last checkpoint wrote it.
///
/// Iterating requires every chain read (`readAll` on the store first); `count` and
/// `ids` include unread blobs.
///
/// With a `limit`, reading one more blob than the limit evicts blobs in the order they
/// were read, down to seven eighths of it: those the store lets go (`evictable`: clean,
/// no open handle, not the super blob) become unread again, their chain's first page
/// remembered. Eviction is suspended (`suspendEviction`) while a caller needs every blob
/// in memory at once (reading all chains, rebuilding the clone index).
final class BlobCache {
    private(set) var read: [BlobID: BlobMetadata] = [:]
    /// Unread blobs: the first page of each one's chain, from the table.
    private(set) var unread: [BlobID: UInt32] = [:]
    /// Reads one unread blob's chain into the cache (`noteRead`); leaves it unread when it
    /// cannot (the reader reports why). Set by the store.
    var reader: ((BlobID) -> Void)?
    /// Blobs kept in memory at most (0: no limit).
    var limit = 0
    /// Whether the store lets `id` go now: the first page of its durable chain (the
    /// store forgets the chain), nil to keep it.
    var evictable: ((BlobID) -> UInt32?)?
    private var suspended = 0
    /// Blobs in the order they were read (an id may appear more than once, or after it
    /// was let go: skipped then).
    private var order: [BlobID] = []
    private var orderHead = 0
    /// In memory past which the next read evicts: the limit, or more after a pass that
    /// could not get under it (every blob changed since the last checkpoint, or open), so
    /// that reads do not each walk the whole order for nothing.
    private var evictAbove = 0
    private(set) var evictions: UInt64 = 0

    subscript(id: BlobID) -> BlobMetadata? {
        get {
            if let blob = read[id] { return blob }
            return readIfUnread(id)
        }
        _modify {
            if read[id] == nil { _ = readIfUnread(id) }
            yield &read[id]
        }
        set {
            // A blob let go is read again first: the store must know its durable chain
            // (a change supersedes it, a deletion frees it).
            if unread[id] != nil { _ = readIfUnread(id) }
            if newValue != nil && read[id] == nil { noteInMemory(id) }
            read[id] = newValue
            unread[id] = nil
        }
    }

    private func readIfUnread(_ id: BlobID) -> BlobMetadata? {
        guard unread[id] != nil, let reader else { return nil }
        reader(id)
        return read[id]
    }

    private func noteInMemory(_ id: BlobID) {
        guard limit > 0 else { return }
        order.append(id)
        if read.count > Swift.max(limit, evictAbove) && suspended == 0 { evict(downTo: limit - limit / 8, keeping: id) }
    }

    /// Lets blobs go, oldest read first, until `target` are in memory or none of the
    /// others may go; `keeping` (the one just read) stays.
    private func evict(downTo target: Int, keeping: BlobID) {
        guard let evictable else { return }
        var kept: [BlobID] = []
        while read.count > target, orderHead < order.count {
            let id = order[orderHead]
            orderHead += 1
            guard read[id] != nil else { continue }
            guard id != keeping, let root = evictable(id) else { kept.append(id); continue }
            read[id] = nil
            unread[id] = root
            evictions += 1
        }
        if orderHead > 4096 && orderHead * 2 > order.count {
            order.removeFirst(orderHead)
            orderHead = 0
        }
        order += kept
        evictAbove = read.count > target ? read.count + Swift.max(1, limit / 8) : limit
    }

    /// Until the matching `resumeEviction`, every blob read stays in memory.
    func suspendEviction() { suspended += 1 }

    /// Ends a `suspendEviction`; the last one evicts what is over the limit (a checkpoint
    /// has just made every changed blob clean: worth a pass even after one that failed).
    func resumeEviction() {
        suspended -= 1
        if suspended == 0, limit > 0, read.count > limit, let last = order.last { evict(downTo: limit - limit / 8, keeping: last) }
    }

    /// A load found blob `id` in the table, its chain starting at page `root`.
    func noteUnread(_ id: BlobID, root: UInt32) { unread[id] = root }

    /// `id` was read by the caller (a batched read of many chains).
    func noteRead(_ blob: BlobMetadata) {
        unread[blob.id] = nil
        read[blob.id] = blob
        noteInMemory(blob.id)
    }

    /// The first page of an unread blob's chain (for the table a checkpoint writes).
    func unreadRoot(_ id: BlobID) -> UInt32? { unread[id] }
    var unreadIDs: Dictionary<BlobID, UInt32>.Keys { unread.keys }
    var allRead: Bool { unread.isEmpty }
    /// Blobs that exist, read or not.
    var count: Int { read.count + unread.count }
    var readCount: Int { read.count }
    /// Every blob id in use, read or not.
    var ids: [BlobID] { Array(read.keys) + Array(unread.keys) }
}

extension BlobCache: Sequence {
    /// Every blob; call only when every chain has been read (`allRead`).
    func makeIterator() -> Dictionary<BlobID, BlobMetadata>.Iterator {
        precondition(unread.isEmpty, "iterating the blobs needs every chain read first")
        return read.makeIterator()
    }
}
