#if canImport(Glibc)
import Glibc
#endif
import Env

/// Why an NVMe/TCP connection or command failed. Connection failures (everything but
/// `.command` and `.unsupported`) end the connection; the controller reconnects.
public enum NVMeTCPError: Error, Equatable, Sendable, CustomStringConvertible {
    case resolve(host: String, reason: String)
    case connect(endpoint: String, SystemError)
    case socket(SystemError)
    /// The target closed the connection (EOF or reset).
    case closedByTarget
    /// The target sent something the protocol does not allow (names what and where).
    case protocolViolation(String)
    /// A header or data digest did not match.
    case digestMismatch(String)
    /// The target ended the connection with a C2HTermReq.
    case terminatedByTarget(String)
    case timeout(String)
    /// An NVMe command completed with an error status.
    case command(NVMeError)
    case unsupported(String)

    public var description: String {
        switch self {
        case let .resolve(host, reason): "cannot resolve \(host): \(reason)"
        case let .connect(endpoint, error): "cannot connect to \(endpoint): \(error)"
        case let .socket(error): "socket: \(error)"
        case .closedByTarget: "connection closed by the target"
        case let .protocolViolation(what): "NVMe/TCP protocol violation: \(what)"
        case let .digestMismatch(what): "NVMe/TCP \(what) digest mismatch"
        case let .terminatedByTarget(what): "target terminated the connection: \(what)"
        case let .timeout(what): "timed out: \(what)"
        case let .command(error): "\(error)"
        case let .unsupported(what): "unsupported: \(what)"
        }
    }
}

/// Where a target listens: an IPv4/IPv6 address or host name and a TCP port.
public struct TCPEndpoint: Equatable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: UInt16
    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }
    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// The same endpoint with its host as a numeric address: name resolution (which may
    /// block on DNS) happens once, on the control path, never on a reactor reconnecting.
    public func resolved() throws(NVMeTCPError) -> TCPEndpoint {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, String(port), &hints, &list)
        guard status == 0, let first = list else { throw .resolve(host: host, reason: String(cString: gai_strerror(status))) }
        defer { freeaddrinfo(list) }
        var text = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        guard getnameinfo(first.pointee.ai_addr, first.pointee.ai_addrlen, &text, socklen_t(text.count), nil, 0,
                          NI_NUMERICHOST) == 0 else {
            throw .resolve(host: host, reason: "no numeric address")
        }
        return TCPEndpoint(host: String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), port: port)
    }
}

/// A non-blocking TCP socket: each syscall wrapped once, EINTR handled here, errors typed.
/// Owned by one thread at a time (the reactor of its queue, or the admin thread).
final class TCPSocket {
    let fd: Int32

    /// Starts a non-blocking connect; `isConnected` tells when it is done.
    static func connecting(to endpoint: TCPEndpoint) throws(NVMeTCPError) -> TCPSocket {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(endpoint.host, String(endpoint.port), &hints, &list)
        guard status == 0, let first = list else {
            throw .resolve(host: endpoint.host, reason: String(cString: gai_strerror(status)))
        }
        defer { freeaddrinfo(list) }
        let fd = socket(first.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue)
                        | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .socket(SystemError("socket")) }
        var one: Int32 = 1
        // Capsules are small and latency-bound: no Nagle delay.
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var result: Int32
        repeat { result = connect(fd, first.pointee.ai_addr, first.pointee.ai_addrlen) } while result != 0 && errno == EINTR
        if result != 0 && errno != EINPROGRESS {
            let error = SystemError("connect", errno: errno)
            close(fd)
            throw .connect(endpoint: endpoint.description, error)
        }
        return TCPSocket(fd: fd)
    }

    private init(fd: Int32) { self.fd = fd }

    deinit { close(fd) }

    /// Whether a connect in progress finished: true when connected, false while in progress.
    func isConnected(endpoint: TCPEndpoint) throws(NVMeTCPError) -> Bool {
        var entry = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        guard poll(&entry, 1, 0) == 1 else { return false }
        var code: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        _ = getsockopt(fd, SOL_SOCKET, SO_ERROR, &code, &length)
        if code != 0 { throw .connect(endpoint: endpoint.description, SystemError("connect", errno: code)) }
        return true
    }

    /// Sends what the kernel takes now: the byte count, 0 when it would block.
    @inline(__always)
    func send(_ bytes: UnsafeRawPointer, count: Int) throws(NVMeTCPError) -> Int {
        while true {
            let sent = Glibc.send(fd, bytes, count, Int32(MSG_DONTWAIT) | Int32(MSG_NOSIGNAL))
            if sent >= 0 { return sent }
            switch errno {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: return 0
            case ECONNRESET, EPIPE: throw .closedByTarget
            default: throw .socket(SystemError("send"))
            }
        }
    }

    /// Receives what is there now: the byte count, 0 when nothing is; EOF throws.
    @inline(__always)
    func receive(into bytes: UnsafeMutableRawPointer, count: Int) throws(NVMeTCPError) -> Int {
        while true {
            let received = recv(fd, bytes, count, Int32(MSG_DONTWAIT))
            if received > 0 { return received }
            if received == 0 { throw .closedByTarget }
            switch errno {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: return 0
            case ECONNRESET, EPIPE, ETIMEDOUT: throw .closedByTarget
            default: throw .socket(SystemError("recv"))
            }
        }
    }

    /// Waits (control path only) until the socket is readable, or also writable when asked,
    /// or `timeoutMs` passes.
    func wait(writable: Bool, timeoutMs: Int32) {
        var entry = pollfd(fd: fd, events: Int16(POLLIN) | (writable ? Int16(POLLOUT) : 0), revents: 0)
        _ = poll(&entry, 1, timeoutMs)
    }
}
