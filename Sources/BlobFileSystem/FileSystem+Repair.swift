#if canImport(Glibc)
import Glibc
#endif
import Blobstore

/// What `FileSystem.repair` changed.
public struct FileSystemRepairReport: Sendable {
    public var changes: [RepairChange] = []
    /// Blobs whose content (attributes, target) the repair rewrote or removed; moving an
    /// inode to /lost+found or fixing its link count does not count.
    public var affectedBlobs: Set<BlobID> = []
}

extension FileSystem {
    /// fsck --repair for the file system (FORMAT.md, "File system"), on a writable store the
    /// blob-store repair made consistent: afterwards `check` is clean and the file system
    /// mounts. In order:
    ///
    /// - the root (blob 0, the super blob, marked `fs`, a directory) is made whole, or
    ///   made anew when its blob is gone;
    /// - an inode whose attributes do not decode gets new ones (its type from the entry
    ///   naming it, else a regular file); a symlink without a target is removed;
    /// - the tree is walked from the root: an entry whose value is malformed or whose
    ///   inode is gone is dropped, a wrong type is corrected, a directory named twice keeps
    ///   the name in the directory its parent field gives (else the first found);
    /// - inodes no directory names (and not orphans) are linked into /lost+found (made
    ///   when missing, mode 0700) with their inode number as name — a directory with its
    ///   subtree, from its topmost unnamed ancestor;
    /// - orphan markers for missing or named inodes are removed;
    /// - link counts, directories' parents and sizes (a symlink's is its target's length,
    ///   a file's at most its blob's capacity) are set to what the tree says.
    ///
    /// `expectFileSystem`: the store held a file system before the damage (its super block
    /// named blob 0), so a missing root is made anew; otherwise a store without one is left
    /// alone.
    public static func repair(_ store: BlobStore, expectFileSystem: Bool) throws(FSError) -> FileSystemRepairReport {
        var repair = Repair(store: store)
        let isFileSystem = store.superBlobID == .rootDirectory
            && store.xattr(.rootDirectory, name: Key.superInfo, isInternal: true) == magic
        guard isFileSystem || expectFileSystem else { return repair.report }
        try repair.run()
        return repair.report
    }
}

/// The state of one file-system repair: what the tree says, and the fixes, written in
/// transactions of a bounded number of records (each must fit the log).
private struct Repair {
    let store: BlobStore
    var report = FileSystemRepairReport()
    /// Attributes of every inode, as they will be written.
    var inodes: [BlobID: InodeAttributes] = [:]
    /// Attributes that must be written at the end (rebuilt, or changed by the walk).
    var rewrite: Set<BlobID> = []
    /// Directories reached, with the directory that names them.
    var parentOf: [BlobID: BlobID] = [.rootDirectory: .rootDirectory]
    var subdirectories: [BlobID: UInt32] = [:]
    var links: [BlobID: UInt32] = [:]
    var orphans: Set<BlobID> = []
    /// Directory entries whose directory is not its parent field's: adopted only when the
    /// directory is not reached through its own parent.
    var unconfirmed: [(directory: BlobID, key: String, child: BlobID)] = []
    /// Internal xattr changes not yet committed (nil value: remove), and blobs to delete.
    var pending: [(id: BlobID, name: String, value: [UInt8]?)] = []
    var deletions: [BlobID] = []
    var lostAndFound: BlobID?
    let clusterBytes: UInt64
    static let recordsPerTransaction = 32

    init(store: BlobStore) {
        self.store = store
        clusterBytes = UInt64(store.clusterSizeBytes)
    }

    mutating func note(_ kind: String, _ id: BlobID?, _ text: String, affects: Bool = false) {
        report.changes.append(RepairChange(kind, blob: id, text))
        if affects, let id { report.affectedBlobs.insert(id) }
    }

    mutating func run() throws(FSError) {
        // Every blob is looked at: their chains read in batches, not one by one on first use.
        do { try store.readAllChains() } catch { throw FSError(error) }
        try makeRootWhole()
        readInodes()
        walk(from: [.rootDirectory])
        adoptUnconfirmed()
        settleOrphans()
        try linkUnreachable()
        fixAttributes()
        try commitPending()
    }

