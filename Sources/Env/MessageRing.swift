import Synchronization

/// A bounded lock-free multi-producer, single-consumer ring (Vyukov's sequence-numbered
/// cells). Producers on any thread; one consumer, the owning reactor.
///
/// Invariant: cell `i` is free for the producer that claimed position `p` when its
/// sequence equals `p`, and holds a message for the consumer at position `p` when its
/// sequence equals `p + 1`.
public final class MessageRing<Element>: @unchecked Sendable {
    private struct Cell: ~Copyable {
        let sequence: Atomic<Int>
        var element: Element?
    }

    public let capacity: Int
    private let mask: Int
    private let cells: UnsafeMutablePointer<Cell>
    private let enqueuePosition = Atomic<Int>(0)
    private var dequeuePosition = 0  // consumer only

    public init(capacity requested: Int) {
        var capacity = 2
        while capacity < requested { capacity <<= 1 }
        self.capacity = capacity
        self.mask = capacity - 1
        cells = .allocate(capacity: capacity)
        for index in 0..<capacity {
            (cells + index).initialize(to: Cell(sequence: Atomic(index), element: nil))
        }
    }

    deinit {
        cells.deinitialize(count: capacity)
        cells.deallocate()
    }

    /// Appends from any thread; false when the ring is full.
    public func push(_ element: Element) -> Bool {
        var position = enqueuePosition.load(ordering: .relaxed)
        while true {
            let cell = cells + (position & mask)
            let sequence = cell.pointee.sequence.load(ordering: .acquiring)
            let difference = sequence - position
            if difference == 0 {
                let (exchanged, original) = enqueuePosition.compareExchange(
                    expected: position, desired: position + 1, ordering: .relaxed)
                if exchanged {
                    cell.pointee.element = element
                    cell.pointee.sequence.store(position + 1, ordering: .releasing)
                    return true
                }
                position = original
            } else if difference < 0 {
                return false
            } else {
                position = enqueuePosition.load(ordering: .relaxed)
            }
        }
    }

    /// Takes the oldest element; consumer thread only.
    public func pop() -> Element? {
        let cell = cells + (dequeuePosition & mask)
        let sequence = cell.pointee.sequence.load(ordering: .acquiring)
        guard sequence == dequeuePosition + 1 else { return nil }
        let element = cell.pointee.element.take()
        cell.pointee.sequence.store(dequeuePosition + capacity, ordering: .releasing)
        dequeuePosition += 1
        return element
    }

    /// True when no producer has published an element the consumer has not taken.
    public var isEmpty: Bool {
        let cell = cells + (dequeuePosition & mask)
        return cell.pointee.sequence.load(ordering: .acquiring) != dequeuePosition + 1
    }
}
