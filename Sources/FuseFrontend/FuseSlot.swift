#if canImport(Glibc)
import Glibc
#endif
import Bdev
import BlobFileSystem
import CFuseKernel
import Env

/// How a request reaches the daemon and its reply goes back: `/dev/fuse` reads and
/// writes, or FUSE over io_uring. A transport owns its slots and calls the session for
/// each request it receives.
protocol FuseTransport: AnyObject {
    /// Sends the reply of the request in `slot` (`error` 0 or a positive errno, then
    /// `body`) and frees the slot for the next request. Called exactly once per request
    /// that wants a reply, on the transport's reactor.
    func send(_ slot: FuseSlot, error: Int32, body: UnsafeRawBufferPointer)
    /// Frees `slot` without a reply (FORGET, BATCH_FORGET, INTERRUPT).
    func drop(_ slot: FuseSlot)
    /// Short name for logs and `blobfs mount`'s line.
    var name: String { get }
}

/// One request in flight and the memory it lives in. A transport has a fixed number of
/// slots, made at start: receiving, answering and the device I/O in between allocate
/// nothing. `data` is DMA memory, 4 KiB aligned: a WRITE's payload arrives there and goes
/// to the device from there; a READ's bytes are read into it and sent from it.
final class FuseSlot: BdevCompletionHandler {
    let index: Int
    unowned(unsafe) let transport: any FuseTransport
    /// Set when the session starts; the session outlives its transports' slots' requests.
    unowned(unsafe) var session: FuseSession!
    /// Room for a reply's fixed part (entry, attributes, open, statfs ... replies).
    let scratch: UnsafeMutableRawPointer
    static let scratchBytes = 1024
    let data: DMASegment

    // The request now in the slot (valid from receipt until the reply).
    var header = fuse_in_header()
    /// The request's fixed argument struct (`in_args[0]`), if the opcode has one.
    var argument = UnsafeRawBufferPointer(start: nil, count: 0)
    /// What follows it: names, values, a WRITE's bytes (at `data` for WRITE).
    var payload = UnsafeRawBufferPointer(start: nil, count: 0)
    var ticket = RequestLedger.Ticket.none
    /// When the request was received (monotonic ns; set only while statistics are kept).
    var receivedNs: UInt64 = 0

    // An asynchronous read or write in flight.
    var readSkip = 0
    var readCount = 0
    var writeCount = 0

    /// Room for a request's payload (`maxWrite`) and for a read of `maxWrite` bytes at an
    /// unaligned offset, which covers up to two more device blocks (4 KiB each at most).
    static func dataBytes(maxWrite: Int) -> Int { maxWrite + 2 * 4096 }

    init(index: Int, transport: any FuseTransport, data: DMASegment) {
        self.index = index
        self.transport = transport
        self.data = data
        scratch = .allocate(byteCount: Self.scratchBytes, alignment: 16)
    }

    deinit { scratch.deallocate() }

    var opcode: UInt32 { header.opcode }
    var nodeID: UInt64 { header.nodeid }
    /// The request's node as the file system numbers it.
    var inode: InodeNumber { InodeNumber(header.nodeid) }

    /// The fixed argument as `T` (zeros past what the kernel sent: older minors send
    /// shorter structs).
    @inline(__always)
    func argument<T>(_: T.Type) -> T {
        if argument.count >= MemoryLayout<T>.size { return argument.loadUnaligned(as: T.self) }
        var value = unsafe_zeroed(T.self)
        withUnsafeMutableBytes(of: &value) { raw in
            raw.copyMemory(from: UnsafeRawBufferPointer(rebasing: argument[0..<min(argument.count, raw.count)]))
        }
        return value
    }

    // MARK: - Replies (each request is answered exactly once)

    func replyError(_ errno: Int32) {
        session.answered(self, errno: errno)
        transport.send(self, error: errno, body: UnsafeRawBufferPointer(start: nil, count: 0))
    }

    /// A reply whose body is `value` (a kernel struct).
    @inline(__always)
    func reply<T>(_ value: T) {
        scratch.storeBytes(of: value, as: T.self)
        replyScratch(MemoryLayout<T>.size)
    }

    /// A reply whose body is the first `count` bytes of `scratch`.
    func replyScratch(_ count: Int) {
        session.answered(self)
        transport.send(self, error: 0, body: UnsafeRawBufferPointer(start: scratch, count: count))
    }

    /// A reply whose body is `count` bytes of `data` from `offset`.
    func replyData(offset: Int, count: Int) {
        session.answered(self, bytes: count)
        transport.send(self, error: 0, body: UnsafeRawBufferPointer(start: data.base + offset, count: count))
    }

    func replyEmpty() {
        session.answered(self)
        transport.send(self, error: 0, body: UnsafeRawBufferPointer(start: nil, count: 0))
    }

    /// No reply (FORGET and friends): the slot is free again.
    func noReply() {
        session.answered(self)
        transport.drop(self)
    }

    // MARK: - Device completions of an asynchronous read or write

    func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        session.dataCompleted(self, status: status)
    }
}

/// A zero-filled value of a C struct type.
@inline(__always)
func unsafe_zeroed<T>(_: T.Type) -> T {
    withUnsafeTemporaryAllocation(of: T.self, capacity: 1) { buffer in
        UnsafeMutableRawPointer(buffer.baseAddress!).initializeMemory(as: UInt8.self, repeating: 0,
                                                                        count: MemoryLayout<T>.size)
        return buffer.baseAddress!.move()
    }
}
