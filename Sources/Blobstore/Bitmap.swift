import Glibc

/// An in-memory bit set with a next-free search; the allocation bitmaps of a loaded store.
/// It notes which of its on-disk pages (`BitmapPage.bitsPerPage` bits each) a set or
/// clear touched, so that a checkpoint writes those again and no others.
public struct Bitmap: Equatable, Sendable {
    public private(set) var count: UInt64
    private var words: ZeroedWords
    public private(set) var setCount: UInt64 = 0
    /// One bit per on-disk page: touched since the last `takeChangedPages()`.
    private var changed: [UInt64]

    public init(count: UInt64) {
        self.count = count
        words = ZeroedWords(count: Int((count + 63) / 64))
        changed = [UInt64](repeating: 0, count: Int((BitmapPage.pages(forBits: count) + 63) / 64))
    }

    public static func == (lhs: Bitmap, rhs: Bitmap) -> Bool { lhs.count == rhs.count && lhs.words == rhs.words }

    /// The same bits in a bitmap of `newCount` (at least `count`) bits; the new ones clear.
    /// Every page is noted as changed.
    public func grown(to newCount: UInt64) -> Bitmap {
        precondition(newCount >= count, "a bitmap of \(count) bits grown to \(newCount)")
        var result = Bitmap(count: newCount)
        // Bits past `count` are never set, so whole words copy as they are.
        result.words = ZeroedWords(count: result.words.count, copying: words)
        result.setCount = setCount
        for index in result.changed.indices { result.changed[index] = ~0 }
        return result
    }

    @inline(__always)
    private mutating func noteChange(_ index: UInt64) {
        let page = index / UInt64(BitmapPage.bitsPerPage)
        changed[Int(page / 64)] |= 1 << (page % 64)
    }

    /// The on-disk pages touched since the last call, in order; forgets them.
    public mutating func takeChangedPages() -> [Int] {
        var pages: [Int] = []
        for (at, word) in changed.enumerated() where word != 0 {
            var bits = word
            while bits != 0 {
                pages.append(at * 64 + bits.trailingZeroBitCount)
                bits &= bits - 1
            }
            changed[at] = 0
        }
        return pages
    }

