#if canImport(Glibc)
import Glibc
#endif
import Env

// The API for module authors (SPDK's bdev_module.h): a backend and its per-reactor
// channels. Consumers never see these; they use `Bdev` and `BdevChannel`.

/// A block-device implementation: RAM, a file through io_uring, an NVMe namespace...
public protocol BdevBackend: AnyObject, Sendable {
    var name: String { get }
    var geometry: BdevGeometry { get }
    /// A channel for I/O from `reactor`; called on that reactor's thread.
    func makeChannel(reactor: Reactor) throws(BdevError) -> any BdevBackendChannel
    /// Releases the device; every channel is closed before.
    func close()
    /// Looks at the device's size again (an image file or block device grown while open:
    /// `blobfs grow`) and returns the geometry now. A device never shrinks under its user:
    /// a smaller size is an error and the geometry stays. Control path, any thread.
    func refreshGeometry() throws(BdevError) -> BdevGeometry
}

extension BdevBackend {
    /// Devices whose size cannot change (RAM, an NVMe namespace here) keep theirs.
    public func refreshGeometry() throws(BdevError) -> BdevGeometry { geometry }
}

/// Per-reactor submission and completion path of a backend.
///
/// Contract: `submit` takes a validated request (range, length and alignment already
/// checked) and must call `io.complete(_:)` exactly once, either inside `submit` or
/// later from `poll`. Completions reach the consumer from the generic channel's poller,
/// never inside `submit`.
public protocol BdevBackendChannel: AnyObject {
    func submit(_ io: BdevIO)
    /// Reaps device completions; `.pending` when requests are in flight that no
    /// registered fd will announce.
    func poll() -> PollStatus
    func close()
}

/// One pooled request. Owned by its channel, handed to the backend for the duration
/// of one I/O, never allocated per I/O.
public final class BdevIO {
    public internal(set) var type: BdevIOType = .read
    public internal(set) var offsetBlocks: UInt64 = 0
    public internal(set) var countBlocks: UInt64 = 0
    /// Bytes moved by a read or write (countBlocks × block size).
    public internal(set) var byteCount: Int = 0
    /// The request's memory as an iovec array (read and write only).
    public let iovecs: UnsafeMutablePointer<iovec>
    public internal(set) var segmentCount: Int = 0
    /// Free for the backend's use while it owns the request.
    public var moduleContext: UInt64 = 0
    /// Position in the channel's pool; stable for the channel's life.
    public let index: Int

    let segments: UnsafeMutablePointer<DMASegment>
    /// The channel owns the request and outlives it; unmanaged, so that completing takes
    /// no reference count.
    private let owner: Unmanaged<BdevChannel>
    var channel: BdevChannel { owner.takeUnretainedValue() }
    unowned(unsafe) var handler: (any BdevCompletionHandler)?
    var tag: UInt64 = 0
    var status: BdevStatus = .success
    var nextCompleted: Int = -1
    var isInFlight = false

    init(index: Int, channel: BdevChannel) {
        self.index = index
        owner = Unmanaged.passUnretained(channel)
        iovecs = .allocate(capacity: BdevLimits.segmentCountMax)
        segments = .allocate(capacity: BdevLimits.segmentCountMax)
    }

    deinit {
        iovecs.deallocate()
        segments.deallocate()
    }

    /// Ends the request: called by the backend exactly once.
    public func complete(_ status: BdevStatus) {
        precondition(isInFlight, "bdev request \(index) completed twice or never submitted")
        isInFlight = false
        self.status = status
        owner._withUnsafeGuaranteedRef { $0.enqueueCompleted(self) }
    }

    /// Copies `byteCount` bytes from the request's segments to `target` (for writes).
    public func gather(into target: UnsafeMutableRawPointer) {
        var offset = 0
        for index in 0..<segmentCount {
            let vector = iovecs[index]
            target.advanced(by: offset).copyMemory(from: vector.iov_base!, byteCount: vector.iov_len)
            offset += vector.iov_len
        }
    }

    /// Copies `byteCount` bytes from `source` into the request's segments (for reads).
    public func scatter(from source: UnsafeRawPointer) {
        var offset = 0
        for index in 0..<segmentCount {
            let vector = iovecs[index]
            vector.iov_base!.copyMemory(from: source.advanced(by: offset), byteCount: vector.iov_len)
            offset += vector.iov_len
        }
    }
}
