/// The blobs of a loaded store: those whose metadata is in memory, and those the blob
/// table names whose chains have not been read yet. A load that knows the bitmaps and
/// counts without the chains (`BlobStore+Load`) leaves every blob unread; the first use
/// of one (`subscript`) reads its chain through `reader`. Blob metadata changes only in
/// memory after it is read, so an unread blob is as the last checkpoint wrote it.
///
/// Iterating requires every chain read (`readAll` on the store first); `count` and
/// `ids` include unread blobs.
final class BlobCache {
    private(set) var read: [BlobID: BlobMetadata] = [:]
    /// Unread blobs: the first page of each one's chain, from the table.
    private(set) var unread: [BlobID: UInt32] = [:]
    /// Reads one unread blob's chain: its metadata, nil if it could not be read (the
    /// reader reports why). Set by the store.
    var reader: ((BlobID, UInt32) -> BlobMetadata?)?

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
            read[id] = newValue
            unread[id] = nil
        }
    }

    private func readIfUnread(_ id: BlobID) -> BlobMetadata? {
        guard let root = unread[id], let reader else { return nil }
        guard let blob = reader(id, root) else { return nil }
        unread[id] = nil
        read[id] = blob
        return blob
    }

    /// A load found blob `id` in the table, its chain starting at page `root`.
    func noteUnread(_ id: BlobID, root: UInt32) { unread[id] = root }

    /// `id` was read by the caller (a batched read of many chains).
    func noteRead(_ blob: BlobMetadata) {
        unread[blob.id] = nil
        read[blob.id] = blob
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

    func removeAll() {
        read = [:]
        unread = [:]
    }
}

extension BlobCache: Sequence {
    /// Every blob; call only when every chain has been read (`allRead`).
    func makeIterator() -> Dictionary<BlobID, BlobMetadata>.Iterator {
        precondition(unread.isEmpty, "iterating the blobs needs every chain read first")
        return read.makeIterator()
    }
}
