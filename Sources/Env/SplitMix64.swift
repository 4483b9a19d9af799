/// SplitMix64: a small seeded generator. Every seeded decision in the project (crash
/// outcomes, test patterns, fuzz mutations, benchmark data) comes from it, so a seed
/// reproduces a run.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Fills `bytes` with generated words (a trailing partial word stays as it was).
    public mutating func fill(_ bytes: UnsafeMutableRawBufferPointer) {
        var offset = 0
        while offset + 8 <= bytes.count {
            bytes.storeBytes(of: next(), toByteOffset: offset, as: UInt64.self)
            offset += 8
        }
    }
}
