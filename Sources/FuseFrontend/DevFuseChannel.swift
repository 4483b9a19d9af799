#if canImport(Glibc)
import Glibc
#endif
import CFuseKernel
import Env

/// The FUSE transport every kernel has: one `read` of `/dev/fuse` per request, one
/// `writev` per reply. The fd is non-blocking and in the reactor's epoll set; a poller
/// reads requests into free slots and hands each to the session on the same thread.
///
/// A slot is one stretch of a single DMA buffer: a 4 KiB header page, then `maxWrite`
/// bytes of data. A request is read to end exactly where the data begins for a WRITE
/// (its in-header and `fuse_write_in` fill the last 80 bytes of the header page), so a
/// WRITE's payload lands 4 KiB aligned and goes to the device without a copy; other
/// requests are small and simply run on into the data area.
final class DevFuseChannel: FuseTransport {
    let fd: Int32
    let name = "/dev/fuse"
    private let buffer: DMABuffer
    private(set) var slots: [FuseSlot] = []
    private var free: [Int] = []
    private let stride: Int
    private let maxWrite: Int
    /// The bytes before `data` a request starts at: a WRITE's in-header and argument.
    private static let writeHeadBytes = MemoryLayout<fuse_in_header>.size + MemoryLayout<fuse_write_in>.size
    private static let headerPageBytes = 4096
    /// Whether the kernel has ended the connection (unmounted, or aborted).
    private(set) var ended = false
    private var pollerID: PollerID?
    private unowned(unsafe) let reactor: Reactor
    /// Read /dev/fuse only when epoll reported it (`readable`) and until it says EAGAIN,
    /// not on every pass (a `read` failing with EAGAIN each pass cost ~10 system calls per
    /// request): when the io_uring transport carries the requests (/dev/fuse brings only
    /// FORGET and INTERRUPT), or when the reactor has a ring, whose poll of the epoll set
    /// reports readiness between busy passes too. Without either, a busy reactor would see
    /// the fd's readiness only when it next sleeps, so it reads every pass.
    var readsOnlyWhenReady = false
    private var readable = true

    init(fd: Int32, slotCount: Int, maxWrite: Int, reactor: Reactor) throws(SystemError) {
        self.fd = fd
        self.maxWrite = maxWrite
        self.reactor = reactor
        stride = Self.headerPageBytes + FuseSlot.dataBytes(maxWrite: maxWrite)
        buffer = try DMABuffer.allocate(bytes: stride * slotCount)
        for index in 0..<slotCount {
            let data = buffer.segment(offset: index * stride + Self.headerPageBytes, count: FuseSlot.dataBytes(maxWrite: maxWrite))
            slots.append(FuseSlot(index: index, transport: self, data: data))
            free.append(slotCount - 1 - index)
        }
    }

    private var onEnded: (() -> Void)?

    /// Starts serving on the reactor (call on it): the fd joins its epoll set and a poller
    /// reads requests. `session` gets each one; `onEnded` runs once when the kernel ends
    /// the connection (unmount).
    func start(_ session: FuseSession, onEnded: @escaping () -> Void) throws(SystemError) {
        self.onEnded = onEnded
        for slot in slots { slot.session = session }
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
        try reactor.registerWakeFD(fd) { [unowned self] in readable = true }
        pollerID = reactor.registerPoller { [unowned self] in self.poll() }
    }

    func stop() {
        if let pollerID { reactor.unregisterPoller(pollerID) }
        pollerID = nil
        reactor.unregisterWakeFD(fd)
    }

    var requestsHeld: Int { slots.count - free.count }

    /// Reads the requests waiting (up to 32 a pass, while slots are free).
    private func poll() -> PollStatus {
        guard !ended, readable || !readsOnlyWhenReady else { return .idle }
        var handled = 0
        while handled < 32, let index = free.last {
            let slot = slots[index]
            let start = slot.data.base - Self.writeHeadBytes
            let count = read(fd, start, Self.writeHeadBytes + slot.data.count)
            if count < 0 {
                switch errno {
                case EINTR: continue
                case EAGAIN:
                    if readsOnlyWhenReady { readable = false }
                    return handled > 0 ? .busy : .idle
                default:
                    // ENODEV: unmounted; anything else: the connection is unusable.
                    if errno != ENODEV {
                        Log.logger("fuse").error("read /dev/fuse: \(String(cString: strerror(errno))); the session ends")
                    }
                    ended = true
                    onEnded?()
                    onEnded = nil
                    return .busy
                }
            }
            free.removeLast()
            handled += 1
            guard count >= MemoryLayout<fuse_in_header>.size else {
                Log.logger("fuse").error("short request from /dev/fuse: \(count) bytes")
                free.append(index)
                continue
            }
            slot.header = UnsafeRawPointer(start).loadUnaligned(as: fuse_in_header.self)
            let argumentBytes = min(FuseSession.argumentBytes(slot.opcode), count - MemoryLayout<fuse_in_header>.size)
            let argumentStart = start + MemoryLayout<fuse_in_header>.size
            slot.argument = UnsafeRawBufferPointer(start: argumentStart, count: argumentBytes)
            slot.payload = UnsafeRawBufferPointer(start: argumentStart + argumentBytes,
                                                  count: count - MemoryLayout<fuse_in_header>.size - argumentBytes)
            slot.session.received(slot)
        }
        // Out of slots with requests perhaps still queued in the kernel: the fd's edge has
        // passed, so poll again once a reply frees one (the pass that sends it is busy).
        return handled > 0 ? .busy : .idle
    }

    func send(_ slot: FuseSlot, error: Int32, body: UnsafeRawBufferPointer) {
        var header = fuse_out_header()
        header.len = UInt32(MemoryLayout<fuse_out_header>.size + (error == 0 ? body.count : 0))
        header.error = -error
        header.unique = slot.header.unique
        let bodyBytes = error == 0 ? body.count : 0
        let written = withUnsafeMutableBytes(of: &header) { head in
            var vectors = (iovec(iov_base: head.baseAddress, iov_len: head.count),
                           iovec(iov_base: UnsafeMutableRawPointer(mutating: body.baseAddress), iov_len: bodyBytes))
            return withUnsafeMutablePointer(to: &vectors) { pointer in
                pointer.withMemoryRebound(to: iovec.self, capacity: 2) { writev(fd, $0, bodyBytes > 0 ? 2 : 1) }
            }
        }
        // ENOENT: the request was interrupted and the kernel no longer waits for it.
        if written < 0 && errno != ENOENT && errno != ENODEV {
            Log.logger("fuse").error("reply to \(FuseOpcode.name(slot.opcode)): writev: \(String(cString: strerror(errno)))")
        }
        free.append(slot.index)
    }

    func drop(_ slot: FuseSlot) {
        free.append(slot.index)
    }
}
