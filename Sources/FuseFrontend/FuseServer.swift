#if canImport(Glibc)
import Glibc
#endif
import BlobFileSystem
import CFuse
import Env

/// Options of the FUSE front end (the `-o` options blobfs handles itself; the rest go
/// to the kernel mount: allow_other, default_permissions, ro, ...).
public struct FuseOptions: Sendable {
    public var entryTimeout: Double = 1
    public var attributeTimeout: Double = 1
    public var writebackCache = false
    /// Every open bypasses the page cache (as if O_DIRECT).
    public var directIO = false
    public var maxWrite: UInt32 = 1 << 20
    /// Worker threads reading /dev/fuse (each with its own cloned fd); 0: none, the file
    /// system's reactor reads the requests itself (`runOnReactor`).
    public var threads = 0
    /// A request held longer than this is logged with its opcode and node (once).
    public var warnUnansweredSeconds: Double = 30
    public var mountOptions: [String] = []
    public init() {}

    /// Splits a comma-separated `-o` list into ours and the kernel's.
    public mutating func parse(_ list: String) throws(FSError) {
        for option in list.split(separator: ",").map(String.init) where !option.isEmpty && !option.hasPrefix("x-") {
            let parts = option.split(separator: "=", maxSplits: 1).map(String.init)
            let value = parts.count == 2 ? parts[1] : nil
            func number() throws(FSError) -> Double {
                guard let value, let number = Double(value), number >= 0 else {
                    throw FSError(EINVAL, "mount option \(option): expected a number of seconds")
                }
                return number
            }
            switch parts[0] {
            case "entry_timeout": entryTimeout = try number()
            case "attr_timeout": attributeTimeout = try number()
            case "warn_unanswered":
                warnUnansweredSeconds = try number()
                guard warnUnansweredSeconds >= 1 else { throw FSError(EINVAL, "mount option \(option): at least 1 second") }
            case "writeback_cache": writebackCache = true
            case "no_writeback_cache": writebackCache = false
            case "direct_io": directIO = true
            case "max_write":
                guard let value, let bytes = UInt32(value), bytes >= 4096, bytes <= 1 << 20 else {
                    throw FSError(EINVAL, "mount option \(option): expected 4096...1048576")
                }
                maxWrite = bytes
            case "allow_other", "allow_root", "default_permissions", "ro", "rw", "suid", "nosuid", "dev", "nodev",
                 "exec", "noexec", "atime", "noatime", "relatime", "sync", "async", "dirsync", "auto_unmount":
                mountOptions.append(option)
            case "fsname", "subtype":
                mountOptions.append(option)
            case "nofail", "_netdev", "auto", "noauto", "user", "nouser", "users", "defaults":
                continue  // fstab-only words mount(8) passes along
            default:
                throw FSError(EINVAL, "unknown mount option '\(option)'")
            }
        }
    }
}

/// A request as the FS thread holds it until it replies (exactly once): every reply call
/// takes the raw request through `answer()`, which marks it answered in the ledger.
struct Request: @unchecked Sendable {
    let raw: fuse_req_t
    let ticket: RequestLedger.Ticket
    unowned(unsafe) let server: FuseServer

    /// Takes the request into the ledger. Call on the file system's thread.
    init(_ raw: fuse_req_t, _ opcode: FuseOpcode, node: UInt64, server: FuseServer) {
        self.raw = raw
        self.server = server
        ticket = server.ledger.take(opcode: opcode.rawValue, nodeID: node)
    }

    /// The raw request for the reply call (the one and only).
    func answer() -> fuse_req_t {
        server.ledger.answer(ticket)
        return raw
    }
}

/// The libfuse3 low-level session: worker threads read requests from /dev/fuse and hand
/// each to the file system's thread, which replies when it is done. A worker never waits
/// for the file system, so requests queue there in arrival order.
public final class FuseServer: @unchecked Sendable {
    let service: FileSystemService
    let options: FuseOptions
    private var session: OpaquePointer?
    public let mountpoint: String
    /// The requests taken and not yet answered (the file system's thread only).
    let ledger = RequestLedger()

