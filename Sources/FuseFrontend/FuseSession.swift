#if canImport(Glibc)
import Glibc
#endif
import Bdev
import BlobFileSystem
import CFuseKernel
import Env

/// The kernel's FUSE protocol, decoded in Swift on the file system's reactor: INIT,
/// then one named function per operation (FuseSession+Operations.swift), each answering
/// its request exactly once through the slot it arrived in. Transports (`/dev/fuse`,
/// io_uring) hand requests in; the session never blocks on the kernel.
///
/// One thread owns it: the reactor that owns the file system. Everything a request
/// needs lives in its slot, so reads, writes and getattr allocate nothing.
final class FuseSession {
    let service: FileSystemService
    let options: FuseOptions
    let ledger = RequestLedger()
    /// What INIT settled.
    private(set) var initialized = false
    private(set) var kernelMinor: UInt32 = 0
    private(set) var writebackCache = false
    private(set) var maxWrite: Int
    /// Offered by the kernel at INIT (io_uring must also be enabled in the fuse module).
    private(set) var kernelOffersURing = false
    /// Called once INIT has been answered (on the reactor): transports that start later
    /// (FUSE over io_uring) register then.
    var onInitialized: (() -> Void)?
    /// The kernel said goodbye (DESTROY) or a transport lost the connection.
    private(set) var destroyed = false
    /// Requests received, by opcode (anything past 63 in the last).
    private(set) var requestCounts = [UInt64](repeating: 0, count: 64)
    /// Per opcode (rows as `requestCounts`): answers, errors, bytes and latency from receipt
    /// to answer, recorded in `answered`; nil with `-o no_stats` (no clock reads).
    let statistics: OperationHistograms?
    /// Error answers by errno (anything past 255 in the last).
    private(set) var errorCounts = [UInt64](repeating: 0, count: 256)

    /// Timeouts in the kernel's form: seconds and nanoseconds.
    let entryValid: (seconds: UInt64, nanoseconds: UInt32)
    let attributeValid: (seconds: UInt64, nanoseconds: UInt32)

    /// The minor this daemon implements: the structures of 7.38 (<linux/fuse.h>) and the
    /// io_uring ones of 7.42 (CFuseKernel).
    static let minorImplemented: UInt32 = 42

    init(service: FileSystemService, options: FuseOptions) {
        self.service = service
        self.options = options
        maxWrite = Int(options.maxWrite)
        func split(_ seconds: Double) -> (UInt64, UInt32) {
            let whole = seconds.rounded(.down)
            return (UInt64(whole), UInt32(((seconds - whole) * 1e9).rounded()))
        }
        entryValid = split(options.entryTimeout)
        attributeValid = split(options.attributeTimeout)
        statistics = options.statistics ? OperationHistograms(rows: 64) : nil
        reactor = service.blobService.reactor
    }

    var fs: FileSystem { service.fileSystemOnReactor }
    /// The reactor the session runs on (the file system's): its pass start stamps requests.
    private unowned(unsafe) let reactor: Reactor

    // MARK: - Requests in and out

    /// A transport received a request into `slot`.
    func received(_ slot: FuseSlot) {
        let opcode = slot.opcode
        requestCounts[min(Int(opcode), 63)] &+= 1
        // The pass that found the request began after it arrived: its start stamps the
        // request (no clock read here; the answer reads one).
        if statistics != nil { slot.receivedNs = reactor.passStartNs }
        if opcode != FuseOpcode.forget.rawValue && opcode != FuseOpcode.batchForget.rawValue
            && opcode != FuseOpcode.interrupt.rawValue {
            slot.ticket = ledger.take(opcode: opcode, nodeID: slot.nodeID)
        } else {
            slot.ticket = .none
        }
        guard initialized || opcode == FuseOpcode.`init`.rawValue else { return slot.replyError(EIO) }
        dispatch(slot)
    }

    /// The reply of `slot` is on its way (the slot's reply functions call this, with the
    /// errno answered and the bytes of a data reply).
    @inline(__always)
    func answered(_ slot: FuseSlot, errno: Int32 = 0, bytes: Int = 0) {
        ledger.answer(slot.ticket)
        slot.ticket = .none
        if let statistics { record(slot, errno: errno, bytes: bytes, into: statistics) }
    }

    /// The request's latency since receipt, its errno and the bytes it moved: a READ's (or
    /// READDIR's, GETXATTR's ...) reply data, a WRITE's payload when it succeeded.
    @inline(__always)
    private func record(_ slot: FuseSlot, errno: Int32, bytes: Int, into statistics: OperationHistograms) {
        var moved = UInt64(bytes)
        if slot.opcode == FuseOpcode.write.rawValue && errno == 0 { moved = UInt64(slot.argument(fuse_write_in.self).size) }
        statistics.record(row: min(Int(slot.opcode), 63), ns: MonotonicClock.nowNs() &- slot.receivedNs, bytes: moved,
                          failed: errno != 0)
        if errno != 0 { errorCounts[min(Int(UInt32(bitPattern: errno)), 255)] &+= 1 }
    }