    /// The on-disk bytes of page `page` (`ArrayPage.payloadBytes`; zero past the end).
    public func pageBytes(_ page: Int) -> [UInt8] {
        var result = [UInt8](repeating: 0, count: ArrayPage.payloadBytes)
        let firstBit = UInt64(page) * UInt64(BitmapPage.bitsPerPage)
        guard firstBit < count else { return result }
        let byteCount = Int((min(count, firstBit + UInt64(BitmapPage.bitsPerPage)) - firstBit + 7) / 8)
        let firstByte = Int(firstBit / 8)
        #if _endian(little)
        words.withUnsafeBytes { source in
            result.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: source[firstByte..<(firstByte + byteCount)])) }
        }
        #else
        for index in 0..<byteCount {
            let byte = firstByte + index
            result[index] = UInt8(truncatingIfNeeded: words[byte / 8] >> (8 * UInt64(byte % 8)))
        }
        #endif
        return result
    }

    public subscript(index: UInt64) -> Bool {
        precondition(index < count, "bit \(index) of \(count)")
        return words[Int(index / 64)] & (1 << (index % 64)) != 0
    }

    public mutating func set(_ index: UInt64) {
        precondition(!self[index], "bit \(index) set twice")
        words[Int(index / 64)] |= 1 << (index % 64)
        setCount += 1
        noteChange(index)
    }

    public mutating func clear(_ index: UInt64) {
        precondition(self[index], "bit \(index) cleared twice")
        words[Int(index / 64)] &= ~(1 << (index % 64))
        setCount -= 1
        noteChange(index)
    }

    /// Sets bits [first, first + count), every one of them clear (a word at a time: a
    /// discard holds runs of up to a whole device).
    public mutating func set(run first: UInt64, count: UInt64) {
        Self.forEachWord(first, count, of: self.count) { word, mask in
            precondition(words[word] & mask == 0, "bit in \(first)+\(count) set twice")
            words[word] |= mask
            setCount += UInt64(mask.nonzeroBitCount)
        }
        noteChanges(first, count)
    }

    /// Clears bits [first, first + count), every one of them set.
    public mutating func clear(run first: UInt64, count: UInt64) {
        Self.forEachWord(first, count, of: self.count) { word, mask in
            precondition(words[word] & mask == mask, "bit in \(first)+\(count) cleared twice")
            words[word] &= ~mask
            setCount -= UInt64(mask.nonzeroBitCount)
        }
        noteChanges(first, count)
    }

    /// Calls `body` with each word bits [first, first + count) touch and the mask of
    /// those bits in it.
    private static func forEachWord(_ first: UInt64, _ count: UInt64, of bits: UInt64, _ body: (Int, UInt64) -> Void) {
        precondition(first <= bits && count <= bits - first, "run \(first)+\(count) of \(bits) bits")
        let end = first + count
        var index = first
        while index < end {
            let bit = index % 64
            let width = min(64 - bit, end - index)
            body(Int(index / 64), width == 64 ? UInt64.max : ((1 << width) - 1) << bit)
            index += width
        }
    }

    private mutating func noteChanges(_ first: UInt64, _ count: UInt64) {
        guard count > 0 else { return }
        let pageBits = UInt64(BitmapPage.bitsPerPage)
        for page in (first / pageBits)...((first + count - 1) / pageBits) { changed[Int(page / 64)] |= 1 << (page % 64) }
    }

    /// First clear bit in [start, limit), without wrapping; nil when there is none.
    public func firstClear(from start: UInt64, before limit: UInt64) -> UInt64? {
        let end = min(limit, count)
        var index = start
        while index < end {
            let word = ~words[Int(index / 64)] & ~((1 << (index % 64)) &- 1)
            if word != 0 {
                let bit = (index / 64) * 64 + UInt64(word.trailingZeroBitCount)
                return bit < end ? bit : nil
            }
            index = (index / 64 + 1) * 64
        }
        return nil
    }

    /// First set bit in [start, limit), without wrapping; nil when there is none.
    public func firstSet(from start: UInt64, before limit: UInt64) -> UInt64? {
        let end = min(limit, count)
        var index = start
        while index < end {
            let word = words[Int(index / 64)] & ~((1 << (index % 64)) &- 1)
            if word != 0 {
                let bit = (index / 64) * 64 + UInt64(word.trailingZeroBitCount)
                return bit < end ? bit : nil
            }
            index = (index / 64 + 1) * 64
        }
        return nil
    }

    /// First clear bit at or after `start`, wrapping around; nil when all are set.
    public func firstClear(from start: UInt64 = 0) -> UInt64? {
        guard setCount < count else { return nil }
        var index = start % max(count, 1)
        for _ in 0..<2 {
            while index < count {
                let word = words[Int(index / 64)] | ((1 << (index % 64)) &- 1)
                if word != UInt64.max {
                    let bit = (index / 64) * 64 + UInt64((~word).trailingZeroBitCount)
                    if bit < count { return bit }
                    break
                }
                index = (index / 64 + 1) * 64
            }
            index = 0
        }
        return nil
    }

    /// Bits set here and clear in `other`, and bits clear here and set in `other`: how
    /// many of each and the first `listing` of each, in order (a word at a time).
    public func differences(from other: Bitmap, listing: Int)
        -> (onlyHere: (count: UInt64, first: [UInt64]), onlyThere: (count: UInt64, first: [UInt64])) {
        precondition(count == other.count, "bitmaps of \(count) and \(other.count) bits")
        var here: (count: UInt64, first: [UInt64]) = (0, [])
        var there: (count: UInt64, first: [UInt64]) = (0, [])
        func note(_ bits: UInt64, _ word: Int, _ into: inout (count: UInt64, first: [UInt64])) {
            into.count += UInt64(bits.nonzeroBitCount)
            var rest = bits
            while rest != 0, into.first.count < listing {
                into.first.append(UInt64(word) * 64 + UInt64(rest.trailingZeroBitCount))
                rest &= rest - 1
            }
        }
        for word in 0..<words.count {
            let (mine, theirs) = (words[word], other.words[word])
            guard mine != theirs else { continue }
            note(mine & ~theirs, word, &here)
            note(theirs & ~mine, word, &there)
        }
        return (here, there)
    }

    /// The bytes of the on-disk form: bit i in byte i/8, bit i%8.
    public func bytes() -> [UInt8] {
        let byteCount = Int((count + 7) / 8)
        #if _endian(little)
        // The words' memory is the on-disk form (bits past `count` are never set).
        return [UInt8](unsafeUninitializedCapacity: byteCount) { buffer, initialized in
            words.withUnsafeBytes { buffer.baseAddress!.update(from: $0.baseAddress!.assumingMemoryBound(to: UInt8.self), count: byteCount) }
            initialized = byteCount
        }
        #else
        var result = [UInt8](repeating: 0, count: byteCount)
        for index in result.indices {
            result[index] = UInt8(truncatingIfNeeded: words[index / 8] >> (8 * UInt64(index % 8)))
        }
        return result
        #endif
    }

    /// Decodes the on-disk form (`bytes()`): the first `(count + 7) / 8` bytes of `bytes`;
    /// bits past `count` are ignored.
    public init(count: UInt64, bytes: ArraySlice<UInt8>) {
        self.init(count: count)
        let byteCount = Int((count + 7) / 8)
        precondition(bytes.count >= byteCount, "\(bytes.count) bytes for \(count) bits")
        var set: UInt64 = 0
        for word in 0..<words.count {
            let first = bytes.startIndex + word * 8
            var value: UInt64 = 0
            for byte in 0..<min(8, byteCount - word * 8) { value |= UInt64(bytes[first + byte]) << (8 * UInt64(byte)) }
            if word == words.count - 1, count % 64 != 0 { value &= (1 << (count % 64)) - 1 }
            guard value != 0 else { continue }
            words[word] = value
            set += UInt64(value.nonzeroBitCount)
        }
        setCount = set
    }
}

