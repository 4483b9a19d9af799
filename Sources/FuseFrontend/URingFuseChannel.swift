#if canImport(Glibc)
import Glibc
#endif
import CFuseKernel
import CURing
import Env
import ReactorRing

/// FUSE over io_uring (protocol 7.42, kernel 6.14+ with the fuse module's enable_uring
/// set): the kernel keeps one queue per possible CPU; each of our ring entries sits in a
/// queue, the kernel completes it when a request is placed in its buffers, and one
/// COMMIT_AND_FETCH command sends the reply and re-arms the entry. A whole batch of
/// replies goes with one `io_uring_submit`, and requests arrive as completions: no
/// read or write system call per request.
///
/// All queues are served by this reactor (a request goes to the queue of the CPU its
/// caller runs on; one thread may serve several queues, giving each entry's own queue
/// id). An entry is a 288-byte header (the request's in-header and fixed argument, the
/// reply's out-header) and a payload buffer of `maxWrite` bytes of DMA memory: a WRITE's
/// bytes arrive at its start, 4 KiB aligned, and a reply's body is sent from it.
/// FORGET, BATCH_FORGET and INTERRUPT still come through /dev/fuse.
///
/// When the reactor has a ring of its own (`ReactorRing`), the entries live in it, beside
/// the device's reads and writes: the reactor's sleep submits a pass's commits and device
/// requests together and wakes for either kind of completion. Otherwise the channel keeps
/// a ring of its own, announced to the reactor by an eventfd.
final class URingFuseChannel: FuseTransport, ReactorRingConsumer {
    let name = "io_uring"
    let fd: Int32
    let queueCount: Int
    let entriesPerQueue: Int
    private let ring: UnsafeMutablePointer<io_uring>
    private let cqes: UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>
    private let headers: UnsafeMutableRawPointer
    private let iovecs: UnsafeMutablePointer<iovec>
    private let buffer: DMABuffer
    private(set) var slots: [FuseSlot] = []
    private var queueOf: [UInt16] = []
    private var unsubmitted = 0
    private var wakeFD: Int32 = -1
    private var pollerID: PollerID?
    private unowned(unsafe) let reactor: Reactor
    /// The reactor's ring and this channel's tag in it (nil: the channel's own ring).
    private let shared: ReactorRing?
    var sharesReactorRing: Bool { shared != nil }
    private var sharedTag: UInt64 = 0
    /// Entries the kernel tore down (unmount): they are gone for good.
    private(set) var entriesEnded = 0
    private static let headerBytes = MemoryLayout<blobfs_fuse_uring_req_header>.size
    private static let payloadSizeOffset = 272  // fuse_uring_req_header.ring_ent_in_out.payload_sz
    private static let reapBatch: UInt32 = 64

