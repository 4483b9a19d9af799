/// A blob's xattrs of one class (FORMAT.md, "Descriptors"): names unique, in insertion
/// order except that removal moves the last entry into the freed slot. Lookups, sets and
/// removals are O(1): a directory of the file system keeps its entries here, and a
/// directory may hold 100,000 of them.
public struct XattrList: RandomAccessCollection, Sendable, ExpressibleByArrayLiteral {
    public typealias Element = (name: String, value: [UInt8])
    private var entries: ContiguousArray<Element> = []
    /// Keyed by the name's bytes: names compare as bytes, as on Linux (String equality
    /// would make two spellings of one Unicode character the same name).
    private var index: [Key: Int] = [:]

    /// The name, compared and hashed by its UTF-8 bytes. It keeps the String itself (a
    /// name of up to 15 bytes is stored inline: a lookup allocates nothing).
    private struct Key: Hashable, Sendable {
        let name: String
        init(_ name: String) { self.name = name }

        static func == (left: Key, right: Key) -> Bool { left.name.utf8.elementsEqual(right.name.utf8) }

        func hash(into hasher: inout Hasher) {
            var name = name
            name.withUTF8 { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
            hasher.combine(name.utf8.count)
        }
    }

    public init() {}
    public init(_ elements: some Sequence<Element>) {
        for element in elements { set(element.name, element.value) }
    }
    public init(arrayLiteral elements: Element...) { self.init(elements) }

    public var startIndex: Int { 0 }
    public var endIndex: Int { entries.count }
    public subscript(position: Int) -> Element { entries[position] }

    /// The value of `name`, if present.
    public subscript(name: String) -> [UInt8]? {
        guard let at = index[Key(name)] else { return nil }
        return entries[at].value
    }

    public func contains(name: String) -> Bool { index[Key(name)] != nil }
    /// Where `name` is in the list (positions follow insertion order, but for a removal,
    /// which moves the last entry into the hole).
    public func position(of name: String) -> Int? { index[Key(name)] }

    /// Sets `name` (replacing its value in place when present).
    public mutating func set(_ name: String, _ value: [UInt8]) {
        if let at = index[Key(name)] {
            entries[at].value = value
        } else {
            index[Key(name)] = entries.count
            entries.append((name, value))
        }
    }

    /// Appends a decoded entry; false when `name` is already present.
    mutating func appendUnique(_ name: String, _ value: [UInt8]) -> Bool {
        guard index[Key(name)] == nil else { return false }
        set(name, value)
        return true
    }

    @discardableResult
    public mutating func remove(_ name: String) -> [UInt8]? {
        guard let at = index.removeValue(forKey: Key(name)) else { return nil }
        let removed = entries[at].value
        let last = entries.count - 1
        if at != last {
            entries[at] = entries[last]
            index[Key(entries[at].name)] = at
        }
        entries.removeLast()
        return removed
    }

    /// Same names with the same values, whatever the order.
    public func sameContents(as other: XattrList) -> Bool {
        guard count == other.count else { return false }
        return entries.allSatisfy { other[$0.name] == $0.value }
    }
}
