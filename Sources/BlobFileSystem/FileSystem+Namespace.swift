#if canImport(Glibc)
import Glibc
#endif
import Blobstore

/// The namespace: lookup, creating, linking, removing and renaming names. Each change
/// is one blob-store transaction; the cached inodes take the new attributes only after
/// it committed.
extension FileSystem {
    // MARK: - Lookup

    public func lookup(parent: InodeNumber, name: [UInt8]) throws(FSError) -> Attributes {
        try lookup(parent: parent, nameBytes: name)
    }

    /// `lookup` of a name given as bytes (the FUSE request's own buffer: no copy).
    public func lookup<Name: Collection<UInt8>>(parent: InodeNumber, nameBytes name: Name) throws(FSError) -> Attributes {
        let (directoryID, _) = try directory(ino: parent)
        guard name.count <= Self.nameBytesMax else { throw FSError(ENAMETOOLONG) }
        guard let found = entry(in: directoryID, name) else { throw FSError(ENOENT) }
        if inodes[found.id] == nil, !store.isRead(found.id) { readAhead(in: directoryID, from: Key.entry(name)) }
        let inode = try inode(blob: found.id)
        inode.lookups += 1
        return attributes(found.id, inode)
    }

    /// Inodes read ahead after a lookup or a READDIRPLUS that has to read one from the
    /// device: the next entries of its directory, in listing order, read in one batch (a
    /// walk of the tree, `find | xargs stat`, looks them up next) rather than one device
    /// read each.
    static let readAheadEntries = 128

    private func readAhead(in directoryID: BlobID, from key: String) {
        guard let entries = store.blob(directoryID)?.internalXattrs, let start = entries.position(of: key) else { return }
        var ids: [BlobID] = []
        ids.reserveCapacity(Self.readAheadEntries)
        for position in start..<min(entries.count, start + Self.readAheadEntries) {
            let entry = entries[position]
            guard Key.entryName(entry.name) != nil, let decoded = Key.decodeEntry(entry.value), inodes[decoded.id] == nil else { continue }
            ids.append(decoded.id)
        }
        store.readChainsAhead(of: ids)
    }

    /// The kernel dropped `count` references to `ino`.
    public func forget(ino: InodeNumber, count: UInt64) {
        let id = ino.blobID
        guard let inode = inodes[id] else { return }
        inode.lookups -= min(inode.lookups, count)
        releaseIfUnused(id, inode)
    }

    public func getAttributes(ino: InodeNumber) throws(FSError) -> Attributes {
        let inode = try inode(ino)
        return attributes(ino.blobID, inode)
    }

    // MARK: - Creating

