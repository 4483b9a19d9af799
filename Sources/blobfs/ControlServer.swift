#if canImport(Glibc)
import Glibc
#endif
import Env
import Logging
import Synchronization
import ToolSupport

/// The daemon's side of the control socket: a thread that accepts connections (and, once
/// a second, samples the reactors' load; on SIGHUP, reopens the log), and a thread per
/// connection that reads its one request and answers. Nothing here runs on a reactor:
/// what a command needs from the file system it asks for with `Reactor.call`, which waits
/// here while the reactor runs the closure between two passes.
final class ControlServer: @unchecked Sendable {
    typealias Handler = @Sendable (_ request: ControlRequest, _ connection: ControlConnection) -> Void

    let path: String
    private let listenFD: Int32
    private let wake: (read: Int32, write: Int32)
    private let handler: Handler
    private let stopping = Atomic<Bool>(false)
    private let connections = Mutex<Int>(0)
    private var acceptThread: pthread_t?
    /// Called on the accept thread after SIGHUP.
    var onHangup: (@Sendable () -> Void)?
    private let samples = Mutex<(older: [Reactor.Load], newer: [Reactor.Load])>(([], []))
    private let log = Log.logger("control")
    /// Connections served at once; more are refused with a message.
    static let connectionsMax = 16

    /// Binds the socket at `path` (mode `mode`, its directory made 0755 if missing). A
    /// socket left by a daemon that died is replaced; one a live daemon answers on is not.
    init(path: String, mode: mode_t, handler: @escaping Handler) throws(SystemError) {
        self.path = path
        self.handler = handler
        let directory = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        if !directory.isEmpty { Self.makeDirectories(directory) }
        if case let .success(fd) = ControlSocket.connect(path) {
            close(fd)
            throw SystemError("another daemon answers on \(path)", errno: EADDRINUSE)
        }
        unlink(path)
        guard var address = ControlSocket.address(path) else { throw SystemError("socket path \(path)", errno: ENAMETOOLONG) }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket") }
        // Created with the mode asked for: no moment in which others could connect.
        let previous = umask(0o777 & ~mode)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        umask(previous)
        guard bound == 0, listen(fd, 16) == 0 else {
            let error = SystemError("bind/listen(\(path))")
            close(fd)
            throw error
        }
        listenFD = fd
        var fds: [Int32] = [-1, -1]
        guard makePipe(&fds) else {
            let error = SystemError("pipe")
            close(fd)
            unlink(path)
            throw error
        }
        wake = (fds[0], fds[1])
        sampleReactors()
    }

    private static func makeDirectories(_ directory: String) {
        var prefix = ""
        for part in directory.split(separator: "/") {
            prefix += "/" + part
            mkdir(prefix, 0o755)
        }
    }

    func start() {
        acceptThread = startThread("blobfs-control") { [self] in acceptLoop() }
    }