    // MARK: - Root

    private mutating func makeRootWhole() throws(FSError) {
        let now = realtimeNs()
        var root = InodeAttributes(mode: UInt32(S_IFDIR) | 0o755, uid: 0, gid: 0, nlink: 2, timeNs: now, generation: 1)
        guard store.blob(.rootDirectory) != nil else {
            try storeCall {
                try store.transaction { tx throws(BlobStoreError) in
                    let id = try tx.createBlob()
                    precondition(id == .rootDirectory, "blob 0 is free, and the first id a transaction hands out")
                    try tx.setXattr(.rootDirectory, name: Key.superInfo, value: FileSystem.magic, isInternal: true)
                    try tx.setXattr(.rootDirectory, name: Key.inode, value: root.encode(), isInternal: true)
                    try tx.setSuperBlob(.rootDirectory)
                }
            }
            note("root_recreated", .rootDirectory, "the root directory (blob 0) is gone: a new, empty one is made; the inodes it named go to /lost+found",
                 affects: true)
            return
        }
        if store.xattr(.rootDirectory, name: Key.superInfo, isInternal: true) != FileSystem.magic {
            pending.append((.rootDirectory, Key.superInfo, FileSystem.magic))
            note("root_marker", .rootDirectory, "the root (blob 0) lacks the file-system marker \"\(Key.superInfo)\": set")
        }
        if let value = store.xattr(.rootDirectory, name: Key.inode, isInternal: true), let decoded = InodeAttributes.decode(value) {
            guard !decoded.isDirectory else { return try claimSuperBlob() }
            root.uid = decoded.uid
            root.gid = decoded.gid
        }
        try storeCall {
            try store.transaction { tx throws(BlobStoreError) in
                try tx.setXattr(.rootDirectory, name: Key.inode, value: root.encode(), isInternal: true)
            }
        }
        note("root_attributes", .rootDirectory, "the root's attributes are missing, unreadable or not a directory's: made a directory's (mode 0755)",
             affects: true)
        try claimSuperBlob()
    }

    private mutating func claimSuperBlob() throws(FSError) {
        guard store.superBlobID != .rootDirectory else { return }
        let before = store.superBlobID
        try storeCall { try store.setSuperBlob(.rootDirectory) }
        note("super_blob", .rootDirectory, "the store's super blob was \(before.map { "\($0)" } ?? "none"): set to blob 0, the root")
    }

    // MARK: - Inodes

    /// Attributes of every blob that has them; rebuilt for those whose bytes do not decode
    /// or that a directory names without any. Symlinks without a target are removed.
    private mutating func readInodes() {
        var named: [BlobID: UInt32] = [:]  // a type some entry gives each blob
        for id in store.blobIDList {
            guard let blob = store.blob(id), store.xattr(id, name: Key.inode, isInternal: true).flatMap(InodeAttributes.decode)?.isDirectory == true
                    || id == .rootDirectory else { continue }
            for (key, value) in blob.internalXattrs where Key.entryName(key) != nil {
                if let entry = Key.decodeEntry(value), named[entry.id] == nil { named[entry.id] = entry.type }
            }
        }
        for id in store.blobIDList {
            guard let blob = store.blob(id) else { continue }
            let value = store.xattr(id, name: Key.inode, isInternal: true)
            if let value, let attributes = InodeAttributes.decode(value) {
                inodes[id] = attributes
            } else if value != nil || named[id] != nil {
                // Without attributes but named, or with attributes that do not decode: an
                // inode lost its attributes. Its type from the name; a regular file's size
                // covers its allocated clusters.
                let hasEntries = blob.internalXattrs.contains { Key.entryName($0.name) != nil }
                let type = hasEntries ? UInt32(S_IFDIR) : named[id] ?? UInt32(S_IFREG)
                let end = blob.extents.last.map { ($0.clusterIndex + UInt64($0.count)) * clusterBytes } ?? 0
                var attributes = InodeAttributes(mode: type | (type == UInt32(S_IFDIR) ? 0o700 : 0o600), uid: 0, gid: 0,
                                                 size: type == UInt32(S_IFREG) ? end : 0, timeNs: realtimeNs(),
                                                 generation: store.logSequence)
                attributes.parent = .rootDirectory
                inodes[id] = attributes
                rewrite.insert(id)
                note("attributes_rebuilt", id, "inode \(InodeNumber(blob: id)): attributes \(value == nil ? "missing" : "unreadable (\(value!.count) bytes)"): rebuilt as a \(Self.typeName(type)) owned by root",
                     affects: true)
            }
        }
        for (id, attributes) in inodes where attributes.isSymlink && store.xattr(id, name: Key.symlink, isInternal: true) == nil {
            inodes[id] = nil
            deletions.append(id)
            note("symlink_removed", id, "symlink inode \(InodeNumber(blob: id)) has no target: removed", affects: true)
        }
    }

