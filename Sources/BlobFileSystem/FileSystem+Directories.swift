#if canImport(Glibc)
import Glibc
#endif
import Blobstore

/// Directory listings: a snapshot taken at `openDirectory`, served by index.
extension FileSystem {
    // MARK: - Directories

    /// A listing of the directory as it is now ("." and ".." first); `readDirectory`
    /// serves it by index, so entries added or removed meanwhile never make a listing skip
    /// or repeat one.
    public func openDirectory(ino: InodeNumber) throws(FSError) -> UInt64 {
        let (id, directory) = try directory(ino: ino)
        var entries = [DirectoryEntry(name: [UInt8(ascii: ".")], ino: ino, type: UInt32(S_IFDIR)),
                       DirectoryEntry(name: [UInt8(ascii: "."), UInt8(ascii: ".")],
                                      ino: InodeNumber(blob: directory.attributes.parent), type: UInt32(S_IFDIR))]
        if let blob = store.blob(id) {
            entries.reserveCapacity(blob.internalXattrs.count + 2)
            for (key, value) in blob.internalXattrs {
                guard let name = Key.entryName(key), let decoded = Key.decodeEntry(value) else { continue }
                entries.append(DirectoryEntry(name: name, ino: InodeNumber(blob: decoded.id), type: decoded.type))
            }
        }
        let handle = nextListing
        nextListing += 1
        listings[handle] = entries
        cachedInode(blob: id)?.opens += 1
        return handle
    }

    private func cachedInode(blob id: BlobID) -> Inode? { inodes[id] }

    /// Entries of a listing from `offset` on, while `accept` takes them (it returns false
    /// when the reply is full). The offset of an entry's successor is its index + 1.
    public func readDirectory(handle: UInt64, offset: UInt64, _ accept: (DirectoryEntry, UInt64) -> Bool) throws(FSError) {
        guard let entries = listings[handle] else { throw FSError(EBADF, "directory handle \(handle)") }
        var index = Int(min(offset, UInt64(entries.count)))
        while index < entries.count, accept(entries[index], UInt64(index + 1)) { index += 1 }
    }

    /// The same as `readDirectory`, with each entry's attributes (one lookup each, as
    /// READDIRPLUS counts them; entries removed since the listing was taken are skipped).
    public func readDirectoryPlus(handle: UInt64, offset: UInt64, _ accept: (DirectoryEntry, Attributes?, UInt64) -> Bool) throws(FSError) {
        guard let entries = listings[handle] else { throw FSError(EBADF, "directory handle \(handle)") }
        var index = Int(min(offset, UInt64(entries.count)))
        // The inodes this reply and the next ones hold, read together rather than one by
        // one below, when the first one is not in memory (entries 0 and 1 are . and ..).
        if let first = entries[min(max(index, 2), entries.count)...].first, !store.isRead(first.ino.blobID) {
            store.readChainsAhead(of: entries[index..<min(entries.count, index + Self.readAheadEntries)].lazy.map(\.ino.blobID))
        }
        while index < entries.count {
            let entry = entries[index]
            let isDot = index < 2
            guard isDot || store.blob(entry.ino.blobID) != nil,
                  let inode = try? inode(entry.ino) else { index += 1; continue }
            guard accept(entry, isDot ? nil : attributes(entry.ino.blobID, inode), UInt64(index + 1)) else { return }
            if !isDot { inode.lookups += 1 }
            index += 1
        }
    }

    public func releaseDirectory(ino: InodeNumber, handle: UInt64) {
        listings[handle] = nil
        let id = ino.blobID
        if let inode = inodes[id] {
            inode.opens -= min(inode.opens, 1)
            releaseIfUnused(id, inode)
        }
    }
}
