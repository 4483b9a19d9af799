#if canImport(Glibc)
import Glibc
#endif
import Env
import Logging
import Synchronization

/// Where the daemon's log goes: stderr in the foreground (the journal, under systemd), a
/// file with `--log FILE` (reopened on SIGHUP, for logrotate), syslog when it runs in the
/// background without one. Levels as swift-log's; `--log-level` sets the least one logged.
enum DaemonLog {
    enum Destination: Equatable {
        case standardError
        case file(String)
        case syslog
    }

    static func bootstrap(_ destination: Destination, level: Logger.Level) {
        switch destination {
        case .standardError, .file:
            // A file is stderr dup'ed onto it (`redirect`): Swift's own fatal messages land there too.
            LoggingSystem.bootstrap { label in
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = level
                return handler
            }
        case .syslog:
            LoggingSystem.bootstrap { label in SyslogLogHandler(label: label, logLevel: level) }
        }
    }

    /// Points stderr (and stdout, `alsoStandardOutput`: the background daemon's) at `path`
    /// (appending; made 0640 if missing). Returns false when it cannot be opened. Called at
    /// start and on SIGHUP: a rotated file is let go and a new one made at the same path.
    @discardableResult
    static func redirect(to path: String, alsoStandardOutput: Bool = true) -> Bool {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o640)
        guard fd >= 0 else { return false }
        if alsoStandardOutput { dup2(fd, 1) }
        dup2(fd, 2)
        close(fd)
        return true
    }
}

/// syslog's datagrams (RFC 3164: `<PRI>TIMESTAMP TAG[PID]: MESSAGE`, facility daemon) to
/// /dev/log, which journald serves on a systemd machine. Written here rather than through
/// syslog(3) so that `BLOBFS_SYSLOG_SOCKET` can point a test at a socket of its own. A
/// message that finds no listener is dropped, as syslog(3) drops it.
struct SyslogLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]

    init(label: String, logLevel: Logger.Level) {
        self.label = label
        self.logLevel = logLevel
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    static func severity(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: 7
        case .info: 6
        case .notice: 5
        case .warning: 4
        case .error: 3
        case .critical: 2
        }
    }

    static let facilityDaemon = 3

    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String,
             file: String, function: String, line: UInt) {
        var all = self.metadata
        if let metadata { all.merge(metadata) { $1 } }
        let details = all.isEmpty ? "" : " " + all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let text = "<\(Self.facilityDaemon * 8 + Self.severity(level))>\(Self.timestamp()) blobfs[\(getpid())]: "
            + "\(level) \(label):\(details) \(message)"
        SyslogSocket.shared.send(text)
    }

    /// "Mmm dd hh:mm:ss", local time (RFC 3164).
    static func timestamp() -> String {
        var now = time(nil)
        var parts = tm()
        localtime_r(&now, &parts)
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        let day = parts.tm_mday < 10 ? " \(parts.tm_mday)" : "\(parts.tm_mday)"
        return "\(months[Int(parts.tm_mon)]) \(day) \(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec))"
    }
}

/// One datagram socket to the syslog daemon, connected on first use and again after a failure.
final class SyslogSocket: Sendable {
    static let shared = SyslogSocket()
    private let fd = Mutex<Int32>(-1)
    let path = getenv("BLOBFS_SYSLOG_SOCKET").map { String(cString: $0) } ?? "/dev/log"

    func send(_ text: String) {
        fd.withLock { fd in
            for _ in 0..<2 {
                if fd < 0 { fd = connectSocket() }
                guard fd >= 0 else { return }
                let sent = text.withCString { Glibc.send(fd, $0, strlen($0), Int32(MSG_NOSIGNAL)) }
                if sent >= 0 { return }
                close(fd)  // the syslog daemon restarted: reconnect once
                fd = -1
            }
        }
    }

    private func connectSocket() -> Int32 {
        guard var address = ControlSocket.address(path) else { return -1 }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return -1 }
        let status = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard status == 0 else {
            close(fd)
            return -1
        }
        return fd
    }
}

/// systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram of
/// `KEY=VALUE` lines to $NOTIFY_SOCKET (a path, or `@name` in the abstract namespace).
enum SystemdNotify {
    /// Sends `state`; false when there is no $NOTIFY_SOCKET or the send failed.
    @discardableResult
    static func send(_ state: String) -> Bool {
        guard let raw = getenv("NOTIFY_SOCKET") else { return false }
        var path = Array(String(cString: raw).utf8)
        guard !path.isEmpty else { return false }
        if path[0] == UInt8(ascii: "@") { path[0] = 0 }  // abstract namespace
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        guard path.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: path) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + path.count + (path[0] == 0 ? 0 : 1))
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let sent = state.withCString { text in
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, text, strlen(text), Int32(MSG_NOSIGNAL), $0, length) }
            }
        }
        return sent >= 0
    }
}