/// The words of a bitmap: zeroed memory from calloc, which for a large bitmap is pages the
/// kernel maps only when a bit in them is first set, so loading a store costs no time in
/// proportion to its device size (an Array of a 15 TiB device's 480 MiB of cluster bits
/// took 0.35 s to zero). Copy on write, as an Array.
struct ZeroedWords: Equatable, @unchecked Sendable {
    private final class Storage {
        let count: Int
        let base: UnsafeMutablePointer<UInt64>

        init(count: Int) {
            self.count = count
            guard let memory = calloc(max(count, 1), MemoryLayout<UInt64>.size) else {
                fatalError("a bitmap of \(count) words: out of memory")
            }
            base = memory.assumingMemoryBound(to: UInt64.self)
        }

        deinit { free(base) }
    }

    private var storage: Storage

    init(count: Int) { storage = Storage(count: count) }

    /// `count` words, the first ones `other`'s (at most `count` of them).
    init(count: Int, copying other: ZeroedWords) {
        storage = Storage(count: count)
        storage.base.update(from: other.storage.base, count: min(count, other.count))
    }

    var count: Int { storage.count }

    subscript(index: Int) -> UInt64 {
        get {
            precondition(index >= 0 && index < storage.count)
            return storage.base[index]
        }
        set {
            precondition(index >= 0 && index < storage.count)
            if !isKnownUniquelyReferenced(&storage) {
                let copy = Storage(count: storage.count)
                copy.base.update(from: storage.base, count: storage.count)
                storage = copy
            }
            storage.base[index] = newValue
        }
    }

    func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: storage.base, count: storage.count * MemoryLayout<UInt64>.size))
    }

    static func == (lhs: ZeroedWords, rhs: ZeroedWords) -> Bool {
        lhs.count == rhs.count && (lhs.storage === rhs.storage || memcmp(lhs.storage.base, rhs.storage.base, lhs.count * 8) == 0)
    }
}
