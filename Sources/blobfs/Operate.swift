#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import ToolSupport

/// The commands that ask a running daemon through its control socket (docs/CONTROL.md).
/// Exit status: 0 answered, 1 the daemon reported a failure, 2 usage or no daemon.
struct ControlTarget: ParsableArguments {
    @Argument(help: "The mountpoint of a blobfs mount.") var mountpoint: String
    @Option(help: "The control socket (default: derived from the mountpoint, as `blobfs mount` printed it).")
    var socket: String?

    /// The socket to use: --socket, else the path for our user, else root's.
    func connect() -> Int32 {
        let point = Device.canonical(mountpoint)
        var tried: [String] = []
        for path in socket.map({ [$0] }) ?? [ControlSocket.path(for: point), ControlSocket.path(for: point, euid: 0)] {
            guard !tried.contains(path) else { continue }
            tried.append(path)
            switch ControlSocket.connect(path) {
            case let .success(fd): return fd
            case let .failure(error):
                if error.errno == EACCES {
                    fail(Failure("\(path): permission denied (the control socket serves root and the daemon's user)", status: 2))
                }
            }
        }
        fail(Failure("no blobfs daemon answers for \(point) (tried \(tried.joined(separator: ", ")); is it a blobfs mount?)",
                     status: 2))
    }

    /// Sends `request` and prints every frame of the answer; exits 1 on an error frame.
    func converse(_ request: String) -> Never {
        let fd = connect()
        guard ControlSocket.writeAll(fd, Array((request + "\n").utf8)) else { fail(Failure("the daemon closed the control socket")) }
        // A pipe closed by the reader (`blobfs stats --interval 1 | head`) ends the command quietly.
        signal(SIGPIPE, SIG_DFL)
        while let frame = ControlSocket.readFrame(fd) {
            if !frame.ok { fail(Failure(frame.text.hasSuffix("\n") ? String(frame.text.dropLast()) : frame.text)) }
            var bytes = Array(frame.text.utf8)[...]
            while !bytes.isEmpty {
                let count = bytes.withUnsafeBytes { write(1, $0.baseAddress!, $0.count) }
                if count < 0 && errno == EINTR { continue }
                guard count > 0 else { Glibc.exit(0) }  // the reader went away
                bytes = bytes.dropFirst(count)
            }
        }
        close(fd)
        Glibc.exit(0)
    }
}

struct Status: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(
        abstract: "Show a mounted file system's state: device, transport, reactors, space, log, checkpoints, errors.")
    @OptionGroup var target: ControlTarget
    @Flag(help: "JSON (docs/CONTROL.md gives the fields).") var json = false

    func run() throws { target.converse("status \(json ? "json" : "text")") }
}

struct Stats: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(
        abstract: "Per FUSE operation counts, bytes and latency percentiles, and the device's requests.",
        discussion: "With --interval S, a report of each interval, like iostat, until interrupted (or --count reports).")
    @OptionGroup var target: ControlTarget
    @Flag(help: "JSON (with --interval: one object per line).") var json = false
    @Option(help: "Seconds between reports (0.1 to 3600).") var interval: Double?
    @Option(help: "Reports to print with --interval (default: until interrupted).") var count: Int?

    func validate() throws {
        if let interval { guard interval >= 0.1, interval <= 3600 else { throw ValidationError("--interval must be 0.1 to 3600 seconds") } }
        if let count {
            guard count > 0 else { throw ValidationError("--count must be positive") }
            guard interval != nil else { throw ValidationError("--count needs --interval") }
        }
    }

    func run() throws {
        var request = "stats \(json ? "json" : "text")"
        if let interval { request += " interval=\(interval)" }
        if let count { request += " count=\(count)" }
        target.converse(request)
    }
}

struct Sync: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(
        abstract: "Write back, flush and checkpoint a mounted file system now.")
    @OptionGroup var target: ControlTarget

    func run() throws { target.converse("sync") }
}

struct Checkpoint: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(
        abstract: "Write a checkpoint of a mounted file system now (the metadata log emptied).")
    @OptionGroup var target: ControlTarget

    func run() throws { target.converse("checkpoint") }
}

struct Grow: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(
        abstract: "Grow a mounted file system onto its grown image file or device.",
        discussion: """
            Without --size the store takes the whole device as it is now (grow the image file or \
            block device first); with --size an image file shorter than SIZE is extended (sparse) \
            first. The new table and bitmaps are written copy-on-write past the old end, and one \
            super block switches to them: a crash at any moment leaves the old size or the new one. \
            The growth must hold them (about 2 x 4 bytes per inode and 2 bits per cluster).
            """)
    @OptionGroup var target: ControlTarget
    @Option(help: "The size to grow to (e.g. 64G).") var size: String?

    func run() throws {
        var request = "grow"
        if let size { request += " size=\(try parseSize(size, "--size"))" }
        target.converse(request)
    }
}
