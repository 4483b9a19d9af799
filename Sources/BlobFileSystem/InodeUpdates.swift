import Blobstore

extension FileSystem {
    /// One change's unit of work on inode attributes: the new attributes of each inode the
    /// change touches, staged under its blob id. An inode that plays two parts (the one
    /// directory of a rename within it, both names of an exchange of two links) is one
    /// entry whose changes add up. The transaction gets each staged inode's attributes
    /// once (`write`); the cached inodes take them only after it committed (`settle`), so
    /// a failed transaction leaves the cache as it was.
    ///
    /// Use: `let slot = updates.stage(id, inode)`, change `updates[slot]`, then
    /// `try updates.write(into: &tx)` inside the transaction and `updates.settle()` after it.
    struct InodeUpdates {
        private var ids: [BlobID] = []
        private var cached: [Inode] = []
        private var staged: [InodeAttributes] = []
        private var written = false

        /// Stages `inode` (blob `id`) with its current attributes unless it is staged
        /// already; returns its slot either way.
        mutating func stage(_ id: BlobID, _ inode: Inode) -> Int {
            if let slot = ids.firstIndex(of: id) {
                assert(cached[slot] === inode, "blob \(id) staged with two different inodes")
                return slot
            }
            ids.append(id)
            cached.append(inode)
            staged.append(inode.attributes)
            return ids.count - 1
        }

        var isEmpty: Bool { ids.isEmpty }

        subscript(slot: Int) -> InodeAttributes {
            get { staged[slot] }
            set { staged[slot] = newValue }
        }

        /// The modification and change times of the inode in `slot` set to `now` (a
        /// directory whose entries changed).
        mutating func touch(_ slot: Int, now: Int64) {
            staged[slot].mtimeNs = now
            staged[slot].ctimeNs = now
        }

        /// Adds each staged inode's attributes to `tx`, once each.
        mutating func write(into tx: inout BlobTransaction) throws(BlobStoreError) {
            for index in ids.indices {
                try tx.setXattr(ids[index], name: Key.inode, value: staged[index].encode(), isInternal: true)
            }
            written = true
        }

        /// After the transaction committed: the cached inodes take the staged attributes
        /// and are clean (what they hold is in the log).
        func settle() {
            precondition(written, "settle() of inode updates that were not written")
            for index in ids.indices {
                cached[index].attributes = staged[index]
                cached[index].dirty = false
            }
        }
    }

    /// Commits `change` to the attributes of one inode (with whatever else `body` adds to
    /// the transaction) and settles it: the pattern of every single-inode attribute change.
    func updateAttributes(_ id: BlobID, _ inode: Inode, _ change: (inout InodeAttributes) -> Void,
                          also body: (inout BlobTransaction) throws(BlobStoreError) -> Void = { _ throws(BlobStoreError) in })
        throws(FSError) {
        var updates = InodeUpdates()
        let slot = updates.stage(id, inode)
        change(&updates[slot])
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try body(&tx)
                try updates.write(into: &tx)
            }
        }
        updates.settle()
        precondition(!inode.dirty, "updateAttributes: what the inode holds is in the log")
    }
}