    static func typeName(_ type: UInt32) -> String {
        switch type {
        case UInt32(S_IFDIR): "directory"
        case UInt32(S_IFREG): "regular file"
        case UInt32(S_IFLNK): "symlink"
        default: "file of type \(type >> 12)"
        }
    }

    // MARK: - Tree

    /// Walks directories from `start` (each already reached), breadth first.
    private mutating func walk(from start: [BlobID]) {
        var queue = start
        while let directory = queue.popLast() {
            guard let blob = store.blob(directory) else { continue }
            for (key, value) in blob.internalXattrs {
                guard let name = Key.entryName(key) else { continue }
                let shown = "\"\(String(decoding: name, as: UTF8.self))\" in directory \(InodeNumber(blob: directory))"
                guard let entry = Key.decodeEntry(value) else {
                    drop(directory, key, "entry \(shown): value of \(value.count) bytes, not 9")
                    continue
                }
                guard let child = inodes[entry.id] else {
                    drop(directory, key, "entry \(shown): inode \(InodeNumber(blob: entry.id)) does not exist")
                    continue
                }
                if child.type != entry.type {
                    pending.append((directory, key, Key.entryValue(id: entry.id, type: child.type)))
                    note("entry_type", directory, "entry \(shown): type \(entry.type >> 12), but inode \(InodeNumber(blob: entry.id)) is a \(Self.typeName(child.type)): corrected")
                }
                guard child.isDirectory else {
                    links[entry.id, default: 0] += 1
                    continue
                }
                if parentOf[entry.id] != nil {
                    drop(directory, key, "entry \(shown): directory inode \(InodeNumber(blob: entry.id)) is named elsewhere already (a directory has one name)")
                } else if child.parent != directory, entry.id != .rootDirectory {
                    unconfirmed.append((directory, key, entry.id))
                } else {
                    adopt(entry.id, in: directory)
                    queue.append(entry.id)
                }
            }
        }
    }

    private mutating func drop(_ directory: BlobID, _ key: String, _ why: String) {
        pending.append((directory, key, nil))
        note("entry_dropped", directory, why + ": dropped")
    }

    private mutating func adopt(_ child: BlobID, in directory: BlobID) {
        parentOf[child] = directory
        subdirectories[directory, default: 0] += 1
    }

    /// Entries naming a directory from somewhere other than its parent: the first one
    /// keeps it when its own parent never named it.
    private mutating func adoptUnconfirmed() {
        while !unconfirmed.isEmpty {
            let entries = unconfirmed
            unconfirmed = []
            var reached: [BlobID] = []
            for (directory, key, child) in entries {
                if parentOf[child] != nil {
                    drop(directory, key, "entry \"\(String(decoding: Key.entryName(key) ?? [], as: UTF8.self))\" in directory \(InodeNumber(blob: directory)): directory inode \(InodeNumber(blob: child)) is named elsewhere already (a directory has one name)")
                    continue
                }
                adopt(child, in: directory)
                reached.append(child)
            }
            walk(from: reached)
        }
    }

