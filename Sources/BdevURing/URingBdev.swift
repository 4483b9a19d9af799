#if canImport(Glibc)
import Glibc
#endif
import Bdev
import CURing
import Env
import ReactorRing
import Synchronization

/// A file or block device served through io_uring: one ring per channel (per reactor),
/// submissions batched per poll, completions reaped by the reactor's poller and
/// announced to a sleeping reactor through an eventfd.
///
/// Reads and writes go through an O_DIRECT descriptor when every segment and the offset
/// are aligned for direct I/O, through the page cache otherwise; flush is fdatasync
/// (which covers both descriptors of the one file); unmap punches a hole; write-zeroes
/// zeroes the range with fallocate (falling back to a hole where the filesystem has no
/// ZERO_RANGE). Both read back as zeros.
public final class URingBdev: BdevBackend, @unchecked Sendable {
    public let name: String
    public let path: String
    private let blockSizeBytes: Int
    /// Grows when `refreshGeometry` finds the file or device larger (`blobfs grow`).
    private let blockCount: Atomic<UInt64>
    public var geometry: BdevGeometry {
        BdevGeometry(blockSizeBytes: blockSizeBytes, blockCount: blockCount.load(ordering: .acquiring), isPersistent: true)
    }
    let bufferedFD: Int32
    let directFD: Int32  // -1 when O_DIRECT is not available
    let directAlignmentBytes: Int
    let isBlockDevice: Bool

    public init(path: String, name: String? = nil, blockSizeBytes: Int = 4096,
                createSizeBytes: UInt64? = nil) throws(BdevError) {
        guard BdevGeometry.supportedBlockSizes.contains(blockSizeBytes) else {
            throw .invalidConfiguration("\(path): block size \(blockSizeBytes) (512 or 4096)")
        }
        var flags = O_RDWR | O_CLOEXEC
        if createSizeBytes != nil { flags |= O_CREAT }
        let fd = open(path, flags, 0o644)
        guard fd >= 0 else { throw .system(SystemError("open(\(path))")) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let error = SystemError("fstat(\(path))")
            Glibc.close(fd)
            throw .system(error)
        }
        var sizeBytes: UInt64
        var directAlignment = 4096
        let isBlock = (info.st_mode & S_IFMT) == S_IFBLK
        if isBlock {
            sizeBytes = 0
            var logical: Int32 = 512
            guard ioctl(fd, blobfs_BLKGETSIZE64, &sizeBytes) == 0 else {
                let error = SystemError("ioctl(BLKGETSIZE64, \(path))")
                Glibc.close(fd)
                throw .system(error)
            }
            if ioctl(fd, blobfs_BLKSSZGET, &logical) == 0, logical > 0 { directAlignment = max(512, Int(logical)) }
            guard Int(logical) <= blockSizeBytes else {
                Glibc.close(fd)
                throw .invalidConfiguration("\(path): logical sector \(logical) bytes is larger than block size \(blockSizeBytes)")
            }
        } else if (info.st_mode & S_IFMT) == S_IFREG {
            sizeBytes = UInt64(info.st_size)
            if sizeBytes == 0, let createSizeBytes {
                guard ftruncate(fd, off_t(createSizeBytes)) == 0 else {
                    let error = SystemError("ftruncate(\(path), \(createSizeBytes))")
                    Glibc.close(fd)
                    throw .system(error)
                }
                sizeBytes = createSizeBytes
            }
        } else {
            Glibc.close(fd)
            throw .invalidConfiguration("\(path): neither a regular file nor a block device")
        }
        let blockCount = sizeBytes / UInt64(blockSizeBytes)
        guard blockCount > 0 else {
            Glibc.close(fd)
            throw .invalidConfiguration("\(path): \(sizeBytes) bytes is smaller than one \(blockSizeBytes)-byte block"
                                        + (createSizeBytes == nil && !isBlock ? " (give a size to create it)" : ""))
        }
        bufferedFD = fd
        directFD = open(path, O_RDWR | O_CLOEXEC | blobfs_O_DIRECT)
        directAlignmentBytes = directAlignment
        isBlockDevice = isBlock
        self.path = path
        self.name = name ?? path
        self.blockSizeBytes = blockSizeBytes
        self.blockCount = Atomic(blockCount)
    }

    /// The file's size (fstat) or the block device's (BLKGETSIZE64) now, in whole blocks.
    public func refreshGeometry() throws(BdevError) -> BdevGeometry {
        var bytes: UInt64 = 0
        if isBlockDevice {
            guard ioctl(bufferedFD, blobfs_BLKGETSIZE64, &bytes) == 0 else { throw .system(SystemError("ioctl(BLKGETSIZE64, \(path))")) }
        } else {
            var info = stat()
            guard fstat(bufferedFD, &info) == 0 else { throw .system(SystemError("fstat(\(path))")) }
            bytes = UInt64(info.st_size)
        }
        let now = bytes / UInt64(blockSizeBytes)
        let known = blockCount.load(ordering: .acquiring)
        guard now >= known else {
            throw .invalidConfiguration("\(path) shrank to \(now) blocks under a user of \(known): its size is kept")
        }
        blockCount.store(now, ordering: .releasing)
        return geometry
    }

