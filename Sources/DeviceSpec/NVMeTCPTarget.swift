import NVMe

/// `nvme-tcp:HOST:PORT/SUBSYSTEM-NQN[?option=value&...]`: a subsystem on an NVMe/TCP
/// target. HOST is a name, an IPv4 address or a bracketed IPv6 address. Options (the
/// names nvme-cli uses where it has one):
///   hostnqn=NQN          the host NQN (default: nqn.2014-08.org.nvmexpress:uuid:<machine-id>)
///   hdgst=0|1, ddgst=0|1 ask for header / data digests (CRC32C)
///   kato=MS              keep-alive timeout sent in Connect (default 10000)
///   ctrl_loss_tmo=S      seconds unreachable before I/O fails as device lost (default 60)
///   io_timeout=S         seconds a command may go unanswered before a reconnect (default 30)
public struct NVMeTCPTarget: Equatable, Sendable, CustomStringConvertible {
    public var endpoint: TCPEndpoint
    public var subsystemNQN: String
    public var options: NVMeTCPOptions
    private var query: String

    public init(parsing text: String) throws(DeviceSpec.ParseError) {
        guard let slash = text.firstIndex(of: "/") else { throw .badTarget("no /SUBSYSTEM-NQN in '\(text)'") }
        let authority = String(text[..<slash])
        var rest = String(text[text.index(after: slash)...])
        query = ""
        if let mark = rest.firstIndex(of: "?") {
            query = String(rest[rest.index(after: mark)...])
            rest = String(rest[..<mark])
        }
        let host: String
        let portText: String
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]"), authority[authority.index(after: close)...].hasPrefix(":") else {
                throw .badTarget("bad bracketed address '\(authority)'")
            }
            host = String(authority[authority.index(after: authority.startIndex)..<close])
            portText = String(authority[authority.index(close, offsetBy: 2)...])
        } else {
            guard let colon = authority.lastIndex(of: ":") else { throw .badTarget("no :PORT in '\(authority)'") }
            host = String(authority[..<colon])
            portText = String(authority[authority.index(after: colon)...])
        }
        guard !host.isEmpty else { throw .badTarget("empty host") }
        guard let port = UInt16(portText), port > 0 else { throw .badTarget("bad port '\(portText)'") }
        guard !rest.isEmpty, rest.utf8.count <= ConnectData.nqnBytesMax, !rest.contains("/") else {
            throw .badTarget("bad subsystem NQN '\(rest)' (1 to \(ConnectData.nqnBytesMax) bytes)")
        }
        endpoint = TCPEndpoint(host: host, port: port)
        subsystemNQN = rest
        options = NVMeTCPOptions()
        for pair in query.split(separator: "&") where !pair.isEmpty {
            let parts = pair.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2 else { throw .badTarget("option '\(pair)' has no value") }
            try apply(parts[0], parts[1])
        }
    }

    private mutating func apply(_ key: String, _ value: String) throws(DeviceSpec.ParseError) {
        func flag() throws(DeviceSpec.ParseError) -> Bool {
            switch value {
            case "1", "on", "yes", "true": return true
            case "0", "off", "no", "false": return false
            default: throw .badTarget("\(key)=\(value): expected 0 or 1")
            }
        }
        func seconds(_ range: ClosedRange<UInt64>) throws(DeviceSpec.ParseError) -> UInt64 {
            guard let number = UInt64(value), range.contains(number) else {
                throw .badTarget("\(key)=\(value): expected \(range.lowerBound) to \(range.upperBound)")
            }
            return number
        }
        switch key {
        case "hostnqn":
            guard !value.isEmpty, value.utf8.count <= ConnectData.nqnBytesMax else { throw .badTarget("hostnqn too long or empty") }
            options.hostNQN = value
        case "hdgst": options.headerDigest = try flag()
        case "ddgst": options.dataDigest = try flag()
        case "kato": options.keepAliveTimeoutMs = UInt32(try seconds(1000...3_600_000))
        case "ctrl_loss_tmo": options.deviceLossTimeoutNs = try seconds(1...86_400) * 1_000_000_000
        case "io_timeout": options.commandTimeoutNs = try seconds(1...3_600) * 1_000_000_000
        default: throw .badTarget("unknown option '\(key)'")
        }
    }

    public var description: String {
        "\(endpoint)/\(subsystemNQN)" + (query.isEmpty ? "" : "?" + query)
    }
}
