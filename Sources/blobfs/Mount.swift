#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Bdev
import BlobFileSystem
import Blobstore
import ToolSupport
import Env
import AllocationCounting
import FuseFrontend
import ReactorRing
import Logging

struct Mount: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(
        abstract: "Mount the file system on DEVICE at MOUNTPOINT.",
        discussion: """
            Without --foreground blobfs returns once the mount is live and keeps serving it in \
            the background; SIGTERM or SIGINT to the daemon, `blobfs unmount MOUNTPOINT` or \
            `fusermount3 -u MOUNTPOINT` unmount it and leave the store clean.
            Options (-o, comma-separated): allow_other, ro, noatime, ... (passed to the kernel; \
            default_permissions is always on: the kernel checks permissions), entry_timeout=S, \
            attr_timeout=S, writeback_cache, direct_io, max_write=BYTES, warn_unanswered=S (log a request \
            held this long; default 30), discard (unmap freed clusters on the device as their release \
            becomes durable; without it, fstrim MOUNTPOINT does it on demand), metadata_cache=N (keep \
            at most N blobs' metadata in memory, default 65536, 0 no limit; more is read again on \
            use), no_stats (keep no \
            per-request statistics), no_reactor_ring (the FUSE queues and the device each on an io_uring of \
            their own instead of one per reactor), control_socket=PATH and control_mode=OCTAL (the control socket \
            `blobfs status` asks; default derived from the mountpoint, 0600).
            Logs go to stderr in the foreground, to syslog in the background, or to --log FILE \
            (reopened on SIGHUP). Under systemd (Type=notify) READY=1 is sent once the mount is live.
            """)
    @Argument(help: "Image path or device spec (malloc:SIZE is formatted at mount).") var device: String
    @Argument(help: "An existing directory.") var mountpoint: String
    @Option(name: .customShort("o"), help: "Mount options, comma-separated.") var options: [String] = []
    @Flag(help: "Stay in the foreground (logs on stderr unless --log).") var foreground = false
    @Option(help: "Log file (default: stderr in the foreground, syslog in the background); SIGHUP reopens it.")
    var log: String?
    @Option(help: "Least level logged: trace, debug, info, notice, warning, error or critical.") var logLevel: String = "info"
    @Flag(help: "Format DEVICE first (always done for malloc:).") var format = false
    /// The daemon's side of `blobfs mount`: it serves in the foreground and reports the
    /// outcome on this fd (the parent started it with these arguments).
    @Option(help: .hidden) var notifyFD: Int32?

    func run() throws {
        // BLOBFS_COUNT_ALLOCATIONS=1: the daemon counts heap allocations (the malloc
        // interposer, preloaded by re-executing once) and logs them per request every 5 s.
        if getenv("BLOBFS_COUNT_ALLOCATIONS") != nil { AllocationCounter.ensureInterposed() }
        let device: Device
        var fuseOptions = FuseOptions()
        var control = ControlOptions()
        do {
            device = try Device(self.device)
            for list in options { try fuseOptions.parse(try control.parse(list)) }
        } catch let error as FSError {
            throw ValidationError("-o: \(error.message)")
        }
        if !fuseOptions.mountOptions.contains("default_permissions") { fuseOptions.mountOptions.append("default_permissions") }
        if let path = device.lockPath, !path.contains(",") { fuseOptions.mountOptions.append("fsname=\(path)") }
        let point = Device.canonical(mountpoint)
        var info = stat()
        guard stat(point, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR else {
            fail(Failure("mountpoint \(point) is not an existing directory", status: 2))
        }
        guard let level = Logger.Level(rawValue: logLevel) else {
            throw ValidationError("--log-level: trace, debug, info, notice, warning, error or critical (not \(logLevel))")
        }
        if let log {
            // Everything the daemon says goes there from the start (libfuse's messages too).
            // In the foreground stdout stays: the "mounted on" line is the user's.
            guard foreground || notifyFD != nil ? DaemonLog.redirect(to: Device.absolute(log), alsoStandardOutput: notifyFD != nil) : true else {
                fail(Failure("--log \(log): \(String(cString: strerror(errno)))", status: 2))
            }
        }
        DaemonLog.bootstrap(log != nil ? .file(Device.absolute(log!)) : notifyFD != nil ? .syslog : .standardError, level: level)
        if notifyFD != nil { setsid() }  // the daemon: no controlling terminal, no signals of the shell's
        if foreground || notifyFD != nil {
            Glibc.exit(serve(device, point, fuseOptions, control, notify: notifyFD))
        }
        // The daemon is this program executed anew (in a session of its own), not a fork:
        // a forked child inherits the parent's thread-local state, and Swift's Mutex keeps
        // the owner's thread id there, so a lock taken by the child's first thread would
        // name a thread of the parent and a second thread could never take it.
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { fail(Failure("pipe: \(String(cString: strerror(errno)))")) }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let pid: pid_t
        do { pid = try spawnDaemon(notifyFD: fds[1]) } catch { fail(error) }
        close(fds[1])
        var answer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = read(fds[0], &chunk, chunk.count)
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            answer += chunk[0..<count]
        }
        let text = String(decoding: answer, as: UTF8.self)
        if text.hasPrefix("OK ") {
            print("blobfs: \(device.text) mounted on \(point) (daemon pid \(pid); \(text.dropFirst(3))); "
                + "unmount with: blobfs unmount \(point)")
            Glibc.exit(0)
        }
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        let message = text.isEmpty ? "the daemon exited before mounting" : text
        fail(Failure(message, status: message.hasPrefix("cannot open") ? 2 : 1))
    }

    /// Starts `blobfs mount ... --notify-fd FD`, FD inherited (it leaves our session itself).
    private func spawnDaemon(notifyFD: Int32) throws -> pid_t {
        var arguments = ["blobfs", "mount", device, mountpoint, "--notify-fd", String(notifyFD)]
        for list in options { arguments += ["-o", list] }
        if let log { arguments += ["--log", Device.absolute(log)] }
        arguments += ["--log-level", logLevel]
        if format { arguments.append("--format") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        // dup2 onto itself clears FD_CLOEXEC in the child only.
        posix_spawn_file_actions_adddup2(&actions, notifyFD, notifyFD)
        var cArguments = arguments.map { strdup($0) } + [nil]
        defer { cArguments.forEach { free($0) } }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, "/proc/self/exe", &actions, nil, &cArguments, environ)
        guard result == 0 else { throw Failure("cannot start the daemon: \(String(cString: strerror(result)))") }
        return pid
    }

    /// Loads the store, mounts and serves until unmounted; returns the exit status.
    private func serve(_ device: Device, _ point: String, _ options: FuseOptions, _ control: ControlOptions,
                       notify: Int32?) -> Int32 {
        func report(_ text: String) {
            guard let notify else { return }
            _ = text.withCString { write(notify, $0, strlen($0)) }
            close(notify)
        }
        func failed(_ error: Error) -> Int32 {
            let failure = error as? Failure ?? Failure("\(error)")
            if notify != nil { report(failure.message) } else { fail(failure) }
            return failure.status
        }
        if notify != nil {
            // The daemon's output goes to its log file (run() redirected it) or nowhere (its
            // log goes to syslog) from its first line; the parent learns the outcome through
            // the pipe.
            if log == nil { _ = DaemonLog.redirect(to: "/dev/null") }
            let null = open("/dev/null", O_RDONLY)
            if null >= 0 { dup2(null, 0); close(null) }
        }
        let lock: Int32?
        let bdev: Bdev
        let counting: CountingBdev?
        do { (lock, bdev, counting) = try Self.openDevice(device, counted: options.statistics) } catch { return failed(error) }
        defer {
            bdev.close()
            if let lock { close(lock) }
        }
        // Before the reactors make their channels: each then gets one ring for its FUSE
        // queues and its device I/O.
        ReactorRing.enabled.store(options.reactorRing, ordering: .relaxed)
        let service: FileSystemService
        do {
            service = try FileSystemService(bdev: bdev, format: device.isRAM || format ? BlobStore.Options() : nil,
                                            discard: options.discard, metadataCache: options.metadataCache)
        } catch {
            return failed(Failure("\(device.text): \(error)", status: 1))
        }
        let server: FuseServer
        do { server = try FuseServer(service: service, mountpoint: point, options: options) } catch {
            try? service.stop()
            return failed(Failure("\(error)"))
        }
        let memory = DMAPool.shared.usesHugepages == true ? "2 MiB hugepages" : "4 KiB pages (no hugepages reserved)"
        Log.logger("mount").info("\(device.text) on \(point): DMA memory from \(memory)")
        if getenv("BLOBFS_COUNT_ALLOCATIONS") != nil && AllocationCounter.isInterposed {
            AllocationCounter.shared.start()
            server.allocationCount = { AllocationCounter.shared.running }
        }
        let controlServer = startControl(device, point, control, bdev: bdev, counting: counting, service: service, server: server,
                                         notify: notify)
        defer { controlServer?.stop() }
        let controlLine = controlServer.map { "; control socket \($0.path)" } ?? "; no control socket"
        let status = server.run { transport, live in
            guard live else {
                // The session ended before the kernel's INIT: the mount never became live.
                Log.logger("mount").error("\(device.text) on \(point): \(transport)")
                if notify != nil {
                    report(transport)
                } else {
                    let text = "blobfs: \(transport)\n"
                    _ = text.withCString { write(2, $0, strlen($0)) }
                }
                return
            }
            // systemd (Type=notify): the mount is live now.
            SystemdNotify.send("READY=1\nMAINPID=\(getpid())\nSTATUS=\(device.text) mounted on \(point)")
            Log.logger("mount").notice("\(device.text) mounted on \(point) (\(transport)\(controlLine))")
            if notify != nil {
                report("OK \(transport)\(controlLine)")
            } else {
                print("blobfs: \(device.text) mounted on \(point) (\(transport)\(controlLine)); Ctrl-C or `blobfs unmount \(point)` unmounts")
            }
        }
        SystemdNotify.send("STOPPING=1\nSTATUS=unmounting \(point)")
        // No control request may wait on the reactor once the store stops.
        controlServer?.stop()
        do { try service.stop() } catch {
            Log.logger("mount").error("unmount of \(device.text): \(error)")
            return 1
        }
        Log.logger("mount").notice("\(point) unmounted; \(device.text) left clean")
        return status == 0 ? 0 : 1
    }

    /// Locks and opens the device; with statistics on, its requests are counted on their
    /// way (CountingBdev).
    private static func openDevice(_ device: Device, counted: Bool) throws -> (lock: Int32?, bdev: Bdev, counting: CountingBdev?) {
        let lock = try device.lock()
        do {
            let opened = try device.open()
            guard counted else { return (lock, opened, nil) }
            let counting = CountingBdev(wrapping: opened.backend)
            return (lock, Bdev(backend: counting), counting)
        } catch {
            if let lock { close(lock) }
            throw error
        }
    }

    /// The control socket, served off the request path (docs/CONTROL.md); nil (and a
    /// warning) when it cannot be made: the mount goes on without it.
    private func startControl(_ device: Device, _ point: String, _ control: ControlOptions, bdev: Bdev, counting: CountingBdev?,
                              service: FileSystemService, server: FuseServer, notify: Int32?) -> ControlServer? {
        let mountControl = MountControl(mountpoint: point, deviceText: device.text, deviceKind: device.kind, bdev: bdev,
                                        counting: counting, service: service, server: server)
        mountControl.grow = { sizeBytes in try Self.grow(device, bdev, service, sizeBytes) }
        catchHangup()
        let socketPath = control.socketPath ?? ControlSocket.path(for: point)
        do {
            let controlServer = try ControlServer(path: socketPath, mode: control.mode) { request, connection in
                mountControl.handle(request, connection)
            }
            mountControl.socketPath = socketPath
            let logFile = log.map { Device.absolute($0) }
            controlServer.onHangup = {
                if let logFile {
                    let reopened = DaemonLog.redirect(to: logFile, alsoStandardOutput: notify != nil)
                    Log.logger("control").notice(reopened ? "SIGHUP: log file reopened" : "SIGHUP: cannot reopen \(logFile)")
                } else {
                    Log.logger("control").notice("SIGHUP: no log file to reopen")
                }
            }
            controlServer.start()
            return controlServer
        } catch {
            Log.logger("control").warning("no control socket: \(error)")
            return nil
        }
    }

}

