#if canImport(Glibc)
import Glibc
#endif
import Bdev
import BlobFileSystem
import CFuseKernel

/// One function per FUSE operation: decode the slot's arguments, call the file system,
/// answer. A thrown `FSError` is the answer (its errno).
extension FuseSession {
    // MARK: - Names and callers

    /// The NUL-terminated name at the start of `bytes` and what follows it.
    private func name(_ bytes: UnsafeRawBufferPointer) -> (name: [UInt8], rest: UnsafeRawBufferPointer) {
        let end = bytes.firstIndex(of: 0) ?? bytes.count
        let rest = end < bytes.count ? UnsafeRawBufferPointer(rebasing: bytes[(end + 1)...]) : UnsafeRawBufferPointer(start: nil, count: 0)
        return (Array(bytes[0..<end]), rest)
    }

    private func caller(_ slot: FuseSlot) -> Caller { Caller(uid: slot.header.uid, gid: slot.header.gid) }

    /// Runs `body`; a thrown error is the reply.
    @inline(__always)
    private func answering(_ slot: FuseSlot, _ body: () throws(FSError) -> Void) {
        do { try body() } catch { slot.replyError(error.errno) }
    }

    // MARK: - Attributes and entries

    private func fill(_ attr: inout fuse_attr, _ attributes: Attributes) {
        let a = attributes.attributes
        attr.ino = attributes.ino.rawValue
        attr.size = a.size
        attr.blocks = attributes.allocatedBytes / 512
        func split(_ ns: Int64) -> (UInt64, UInt32) {
            var seconds = ns / 1_000_000_000
            var rest = ns % 1_000_000_000
            if rest < 0 { seconds -= 1; rest += 1_000_000_000 }
            return (UInt64(bitPattern: seconds), UInt32(rest))
        }
        (attr.atime, attr.atimensec) = split(a.atimeNs)
        (attr.mtime, attr.mtimensec) = split(a.mtimeNs)
        (attr.ctime, attr.ctimensec) = split(a.ctimeNs)
        attr.mode = a.mode
        attr.nlink = a.nlink
        attr.uid = a.uid
        attr.gid = a.gid
        attr.rdev = a.rdev
        attr.blksize = attributes.blockSize
    }

    private func entry(_ attributes: Attributes) -> fuse_entry_out {
        var out = unsafe_zeroed(fuse_entry_out.self)
        out.nodeid = attributes.ino.rawValue
        out.generation = attributes.attributes.generation
        out.entry_valid = entryValid.seconds
        out.entry_valid_nsec = entryValid.nanoseconds
        out.attr_valid = attributeValid.seconds
        out.attr_valid_nsec = attributeValid.nanoseconds
        fill(&out.attr, attributes)
        return out
    }

    private func replyAttributes(_ slot: FuseSlot, _ attributes: Attributes) {
        var out = unsafe_zeroed(fuse_attr_out.self)
        out.attr_valid = attributeValid.seconds
        out.attr_valid_nsec = attributeValid.nanoseconds
        fill(&out.attr, attributes)
        slot.reply(out)
    }

    // MARK: - Namespace

    func lookup(_ slot: FuseSlot) {
        let name = slot.payload.prefix { $0 != 0 }  // no copy: looked up from the request's buffer
        answering(slot) { () throws(FSError) in
            slot.reply(entry(try fs.lookup(parent: slot.inode, nameBytes: name)))
        }
    }

    func forget(_ slot: FuseSlot) {
        fs.forget(ino: slot.inode, count: slot.argument(fuse_forget_in.self).nlookup)
        slot.noReply()
    }

    func batchForget(_ slot: FuseSlot) {
        let count = Int(slot.argument(fuse_batch_forget_in.self).count)
        let one = MemoryLayout<fuse_forget_one>.size
        for index in 0..<min(count, slot.payload.count / one) {
            let item = slot.payload.loadUnaligned(fromByteOffset: index * one, as: fuse_forget_one.self)
            fs.forget(ino: InodeNumber(item.nodeid), count: item.nlookup)
        }
        slot.noReply()
    }