    /// The bytes of each opcode's fixed argument struct (`in_args[0]`); 0 when the
    /// request starts with a name or has no argument. Both transports split a request
    /// there: io_uring puts this part in the entry header's `op_in`.
    static func argumentBytes(_ opcode: UInt32) -> Int {
        guard let op = FuseOpcode(rawValue: opcode) else { return 0 }
        switch op {
        case .lookup, .readlink, .symlink, .unlink, .rmdir, .statfs, .removexattr, .destroy: return 0
        case .forget: return MemoryLayout<fuse_forget_in>.size
        case .getattr: return MemoryLayout<fuse_getattr_in>.size
        case .setattr: return MemoryLayout<fuse_setattr_in>.size
        case .mknod: return MemoryLayout<fuse_mknod_in>.size
        case .mkdir: return MemoryLayout<fuse_mkdir_in>.size
        case .rename: return MemoryLayout<fuse_rename_in>.size
        case .rename2: return MemoryLayout<fuse_rename2_in>.size
        case .link: return MemoryLayout<fuse_link_in>.size
        case .open, .opendir: return MemoryLayout<fuse_open_in>.size
        case .read, .readdir, .readdirplus: return MemoryLayout<fuse_read_in>.size
        case .write: return MemoryLayout<fuse_write_in>.size
        case .release, .releasedir: return MemoryLayout<fuse_release_in>.size
        case .fsync, .fsyncdir: return MemoryLayout<fuse_fsync_in>.size
        // The 8-byte form (FUSE_COMPAT_SETXATTR_IN_SIZE): FUSE_SETXATTR_EXT is not negotiated.
        case .setxattr: return 8
        case .getxattr, .listxattr: return MemoryLayout<fuse_getxattr_in>.size
        case .flush: return MemoryLayout<fuse_flush_in>.size
        case .`init`: return MemoryLayout<fuse_init_in>.size
        case .getlk, .setlk, .setlkw: return MemoryLayout<fuse_lk_in>.size
        case .access: return MemoryLayout<fuse_access_in>.size
        case .create, .tmpfile: return MemoryLayout<fuse_create_in>.size
        case .interrupt: return MemoryLayout<fuse_interrupt_in>.size
        case .bmap: return MemoryLayout<fuse_bmap_in>.size
        case .ioctl: return MemoryLayout<fuse_ioctl_in>.size
        case .poll: return MemoryLayout<fuse_poll_in>.size
        case .batchForget: return MemoryLayout<fuse_batch_forget_in>.size
        case .fallocate: return MemoryLayout<fuse_fallocate_in>.size
        case .lseek: return MemoryLayout<fuse_lseek_in>.size
        case .copyFileRange: return MemoryLayout<fuse_copy_file_range_in>.size
        case .syncfs: return MemoryLayout<fuse_syncfs_in>.size
        case .notifyReply, .setupMapping, .removeMapping, .statx: return 0
        }
    }

    // MARK: - INIT

    /// Settles the protocol: the minor both sides speak, what the kernel may do (async
    /// reads, parallel directory operations, readdirplus, the writeback cache when asked,
    /// 1 MiB requests, mmap of direct-I/O files, ioctls on directories: fstrim's FITRIM
    /// goes to the mount's root) and how many requests it may keep in
    /// flight in the background.
    func initialize(_ slot: FuseSlot) {
        let request = slot.argument(fuse_init_in.self)
        guard request.major == 7 else {
            if request.major > 7 {
                // The kernel offers a newer major: answer with ours; it asks again.
                var out = unsafe_zeroed(fuse_init_out.self)
                out.major = 7
                out.minor = Self.minorImplemented
                return slot.reply(out)
            }
            Log.logger("fuse").error("kernel FUSE protocol \(request.major).\(request.minor) is too old")
            return slot.replyError(EPROTO)
        }
        kernelMinor = request.minor
        let offered = UInt64(request.flags) | (request.flags & UInt32(FUSE_INIT_EXT) != 0 ? UInt64(request.flags2) << 32 : 0)
        kernelOffersURing = offered & blobfs_FUSE_OVER_IO_URING != 0
        // FUSE_HANDLE_KILLPRIV_V2: we drop set-user-ID and set-group-ID on chown, and on
        // a write, truncate or O_TRUNC open that the kernel flags (FUSE_WRITE_KILL_SUIDGID,
        // FATTR_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID). In return the kernel marks the mount
        // SB_NOSEC: without it, every write(2) into the page cache first asked us for the
        // file's security.capability (a GETXATTR round trip per write: 229,411 of them in
        // a 4 s buffered random-write run).
        var wanted: UInt64 = UInt64(FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES | FUSE_AUTO_INVAL_DATA
            | FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO | FUSE_ASYNC_DIO | FUSE_PARALLEL_DIROPS
            | FUSE_MAX_PAGES | FUSE_INIT_EXT | FUSE_HAS_IOCTL_DIR | FUSE_HANDLE_KILLPRIV_V2)
        wanted |= blobfs_FUSE_DIRECT_IO_ALLOW_MMAP
        if options.writebackCache { wanted |= UInt64(FUSE_WRITEBACK_CACHE) }
        let granted = wanted & (offered | UInt64(FUSE_INIT_EXT))
        writebackCache = granted & UInt64(FUSE_WRITEBACK_CACHE) != 0
        if granted & UInt64(FUSE_MAX_PAGES) == 0 { maxWrite = min(maxWrite, 32 * 4096) }

        var out = unsafe_zeroed(fuse_init_out.self)
        out.major = 7
        out.minor = min(request.minor, Self.minorImplemented)
        out.max_readahead = min(request.max_readahead, 1 << 20)
        out.flags = UInt32(truncatingIfNeeded: granted)
        out.flags2 = UInt32(truncatingIfNeeded: granted >> 32)
        out.max_background = UInt16(options.maxBackground)
        out.congestion_threshold = UInt16(options.maxBackground * 3 / 4)
        out.max_write = UInt32(maxWrite)
        out.time_gran = 1
        out.max_pages = UInt16(maxWrite / 4096)
        initialized = true
        slot.reply(out)
        onInitialized?()
    }

