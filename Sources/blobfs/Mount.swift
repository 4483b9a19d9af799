#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Bdev
import BlobFileSystem
import Blobstore
import CommandLineSupport
import Env
import FuseFrontend
import Logging
import ToolSupport

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
            held this long; default 30).
            """)
    @Argument(help: "Image path or device spec (malloc:SIZE is formatted at mount).") var device: String
    @Argument(help: "An existing directory.") var mountpoint: String
    @Option(name: .customShort("o"), help: "Mount options, comma-separated.") var options: [String] = []
    @Flag(help: "Stay in the foreground (logs on stderr).") var foreground = false
    @Option(help: "Threads reading FUSE requests (each with its own cloned /dev/fuse fd); 0 (the default): the file system's reactor reads them itself.") var reactors = 0
    @Option(help: "Log file of the background daemon.") var log: String?
    @Flag(help: "Format DEVICE first (always done for malloc:).") var format = false

    func validate() throws {
        guard reactors >= 0, reactors <= 64 else { throw ValidationError("--reactors must be 0...64") }
    }

    func run() throws {
        let device: Device
        var fuseOptions = FuseOptions()
        do {
            device = try Device(self.device)
            for list in options { try fuseOptions.parse(list) }
        } catch let error as FSError {
            throw ValidationError("-o: \(error.message)")
        }
        fuseOptions.threads = reactors
        if !fuseOptions.mountOptions.contains("default_permissions") { fuseOptions.mountOptions.append("default_permissions") }
        if let path = device.lockPath, !path.contains(",") { fuseOptions.mountOptions.append("fsname=\(path)") }
        let point = Device.absolute(mountpoint)
        var info = stat()
        guard stat(point, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR else {
            fail(Failure("mountpoint \(point) is not an existing directory", status: 2))
        }
        LoggingSystem.bootstrap(StreamLogHandler.standardError)
        if foreground {
            Glibc.exit(serve(device, point, fuseOptions, notify: nil))
        }
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { fail(Failure("pipe: \(String(cString: strerror(errno)))")) }
        let pid = fork()
        guard pid >= 0 else { fail(Failure("fork: \(String(cString: strerror(errno)))")) }
        if pid == 0 {
            close(fds[0])
            setsid()
            Glibc.exit(serve(device, point, fuseOptions, notify: fds[1]))
        }
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
        if text.hasPrefix("OK") {
            print("blobfs: \(device.text) mounted on \(point) (daemon pid \(pid)); unmount with: blobfs unmount \(point)")
            Glibc.exit(0)
        }
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        let message = text.isEmpty ? "the daemon exited before mounting" : text
        fail(Failure(message, status: message.hasPrefix("cannot open") ? 2 : 1))
    }

    /// Loads the store, mounts and serves until unmounted; returns the exit status.
    private func serve(_ device: Device, _ point: String, _ options: FuseOptions, notify: Int32?) -> Int32 {
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
        let lock: Int32?
        let bdev: Bdev
        do {
            lock = try device.lock()
            bdev = try device.open()
        } catch { return failed(error) }
        defer {
            bdev.close()
            if let lock { close(lock) }
        }
        let service: FileSystemService
        do {
            service = try FileSystemService(bdev: bdev, format: device.isRAM || format ? BlobStore.Options() : nil)
        } catch {
            return failed(Failure("\(device.text): \(error)", status: 1))
        }
        let server: FuseServer
        do { server = try FuseServer(service: service, mountpoint: point, options: options) } catch {
            try? service.stop()
            return failed(Failure("\(error)"))
        }
        if let notify {
            report("OK")
            _ = notify
            let sink = open(log ?? "/dev/null", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            if sink >= 0 {
                dup2(sink, 1)
                dup2(sink, 2)
                close(sink)
            }
            let null = open("/dev/null", O_RDONLY)
            if null >= 0 { dup2(null, 0); close(null) }
        } else {
            print("blobfs: \(device.text) mounted on \(point); Ctrl-C or `blobfs unmount \(point)` unmounts")
        }
        let status = server.run()
        do { try service.stop() } catch {
            let line = "blobfs: unmount of \(device.text): \(error)\n"
            _ = line.withCString { write(2, $0, strlen($0)) }
            return 1
        }
        return status == 0 ? 0 : 1
    }
}
