#if canImport(Glibc)
import Glibc
#endif

/// A byte count for people: "512 B", "1.5 KiB", "3.9 GiB" (binary units, one decimal).
/// The one formatter of the tools (blobfs, blobcli, bdevperf, blobbench).
public func formatBytes(_ bytes: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var value = Double(bytes)
    var unit = 0
    while value >= 1024, unit < units.count - 1 { value /= 1024; unit += 1 }
    return unit == 0 ? "\(bytes) B" : "\(fixed(value, 1)) \(units[unit])"
}

/// `value` with `digits` decimals, as printf's %.Nf writes it (no Foundation).
public func fixed(_ value: Double, _ digits: Int) -> String {
    var buffer = [CChar](repeating: 0, count: 64)
    _ = withVaList([value]) { vsnprintf(&buffer, buffer.count, "%.\(digits)f", $0) }
    return String(cString: buffer)
}