extension Mount {
    /// `blobfs grow`: an image file shorter than `sizeBytes` is extended (sparse), the device
    /// asked for its size again, and the store grown onto it (all of it without a size).
    /// On a control thread; the grow itself runs on the file system's reactor.
    static func grow(_ device: Device, _ bdev: Bdev, _ service: FileSystemService, _ sizeBytes: UInt64?) throws -> String {
        let started = MonotonicClock.nowNs()
        if let sizeBytes, case let .file(path) = device.spec {
            var info = stat()
            guard stat(path, &info) == 0 else { throw Failure("\(path): \(String(cString: strerror(errno)))") }
            if (info.st_mode & S_IFMT) == S_IFREG && UInt64(info.st_size) < sizeBytes {
                guard truncate(path, off_t(sizeBytes)) == 0 else {
                    throw Failure("extending \(path) to \(sizeBytes) bytes: \(String(cString: strerror(errno)))")
                }
                Log.logger("mount").notice("grow: \(path) extended to \(formatBytes(sizeBytes))")
            }
        }
        let geometry: BdevGeometry
        do { geometry = try bdev.refreshGeometry() } catch { throw Failure("\(device.text): \(error)") }
        if let sizeBytes, sizeBytes > geometry.capacityBytes {
            throw Failure("\(device.text) holds \(geometry.capacityBytes) bytes, less than \(sizeBytes) (a \(device.kind) device grows outside blobfs)")
        }
        let pages = sizeBytes.map { $0 / UInt64(SuperBlock.pageBytes) }
        let result: Result<BlobStore.GrowReport, FSError> = service.blobService.reactor.call {
            do throws(FSError) { return .success(try service.growNow(toDevicePages: pages)) } catch { return .failure(error) }
        }
        let report: BlobStore.GrowReport
        switch result {
        case let .success(value): report = value
        case let .failure(error): throw Failure(error.message.isEmpty ? "\(error)" : error.message)
        }
        let page = UInt64(SuperBlock.pageBytes)
        let elapsed = milliseconds(MonotonicClock.nowNs() - started)
        let line = "grown from \(formatBytes(report.devicePagesBefore * page)) to \(formatBytes(report.devicePagesAfter * page)): "
            + "\(report.clustersBefore) to \(report.clustersAfter) clusters, \(report.blobIDLimitBefore) to \(report.blobIDLimitAfter) inodes "
            + "(\(formatBytes(report.arrayPagesWritten * page)) of new table and bitmaps written; \(elapsed) ms)"
        Log.logger("mount").notice("grow: \(line)")
        return line
    }
}

/// The control socket's mount options (taken out of -o before the FUSE options):
/// `control_socket=PATH` (default: derived from the mountpoint, ControlSocket.path) and
/// `control_mode=OCTAL` (default 0600: root, or the user running the daemon).
struct ControlOptions: Sendable {
    var socketPath: String?
    var mode: mode_t = 0o600

    /// `list` without the control options.
    mutating func parse(_ list: String) throws(FSError) -> String {
        var rest: [Substring] = []
        for option in list.split(separator: ",") {
            if option.hasPrefix("control_socket=") {
                let path = String(option.dropFirst("control_socket=".count))
                guard path.hasPrefix("/"), ControlSocket.address(path) != nil else {
                    throw FSError(EINVAL, "mount option \(option): an absolute path of at most 107 bytes")
                }
                socketPath = path
            } else if option.hasPrefix("control_mode=") {
                guard let value = mode_t(option.dropFirst("control_mode=".count), radix: 8), value & ~0o777 == 0 else {
                    throw FSError(EINVAL, "mount option \(option): octal permission bits, e.g. 0660")
                }
                mode = value
            } else {
                rest.append(option)
            }
        }
        return rest.joined(separator: ",")
    }
}
