#if canImport(Glibc)
import Glibc
#endif
import Blobstore

/// Attributes (SETATTR) and extended attributes.
extension FileSystem {
    // MARK: - Attributes

    public func setAttributes(ino: InodeNumber, _ changes: AttributeChanges, caller: Caller) throws(FSError) -> Attributes {
        let id = ino.blobID
        let inode = try inode(ino)
        let now = realtimeNs()
        if let size = changes.size {
            guard inode.attributes.isRegular else {
                throw FSError(inode.attributes.isDirectory ? EISDIR : EINVAL, "truncate of a non-regular file")
            }
            try truncate(id, inode, to: size)
        }
        try updateAttributes(id, inode) { attributes in
            if let mode = changes.mode { attributes.mode = (attributes.mode & UInt32(S_IFMT)) | (mode & 0o7777) }
            if let uid = changes.uid { attributes.uid = uid }
            if let gid = changes.gid { attributes.gid = gid }
            // chown drops them whoever the caller is, as Linux's chown_common does for
            // anything but a directory.
            if changes.dropSetID || (changes.uid != nil || changes.gid != nil), !attributes.isDirectory {
                attributes.mode &= ~UInt32(S_ISUID)
                if attributes.mode & UInt32(S_IXGRP) != 0 { attributes.mode &= ~UInt32(S_ISGID) }
            }
            switch changes.atime {
            case .now?: attributes.atimeNs = now
            case let .ns(value)?: attributes.atimeNs = value
            case nil: break
            }
            switch changes.mtime {
            case .now?: attributes.mtimeNs = now
            case let .ns(value)?: attributes.mtimeNs = value
            case nil: break
            }
            attributes.ctimeNs = changes.ctime ?? now
        }
        return self.attributes(id, inode)
    }

    // MARK: - Extended attributes

    static let userXattrPrefixes = ["user.", "trusted.", "security."]

    private func checkXattrName(_ name: String) throws(FSError) {
        guard Self.userXattrPrefixes.contains(where: { name.hasPrefix($0) && name.utf8.count > $0.utf8.count }) else {
            throw FSError(EOPNOTSUPP, "xattr namespace of \(name)")
        }
        guard name.utf8.count <= 255 else { throw FSError(ERANGE, "xattr name longer than 255 bytes") }
    }

    public func setXattr(ino: InodeNumber, name: String, value: [UInt8], create: Bool, replace: Bool) throws(FSError) {
        try checkXattrName(name)
        let id = ino.blobID
        let inode = try inode(ino)
        let exists = store.xattr(id, name: name) != nil
        if create && exists { throw FSError(EEXIST) }
        if replace && !exists { throw FSError(ENODATA) }
        guard name.utf8.count + value.count <= MetadataPage.xattrBytesMax else {
            throw FSError(E2BIG, "xattr name and value over \(MetadataPage.xattrBytesMax) bytes")
        }
        try updateAttributes(id, inode, { $0.ctimeNs = realtimeNs() }, also: { tx throws(BlobStoreError) in
            try tx.setXattr(id, name: name, value: value)
        })
    }

    public func getXattr(ino: InodeNumber, name: String) throws(FSError) -> [UInt8] {
        _ = try inode(ino)
        guard let value = store.xattr(ino.blobID, name: name) else { throw FSError(ENODATA) }
        return value
    }

    /// The names of the user-visible xattrs; trusted.* only for a privileged caller (as
    /// the kernel's own file systems list them only to CAP_SYS_ADMIN).
    public func listXattrs(ino: InodeNumber, privileged: Bool = true) throws(FSError) -> [String] {
        _ = try inode(ino)
        let names = store.blob(ino.blobID)?.xattrs.map(\.name) ?? []
        return privileged ? names : names.filter { !$0.hasPrefix("trusted.") }
    }

    public func removeXattr(ino: InodeNumber, name: String) throws(FSError) {
        let id = ino.blobID
        let inode = try inode(ino)
        guard store.xattr(id, name: name) != nil else { throw FSError(ENODATA) }
        try updateAttributes(id, inode, { $0.ctimeNs = realtimeNs() }, also: { tx throws(BlobStoreError) in
            try tx.removeXattr(id, name: name)
        })
    }
}