    public var usesDirectIO: Bool { directFD >= 0 }

    public func makeChannel(reactor: Reactor) throws(BdevError) -> any BdevBackendChannel {
        try URingChannel(bdev: self, reactor: reactor)
    }

    public func close() {
        if directFD >= 0 { Glibc.close(directFD) }
        Glibc.close(bufferedFD)
    }
}

/// One io_uring per reactor: the reactor's own ring (`ReactorRing`) when it has one — its
/// completions come through the ring's poller, and the reactor's sleep submits — else a
/// ring of the channel's own, announced to the sleeping reactor by an eventfd. The ring
/// and the CQE batch array live in memory allocated once, so the I/O path allocates nothing.
final class URingChannel: BdevBackendChannel, ReactorRingConsumer {
    static let ringEntries: UInt32 = 512
    static let reapBatch: UInt32 = 64

    private let bdev: URingBdev
    private let reactor: Reactor
    private let ring: UnsafeMutablePointer<io_uring>
    private let cqes: UnsafeMutablePointer<UnsafeMutablePointer<io_uring_cqe>?>
    private let wakeFD: Int32
    /// The reactor's ring and this channel's tag in it (nil: the channel's own ring).
    private let shared: ReactorRing?
    private var sharedTag: UInt64 = 0
    /// The pass in which `poll` was last called (`Reactor.passStartNs`): a second call in
    /// one pass is a caller waiting in a loop (a drain), which needs the ring polled by hand.
    private var lastPollPassNs: UInt64 = .max
    private let blockSizeBytes: Int
    private let directMask: Int
    private var unsubmitted: UInt32 = 0
    private var inFlight = 0
    /// Requests that found the submission queue full, submitted from the next poll.
    private var overflow: ContiguousArray<BdevIO> = []
    private var zeroRangeSupported = true

    init(bdev: URingBdev, reactor: Reactor) throws(BdevError) {
        self.bdev = bdev
        self.reactor = reactor
        blockSizeBytes = bdev.geometry.blockSizeBytes
        directMask = bdev.directAlignmentBytes - 1
        overflow.reserveCapacity(BdevLimits.queueDepthMax)
        if let reactorRing = ReactorRing.ring(of: reactor) {
            shared = reactorRing
            ring = reactorRing.ring
            cqes = .allocate(capacity: 1)
            wakeFD = -1
            guard let tag = reactorRing.add(self, completesInHandPolls: true) else {
                cqes.deallocate()
                throw .invalidConfiguration("\(bdev.name): no consumer tag left in reactor \(reactor.name)'s ring")
            }
            sharedTag = tag
            return
        }
        shared = nil
        ring = .allocate(capacity: 1)
        cqes = .allocate(capacity: Int(Self.reapBatch))
        let result = io_uring_queue_init(Self.ringEntries, ring, 0)
        guard result == 0 else {
            ring.deallocate()
            cqes.deallocate()
            throw .system(SystemError("io_uring_queue_init", errno: -result))
        }
        wakeFD = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        if wakeFD >= 0 {
            _ = io_uring_register_eventfd(ring, wakeFD)
            try? reactor.registerWakeFD(wakeFD)
        }
    }

    func close() {
        precondition(inFlight == 0 && overflow.isEmpty, "uring channel closed with I/O in flight")
        if let shared {
            shared.remove(tag: sharedTag)
            cqes.deallocate()
            return
        }
        if wakeFD >= 0 {
            reactor.unregisterWakeFD(wakeFD)
            Glibc.close(wakeFD)
        }
        io_uring_queue_exit(ring)
        ring.deallocate()
        cqes.deallocate()
    }

    func submit(_ io: BdevIO) {
        inFlight += 1
        if !overflow.isEmpty || !prepare(io) { overflow.append(io) }
    }

