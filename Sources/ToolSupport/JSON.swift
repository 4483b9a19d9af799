import BlobFileSystem
import Blobstore

/// A small JSON value and its printer (the tools' `--json` output; no Foundation).
public indirect enum JSON: Sendable {
    case object([(String, JSON)])
    case array([JSON])
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case double(Double)
    case bool(Bool)
    case null

    /// Indented, or `compact`: on one line (a stream of them is JSON Lines).
    public func render(indent: Int = 0, compact: Bool = false) -> String {
        if compact {
            switch self {
            case let .object(members):
                return "{" + members.map { JSON.quote($0.0) + ":" + $0.1.render(compact: true) }.joined(separator: ",") + "}"
            case let .array(items):
                return "[" + items.map { $0.render(compact: true) }.joined(separator: ",") + "]"
            default:
                break
            }
        }
        let pad = String(repeating: "  ", count: indent + 1)
        let close = String(repeating: "  ", count: indent)
        switch self {
        case let .object(members):
            guard !members.isEmpty else { return "{}" }
            let body = members.map { "\(pad)\(JSON.quote($0.0)): \($0.1.render(indent: indent + 1))" }
            return "{\n" + body.joined(separator: ",\n") + "\n\(close)}"
        case let .array(items):
            guard !items.isEmpty else { return "[]" }
            return "[\n" + items.map { pad + $0.render(indent: indent + 1) }.joined(separator: ",\n") + "\n\(close)]"
        case let .string(text): return JSON.quote(text)
        case let .int(value): return "\(value)"
        case let .uint(value): return "\(value)"
        case let .double(value): return value.isFinite ? "\(value)" : "null"
        case let .bool(value): return value ? "true" : "false"
        case .null: return "null"
        }
    }

    static func quote(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }
}

/// Rows printed as aligned columns.
public func table(_ header: [String], _ rows: [[String]]) -> String {
    var widths = header.map(\.count)
    for row in rows { for (index, cell) in row.enumerated() where index < widths.count { widths[index] = max(widths[index], cell.count) } }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { index, cell in
            index == cells.count - 1 ? cell : cell + String(repeating: " ", count: widths[index] - cell.count)
        }.joined(separator: "  ")
    }
    return ([line(header)] + rows.map(line)).joined(separator: "\n")
}

extension JSON {
    /// A blob id as the tools print it: its number.
    public static func blob(_ id: BlobID) -> JSON { .uint(id.rawValue) }
    /// An inode number as the tools print it: its number.
    public static func ino(_ ino: InodeNumber) -> JSON { .uint(ino.rawValue) }
}