    /// Stops accepting, waits for the connections being served to end (they end: the
    /// reactors are still running) and removes the socket.
    func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        var byte: UInt8 = 1
        _ = write(wake.write, &byte, 1)
        if let acceptThread { pthread_join(acceptThread, nil) }
        while connections.withLock({ $0 }) > 0 { usleep(10_000) }
        close(listenFD)
        close(wake.read)
        close(wake.write)
        unlink(path)
    }

    var isStopping: Bool { stopping.load(ordering: .acquiring) }

    /// Reactor loads now and one to two seconds ago, for busy shares over the last second.
    func reactorLoads() -> (now: [Reactor.Load], earlier: [Reactor.Load]) {
        let now = Reactor.all.map(\.load)
        return (now, samples.withLock { $0.older })
    }

    private func sampleReactors() {
        let loads = Reactor.all.map(\.load)
        samples.withLock { $0 = ($0.newer.isEmpty ? loads : $0.newer, loads) }
    }

    private func acceptLoop() {
        var lastSampleNs = MonotonicClock.nowNs()
        while !isStopping {
            var fds = [pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: wake.read, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: hangupPipe.read, events: Int16(POLLIN), revents: 0)]
            let ready = poll(&fds, nfds_t(hangupPipe.read >= 0 ? 3 : 2), 1000)
            if MonotonicClock.nowNs() - lastSampleNs >= 1_000_000_000 {
                sampleReactors()
                lastSampleNs = MonotonicClock.nowNs()
            }
            guard ready > 0 else { continue }
            if fds[2].revents != 0 {
                var drained = [UInt8](repeating: 0, count: 64)
                _ = read(hangupPipe.read, &drained, drained.count)
                onHangup?()
            }
            guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
            let client = accept(listenFD, nil, nil)
            guard client >= 0 else { continue }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            serve(client)
        }
    }

    private func serve(_ fd: Int32) {
        // Root, or the user the daemon runs as: the socket's mode says the same; this
        // holds even if someone loosens it.
        // struct ucred (Glibc's module leaves it out: it needs _GNU_SOURCE).
        struct PeerCredentials { var pid: Int32 = 0; var uid: UInt32 = 0; var gid: UInt32 = 0 }
        var credentials = PeerCredentials()
        var length = socklen_t(MemoryLayout<PeerCredentials>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) == 0,
              credentials.uid == 0 || credentials.uid == geteuid() else {
            ControlSocket.sendFrame(fd, ok: false, "permission denied: the control socket serves root and uid \(geteuid())")
            close(fd)
            return
        }
        let admitted = connections.withLock { count -> Bool in
            guard count < Self.connectionsMax else { return false }
            count += 1
            return true
        }
        guard admitted else {
            ControlSocket.sendFrame(fd, ok: false, "busy: \(Self.connectionsMax) control connections already")
            close(fd)
            return
        }
        let started = startThread("blobfs-ctl-conn") { [self] in
            defer {
                close(fd)
                connections.withLock { $0 -= 1 }
            }
            // A client that neither sends nor reads (`blobfs stats --interval 1 | sleep 1000`)
            // cannot hold the connection, and with it the unmount, past these.
            var timeout = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            guard let line = ControlSocket.readLine(fd) else { return }
            guard let request = ControlRequest(line) else {
                ControlSocket.sendFrame(fd, ok: false, "bad request '\(line)'")
                return
            }
            handler(request, ControlConnection(fd: fd, server: self))
        }
        if started == nil {
            connections.withLock { $0 -= 1 }
            close(fd)
        }
    }
}

/// One request: a command and its words (`json`, `text`, `key=value`).
struct ControlRequest: Sendable {
    let command: String
    let flags: Set<String>
    let values: [String: String]

    init?(_ line: String) {
        let words = line.split(separator: " ").map(String.init)
        guard let first = words.first, !first.isEmpty else { return nil }
        command = first
        var flags: Set<String> = []
        var values: [String: String] = [:]
        for word in words.dropFirst() {
            if let equals = word.firstIndex(of: "=") {
                values[String(word[..<equals])] = String(word[word.index(after: equals)...])
            } else {
                flags.insert(word)
            }
        }
        self.flags = flags
        self.values = values
    }
}

/// The answering side of one connection.
struct ControlConnection: Sendable {
    let fd: Int32
    let server: ControlServer

    @discardableResult
    func answer(_ text: String) -> Bool { ControlSocket.sendFrame(fd, ok: true, text) }
    func fail(_ text: String) { ControlSocket.sendFrame(fd, ok: false, text) }
    /// The client went away (a streaming `stats --interval` ended with Ctrl-C).
    var peerClosed: Bool {
        var fds = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&fds, 1, 0) > 0 else { return false }
        var byte: UInt8 = 0
        return recv(fd, &byte, 1, Int32(MSG_PEEK) | Int32(MSG_DONTWAIT)) <= 0
    }
}

// MARK: - SIGHUP

/// The self-pipe SIGHUP writes to (the handler may only make async-signal-safe calls);
/// the control thread reads it and reopens the log.
nonisolated(unsafe) var hangupPipe: (read: Int32, write: Int32) = (-1, -1)

/// Installs the SIGHUP handler. Before libfuse installs its own: libfuse leaves a signal
/// alone whose handler is not the default, so SIGHUP reopens the log instead of unmounting.
func catchHangup() {
    var fds: [Int32] = [-1, -1]
    guard makePipe(&fds) else { return }
    hangupPipe = (fds[0], fds[1])
    var action = sigaction()
    action.__sigaction_handler.sa_handler = { _ in
        let saved = errno
        var byte: UInt8 = 1
        _ = write(hangupPipe.write, &byte, 1)
        errno = saved
    }
    sigemptyset(&action.sa_mask)
    action.sa_flags = SA_RESTART
    sigaction(SIGHUP, &action, nil)
}

/// A pipe whose ends are close-on-exec and non-blocking (pipe2 is not in Glibc's module).
func makePipe(_ fds: inout [Int32]) -> Bool {
    guard pipe(&fds) == 0 else { return false }
    for fd in fds {
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }
    return true
}