    public init(service: FileSystemService, mountpoint: String, options: FuseOptions) throws(FSError) {
        self.service = service
        self.options = options
        self.mountpoint = mountpoint
        var arguments = ["blobfs", "-o", (["fsname=blobfs", "subtype=blobfs"] + options.mountOptions).joined(separator: ",")]
        var cArguments = arguments.map { strdup($0) }
        defer { cArguments.forEach { free($0) } }
        var args = fuse_args(argc: Int32(cArguments.count), argv: nil, allocated: 0)
        var operations = Self.operations()
        session = cArguments.withUnsafeMutableBufferPointer { buffer in
            args.argv = buffer.baseAddress
            return fuse_session_new(&args, &operations, MemoryLayout<fuse_lowlevel_ops>.size,
                                    Unmanaged.passUnretained(self).toOpaque())
        }
        fuse_opt_free_args(&args)
        arguments.removeAll()
        guard let session else { throw FSError(EINVAL, "FUSE session could not be created (see the message above)") }
        guard fuse_session_mount(session, mountpoint) == 0 else {
            fuse_session_destroy(session)
            self.session = nil
            throw FSError(EIO, "cannot mount on \(mountpoint) (is /dev/fuse usable and the directory empty?)")
        }
    }

    /// Serves requests until unmounted or signalled (SIGINT, SIGTERM, SIGHUP), then
    /// unmounts. Returns 0 on a clean end.
    public func run() -> Int32 {
        guard let session else { return 1 }
        guard fuse_set_signal_handlers(session) == 0 else { return 1 }
        let reactor = service.blobService.reactor
        let limitNs = UInt64(options.warnUnansweredSeconds * 1e9)
        let watch = reactor.call { [self] in
            reactor.registerTimedPoller(periodNs: 1_000_000_000) { [self] in
                ledger.warnAboutOverdue(limitNs: limitNs)
                return .idle
            }
        }
        let status: Int32
        if options.threads == 0 {
            status = runOnReactor(session)
        } else {
            var config = fuse_loop_config(clone_fd: 1, max_idle_threads: UInt32(options.threads))
            status = fuse_session_loop_mt_32(session, &config)
        }
        fuse_remove_signal_handlers(session)
        fuse_session_unmount(session)
        // Requests answered from device completions may still be finishing: give them a
        // moment, then report any the daemon never answered.
        var report: String? = nil
        for _ in 0..<100 {
            report = reactor.call { [self] in ledger.unmountReport() }
            if report == nil { break }
            usleep(20_000)
        }
        reactor.call { reactor.unregisterPoller(watch) }
        if let report {
            Log.logger("fuse").error("unmount: \(report)")
            return 3
        }
        return status < 0 ? Int32(-status) : Int32(0)
    }

    /// No worker threads: the file system's reactor reads /dev/fuse itself (non-blocking,
    /// up to 64 requests a pass; its epoll wakes it when a request arrives) and runs each
    /// request where it is decoded, with no hand-over between threads. The calling thread
    /// only waits for the end (unmount or a signal). Returns 0.
    private func runOnReactor(_ session: OpaquePointer) -> Int32 {
        let reactor = service.blobService.reactor
        let fd = fuse_session_fd(session)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        let box = SessionBox(session)
        let poller: PollerID? = reactor.call {
            do { try reactor.registerWakeFD(fd) } catch { return nil }
            return reactor.registerPoller {
                var handled = 0
                while handled < 64 {
                    let result = fuse_session_receive_buf(box.session, &box.buffer)
                    if result == -EINTR { continue }
                    if result <= 0 {
                        if result != -EAGAIN { fuse_session_exit(box.session) }  // 0: unmounted or exited
                        break
                    }
                    fuse_session_process_buf(box.session, &box.buffer)
                    handled += 1
                }
                return handled > 0 ? .busy : .idle
            }
        }
        guard let poller else { return EIO }
        while fuse_session_exited(session) == 0 { usleep(20_000) }  // signals and unmount set it
        reactor.call {
            reactor.unregisterPoller(poller)
            reactor.unregisterWakeFD(fd)
            free(box.buffer.mem)
            box.buffer.mem = nil
        }
        return 0
    }

    /// The session and its receive buffer, owned by the reactor's poller.
    private final class SessionBox: @unchecked Sendable {
        let session: OpaquePointer
        var buffer = fuse_buf()
        init(_ session: OpaquePointer) { self.session = session }
    }