    private mutating func settleOrphans() {
        guard let root = store.blob(.rootDirectory) else { return }
        for (name, _) in root.internalXattrs where name.hasPrefix(Key.orphanPrefix) && name != Key.superInfo {
            guard let id = Key.orphanID(name), let attributes = inodes[id] else {
                pending.append((.rootDirectory, name, nil))
                note("orphan_marker", nil, "orphan marker \"\(name)\" names no inode: removed")
                continue
            }
            if links[id] != nil || parentOf[id] != nil || id == .rootDirectory {
                pending.append((.rootDirectory, name, nil))
                note("orphan_marker", id, "inode \(InodeNumber(blob: id)) is marked an orphan (unlinked while open) yet a directory names it: the marker is removed")
                continue
            }
            if attributes.isDirectory {
                // An unlinked directory held open: nothing to keep in it, as for a file.
                orphans.insert(id)
                continue
            }
            orphans.insert(id)
        }
    }

    // MARK: - lost+found

    private mutating func linkUnreachable() throws(FSError) {
        var namedIn: [BlobID: Set<BlobID>] = [:]
        for (id, attributes) in inodes where attributes.isDirectory {
            guard let blob = store.blob(id) else { continue }
            for (key, value) in blob.internalXattrs where Key.entryName(key) != nil {
                if let entry = Key.decodeEntry(value) { namedIn[entry.id, default: []].insert(id) }
            }
        }
        func unreachableDirectories() -> [BlobID] {
            inodes.filter { $0.value.isDirectory && parentOf[$0.key] == nil && !orphans.contains($0.key) }.map(\.key).sorted()
        }
        for start in unreachableDirectories() where parentOf[start] == nil {
            // Its topmost unreached ancestor that names it: the subtree keeps its shape.
            var top = start
            var seen: Set<BlobID> = [start]
            while let parent = inodes[top]?.parent, parentOf[parent] == nil, inodes[parent]?.isDirectory == true,
                  namedIn[top]?.contains(parent) == true, seen.insert(parent).inserted, !orphans.contains(parent) {
                top = parent
            }
            try link(top)
            walk(from: [top])
            adoptUnconfirmed()
        }
        let files = inodes.filter { !$0.value.isDirectory && links[$0.key] == nil && !orphans.contains($0.key) }.map(\.key).sorted()
        for id in files { try link(id) }
    }

    /// Names `id` in /lost+found by its inode number.
    private mutating func link(_ id: BlobID) throws(FSError) {
        let directory = try lostAndFoundDirectory()
        guard let attributes = inodes[id] else { return }
        var name = InodeNumber(blob: id).description
        var suffix = 0
        while store.xattr(directory, name: Key.entry(Array(name.utf8)), isInternal: true) != nil
                || pending.contains(where: { $0.id == directory && $0.name == Key.entry(Array(name.utf8)) && $0.value != nil }) {
            suffix += 1
            name = "\(InodeNumber(blob: id)).\(suffix)"
        }
        pending.append((directory, Key.entry(Array(name.utf8)), Key.entryValue(id: id, type: attributes.type)))
        if attributes.isDirectory {
            adopt(id, in: directory)
        } else {
            links[id, default: 0] += 1
        }
        let what = attributes.isDirectory ? "directory" : "\(Self.typeName(attributes.type)) of \(attributes.size) bytes"
        note("lost_found", id, "inode \(InodeNumber(blob: id)) (\(what)) is named by no directory: linked as /\(lostAndFoundName)/\(name)")
    }

    private var lostAndFoundName = "lost+found"

