#if canImport(Glibc)
import Glibc
#endif
import Blobstore

/// What the file-system check found on top of the blob store's verifier.
public struct FileSystemCheckReport: Sendable {
    public var problems: [String] = []
    public var directories = 0
    public var files = 0
    public var orphans = 0
    /// Blobs with no inode attributes: not part of the file system (blobcli import makes
    /// them); reported, not a problem.
    public var foreignBlobs = 0
    /// Snapshot blobs holding data that copies of files share (FileSystem+Clones.swift).
    public var sharedDataBlobs = 0
    public var isConsistent: Bool { problems.isEmpty }
}

extension FileSystem {
    /// Walks the tree from the root: every entry names a live inode of the type it
    /// records, link counts equal the entries naming each inode (directories: 2 + their
    /// subdirectories), each directory's parent is the one that names it, and every blob
    /// is reachable or an orphan (unlinked while open).
    public static func check(_ store: BlobStore) -> FileSystemCheckReport {
        var report = FileSystemCheckReport()
        // Every blob is looked at: their chains read in batches, not one by one on first use.
        do { try store.readAllChains() } catch {
            report.problems.append("blob metadata: \(error)")
            return report
        }
        guard store.superBlobID == .rootDirectory, store.xattr(.rootDirectory, name: Key.superInfo, isInternal: true) == magic else {
            report.problems.append("super blob: not a blobfs root (no \"\(Key.superInfo)\" marker on blob 0)")
            return report
        }
        var links: [BlobID: UInt32] = [:]
        var subdirectories: [BlobID: UInt32] = [:]
        var attributes: [BlobID: InodeAttributes] = [:]
        var parents: [BlobID: BlobID] = [:]
        var queue: [BlobID] = [.rootDirectory]
        var visited: Set<BlobID> = [.rootDirectory]
        func load(_ id: BlobID) -> InodeAttributes? {
            if let known = attributes[id] { return known }
            guard let value = store.xattr(id, name: Key.inode, isInternal: true) else { return nil }
            let decoded = InodeAttributes.decode(value)
            attributes[id] = decoded
            return decoded
        }
        guard load(.rootDirectory)?.isDirectory == true else {
            report.problems.append("root (blob 0): attributes missing or not a directory")
            return report
        }
        while let directory = queue.popLast() {
            report.directories += 1
            guard let blob = store.blob(directory) else { continue }
            for (key, value) in blob.internalXattrs {
                guard let name = Key.entryName(key) else { continue }
                let shown = String(decoding: name, as: UTF8.self)
                guard let entry = Key.decodeEntry(value) else {
                    report.problems.append("directory \(InodeNumber(blob: directory)), entry \"\(shown)\": value of \(value.count) bytes, not 9")
                    continue
                }
                guard store.blob(entry.id) != nil, let child = load(entry.id) else {
                    report.problems.append("directory \(InodeNumber(blob: directory)), entry \"\(shown)\": inode \(InodeNumber(blob: entry.id)) does not exist")
                    continue
                }
                if child.type != entry.type {
                    report.problems.append("directory \(InodeNumber(blob: directory)), entry \"\(shown)\": type \(entry.type >> 12) but inode \(InodeNumber(blob: entry.id)) is \(child.type >> 12)")
                }
                links[entry.id, default: 0] += 1
                if child.isDirectory {
                    subdirectories[directory, default: 0] += 1
                    if let previous = parents[entry.id] {
                        report.problems.append("directory inode \(InodeNumber(blob: entry.id)) is named in \(InodeNumber(blob: previous)) and \(InodeNumber(blob: directory))")
                    }
                    parents[entry.id] = directory
                    if child.parent != directory {
                        report.problems.append("directory inode \(InodeNumber(blob: entry.id)): parent \(InodeNumber(blob: child.parent)), but it is named in \(InodeNumber(blob: directory))")
                    }
                    if visited.insert(entry.id).inserted { queue.append(entry.id) }
                } else {
                    report.files += 1
                }
            }
        }
        let orphans = Set(store.blob(.rootDirectory)?.internalXattrs.compactMap { Key.orphanID($0.name) } ?? [])
        report.orphans = orphans.count
        for id in store.blobIDList {
            guard store.xattr(id, name: Key.inode, isInternal: true) != nil else {
                if store.xattr(id, name: Key.sharedData, isInternal: true) != nil {
                    report.sharedDataBlobs += 1
                    if store.clones(of: id).isEmpty {
                        report.problems.append("shared data blob \(id): no file reads it (leaked)")
                    }
                } else {
                    report.foreignBlobs += 1
                }
                continue
            }
            guard let inode = load(id) else {
                report.problems.append("inode \(InodeNumber(blob: id)): attributes unreadable")
                continue
            }
            if inode.isDirectory {
                let expected = id == .rootDirectory || links[id] != nil ? 2 + (subdirectories[id] ?? 0) : 0
                if inode.nlink != expected {
                    report.problems.append("directory inode \(InodeNumber(blob: id)): link count \(inode.nlink), expected \(expected)")
                }
            } else if inode.nlink != links[id] ?? 0 {
                report.problems.append("inode \(InodeNumber(blob: id)): link count \(inode.nlink), named \(links[id] ?? 0) times")
            }
            if id != .rootDirectory, links[id] == nil, !orphans.contains(id) {
                report.problems.append("inode \(InodeNumber(blob: id)): not named in any directory and not an orphan (leaked)")
            }
            if links[id] != nil, orphans.contains(id) {
                // A mount deletes orphans: it would leave the names pointing at nothing.
                report.problems.append("inode \(InodeNumber(blob: id)): marked an orphan, yet named in a directory")
            }
            report.problems += sizeProblems(store, id, inode)
        }
        return report
    }
}

extension FileSystem {
    /// A symlink's size is its target's length, and it has one; a regular file's size is
    /// within its blob (a file grows its blob before its size).
    static func sizeProblems(_ store: BlobStore, _ id: BlobID, _ inode: InodeAttributes) -> [String] {
        if inode.isSymlink {
            var length = 0
            var index = 0
            while let piece = store.xattr(id, name: Key.symlinkPiece(index), isInternal: true) {
                length += piece.count
                index += 1
            }
            if index == 0 { return ["symlink inode \(InodeNumber(blob: id)): no target"] }
            if inode.size != UInt64(length) { return ["symlink inode \(InodeNumber(blob: id)): size \(inode.size), target of \(length) bytes"] }
        } else if inode.isRegular, let blob = store.blob(id) {
            let capacity = blob.clusterCount * UInt64(store.clusterSizeBytes)
            if inode.size > capacity { return ["inode \(InodeNumber(blob: id)): size \(inode.size) beyond its blob's \(capacity) bytes"] }
        }
        return []
    }
}