    func getattr(_ slot: FuseSlot) {
        answering(slot) { () throws(FSError) in replyAttributes(slot, try fs.getAttributes(ino: slot.inode)) }
    }

    func setattr(_ slot: FuseSlot) {
        let request = slot.argument(fuse_setattr_in.self)
        let valid = Int32(bitPattern: request.valid)
        var changes = AttributeChanges()
        if valid & FATTR_MODE != 0 { changes.mode = request.mode }
        if valid & FATTR_UID != 0 { changes.uid = request.uid }
        if valid & FATTR_GID != 0 { changes.gid = request.gid }
        if valid & FATTR_SIZE != 0 { changes.size = request.size }
        func ns(_ seconds: UInt64, _ nanoseconds: UInt32) -> Int64 {
            Int64(bitPattern: seconds) &* 1_000_000_000 &+ Int64(nanoseconds)
        }
        if valid & FATTR_ATIME_NOW != 0 {
            changes.atime = .now
        } else if valid & FATTR_ATIME != 0 {
            changes.atime = .ns(ns(request.atime, request.atimensec))
        }
        if valid & FATTR_MTIME_NOW != 0 {
            changes.mtime = .now
        } else if valid & FATTR_MTIME != 0 {
            changes.mtime = .ns(ns(request.mtime, request.mtimensec))
        }
        if valid & FATTR_CTIME != 0 { changes.ctime = ns(request.ctime, request.ctimensec) }
        if valid & FATTR_KILL_SUIDGID != 0 { changes.dropSetID = true }  // a truncate by an unprivileged caller
        answering(slot) { () throws(FSError) in
            replyAttributes(slot, try fs.setAttributes(ino: slot.inode, changes, caller: caller(slot)))
        }
    }