    /// Creates a regular file, directory, symlink, FIFO, socket or device node.
    public func make(parent: InodeNumber, name: [UInt8], mode: UInt32, rdev: UInt32 = 0, symlinkTarget: [UInt8]? = nil,
                     caller: Caller) throws(FSError) -> Attributes {
        try checkName(name)
        let (directoryID, directory) = try directory(ino: parent)
        guard entry(in: directoryID, name) == nil else { throw FSError(EEXIST) }
        try reserveInode()
        if let symlinkTarget {
            guard !symlinkTarget.isEmpty, symlinkTarget.count <= Self.symlinkBytesMax else {
                throw FSError(ENAMETOOLONG, "\(symlinkTarget.count)-byte symlink target")
            }
        }
        let now = realtimeNs()
        var mode = mode
        var gid = caller.gid
        let isDirectory = mode & UInt32(S_IFMT) == UInt32(S_IFDIR)
        if directory.attributes.mode & UInt32(S_ISGID) != 0 {
            gid = directory.attributes.gid
            if isDirectory { mode |= UInt32(S_ISGID) }
        } else if !isDirectory, mode & UInt32(S_ISGID) != 0, caller.uid != 0, caller.gid != gid {
            mode &= ~UInt32(S_ISGID)
        }
        var attributes = InodeAttributes(mode: mode, uid: caller.uid, gid: gid, nlink: isDirectory ? 2 : 1,
                                         size: UInt64(symlinkTarget?.count ?? 0), timeNs: now,
                                         generation: store.logSequence, rdev: rdev)
        if isDirectory { attributes.parent = directoryID }
        var updates = InodeUpdates()
        let parentSlot = updates.stage(directoryID, directory)
        updates.touch(parentSlot, now: now)
        if isDirectory { updates[parentSlot].nlink += 1 }
        let id = try storeCall {
            try store.transaction { tx throws(BlobStoreError) -> BlobID in
                let id = try tx.createBlob()
                try tx.setXattr(id, name: Key.inode, value: attributes.encode(), isInternal: true)
                if let symlinkTarget {
                    // In pieces that each fit a log record: "l", then "l1", "l2" ...
                    for (index, start) in stride(from: 0, to: symlinkTarget.count, by: Key.symlinkPieceBytes).enumerated() {
                        let piece = Array(symlinkTarget[start..<min(start + Key.symlinkPieceBytes, symlinkTarget.count)])
                        try tx.setXattr(id, name: Key.symlinkPiece(index), value: piece, isInternal: true)
                    }
                }
                try tx.setXattr(directoryID, name: Key.entry(name), value: Key.entryValue(id: id, type: attributes.type),
                                isInternal: true)
                try updates.write(into: &tx)
                return id
            }
        }
        updates.settle()
        let inode = Inode(attributes)
        inode.lookups = 1
        inodes[id] = inode
        assert(entry(in: directoryID, name)?.id == id, "make: the new name leads to the new inode")
        assert(!isDirectory || directory.attributes.nlink >= 3, "make: a parent of a directory counts its '..'")
        return self.attributes(id, inode)
    }

    public func readSymlink(ino: InodeNumber) throws(FSError) -> [UInt8] {
        let inode = try inode(ino)
        guard inode.attributes.isSymlink else { throw FSError(EINVAL, "not a symlink") }
        let id = ino.blobID
        guard var target = store.xattr(id, name: Key.symlink, isInternal: true) else {
            throw FSError(EIO, "symlink \(ino) has no target")
        }
        var index = 1
        while let piece = store.xattr(id, name: Key.symlinkPiece(index), isInternal: true) {
            target += piece
            index += 1
        }
        return target
    }

