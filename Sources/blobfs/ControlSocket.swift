#if canImport(Glibc)
import Glibc
#endif
import Env
import ToolSupport

/// The control socket of a mount: a Unix stream socket whose path follows from the
/// mountpoint, so `blobfs status MOUNTPOINT` finds it without asking anyone.
///
/// The conversation (docs/CONTROL.md): the client sends one line, `COMMAND [WORD ...]`
/// (`status json`, `stats text interval=1 count=5`, `sync`, `checkpoint`, `grow size=N`);
/// the daemon answers with frames, each `ok LENGTH\n` or `error LENGTH\n` and LENGTH bytes
/// (UTF-8 text or JSON), and closes the connection after the last one.
enum ControlSocket {
    /// Where the sockets of daemons running as `euid` live: /run/blobfs for root,
    /// $XDG_RUNTIME_DIR/blobfs (or /tmp/blobfs-UID) for others.
    static func directory(euid: uid_t = geteuid()) -> String {
        if euid == 0 { return "/run/blobfs" }
        if let runtime = getenv("XDG_RUNTIME_DIR").map({ String(cString: $0) }), !runtime.isEmpty { return runtime + "/blobfs" }
        return "/tmp/blobfs-\(euid)"
    }

    /// The socket path for `mountpoint` (absolute, as mounted): the path with its slashes
    /// turned into dashes and every byte outside [A-Za-z0-9_.] as %XX, so that two
    /// mountpoints never share a name; a name too long for sun_path keeps its start and
    /// ends in a hash of the whole.
    static func path(for mountpoint: String, euid: uid_t = geteuid()) -> String {
        let trimmed = mountpoint.split(separator: "/", omittingEmptySubsequences: true).joined(separator: "/")
        var name = ""
        for byte in trimmed.utf8 {
            switch byte {
            case UInt8(ascii: "/"): name += "-"
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                 UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "_"), UInt8(ascii: "."):
                name.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                let hex = String(byte, radix: 16, uppercase: true)
                name += "%" + (hex.count == 1 ? "0" : "") + hex
            }
        }
        if name.isEmpty { name = "root" }
        let directory = directory(euid: euid)
        // sun_path holds 108 bytes with the NUL.
        let room = 107 - directory.utf8.count - 1 - ".sock".utf8.count
        if name.utf8.count > room {
            var hash: UInt64 = 0xcbf2_9ce4_8422_2325  // FNV-1a 64
            for byte in mountpoint.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
            let tag = String(hash, radix: 16)
            name = String(name.utf8.prefix(max(0, room - tag.utf8.count - 1)))! + "-" + tag
        }
        return directory + "/" + name + ".sock"
    }

    /// A sockaddr_un for `path`, or nil when the path does not fit.
    static func address(_ path: String) -> sockaddr_un? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    /// Connects to the socket at `path`; the fd, or the errno.
    static func connect(_ path: String) -> Result<Int32, SystemError> {
        guard var address = address(path) else { return .failure(SystemError("socket path too long", errno: ENAMETOOLONG)) }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failure(SystemError("socket")) }
        let status = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard status == 0 else {
            let error = SystemError("connect(\(path))")
            close(fd)
            return .failure(error)
        }
        return .success(fd)
    }

    // MARK: - Frames

    /// Writes all of `bytes`; false when the peer went away.
    @discardableResult
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var written = 0
        while written < bytes.count {
            let count = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + written, bytes.count - written, Int32(MSG_NOSIGNAL)) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { return false }
            written += count
        }
        return true
    }

    @discardableResult
    static func sendFrame(_ fd: Int32, ok: Bool, _ text: String) -> Bool {
        let payload = Array(text.utf8)
        return writeAll(fd, Array("\(ok ? "ok" : "error") \(payload.count)\n".utf8) + payload)
    }

    /// Reads bytes up to and without a newline (at most `limit`); nil at end of stream.
    static func readLine(_ fd: Int32, limit: Int = 4096) -> String? {
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < limit {
            let count = recv(fd, &byte, 1, 0)
            if count < 0 && errno == EINTR { continue }
            guard count == 1 else { return line.isEmpty ? nil : String(decoding: line, as: UTF8.self) }
            if byte == UInt8(ascii: "\n") { return String(decoding: line, as: UTF8.self) }
            line.append(byte)
        }
        return String(decoding: line, as: UTF8.self)
    }

    /// The next frame: (ok, payload); nil at the end of the conversation.
    static func readFrame(_ fd: Int32) -> (ok: Bool, text: String)? {
        guard let header = readLine(fd, limit: 64) else { return nil }
        let parts = header.split(separator: " ")
        guard parts.count == 2, parts[0] == "ok" || parts[0] == "error", let length = Int(parts[1]), length >= 0,
              length <= 64 << 20 else { return (false, "malformed answer from the daemon: \(header)") }
        var payload = [UInt8](repeating: 0, count: length)
        var received = 0
        while received < length {
            let count = payload.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + received, length - received, 0) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { return (false, "the daemon closed the connection mid-answer") }
            received += count
        }
        return (parts[0] == "ok", String(decoding: payload, as: UTF8.self))
    }
}

/// Starts a detached thread running `body` (the control socket's threads: off every reactor).
@discardableResult
func startThread(_ name: String, _ body: @escaping @Sendable () -> Void) -> pthread_t? {
    final class Box: @unchecked Sendable {
        let name: String
        let body: @Sendable () -> Void
        init(_ name: String, _ body: @escaping @Sendable () -> Void) { self.name = name; self.body = body }
    }
    var handle = pthread_t()
    let context = Unmanaged.passRetained(Box(name, body)).toOpaque()
    let result = pthread_create(&handle, nil, { raw in
        let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        setCurrentThreadName(box.name)
        box.body()
        return nil
    }, context)
    guard result == 0 else {
        Unmanaged<Box>.fromOpaque(context).release()
        return nil
    }
    return handle
}