    /// Fills one SQE for `io`; false when the submission queue is full.
    @inline(__always)
    private func prepare(_ io: BdevIO) -> Bool {
        // On the reactor's ring, what is already queued (our earlier requests, FUSE replies)
        // goes now, before this request is queued: a burst of requests (a pass that took
        // 13-25 FUSE reads) then reaches the device one by one, as fio submits, not as one
        // batch at the end of the pass. In a batch each request waits behind the others
        // inside the device: on this machine's virtio disk, qd32 reads spent 442-457 us
        // each in the device in batches against 300-318 us one by one (bench/blk-latency.sh;
        // bench/results/reqpath-2026-12-07.md, section 4). A lone request (qd1) still goes
        // with the reactor's sleep, at no extra system call.
        guard let sqe = shared?.nextEntrySubmittingQueued() ?? io_uring_get_sqe(ring) else { return false }
        let offset = off_t(Int(io.offsetBlocks) * blockSizeBytes)
        switch io.type {
        case .read, .write:
            let fd = fdFor(io, offset: Int(offset))
            if io.segmentCount == 1 {
                let vector = io.iovecs[0]
                if io.type == .read {
                    io_uring_prep_read(sqe, fd, vector.iov_base, UInt32(vector.iov_len), UInt64(offset))
                } else {
                    io_uring_prep_write(sqe, fd, vector.iov_base, UInt32(vector.iov_len), UInt64(offset))
                }
            } else if io.type == .read {
                io_uring_prep_readv(sqe, fd, io.iovecs, UInt32(io.segmentCount), UInt64(offset))
            } else {
                io_uring_prep_writev(sqe, fd, io.iovecs, UInt32(io.segmentCount), UInt64(offset))
            }
        case .flush:
            io_uring_prep_fsync(sqe, bdev.bufferedFD, UInt32(IORING_FSYNC_DATASYNC))
        case .unmap, .writeZeroes:
            let length = off_t(Int(io.countBlocks) * blockSizeBytes)
            let zeroRange = io.type == .writeZeroes && zeroRangeSupported
            io.moduleContext = zeroRange ? 1 : 0
            let mode = (zeroRange ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE) | FALLOC_FL_KEEP_SIZE
            io_uring_prep_fallocate(sqe, bdev.bufferedFD, Int32(mode), offset, length)
        }
        let address = UInt64(UInt(bitPattern: Unmanaged.passUnretained(io).toOpaque()))
        io_uring_sqe_set_data64(sqe, address | sharedTag)
        if shared == nil { unsubmitted += 1 }
        return true
    }

    /// The O_DIRECT descriptor when the request is aligned for it.
    @inline(__always)
    private func fdFor(_ io: BdevIO, offset: Int) -> Int32 {
        guard bdev.directFD >= 0, offset & directMask == 0 else { return bdev.bufferedFD }
        for index in 0..<io.segmentCount {
            let vector = io.iovecs[index]
            if (Int(bitPattern: vector.iov_base) | vector.iov_len) & directMask != 0 { return bdev.bufferedFD }
        }
        return bdev.directFD
    }

    func poll() -> PollStatus {
        if let shared { return pollShared(shared) }
        var busy = false
        while !overflow.isEmpty, prepare(overflow[0]) { overflow.removeFirst() }
        if unsubmitted > 0 {
            let result = io_uring_submit(ring)
            if result >= 0 { unsubmitted -= min(unsubmitted, UInt32(result)) }
            busy = true
        }
        while true {
            let count = io_uring_peek_batch_cqe(ring, cqes, Self.reapBatch)
            if count == 0 { break }
            for index in 0..<Int(count) {
                let cqe = cqes[index]!
                complete(Self.request(cqe.pointee.user_data), result: cqe.pointee.res)
            }
            io_uring_cq_advance(ring, count)
            busy = true
        }
        if busy { return .busy }
        // SQEs still queued (the kernel refused them for now) or requests waiting for
        // room: nothing will wake us for those, so keep polling.
        return unsubmitted > 0 || !overflow.isEmpty ? .pending : .idle
    }

    /// With the reactor's ring: its poller reaps; requests that found its submission
    /// queue full go once the queue has been submitted.
    private func pollShared(_ shared: ReactorRing) -> PollStatus {
        let pass = reactor.passStartNs
        var busy = false
        if pass == lastPollPassNs && inFlight > 0 {
            shared.pollByHand()
            busy = true
        }
        lastPollPassNs = pass
        guard !overflow.isEmpty else { return busy ? .busy : .idle }
        shared.submitNow()
        while !overflow.isEmpty, prepare(overflow[0]) { overflow.removeFirst() }
        return .busy
    }

    func ringCompleted(payload: UInt64, result: Int32) {
        complete(Self.request(payload), result: result)
    }

    /// The request whose address an entry's user data holds (without a tag).
    @inline(__always)
    private static func request(_ userData: UInt64) -> BdevIO {
        Unmanaged<BdevIO>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(userData))!).takeUnretainedValue()
    }

    @inline(__always)
    private func complete(_ io: BdevIO, result: Int32) {
        if result < 0 {
            if io.type == .writeZeroes && io.moduleContext == 1 && (result == -EOPNOTSUPP || result == -EINVAL) {
                // This filesystem has no FALLOC_FL_ZERO_RANGE: a punched hole reads as zeros too.
                zeroRangeSupported = false
                if !prepare(io) { overflow.append(io) }
                return
            }
            inFlight -= 1
            io.complete(.failed(.io(errno: -result)))
            return
        }
        inFlight -= 1
        if (io.type == .read || io.type == .write) && Int(result) != io.byteCount {
            // A short transfer inside the device's size means the file shrank under us.
            io.complete(.failed(.io(errno: EIO)))
            return
        }
        io.complete(.success)
    }
}