    /// Ends the loop from another thread (tests).
    public func exit() {
        if let session { fuse_session_exit(session) }
    }

    deinit {
        if let session { fuse_session_destroy(session) }
    }

    static func server(_ req: fuse_req_t?) -> FuseServer {
        Unmanaged<FuseServer>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
    }
}

// MARK: - Replies (from the file system's thread)

extension FuseServer {
    static func fill(_ stat: inout stat, _ attributes: Attributes) {
        let a = attributes.attributes
        stat = Glibc.stat()
        stat.st_ino = UInt(attributes.ino)
        stat.st_mode = a.mode
        stat.st_nlink = UInt(a.nlink)
        stat.st_uid = a.uid
        stat.st_gid = a.gid
        stat.st_rdev = UInt(a.rdev)
        stat.st_size = Int(a.size)
        stat.st_blksize = Int(attributes.blockSize)
        stat.st_blocks = Int(attributes.allocatedBytes / 512)
        func spec(_ ns: Int64) -> timespec {
            var seconds = ns / 1_000_000_000
            var rest = ns % 1_000_000_000
            if rest < 0 { seconds -= 1; rest += 1_000_000_000 }
            return timespec(tv_sec: Int(seconds), tv_nsec: Int(rest))
        }
        stat.st_atim = spec(a.atimeNs)
        stat.st_mtim = spec(a.mtimeNs)
        stat.st_ctim = spec(a.ctimeNs)
    }

    func entry(_ attributes: Attributes) -> fuse_entry_param {
        var entry = fuse_entry_param()
        entry.ino = attributes.ino
        entry.generation = attributes.attributes.generation
        Self.fill(&entry.attr, attributes)
        entry.attr_timeout = options.attributeTimeout
        entry.entry_timeout = options.entryTimeout
        return entry
    }

    static func replyError(_ req: Request, _ error: Error) {
        let code = (error as? FSError)?.errno ?? EIO
        fuse_reply_err(req.answer(), code)
    }

    func replyEntry(_ req: Request, _ attributes: Attributes, forget fs: FileSystem) {
        var param = entry(attributes)
        if fuse_reply_entry(req.answer(), &param) != 0 { fs.forget(ino: attributes.ino, count: 1) }
    }

    func replyAttributes(_ req: Request, _ attributes: Attributes) {
        var stat = Glibc.stat()
        Self.fill(&stat, attributes)
        fuse_reply_attr(req.answer(), &stat, options.attributeTimeout)
    }

    static func replyBytes(_ req: Request, _ bytes: [UInt8]) {
        bytes.withUnsafeBufferPointer { buffer in
            _ = fuse_reply_buf(req.answer(), UnsafeRawPointer(buffer.baseAddress).map { $0.assumingMemoryBound(to: CChar.self) },
                               buffer.count)
        }
    }
}

// MARK: - Operations (on libfuse's worker threads: decode, hand over, return)

extension FuseServer {
    static func name(_ pointer: UnsafePointer<CChar>?) -> [UInt8] {
        guard let pointer else { return [] }
        return Array(UnsafeBufferPointer(start: UnsafeRawPointer(pointer).assumingMemoryBound(to: UInt8.self),
                                         count: strlen(pointer)))
    }

    static func caller(_ req: fuse_req_t?) -> Caller {
        guard let context = fuse_req_ctx(req) else { return .root }
        return Caller(uid: context.pointee.uid, gid: context.pointee.gid)
    }

    /// Runs `body` on the file system's thread; a thrown error is the reply.
    static func handOver(_ req: fuse_req_t?, _ opcode: FuseOpcode, _ node: UInt64,
                         _ body: @escaping @Sendable (FileSystem, FuseServer, Request) throws -> Void) {
        let server = server(req)
        let raw = RawRequest(req!)
        if server.options.threads == 0 {
            // Decoded on the file system's reactor itself (runOnReactor): run it now.
            server.service.runHere { fs in
                let request = Request(raw.value, opcode, node: node, server: server)
                do { try body(fs, server, request) } catch { replyError(request, error) }
            }
            return
        }
        server.service.submit { fs in
            let request = Request(raw.value, opcode, node: node, server: server)
            do { try body(fs, server, request) } catch { replyError(request, error) }
        }
    }