    public func link(ino: InodeNumber, newParent: InodeNumber, newName: [UInt8]) throws(FSError) -> Attributes {
        try checkName(newName)
        let id = ino.blobID
        let inode = try inode(ino)
        guard !inode.attributes.isDirectory else { throw FSError(EPERM, "hard link to a directory") }
        guard inode.attributes.nlink < UInt32(Int32.max) else { throw FSError(EMLINK) }
        let (directoryID, directory) = try directory(ino: newParent)
        guard entry(in: directoryID, newName) == nil else { throw FSError(EEXIST) }
        try reserveInode()
        let now = realtimeNs()
        var updates = InodeUpdates()
        updates.touch(updates.stage(directoryID, directory), now: now)
        let linked = updates.stage(id, inode)
        updates[linked].nlink += 1
        updates[linked].ctimeNs = now
        let type = inode.attributes.type
        let wasOrphan = updates[linked].nlink == 1
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.setXattr(directoryID, name: Key.entry(newName), value: Key.entryValue(id: id, type: type),
                                isInternal: true)
                try updates.write(into: &tx)
                if wasOrphan { try tx.removeXattr(.rootDirectory, name: Key.orphan(id), isInternal: true) }
            }
        }
        updates.settle()
        inode.lookups += 1
        assert(entry(in: directoryID, newName)?.id == id, "link: the new name leads to the inode")
        precondition(inode.attributes.nlink >= 1 && !inode.dirty, "link: counted and committed")
        return self.attributes(id, inode)
    }

    // MARK: - Removing

    private func isEmptyDirectory(_ id: BlobID) -> Bool {
        guard let blob = store.blob(id) else { return true }
        return !blob.internalXattrs.contains { Key.entryName($0.name) != nil }
    }

    /// Adds to `tx` what dropping one link of `id` takes: its attributes, and its deletion
    /// (or its orphan record while it is still open or known to the kernel).
    private func dropLink(_ tx: inout BlobTransaction, _ id: BlobID, _ inode: Inode, now: Int64,
                          attributes: inout InodeAttributes) throws(BlobStoreError) {
        if attributes.isDirectory {
            attributes.nlink = 0
        } else {
            attributes.nlink -= min(attributes.nlink, 1)
        }
        attributes.ctimeNs = now
        if attributes.nlink == 0 && inode.opens == 0 && inode.lookups == 0 {
            try deleteFileBlob(&tx, id)
        } else {
            try tx.setXattr(id, name: Key.inode, value: attributes.encode(), isInternal: true)
            if attributes.nlink == 0 { try tx.setXattr(.rootDirectory, name: Key.orphan(id), value: [], isInternal: true) }
        }
    }

    private func settleDropped(_ id: BlobID, _ inode: Inode, _ attributes: InodeAttributes) {
        if store.blob(id) == nil {
            inodes[id] = nil
        } else {
            inode.attributes = attributes
            inode.dirty = false
        }
    }

    public func unlink(parent: InodeNumber, name: [UInt8]) throws(FSError) {
        try remove(parent: parent, name: name, directory: false)
    }

    public func removeDirectory(parent: InodeNumber, name: [UInt8]) throws(FSError) {
        try remove(parent: parent, name: name, directory: true)
    }

    private func remove(parent: InodeNumber, name: [UInt8], directory wantDirectory: Bool) throws(FSError) {
        let (directoryID, directory) = try directory(ino: parent)
        guard let found = entry(in: directoryID, name) else { throw FSError(ENOENT) }
        let child = try inode(blob: found.id)
        if wantDirectory {
            guard child.attributes.isDirectory else { throw FSError(ENOTDIR) }
            guard isEmptyDirectory(found.id) else { throw FSError(ENOTEMPTY) }
        } else {
            guard !child.attributes.isDirectory else { throw FSError(EISDIR) }
        }
        let now = realtimeNs()
        var updates = InodeUpdates()
        let parentSlot = updates.stage(directoryID, directory)
        updates.touch(parentSlot, now: now)
        if wantDirectory { updates[parentSlot].nlink -= 1 }
        var childAttributes = child.attributes
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.removeXattr(directoryID, name: Key.entry(name), isInternal: true)
                try updates.write(into: &tx)
                try dropLink(&tx, found.id, child, now: now, attributes: &childAttributes)
            }
        }
        updates.settle()
        settleDropped(found.id, child, childAttributes)
        assert(entry(in: directoryID, name) == nil, "remove: the name is gone")
        precondition(!directory.dirty, "remove: the parent's attributes are committed")
    }

    /// Deletes an unlinked inode once nothing refers to it any more.
    func releaseIfUnused(_ id: BlobID, _ inode: Inode) {
        guard inode.opens == 0, inode.lookups == 0 else { return }
        if inode.attributes.nlink == 0, store.blob(id) != nil {
            do {
                try store.transaction { tx throws(BlobStoreError) in
                    try deleteFileBlob(&tx, id)
                    try tx.removeXattr(.rootDirectory, name: Key.orphan(id), isInternal: true)
                }
            } catch {
                // Still an orphan on disk: the next mount deletes it.
                return
            }
        }
        if !inode.dirty { inodes[id] = nil }
    }

    // MARK: - Rename

    public struct RenameFlags: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let noReplace = RenameFlags(rawValue: 1)
        public static let exchange = RenameFlags(rawValue: 2)
    }

    public func rename(parent: InodeNumber, name: [UInt8], newParent: InodeNumber, newName: [UInt8],
                       flags: RenameFlags = []) throws(FSError) {
        try checkName(newName)
        guard flags.rawValue & ~3 == 0, flags != [.noReplace, .exchange] else { throw FSError(EINVAL, "rename flags") }
        let (fromID, fromDirectory) = try directory(ino: parent)
        let (toID, toDirectory) = try directory(ino: newParent)
        guard let source = entry(in: fromID, name) else { throw FSError(ENOENT) }
        let target = entry(in: toID, newName)
        let sourceInode = try inode(blob: source.id)
        let now = realtimeNs()
        if flags.contains(.exchange) {
            guard let target else { throw FSError(ENOENT) }
            try exchange(fromID, fromDirectory, name, source, toID, toDirectory, newName, target, now: now)
            return
        }
        if let target {
            if flags.contains(.noReplace) { throw FSError(EEXIST) }
            if target.id == source.id { return }  // two links of one inode: nothing to do
            let targetInode = try inode(blob: target.id)
            if sourceInode.attributes.isDirectory {
                guard targetInode.attributes.isDirectory else { throw FSError(ENOTDIR) }
                guard isEmptyDirectory(target.id) else { throw FSError(ENOTEMPTY) }
            } else if targetInode.attributes.isDirectory {
                throw FSError(EISDIR)
            }
        } else {
            try reserveInode()
        }
        let movesDirectory = sourceInode.attributes.isDirectory
        var updates = InodeUpdates()
        let from = updates.stage(fromID, fromDirectory)
        let to = updates.stage(toID, toDirectory)  // the same slot within one directory
        let moved = updates.stage(source.id, sourceInode)
        updates.touch(from, now: now)
        updates.touch(to, now: now)
        updates[moved].ctimeNs = now
        if movesDirectory && fromID != toID {
            updates[from].nlink -= 1
            updates[to].nlink += 1
            updates[moved].parent = toID
        }
        let targetInode = try target.map { (t) throws(FSError) in try inode(blob: t.id) }
        var targetAttributes = targetInode?.attributes
        if let targetAttributes, targetAttributes.isDirectory { updates[to].nlink -= 1 }
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.removeXattr(fromID, name: Key.entry(name), isInternal: true)
                try tx.setXattr(toID, name: Key.entry(newName), value: Key.entryValue(id: source.id, type: source.type),
                                isInternal: true)
                try updates.write(into: &tx)
                if let target, let targetInode, var attributes = targetAttributes {
                    try dropLink(&tx, target.id, targetInode, now: now, attributes: &attributes)
                    targetAttributes = attributes
                }
            }
        }
        updates.settle()
        if let target, let targetInode, let targetAttributes { settleDropped(target.id, targetInode, targetAttributes) }
        assert(entry(in: toID, newName)?.id == source.id, "rename: the new name leads to the source")
        assert(fromID == toID && name == newName || entry(in: fromID, name) == nil, "rename: the old name is gone")
    }

    private func exchange(_ fromID: BlobID, _ fromDirectory: Inode, _ name: [UInt8], _ source: (id: BlobID, type: UInt32),
                          _ toID: BlobID, _ toDirectory: Inode, _ newName: [UInt8], _ target: (id: BlobID, type: UInt32),
                          now: Int64) throws(FSError) {
        var updates = InodeUpdates()
        let from = updates.stage(fromID, fromDirectory)
        let to = updates.stage(toID, toDirectory)  // the same slot within one directory
        let first = updates.stage(source.id, try inode(blob: source.id))
        let second = updates.stage(target.id, try inode(blob: target.id))  // the same slot for two links of one inode
        updates[first].ctimeNs = now
        updates[second].ctimeNs = now
        updates.touch(from, now: now)
        updates.touch(to, now: now)
        if fromID != toID {
            if updates[first].isDirectory { updates[first].parent = toID; updates[from].nlink -= 1; updates[to].nlink += 1 }
            if updates[second].isDirectory { updates[second].parent = fromID; updates[to].nlink -= 1; updates[from].nlink += 1 }
        }
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.setXattr(fromID, name: Key.entry(name), value: Key.entryValue(id: target.id, type: target.type),
                                isInternal: true)
                try tx.setXattr(toID, name: Key.entry(newName), value: Key.entryValue(id: source.id, type: source.type),
                                isInternal: true)
                try updates.write(into: &tx)
            }
        }
        updates.settle()
        assert(entry(in: fromID, name)?.id == target.id && entry(in: toID, newName)?.id == source.id,
               "exchange: each name leads to the other's inode")
    }
}