    func readlink(_ slot: FuseSlot) {
        answering(slot) { () throws(FSError) in
            let target = try fs.readSymlink(ino: slot.inode)
            guard target.count <= slot.data.count else { throw FSError(ENAMETOOLONG) }
            target.withUnsafeBytes { slot.data.base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            slot.replyData(offset: 0, count: target.count)
        }
    }

    func symlink(_ slot: FuseSlot) {
        let (linkName, rest) = name(slot.payload)
        let target = name(rest).name
        answering(slot) { () throws(FSError) in
            slot.reply(entry(try fs.make(parent: slot.inode, name: linkName, mode: 0o120000 | 0o777,
                                         symlinkTarget: target, caller: caller(slot))))
        }
    }

    func mknod(_ slot: FuseSlot) {
        let request = slot.argument(fuse_mknod_in.self)
        answering(slot) { () throws(FSError) in
            slot.reply(entry(try fs.make(parent: slot.inode, name: name(slot.payload).name, mode: request.mode,
                                         rdev: request.rdev, caller: caller(slot))))
        }
    }

    func mkdir(_ slot: FuseSlot) {
        let request = slot.argument(fuse_mkdir_in.self)
        answering(slot) { () throws(FSError) in
            slot.reply(entry(try fs.make(parent: slot.inode, name: name(slot.payload).name,
                                         mode: 0o040000 | (request.mode & 0o7777), caller: caller(slot))))
        }
    }

    func unlink(_ slot: FuseSlot) {
        answering(slot) { () throws(FSError) in
            try fs.unlink(parent: slot.inode, name: name(slot.payload).name)
            slot.replyEmpty()
        }
    }

    func rmdir(_ slot: FuseSlot) {
        answering(slot) { () throws(FSError) in
            try fs.removeDirectory(parent: slot.inode, name: name(slot.payload).name)
            slot.replyEmpty()
        }
    }

    func rename(_ slot: FuseSlot, flags: UInt32) {
        // RENAME's argument is the new directory alone; RENAME2's adds the flags.
        let newDirectory = slot.argument(fuse_rename_in.self).newdir
        let (oldName, rest) = name(slot.payload)
        let newName = name(rest).name
        answering(slot) { () throws(FSError) in
            try fs.rename(parent: slot.inode, name: oldName, newParent: InodeNumber(newDirectory), newName: newName,
                          flags: FileSystem.RenameFlags(rawValue: flags))
            slot.replyEmpty()
        }
    }

    func link(_ slot: FuseSlot) {
        let request = slot.argument(fuse_link_in.self)
        answering(slot) { () throws(FSError) in
            slot.reply(entry(try fs.link(ino: InodeNumber(request.oldnodeid), newParent: slot.inode, newName: name(slot.payload).name)))
        }
    }

    // MARK: - Files

    /// The open reply's flags: direct I/O when asked (the mount option or O_DIRECT), and
    /// for a file opened for writing under the writeback cache when free space is short
    /// (below `writeThroughBelowBytes`): its writes then reach us one by one and a full
    /// file system fails the write() itself with ENOSPC, as ext4's would, instead of a
    /// later write-back. Direct writes to one file may run in parallel (else the kernel
    /// takes them one at a time).
    ///
    /// Any other open keeps the file's page cache (FOPEN_KEEP_CACHE), as a kernel file
    /// system's survives close and open: every change to a file's bytes passes through
    /// the kernel, which keeps its cache right (buffered writes land in it; direct
    /// writes, copy_file_range, fallocate and truncation invalidate what they change,
    /// direct ones since FUSE_DIRECT_IO_ALLOW_MMAP), and FUSE_AUTO_INVAL_DATA drops it
    /// when a GETATTR shows a new mtime or size. Without it each open threw away what
    /// the last one read or wrote and went back to the device.
    private func openFlags(_ flags: UInt32) -> UInt32 {
        let direct = UInt32(FOPEN_DIRECT_IO) | UInt32(FOPEN_PARALLEL_DIRECT_WRITES)
        if options.directIO || Int32(bitPattern: flags) & blobfs_fuse_kernel_O_DIRECT != 0 { return direct }
        let forWriting = Int32(bitPattern: flags) & O_ACCMODE != O_RDONLY
        if writebackCache && forWriting && fs.freeBytesForWriting < options.writeThroughBelowBytes { return direct }
        return UInt32(FOPEN_KEEP_CACHE)
    }

    func open(_ slot: FuseSlot) {
        let request = slot.argument(fuse_open_in.self)
        answering(slot) { () throws(FSError) in
            let truncate = Int32(bitPattern: request.flags) & O_TRUNC != 0
            try service.open(ino: slot.inode, truncate: truncate)
            if truncate && request.open_flags & UInt32(FUSE_OPEN_KILL_SUIDGID) != 0 {
                _ = try fs.setAttributes(ino: slot.inode, AttributeChanges(dropSetID: true), caller: caller(slot))
            }
            var out = fuse_open_out()
            out.open_flags = openFlags(request.flags)
            slot.reply(out)
        }
    }

    func create(_ slot: FuseSlot) {
        let request = slot.argument(fuse_create_in.self)
        answering(slot) { () throws(FSError) in
            let attributes = try service.create(parent: slot.inode, name: name(slot.payload).name, mode: request.mode,
                                                caller: caller(slot))
            let entrySize = MemoryLayout<fuse_entry_out>.size
            slot.scratch.storeBytes(of: entry(attributes), as: fuse_entry_out.self)
            var open = fuse_open_out()
            open.open_flags = openFlags(request.flags)
            (slot.scratch + entrySize).storeBytes(of: open, as: fuse_open_out.self)
            slot.replyScratch(entrySize + MemoryLayout<fuse_open_out>.size)
        }
    }

    func read(_ slot: FuseSlot) {
        let request = slot.argument(fuse_read_in.self)
        answering(slot) { () throws(FSError) in
            let count = min(Int(request.size), maxWrite)
            guard let started = try service.startRead(ino: slot.inode, offset: request.offset, count: count,
                                                      into: slot.data, handler: slot, tag: 0) else {
                return slot.replyData(offset: 0, count: 0)  // at or past the end
            }
            slot.readSkip = started.skip
            slot.readCount = started.count
            if !started.pending { slot.replyData(offset: started.skip, count: started.count) }
        }
    }

    func write(_ slot: FuseSlot) {
        let request = slot.argument(fuse_write_in.self)
        let count = Int(request.size)
        // The payload is where both transports put it: at the start of the slot's data.
        guard count <= slot.payload.count, slot.payload.baseAddress == UnsafeRawPointer(slot.data.base) else {
            return slot.replyError(EINVAL)
        }
        // With the writeback cache the kernel owns the file position: O_APPEND is its job.
        let append = Int32(bitPattern: request.flags) & O_APPEND != 0 && !writebackCache
        answering(slot) { () throws(FSError) in
            // A write-back of the kernel's page cache may use the room held for it.
            let writeBack = request.write_flags & UInt32(FUSE_WRITE_CACHE) != 0
            if request.write_flags & UInt32(FUSE_WRITE_KILL_SUIDGID) != 0 {
                // A write by an unprivileged caller to a set-ID file (the kernel sends it
                // through, not into its cache): rare, so an attribute change of its own.
                _ = try fs.setAttributes(ino: slot.inode, AttributeChanges(dropSetID: true), caller: caller(slot))
            }
            switch try service.startWrite(ino: slot.inode, offset: request.offset, data: slot.data.slice(from: 0, count: count),
                                          append: append, writeBack: writeBack, handler: slot, tag: 0) {
            case .pending:
                slot.writeCount = count
            case let .done(bytes):
                var out = fuse_write_out()
                out.size = UInt32(bytes)
                slot.reply(out)
            }
        }
    }

    func release(_ slot: FuseSlot) {
        service.release(ino: slot.inode)
        slot.replyEmpty()
    }

    func fsync(_ slot: FuseSlot) {
        // Answered when the flushes complete; the reactor serves other requests meanwhile.
        let dataOnly = slot.argument(fuse_fsync_in.self).fsync_flags & 1 != 0  // FUSE_FSYNC_FDATASYNC
        service.fsync(ino: slot.inode, dataOnly: dataOnly) { errno in
            if errno != 0 { slot.replyError(errno) } else { slot.replyEmpty() }
        }
    }

    /// FUSE_SYNCFS: attributes written back, everything flushed. Served for kernels that
    /// send it; this one (6.18) sends it to virtiofs only (`fc->sync_fs`), so syncfs(2)
    /// and sync(2) on a /dev/fuse or io_uring mount write the kernel's dirty pages back
    /// to us and return without a request: what they leave in memory becomes durable at
    /// the next fsync, flush of a file, or the one-second write-back (docs/ARCHITECTURE.md).
    func syncfs(_ slot: FuseSlot) {
        answering(slot) { () throws(FSError) in
            try fs.writeBack()
            service.flush { ok in if ok { slot.replyEmpty() } else { slot.replyError(EIO) } }
        }
    }

    func fallocate(_ slot: FuseSlot) {
        let request = slot.argument(fuse_fallocate_in.self)
        answering(slot) { () throws(FSError) in
            guard request.length > 0 else { throw FSError(EINVAL) }
            try fs.allocate(ino: slot.inode, mode: FileSystem.AllocateMode(rawValue: Int32(bitPattern: request.mode)),
                            offset: request.offset, length: request.length)
            slot.replyEmpty()
        }
    }

    /// COPY_FILE_RANGE (copy_file_range(2), what cp uses): a whole file copied to the
    /// start of an empty one shares its clusters (`FileSystem.copyRange`); anything else
    /// is copied here, up to 8 MiB a call. The kernel caps a request at 4 GiB - 4 KiB (the
    /// answer is 32 bits), so larger files are copied, not shared.
    func copyFileRange(_ slot: FuseSlot) {
        let request = slot.argument(fuse_copy_file_range_in.self)
        answering(slot) { () throws(FSError) in
            let copied = try fs.copyRange(from: slot.inode, offset: request.off_in, to: InodeNumber(request.nodeid_out),
                                          offset: request.off_out, length: min(request.len, UInt64(UInt32.max)))
            var out = fuse_write_out()
            out.size = UInt32(copied)
            slot.reply(out)
        }
    }

    func statfs(_ slot: FuseSlot) {
        let statistics = fs.statistics()
        var out = unsafe_zeroed(fuse_statfs_out.self)
        out.st.bsize = UInt32(statistics.blockSize)
        out.st.frsize = UInt32(statistics.blockSize)
        out.st.blocks = statistics.blocks
        out.st.bfree = statistics.freeBlocks
        out.st.bavail = statistics.freeBlocks
        out.st.files = statistics.files
        out.st.ffree = statistics.freeFiles
        out.st.namelen = UInt32(statistics.nameMax)
        slot.reply(out)
    }

    // MARK: - ioctl

    /// FITRIM (`fstrim MOUNTPOINT`), the one ioctl served; anything else is ENOTTY. A
    /// restricted ioctl: the kernel copies struct fstrim_range (start, len, minlen; bytes
    /// of the device) in after fuse_ioctl_in and copies the answer's back, whose len is
    /// the bytes trimmed. Answered when the trim completes (the reactor serves other
    /// requests meanwhile). Privileged, as on ext4 and XFS: root, or the user the daemon
    /// runs as.
    func ioctl(_ slot: FuseSlot) {
        let request = slot.argument(fuse_ioctl_in.self)
        let rangeBytes = MemoryLayout<blobfs_fstrim_range>.size
        guard request.cmd == blobfs_FITRIM else { return slot.replyError(ENOTTY) }
        guard request.flags & UInt32(FUSE_IOCTL_UNRESTRICTED) == 0, request.in_size >= rangeBytes,
              request.out_size >= rangeBytes, slot.payload.count >= rangeBytes else { return slot.replyError(EINVAL) }
        guard slot.header.uid == 0 || slot.header.uid == geteuid() else { return slot.replyError(EPERM) }
        let range = slot.payload.loadUnaligned(as: blobfs_fstrim_range.self)
        service.trim(startBytes: range.start, lengthBytes: range.len, minimumBytes: range.minlen) { result in
            switch result {
            case let .failure(error):
                slot.replyError(error.errno)
            case let .success(bytes):
                var answer = range
                answer.len = bytes
                let header = MemoryLayout<fuse_ioctl_out>.size
                slot.scratch.storeBytes(of: unsafe_zeroed(fuse_ioctl_out.self), as: fuse_ioctl_out.self)  // result 0
                (slot.scratch + header).storeBytes(of: answer, as: blobfs_fstrim_range.self)
                slot.replyScratch(header + rangeBytes)
            }
        }
    }

    // MARK: - Extended attributes

    func setxattr(_ slot: FuseSlot) {
        let request = slot.argument(fuse_setxattr_in.self)
        let (nameBytes, rest) = name(slot.payload)
        let value = Array(rest.prefix(Int(request.size)))
        answering(slot) { () throws(FSError) in
            try fs.setXattr(ino: slot.inode, name: String(decoding: nameBytes, as: UTF8.self), value: value,
                            create: Int32(bitPattern: request.flags) & blobfs_kernel_XATTR_CREATE != 0,
                            replace: Int32(bitPattern: request.flags) & blobfs_kernel_XATTR_REPLACE != 0)
            slot.replyEmpty()
        }
    }

    /// A getxattr/listxattr answer: the size alone when asked with size 0, ERANGE when the
    /// caller's buffer is too small, else the bytes.
    private func replySized(_ slot: FuseSlot, _ bytes: [UInt8], room: UInt32) throws(FSError) {
        if room == 0 {
            var out = fuse_getxattr_out()
            out.size = UInt32(bytes.count)
            return slot.reply(out)
        }
        guard bytes.count <= Int(room) else { throw FSError(ERANGE) }
        guard bytes.count <= slot.data.count else { throw FSError(E2BIG) }
        bytes.withUnsafeBytes { if let base = $0.baseAddress { slot.data.base.copyMemory(from: base, byteCount: $0.count) } }
        slot.replyData(offset: 0, count: bytes.count)
    }

    func getxattr(_ slot: FuseSlot) {
        let request = slot.argument(fuse_getxattr_in.self)
        let nameBytes = name(slot.payload).name
        answering(slot) { () throws(FSError) in
            let value = try fs.getXattr(ino: slot.inode, name: String(decoding: nameBytes, as: UTF8.self))
            try replySized(slot, value, room: request.size)
        }
    }

    func listxattr(_ slot: FuseSlot) {
        let request = slot.argument(fuse_getxattr_in.self)
        answering(slot) { () throws(FSError) in
            var list: [UInt8] = []
            for name in try fs.listXattrs(ino: slot.inode, privileged: slot.header.uid == 0) { list += Array(name.utf8) + [0] }
            try replySized(slot, list, room: request.size)
        }
    }

    func removexattr(_ slot: FuseSlot) {
        let nameBytes = name(slot.payload).name
        answering(slot) { () throws(FSError) in
            try fs.removeXattr(ino: slot.inode, name: String(decoding: nameBytes, as: UTF8.self))
            slot.replyEmpty()
        }
    }

    // MARK: - Directories

    func opendir(_ slot: FuseSlot) {
        answering(slot) { () throws(FSError) in
            var out = fuse_open_out()
            out.fh = try fs.openDirectory(ino: slot.inode)
            slot.reply(out)
        }
    }

    /// READDIR and READDIRPLUS: entries from the listing taken at opendir, packed into
    /// the slot's data up to the size asked (fuse_dirent, and fuse_entry_out before each
    /// for PLUS; 8-byte aligned).
    func readdir(_ slot: FuseSlot, plus: Bool) {
        let request = slot.argument(fuse_read_in.self)
        let room = min(Int(request.size), slot.data.count)
        let out = slot.data.base
        var used = 0
        func add(_ entry: DirectoryEntry, _ next: UInt64, _ attributes: Attributes?) -> Bool {
            let entrySize = plus ? MemoryLayout<fuse_entry_out>.size : 0
            let nameOffset = 24  // FUSE_NAME_OFFSET: ino, off, namelen, type
            let size = entrySize + (nameOffset + entry.name.count + 7) & ~7
            guard used + size <= room else { return false }
            let at = out + used
            at.initializeMemory(as: UInt8.self, repeating: 0, count: size)
            // "." and ".." come without attributes: their entry stays zero (nodeid 0), and
            // the kernel instantiates nothing for them.
            if plus, let attributes { at.storeBytes(of: self.entry(attributes), as: fuse_entry_out.self) }
            let dirent = at + entrySize
            dirent.storeBytes(of: entry.ino.rawValue, toByteOffset: 0, as: UInt64.self)
            dirent.storeBytes(of: next, toByteOffset: 8, as: UInt64.self)
            dirent.storeBytes(of: UInt32(entry.name.count), toByteOffset: 16, as: UInt32.self)
            dirent.storeBytes(of: entry.type >> 12, toByteOffset: 20, as: UInt32.self)
            entry.name.withUnsafeBytes { (dirent + nameOffset).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            used += size
            return true
        }
        answering(slot) { () throws(FSError) in
            if plus {
                try fs.readDirectoryPlus(handle: request.fh, offset: request.offset) { entry, attributes, next in
                    add(entry, next, attributes)
                }
            } else {
                try fs.readDirectory(handle: request.fh, offset: request.offset) { entry, next in add(entry, next, nil) }
            }
            slot.replyData(offset: 0, count: used)
        }
    }

    func releasedir(_ slot: FuseSlot) {
        fs.releaseDirectory(ino: slot.inode, handle: slot.argument(fuse_release_in.self).fh)
        slot.replyEmpty()
    }
}