    private mutating func lostAndFoundDirectory() throws(FSError) -> BlobID {
        if let lostAndFound { return lostAndFound }
        var name = "lost+found"
        var suffix = 0
        while true {
            let key = Key.entry(Array(name.utf8))
            let existing = store.xattr(.rootDirectory, name: key, isInternal: true).flatMap(Key.decodeEntry)
            let dropped = pending.contains { $0.id == .rootDirectory && $0.name == key && $0.value == nil }
            if let existing, !dropped, inodes[existing.id]?.isDirectory == true, parentOf[existing.id] == .rootDirectory {
                lostAndFound = existing.id
                lostAndFoundName = name
                return existing.id
            }
            if existing == nil || dropped { break }
            suffix += 1
            name = "lost+found.\(suffix)"
        }
        // Its own transaction: later entries name its blob id.
        try commitPending()
        let now = realtimeNs()
        var attributes = InodeAttributes(mode: UInt32(S_IFDIR) | 0o700, uid: 0, gid: 0, nlink: 2, timeNs: now,
                                         generation: store.logSequence)
        attributes.parent = .rootDirectory
        let key = Key.entry(Array(name.utf8))
        let id = try storeCall {
            try store.transaction { tx throws(BlobStoreError) -> BlobID in
                let id = try tx.createBlob()
                try tx.setXattr(id, name: Key.inode, value: attributes.encode(), isInternal: true)
                try tx.setXattr(.rootDirectory, name: key, value: Key.entryValue(id: id, type: attributes.type), isInternal: true)
                return id
            }
        }
        inodes[id] = attributes
        adopt(id, in: .rootDirectory)
        lostAndFound = id
        lostAndFoundName = name
        note("lost_found_made", id, "made /\(name) (inode \(InodeNumber(blob: id)), mode 0700) for the inodes no directory names")
        return id
    }

    // MARK: - Attributes

    private mutating func fixAttributes() {
        for id in inodes.keys.sorted() {
            guard var attributes = inodes[id] else { continue }
            let before = attributes
            var notes: [String] = []
            if attributes.isDirectory {
                let expected = orphans.contains(id) ? 0 : 2 + (subdirectories[id] ?? 0)
                if attributes.nlink != expected {
                    notes.append("link count \(attributes.nlink) → \(expected)")
                    attributes.nlink = expected
                }
                let parent = parentOf[id] ?? .rootDirectory
                if attributes.parent != parent {
                    notes.append("parent inode \(InodeNumber(blob: attributes.parent)) → \(InodeNumber(blob: parent))")
                    attributes.parent = parent
                }
            } else {
                let expected = links[id] ?? 0
                if attributes.nlink != expected {
                    notes.append("link count \(attributes.nlink) → \(expected)")
                    attributes.nlink = expected
                }
            }
            if attributes.isSymlink {
                var length = 0
                var index = 0
                while let piece = store.xattr(id, name: Key.symlinkPiece(index), isInternal: true) {
                    length += piece.count
                    index += 1
                }
                if attributes.size != UInt64(length) {
                    notes.append("size \(attributes.size) → \(length) (the target's length)")
                    attributes.size = UInt64(length)
                }
            } else if attributes.isRegular, let blob = store.blob(id), attributes.size > blob.clusterCount * clusterBytes {
                let capacity = blob.clusterCount * clusterBytes
                notes.append("size \(attributes.size) → \(capacity) (its blob's capacity)")
                attributes.size = capacity
            }
            guard attributes != before || rewrite.contains(id) else { continue }
            inodes[id] = attributes
            pending.append((id, Key.inode, attributes.encode()))
            if !notes.isEmpty {
                let sizeChanged = attributes.size != before.size
                note(sizeChanged ? "size" : "link_count", id, "inode \(InodeNumber(blob: id)): " + notes.joined(separator: ", "), affects: sizeChanged)
            }
        }
    }

    // MARK: - Writing

    private mutating func commitPending() throws(FSError) {
        let changes = pending
        let removals = deletions
        pending = []
        deletions = []
        var start = 0
        while start < changes.count {
            let chunk = changes[start..<min(changes.count, start + Self.recordsPerTransaction)]
            try storeCall {
                try store.transaction { tx throws(BlobStoreError) in
                    for (id, name, value) in chunk {
                        if let value {
                            try tx.setXattr(id, name: name, value: value, isInternal: true)
                        } else {
                            try tx.removeXattr(id, name: name, isInternal: true)
                        }
                    }
                }
            }
            start += chunk.count
        }
        for id in removals where store.blob(id) != nil {
            try storeCall { try store.transaction { (tx) throws(BlobStoreError) in try FileSystem.deleteFileBlob(&tx, id, in: store) } }
        }
    }
}