    // MARK: - Dispatch

    private func dispatch(_ slot: FuseSlot) {
        guard let op = FuseOpcode(rawValue: slot.opcode) else { return slot.replyError(ENOSYS) }
        switch op {
        case .`init`: initialize(slot)
        case .lookup: lookup(slot)
        case .forget: forget(slot)
        case .batchForget: batchForget(slot)
        case .getattr: getattr(slot)
        case .setattr: setattr(slot)
        case .readlink: readlink(slot)
        case .symlink: symlink(slot)
        case .mknod: mknod(slot)
        case .mkdir: mkdir(slot)
        case .unlink: unlink(slot)
        case .rmdir: rmdir(slot)
        case .rename: rename(slot, flags: 0)
        case .rename2: rename(slot, flags: slot.argument(fuse_rename2_in.self).flags)
        case .link: link(slot)
        case .open: open(slot)
        case .read: read(slot)
        case .write: write(slot)
        case .statfs: statfs(slot)
        case .release: release(slot)
        case .fsync, .fsyncdir: fsync(slot)
        case .setxattr: setxattr(slot)
        case .getxattr: getxattr(slot)
        case .listxattr: listxattr(slot)
        case .removexattr: removexattr(slot)
        // FLUSH (every close) has nothing for us to do: the kernel writes the file's dirty
        // pages back and checks their errors before it would send it, and we keep no
        // POSIX locks. ENOSYS once makes the kernel stop sending it (fc->no_flush): one
        // round trip less per close (a quarter of a create-and-close's wall time here).
        case .flush: slot.replyError(ENOSYS)
        case .opendir: opendir(slot)
        case .readdir: readdir(slot, plus: false)
        case .readdirplus: readdir(slot, plus: true)
        case .releasedir: releasedir(slot)
        case .create: create(slot)
        case .interrupt: slot.noReply()  // every request is answered soon anyway
        case .destroy:
            destroyed = true
            slot.replyEmpty()
        case .fallocate: fallocate(slot)
        case .syncfs: syncfs(slot)
        case .ioctl: ioctl(slot)
        case .copyFileRange: copyFileRange(slot)
        case .getlk, .setlk, .setlkw, .access, .bmap, .poll, .lseek, .tmpfile, .statx,
             .notifyReply, .setupMapping, .removeMapping:
            // Not served: the kernel falls back (local locks, its own permission checks,
            // generic seek, a read/write copy) and stops asking for most of them.
            slot.replyError(ENOSYS)
        }
    }

    // MARK: - Device completions of reads and writes

    func dataCompleted(_ slot: FuseSlot, status: BdevStatus) {
        if case let .failed(error) = status {
            // The device's errno (BdevError.errno); a write to a lost device is refused as
            // the file system refuses every change then (EROFS, FSError's mapping).
            let isWrite = slot.opcode != FuseOpcode.read.rawValue
            if case .deviceLost = error, isWrite { return slot.replyError(EROFS) }
            return slot.replyError(error.errno)
        }
        if slot.opcode == FuseOpcode.read.rawValue {
            slot.replyData(offset: slot.readSkip, count: slot.readCount)
        } else {
            var out = fuse_write_out()
            out.size = UInt32(slot.writeCount)
            slot.reply(out)
        }
    }
}