    /// The kernel's queue count: one per possible CPU (`nr_cpu_ids`).
    static func possibleCPUs() -> Int {
        guard let file = fopen("/sys/devices/system/cpu/possible", "r") else { return sysconf(Int32(_SC_NPROCESSORS_CONF)) }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 256)
        guard fgets(&line, Int32(line.count), file) != nil else { return sysconf(Int32(_SC_NPROCESSORS_CONF)) }
        // "0-1", "0-3,8-11", "0": the highest CPU number + 1.
        let text = String(cString: line).split(whereSeparator: { $0 == "," || $0 == "\n" })
        var highest = 0
        for part in text {
            if let last = part.split(separator: "-").last, let value = Int(last) { highest = max(highest, value) }
        }
        return highest + 1
    }

    init(fd: Int32, maxWrite: Int, reactor: Reactor, entriesPerQueue: Int = 64) throws(SystemError) {
        self.fd = fd
        self.reactor = reactor
        self.entriesPerQueue = entriesPerQueue
        queueCount = Self.possibleCPUs()
        let total = queueCount * entriesPerQueue
        cqes = .allocate(capacity: Int(Self.reapBatch))
        if let reactorRing = ReactorRing.ring(of: reactor) {
            shared = reactorRing
            ring = reactorRing.ring
        } else {
            shared = nil
            ring = .allocate(capacity: 1)
            var params = io_uring_params()
            params.flags = UInt32(IORING_SETUP_SQE128) | UInt32(IORING_SETUP_SUBMIT_ALL)
            var entries: UInt32 = 1
            while entries < UInt32(total) { entries <<= 1 }
            let result = io_uring_queue_init_params(entries, ring, &params)
            guard result == 0 else {
                ring.deallocate()
                cqes.deallocate()
                throw SystemError("io_uring_queue_init (SQE128)", errno: -result)
            }
        }
        headers = .allocate(byteCount: total * Self.headerBytes, alignment: 64)
        headers.initializeMemory(as: UInt8.self, repeating: 0, count: total * Self.headerBytes)
        iovecs = .allocate(capacity: total * 2)
        let dataBytes = FuseSlot.dataBytes(maxWrite: maxWrite)
        do { buffer = try DMABuffer.allocate(bytes: total * dataBytes) } catch {
            if shared == nil {
                io_uring_queue_exit(ring)
                ring.deallocate()
            }
            cqes.deallocate()
            headers.deallocate()
            iovecs.deallocate()
            throw error
        }
        for index in 0..<total {
            let data = buffer.segment(offset: index * dataBytes, count: dataBytes)
            slots.append(FuseSlot(index: index, transport: self, data: data))
            queueOf.append(UInt16(index / entriesPerQueue))
            iovecs[index * 2] = iovec(iov_base: headers + index * Self.headerBytes, iov_len: Self.headerBytes)
            iovecs[index * 2 + 1] = iovec(iov_base: data.base, iov_len: dataBytes)
        }
    }

    /// Registers every entry with its queue (after INIT has been answered: earlier the
    /// kernel refuses with EAGAIN) and starts reaping. Call on the reactor.
    func start(_ session: FuseSession) throws(SystemError) {
        reactor.preconditionCurrent()
        if let shared {
            guard let tag = shared.add(self) else { throw SystemError("reactor ring: no consumer tag left", errno: EBUSY) }
            sharedTag = tag
            for slot in slots {
                slot.session = session
                prepare(slot, command: UInt32(BLOBFS_FUSE_IO_URING_CMD_REGISTER), commitID: 0)
            }
            shared.submitNow()
            return
        }
        wakeFD = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        guard wakeFD >= 0 else { throw SystemError("eventfd") }
        let registered = io_uring_register_eventfd(ring, wakeFD)
        guard registered == 0 else { throw SystemError("io_uring_register_eventfd", errno: -registered) }
        try reactor.registerWakeFD(wakeFD)
        for slot in slots {
            slot.session = session
            prepare(slot, command: UInt32(BLOBFS_FUSE_IO_URING_CMD_REGISTER), commitID: 0)
        }
        submit()
        pollerID = reactor.registerPoller { [unowned self] in self.poll() }
    }

    func stop() {
        // With the reactor's ring the entries stay registered until the kernel ends them
        // (unmount); their completions find no consumer and are dropped.
        if let shared, sharedTag != 0 {
            shared.remove(tag: sharedTag)
            sharedTag = 0
        }
        if let pollerID { reactor.unregisterPoller(pollerID) }
        pollerID = nil
        if wakeFD >= 0 {
            reactor.unregisterWakeFD(wakeFD)
            Glibc.close(wakeFD)
            wakeFD = -1
        }
    }

    /// Ends the ring (the kernel cancels what is still registered). After `stop`.
    func close() {
        if shared == nil {
            io_uring_queue_exit(ring)
            ring.deallocate()
        }
        cqes.deallocate()
        headers.deallocate()
        iovecs.deallocate()
    }

    private func header(_ slot: FuseSlot) -> UnsafeMutableRawPointer { headers + slot.index * Self.headerBytes }

    /// Queues REGISTER or COMMIT_AND_FETCH for `slot` (submitted by the next `submit`).
    private func prepare(_ slot: FuseSlot, command: UInt32, commitID: UInt64) {
        guard let sqe = entry() else {
            // Never with one SQE per entry at most in flight; a lost entry would only
            // shrink the queue, not hang it.
            submit()
            guard let retry = entry() else {
                return Log.logger("fuse").error("io_uring: no submission entry for FUSE entry \(slot.index)")
            }
            return fill(retry, slot, command, commitID)
        }
        fill(sqe, slot, command, commitID)
    }

    @inline(__always)
    private func entry() -> UnsafeMutablePointer<io_uring_sqe>? {
        if let shared { return shared.nextEntry() }
        return io_uring_get_sqe(ring)
    }

    private func fill(_ sqe: UnsafeMutablePointer<io_uring_sqe>, _ slot: FuseSlot, _ command: UInt32, _ commitID: UInt64) {
        // The SQE as bytes (128 with SQE128): the uring_cmd fields and, at byte 48, the
        // fuse_uring_cmd_req.
        let raw = UnsafeMutableRawPointer(sqe)
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: 128)
        raw.storeBytes(of: UInt8(IORING_OP_URING_CMD.rawValue), toByteOffset: 0, as: UInt8.self)
        raw.storeBytes(of: fd, toByteOffset: 4, as: Int32.self)
        raw.storeBytes(of: command, toByteOffset: 8, as: UInt32.self)  // cmd_op
        if command == UInt32(BLOBFS_FUSE_IO_URING_CMD_REGISTER) {
            raw.storeBytes(of: UInt64(UInt(bitPattern: iovecs + slot.index * 2)), toByteOffset: 16, as: UInt64.self)
            raw.storeBytes(of: UInt32(2), toByteOffset: 24, as: UInt32.self)
        }
        let userData = UInt64(slot.index) << ReactorRing.tagBits | sharedTag
        raw.storeBytes(of: userData, toByteOffset: 32, as: UInt64.self)  // user_data
        var request = blobfs_fuse_uring_cmd_req()
        request.commit_id = commitID
        request.qid = queueOf[slot.index]
        (raw + 48).storeBytes(of: request, as: blobfs_fuse_uring_cmd_req.self)
        if shared == nil { unsubmitted += 1 }
    }

    private func submit() {
        if let shared { return shared.submitNow() }
        guard unsubmitted > 0 else { return }
        let result = io_uring_submit(ring)
        if result >= 0 {
            unsubmitted -= min(unsubmitted, Int(result))
        } else if result != -EINTR && result != -EAGAIN && result != -EBUSY {
            Log.logger("fuse").error("io_uring_submit: \(String(cString: strerror(-result)))")
            unsubmitted = 0
        }
    }

    private func poll() -> PollStatus {
        var busy = false
        // Replies sent since the last pass (from device completions too) go in one batch.
        if unsubmitted > 0 {
            submit()
            busy = true
        }
        while true {
            let count = io_uring_peek_batch_cqe(ring, cqes, Self.reapBatch)
            if count == 0 { break }
            for index in 0..<Int(count) {
                let cqe = cqes[index]!
                arrived(slots[Int(cqe.pointee.user_data >> ReactorRing.tagBits)], result: cqe.pointee.res)
            }
            io_uring_cq_advance(ring, count)
            busy = true
        }
        if unsubmitted > 0 { submit() }
        if busy { return .busy }
        return unsubmitted > 0 ? .pending : .idle
    }

    /// A completion from the reactor's ring.
    func ringCompleted(payload: UInt64, result: Int32) {
        arrived(slots[Int(payload >> ReactorRing.tagBits)], result: result)
    }

    /// An entry's completion: a request in its buffers, or the end of the entry.
    private func arrived(_ slot: FuseSlot, result: Int32) {
        switch result {
        case 0:
            let head = UnsafeRawPointer(header(slot))
            slot.header = head.loadUnaligned(as: fuse_in_header.self)
            let argumentBytes = min(FuseSession.argumentBytes(slot.opcode), Int(BLOBFS_FUSE_URING_OP_IN_OUT_SZ))
            slot.argument = UnsafeRawBufferPointer(start: head + Int(BLOBFS_FUSE_URING_IN_OUT_HEADER_SZ), count: argumentBytes)
            let payloadBytes = Int(head.loadUnaligned(fromByteOffset: Self.payloadSizeOffset, as: UInt32.self))
            slot.payload = UnsafeRawBufferPointer(start: slot.data.base, count: min(payloadBytes, slot.data.count))
            slot.session.received(slot)
        case -ENOTCONN:
            entriesEnded += 1  // unmounted: the kernel let the entry go
        case -EAGAIN, -EINTR, -ENOENT:
            // Registered too early, interrupted, or a commit the kernel no longer knew:
            // the entry is not in its queue; register it again.
            prepare(slot, command: UInt32(BLOBFS_FUSE_IO_URING_CMD_REGISTER), commitID: 0)
        default:
            entriesEnded += 1
            let reason = String(cString: strerror(-result))
            Log.logger("fuse").error("FUSE io_uring entry \(slot.index) (queue \(queueOf[slot.index])): \(reason); /dev/fuse serves on")
        }
    }

    func send(_ slot: FuseSlot, error: Int32, body: UnsafeRawBufferPointer) {
        let head = header(slot)
        let bodyBytes = error == 0 ? body.count : 0
        if bodyBytes > 0, let base = body.baseAddress, base != UnsafeRawPointer(slot.data.base) {
            // The reply's body goes in the payload buffer (a READ's bytes are there already,
            // at an offset when the read was not aligned).
            memmove(slot.data.base, base, bodyBytes)
        }
        var out = fuse_out_header()
        out.len = UInt32(MemoryLayout<fuse_out_header>.size + bodyBytes)
        out.error = -error
        out.unique = slot.header.unique
        head.storeBytes(of: out, as: fuse_out_header.self)
        head.storeBytes(of: UInt32(bodyBytes), toByteOffset: Self.payloadSizeOffset, as: UInt32.self)
        prepare(slot, command: UInt32(BLOBFS_FUSE_IO_URING_CMD_COMMIT_AND_FETCH), commitID: slot.header.unique)
    }

    func drop(_ slot: FuseSlot) {
        // Requests without a reply never come through the ring; re-arm the entry all the same.
        Log.logger("fuse").warning("\(FuseOpcode.name(slot.opcode)) arrived through io_uring; re-registering the entry")
        prepare(slot, command: UInt32(BLOBFS_FUSE_IO_URING_CMD_REGISTER), commitID: 0)
    }
}