    // swiftlint:disable:next function_body_length
    static func operations() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            guard let userdata, let conn else { return }
            let server = Unmanaged<FuseServer>.fromOpaque(userdata).takeUnretainedValue()
            conn.pointee.max_write = server.options.maxWrite
            conn.pointee.max_readahead = 1 << 20
            if server.options.writebackCache, conn.pointee.capable & UInt32(FUSE_CAP_WRITEBACK_CACHE) != 0 {
                conn.pointee.want |= UInt32(FUSE_CAP_WRITEBACK_CACHE)
            }
            conn.pointee.want &= ~UInt32(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE)
            if conn.pointee.capable & UInt32(FUSE_CAP_PARALLEL_DIROPS) != 0 { conn.pointee.want |= UInt32(FUSE_CAP_PARALLEL_DIROPS) }
        }
        ops.lookup = { req, parent, name in
            let name = FuseServer.name(name)
            FuseServer.handOver(req, .lookup, parent) { fs, server, req in server.replyEntry(req, try fs.lookup(parent: parent, name: name), forget: fs) }
        }
        ops.forget = { req, ino, count in
            FuseServer.handOver(req, .forget, ino) { fs, _, req in
                fs.forget(ino: ino, count: count)
                fuse_reply_none(req.answer())
            }
        }
        ops.forget_multi = { req, count, forgets in
            let list = (0..<count).map { (forgets![$0].ino, forgets![$0].nlookup) }
            FuseServer.handOver(req, .batchForget, 0) { fs, _, req in
                for (ino, count) in list { fs.forget(ino: ino, count: count) }
                fuse_reply_none(req.answer())
            }
        }
        ops.getattr = { req, ino, _ in
            FuseServer.handOver(req, .getattr, ino) { fs, server, req in server.replyAttributes(req, try fs.getAttributes(ino: ino)) }
        }
        ops.setattr = { req, ino, attr, toSet, _ in
            guard let attr else { return }
            var changes = AttributeChanges()
            let set = toSet
            if set & FUSE_SET_ATTR_MODE != 0 { changes.mode = attr.pointee.st_mode }
            if set & FUSE_SET_ATTR_UID != 0 { changes.uid = attr.pointee.st_uid }
            if set & FUSE_SET_ATTR_GID != 0 { changes.gid = attr.pointee.st_gid }
            if set & FUSE_SET_ATTR_SIZE != 0 { changes.size = UInt64(max(0, attr.pointee.st_size)) }
            func ns(_ spec: timespec) -> Int64 { Int64(spec.tv_sec) * 1_000_000_000 + Int64(spec.tv_nsec) }
            if set & FUSE_SET_ATTR_ATIME_NOW != 0 {
                changes.atime = .now
            } else if set & FUSE_SET_ATTR_ATIME != 0 {
                changes.atime = .ns(ns(attr.pointee.st_atim))
            }
            if set & FUSE_SET_ATTR_MTIME_NOW != 0 {
                changes.mtime = .now
            } else if set & FUSE_SET_ATTR_MTIME != 0 {
                changes.mtime = .ns(ns(attr.pointee.st_mtim))
            }
            if set & FUSE_SET_ATTR_CTIME != 0 { changes.ctime = ns(attr.pointee.st_ctim) }
            let caller = FuseServer.caller(req)
            let frozen = changes
            FuseServer.handOver(req, .setattr, ino) { fs, server, req in
                server.replyAttributes(req, try fs.setAttributes(ino: ino, frozen, caller: caller))
            }
        }
        ops.readlink = { req, ino in
            FuseServer.handOver(req, .readlink, ino) { fs, _, req in
                var target = try fs.readSymlink(ino: ino)
                target.append(0)
                target.withUnsafeBufferPointer { buffer in
                    _ = fuse_reply_readlink(req.answer(), UnsafeRawPointer(buffer.baseAddress!).assumingMemoryBound(to: CChar.self))
                }
            }
        }
        ops.mknod = { req, parent, name, mode, rdev in
            let name = FuseServer.name(name)
            let caller = FuseServer.caller(req)
            FuseServer.handOver(req, .mknod, parent) { fs, server, req in
                server.replyEntry(req, try fs.make(parent: parent, name: name, mode: mode, rdev: UInt32(truncatingIfNeeded: rdev),
                                                   caller: caller), forget: fs)
            }
        }
        ops.mkdir = { req, parent, name, mode in
            let name = FuseServer.name(name)
            let caller = FuseServer.caller(req)
            FuseServer.handOver(req, .mkdir, parent) { fs, server, req in
                server.replyEntry(req, try fs.make(parent: parent, name: name, mode: 0o040000 | (mode & 0o7777),
                                                   caller: caller), forget: fs)
            }
        }
        ops.symlink = { req, link, parent, name in
            let name = FuseServer.name(name)
            let target = FuseServer.name(link)
            let caller = FuseServer.caller(req)
            FuseServer.handOver(req, .symlink, parent) { fs, server, req in
                server.replyEntry(req, try fs.make(parent: parent, name: name, mode: 0o120000 | 0o777,
                                                   symlinkTarget: target, caller: caller), forget: fs)
            }
        }
        ops.unlink = { req, parent, name in
            let name = FuseServer.name(name)
            FuseServer.handOver(req, .unlink, parent) { fs, _, req in
                try fs.unlink(parent: parent, name: name)
                fuse_reply_err(req.answer(), 0)
            }
        }
        ops.rmdir = { req, parent, name in
            let name = FuseServer.name(name)
            FuseServer.handOver(req, .rmdir, parent) { fs, _, req in
                try fs.removeDirectory(parent: parent, name: name)
                fuse_reply_err(req.answer(), 0)
            }
        }
        ops.rename = { req, parent, name, newParent, newName, flags in
            let name = FuseServer.name(name)
            let newName = FuseServer.name(newName)
            FuseServer.handOver(req, .rename, parent) { fs, _, req in
                try fs.rename(parent: parent, name: name, newParent: newParent, newName: newName,
                              flags: FileSystem.RenameFlags(rawValue: UInt32(flags)))
                fuse_reply_err(req.answer(), 0)
            }
        }
        ops.link = { req, ino, newParent, newName in
            let newName = FuseServer.name(newName)
            FuseServer.handOver(req, .link, ino) { fs, server, req in
                server.replyEntry(req, try fs.link(ino: ino, newParent: newParent, newName: newName), forget: fs)
            }
        }
        ops.open = { req, ino, fi in
            guard let fi else { return }
            let flags = fi.pointee.flags
            let truncate = flags & O_TRUNC != 0
            let info = FileInfo(fi.pointee)
            FuseServer.handOver(req, .open, ino) { fs, server, req in
                try fs.open(ino: ino, truncate: truncate)
                var reply = info.value
                reply.fh = 0
                if server.options.directIO || flags & blobfs_fuse_O_DIRECT != 0 { reply.direct_io = 1 }
                if fuse_reply_open(req.answer(), &reply) != 0 { fs.release(ino: ino) }
            }
        }
        ops.create = { req, parent, name, mode, fi in
            guard let fi else { return }
            let name = FuseServer.name(name)
            let caller = FuseServer.caller(req)
            let flags = fi.pointee.flags
            let info = FileInfo(fi.pointee)
            FuseServer.handOver(req, .create, parent) { fs, server, req in
                let attributes = try fs.create(parent: parent, name: name, mode: mode, caller: caller)
                var param = server.entry(attributes)
                var reply = info.value
                reply.fh = 0
                if server.options.directIO || flags & blobfs_fuse_O_DIRECT != 0 { reply.direct_io = 1 }
                if fuse_reply_create(req.answer(), &param, &reply) != 0 {
                    fs.release(ino: attributes.ino)
                    fs.forget(ino: attributes.ino, count: 1)
                }
            }
        }
        ops.read = { req, ino, size, offset, _ in
            // Replied when the device reads complete; the file system serves other requests meanwhile.
            FuseServer.handOver(req, .read, ino) { _, server, req in
                server.service.read(ino: ino, offset: UInt64(max(0, offset)), count: size) { bytes, errno in
                    if errno != 0 { fuse_reply_err(req.answer(), errno); return }
                    _ = fuse_reply_buf(req.answer(), bytes.baseAddress?.assumingMemoryBound(to: CChar.self), bytes.count)
                }
            }
        }
        ops.write = { req, ino, buffer, size, offset, fi in
            let server = FuseServer.server(req)
            let offset = UInt64(max(0, offset))
            // With the writeback cache the kernel owns the file position: O_APPEND is its job.
            let append = (fi?.pointee.flags ?? 0) & O_APPEND != 0 && !server.options.writebackCache
            // Replied when the data is on the device (an overwrite in place: asynchronously).
            @Sendable func reply(_ request: Request) -> @Sendable (Int, Int32) -> Void {
                { written, errno in
                    if errno != 0 { fuse_reply_err(request.answer(), errno) } else { fuse_reply_write(request.answer(), written) }
                }
            }
            let data = UnsafeRawBufferPointer(start: buffer, count: size)
            if server.options.threads == 0 {
                // On the file system's reactor, while libfuse's buffer is valid: one copy, into
                // the device buffer (or the synchronous write's array).
                server.service.runHere { _ in
                    let request = Request(req!, .write, node: ino, server: server)
                    server.service.write(ino: ino, offset: offset, data: data, append: append, reply(request))
                }
                return
            }
            let copy = [UInt8](data)  // the worker's buffer is reused once this returns
            FuseServer.handOver(req, .write, ino) { _, server, request in
                copy.withUnsafeBytes { server.service.write(ino: ino, offset: offset, data: $0, append: append, reply(request)) }
            }
        }
        ops.flush = { req, ino, _ in
            FuseServer.handOver(req, .flush, ino) { _, _, req in fuse_reply_err(req.answer(), 0) }
        }
        ops.release = { req, ino, _ in
            FuseServer.handOver(req, .release, ino) { fs, _, req in
                fs.release(ino: ino)
                fuse_reply_err(req.answer(), 0)
            }
        }
        ops.fsync = { req, ino, _, _ in
            // Replied when the flushes complete; the file system serves other requests meanwhile.
            FuseServer.handOver(req, .fsync, ino) { _, server, req in
                server.service.fsync(ino: ino) { errno in fuse_reply_err(req.answer(), errno) }
            }
        }
        ops.opendir = { req, ino, fi in
            guard let fi else { return }
            let info = FileInfo(fi.pointee)
            FuseServer.handOver(req, .opendir, ino) { fs, _, req in
                var reply = info.value
                reply.fh = try fs.openDirectory(ino: ino)
                if fuse_reply_open(req.answer(), &reply) != 0 { fs.releaseDirectory(ino: ino, handle: reply.fh) }
            }
        }
        ops.readdir = { req, ino, size, offset, fi in
            let handle = fi?.pointee.fh ?? 0
            FuseServer.handOver(req, .readdir, ino) { fs, _, req in
                var buffer = [CChar](repeating: 0, count: size)
                var used = 0
                try fs.readDirectory(handle: handle, offset: UInt64(max(0, offset))) { entry, next in
                    var stat = Glibc.stat()
                    stat.st_ino = UInt(entry.ino)
                    stat.st_mode = entry.type
                    var name = entry.name.map { CChar(bitPattern: $0) }
                    name.append(0)
                    let needed = buffer.withUnsafeMutableBufferPointer { out in
                        fuse_add_direntry(req.raw, out.baseAddress! + used, size - used, name, &stat, off_t(next))
                    }
                    guard used + needed <= size else { return false }
                    used += needed
                    return true
                }
                buffer.withUnsafeBufferPointer { _ = fuse_reply_buf(req.answer(), $0.baseAddress, used) }
            }
        }
        ops.readdirplus = { req, ino, size, offset, fi in
            let handle = fi?.pointee.fh ?? 0
            FuseServer.handOver(req, .readdirplus, ino) { fs, server, req in
                var buffer = [CChar](repeating: 0, count: size)
                var used = 0
                try fs.readDirectoryPlus(handle: handle, offset: UInt64(max(0, offset))) { entry, attributes, next in
                    var param = fuse_entry_param()
                    if let attributes {
                        param = server.entry(attributes)
                    } else {
                        param.attr.st_ino = UInt(entry.ino)
                        param.attr.st_mode = entry.type
                    }
                    var name = entry.name.map { CChar(bitPattern: $0) }
                    name.append(0)
                    let needed = buffer.withUnsafeMutableBufferPointer { out in
                        fuse_add_direntry_plus(req.raw, out.baseAddress! + used, size - used, name, &param, off_t(next))
                    }
                    guard used + needed <= size else { return false }
                    used += needed
                    return true
                }
                buffer.withUnsafeBufferPointer { _ = fuse_reply_buf(req.answer(), $0.baseAddress, used) }
            }
        }
        ops.releasedir = { req, ino, fi in
            let handle = fi?.pointee.fh ?? 0
            FuseServer.handOver(req, .releasedir, ino) { fs, _, req in
                fs.releaseDirectory(ino: ino, handle: handle)
                fuse_reply_err(req.answer(), 0)
            }
        }
        ops.fsyncdir = { req, ino, _, _ in
            FuseServer.handOver(req, .fsyncdir, ino) { _, server, req in
                server.service.fsync(ino: ino) { errno in fuse_reply_err(req.answer(), errno) }
            }
        }
        ops.statfs = { req, ino in
            FuseServer.handOver(req, .statfs, ino) { fs, _, req in
                let statistics = fs.statistics()
                var out = statvfs()
                out.f_bsize = UInt(statistics.blockSize)
                out.f_frsize = UInt(statistics.blockSize)
                out.f_blocks = UInt(statistics.blocks)
                out.f_bfree = UInt(statistics.freeBlocks)
                out.f_bavail = UInt(statistics.freeBlocks)
                out.f_files = UInt(statistics.files)
                out.f_ffree = UInt(statistics.freeFiles)
                out.f_favail = UInt(statistics.freeFiles)
                out.f_namemax = UInt(statistics.nameMax)
                fuse_reply_statfs(req.answer(), &out)
            }
        }
        ops.setxattr = { req, ino, name, value, size, flags in
            let name = String(cString: name!)
            let bytes = [UInt8](UnsafeRawBufferPointer(start: value, count: size))
            FuseServer.handOver(req, .setxattr, ino) { fs, _, req in
                try fs.setXattr(ino: ino, name: name, value: bytes, create: flags & blobfs_XATTR_CREATE != 0,
                                replace: flags & blobfs_XATTR_REPLACE != 0)
                fuse_reply_err(req.answer(), 0)
            }
        }
        ops.getxattr = { req, ino, name, size in
            let name = String(cString: name!)
            FuseServer.handOver(req, .getxattr, ino) { fs, _, req in
                let value = try fs.getXattr(ino: ino, name: name)
                if size == 0 {
                    fuse_reply_xattr(req.answer(), value.count)
                } else if value.count > size {
                    fuse_reply_err(req.answer(), ERANGE)
                } else {
                    FuseServer.replyBytes(req, value)
                }
            }
        }
        ops.listxattr = { req, ino, size in
            FuseServer.handOver(req, .listxattr, ino) { fs, _, req in
                var list: [UInt8] = []
                for name in try fs.listXattrs(ino: ino, privileged: FuseServer.caller(req.raw).uid == 0) { list += Array(name.utf8) + [0] }
                if size == 0 {
                    fuse_reply_xattr(req.answer(), list.count)
                } else if list.count > size {
                    fuse_reply_err(req.answer(), ERANGE)
                } else {
                    FuseServer.replyBytes(req, list)
                }
            }
        }
        ops.removexattr = { req, ino, name in
            let name = String(cString: name!)
            FuseServer.handOver(req, .removexattr, ino) { fs, _, req in
                try fs.removeXattr(ino: ino, name: name)
                fuse_reply_err(req.answer(), 0)
            }
        }
        ops.fallocate = { req, ino, mode, offset, length, _ in
            FuseServer.handOver(req, .fallocate, ino) { fs, _, req in
                guard offset >= 0, length > 0 else { throw FSError(EINVAL) }
                try fs.allocate(ino: ino, mode: FileSystem.AllocateMode(rawValue: mode), offset: UInt64(offset),
                                length: UInt64(length))
                fuse_reply_err(req.answer(), 0)
            }
        }
        return ops
    }
}

/// A libfuse request handle carried to the file system's thread.
struct RawRequest: @unchecked Sendable {
    let value: fuse_req_t
    init(_ value: fuse_req_t) { self.value = value }
}

/// A copy of a `fuse_file_info` to reply with from another thread.
struct FileInfo: @unchecked Sendable {
    let value: fuse_file_info
    init(_ value: fuse_file_info) { self.value = value }
}
