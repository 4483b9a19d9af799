import XCTest
import Bdev
import BdevConformance
import BdevURing
import Env
import ReactorRing
import Synchronization

final class URingBdevTests: XCTestCase {
    private var paths: [String] = []

    private func temporaryImage(_ name: String) -> String {
        let path = "/var/tmp/blobfs-uring-\(getpid())-\(name).img"
        unlink(path)
        paths.append(path)
        return path
    }

    override func tearDown() {
        paths.forEach { unlink($0) }
    }

    func testConformance4K() throws {
        let path = temporaryImage("4k")
        let reactor = try Reactor()
        try BdevConformance(reactor: reactor) {
            Bdev(backend: try URingBdev(path: path, blockSizeBytes: 4096, createSizeBytes: 16 << 20))
        }.run()
    }

    func testConformance512() throws {
        let path = temporaryImage("512")
        let reactor = try Reactor()
        try BdevConformance(reactor: reactor) {
            Bdev(backend: try URingBdev(path: path, blockSizeBytes: 512, createSizeBytes: 8 << 20))
        }.run()
    }

    /// An image grown under an open device (what `blobfs grow` relies on): the size seen
    /// after `refreshGeometry`, and a channel made before takes requests past the old end.
    /// A shrunk image is refused and the size kept.
    func testAGrownImageIsSeenAfterARefresh() throws {
        let path = temporaryImage("grow")
        let bdev = Bdev(backend: try URingBdev(path: path, createSizeBytes: 1 << 20))
        defer { bdev.close() }
        let reactor = try Reactor()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        XCTAssertThrowsError(try io.writeBytes([UInt8](repeating: 1, count: 4096), offsetBlocks: 256))
        XCTAssertEqual(truncate(path, 2 << 20), 0)
        XCTAssertEqual(bdev.geometry.blockCount, 256, "the size is looked at again only when asked")
        XCTAssertEqual(try bdev.refreshGeometry().blockCount, 512)
        try io.writeBytes([UInt8](repeating: 7, count: 4096), offsetBlocks: 511)
        XCTAssertEqual(try io.readBytes(offsetBlocks: 511, countBlocks: 1), [UInt8](repeating: 7, count: 4096))
        XCTAssertEqual(truncate(path, 1 << 20), 0)
        XCTAssertThrowsError(try bdev.refreshGeometry())
        XCTAssertEqual(bdev.geometry.blockCount, 512)
    }

    func testUsesDirectIOOnAFileSystemThatHasIt() throws {
        let path = temporaryImage("direct")
        let bdev = try URingBdev(path: path, createSizeBytes: 1 << 20)
        defer { bdev.close() }
        XCTAssertTrue(bdev.usesDirectIO, "/var/tmp supports O_DIRECT here")
    }

    func testUnalignedAndAlignedRequestsSeeTheSameBytes() throws {
        // 512-byte blocks at odd offsets take the page cache; 4 KiB-aligned ones O_DIRECT.
        let path = temporaryImage("mixed")
        let reactor = try Reactor()
        let bdev = Bdev(backend: try URingBdev(path: path, blockSizeBytes: 512, createSizeBytes: 1 << 20))
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close(); bdev.close() }
        let data = pattern(seed: 3, bytes: 16 * 512)
        try io.writeBytes(Array(data[0..<512]), offsetBlocks: 1)             // buffered
        try io.writeBytes(Array(data[4096..<8192]), offsetBlocks: 8)         // direct
        XCTAssertEqual(try io.readBytes(offsetBlocks: 1, countBlocks: 1), Array(data[0..<512]))
        XCTAssertEqual(try io.readBytes(offsetBlocks: 8, countBlocks: 8), Array(data[4096..<8192]))
        XCTAssertEqual(try io.readBytes(offsetBlocks: 0, countBlocks: 16)[512..<1024], data[0..<512])
    }

    func testMissingFileIsAClearError() {
        XCTAssertThrowsError(try URingBdev(path: "/nonexistent/dir/image")) { error in
            XCTAssertTrue("\(error)".contains("open(/nonexistent/dir/image)"), "\(error)")
        }
        let path = temporaryImage("empty")
        close(open(path, O_CREAT | O_RDWR, 0o644))
        XCTAssertThrowsError(try URingBdev(path: path)) { error in
            XCTAssertTrue("\(error)".contains("smaller than one"), "\(error)")
        }
        XCTAssertThrowsError(try URingBdev(path: "/dev/null")) { error in
            XCTAssertTrue("\(error)".contains("neither a regular file nor a block device"), "\(error)")
        }
    }

    func testIdleChannelLetsTheReactorSleep() throws {
        // After I/O, the completion eventfd must not keep waking the reactor.
        try assertIdleReactorSleeps(onItsRing: false)
    }

    /// I/O through a uring channel, then 300 ms of nothing (a timed poller bounds each
    /// sleep): the reactor sleeps instead of spinning.
    private func assertIdleReactorSleeps(onItsRing: Bool) throws {
        let path = temporaryImage(onItsRing ? "ring-idle" : "idle")
        let reactor = try Reactor(configuration: .init(idleBeforeSleepNs: 10_000))
        if onItsRing { try ReactorRing.attach(to: reactor) }
        let bdev = Bdev(backend: try URingBdev(path: path, createSizeBytes: 1 << 20))
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close(); bdev.close() }
        try io.writeBytes(pattern(seed: 1, bytes: 4096), offsetBlocks: 0)
        XCTAssertEqual(try io.readBytes(offsetBlocks: 0, countBlocks: 1), pattern(seed: 1, bytes: 4096))
        reactor.registerTimedPoller(periodNs: 20_000_000) { .idle }  // bounds each sleep: the timeout works
        let before = reactor.sleepCount
        let deadline = MonotonicClock.nowNs() + 300_000_000
        var iterations = 0
        reactor.run(until: {
            iterations += 1
            return MonotonicClock.nowNs() > deadline
        })
        XCTAssertGreaterThan(reactor.sleepCount, before)
        XCTAssertLessThan(iterations, 20_000, "an idle reactor \(onItsRing ? "on its ring" : "with a uring channel") sleeps instead of spinning")
    }

    // MARK: - On the reactor's ring (one io_uring per reactor, the reactor sleeps in it)

    func testConformance4KOnTheReactorRing() throws {
        let path = temporaryImage("ring-4k")
        let reactor = try Reactor()
        try ReactorRing.attach(to: reactor)
        try BdevConformance(reactor: reactor) {
            Bdev(backend: try URingBdev(path: path, blockSizeBytes: 4096, createSizeBytes: 16 << 20))
        }.run()
    }

    func testIdleChannelOnTheReactorRingLetsTheReactorSleep() throws {
        try assertIdleReactorSleeps(onItsRing: true)
    }

    /// A reactor asleep in its ring wakes for messages sent from another thread (through
    /// its epoll set, polled by the ring) as it does in epoll.
    func testAReactorSleepingInItsRingWakesForMessages() throws {
        let reactor = try Reactor()
        try reactor.start()
        defer { reactor.stop() }
        _ = reactor.call { (try? ReactorRing.attach(to: reactor)) != nil }
        let received = Atomic<Int>(0)
        for round in 1...50 {
            usleep(round % 5 == 0 ? 2_000 : 0)  // some messages find it asleep, some awake
            reactor.send { received.add(1, ordering: .relaxed) }
        }
        XCTAssertEqual(reactor.call { 1 }, 1)
        XCTAssertEqual(received.load(ordering: .relaxed), 50)
        XCTAssertGreaterThan(reactor.sleepCount, 0)
    }

    /// Code that waits for its requests by polling the channel in a loop (a drain before
    /// unmount, an allocation waiting for released clusters) gets them completed without
    /// the reactor's loop: the second poll in one pass polls the ring by hand.
    func testAChannelPolledInALoopCompletesOnTheReactorRing() throws {
        let (reactor, _, bdev, channel) = try channelOnTheReactorRing("ring-drain")
        defer { bdev.close() }
        defer { channel.close() }
        let count = SuccessCount()
        let buffer = try DMABuffer.allocate(bytes: 16 * 4096)
        for index in 0..<16 {
            try channel.write(from: buffer, bufferOffset: index * 4096, offsetBlocks: UInt64(index), countBlocks: 1,
                              handler: count, tag: UInt64(index))
        }
        // On the reactor's thread (run sets it), before its first pass: a drain as code
        // running on the reactor does it.
        reactor.run(until: {
            let deadline = MonotonicClock.nowNs() + 10_000_000_000
            while channel.inFlight > 0 && MonotonicClock.nowNs() < deadline { _ = channel.poll() }
            return true
        })
        XCTAssertEqual(count.completed, 16)
    }

    /// A burst of device requests on the reactor's ring reaches the device one by one:
    /// queueing a request submits the ones queued before it, so only the burst's last
    /// waits for the reactor's sleep (a batch makes each request wait behind the others
    /// in the device).
    func testABurstOfRequestsOnTheReactorRingIsSubmittedAsItIsQueued() throws {
        let (reactor, ring, bdev, channel) = try channelOnTheReactorRing("ring-burst")
        defer { bdev.close() }
        defer { channel.close() }
        let count = SuccessCount()
        let buffer = try DMABuffer.allocate(bytes: 8 * 4096)
        ring.submitNow()  // the ring's own set-up entries
        for index in 0..<8 {
            try channel.read(into: buffer, bufferOffset: index * 4096, offsetBlocks: UInt64(index), countBlocks: 1,
                             handler: count, tag: UInt64(index))
            XCTAssertEqual(ring.queuedEntries, 1, "after request \(index), only it waits for the sleep")
        }
        reactor.run(until: { count.completed == 8 })
        XCTAssertEqual(count.completed, 8)
    }

    /// A reactor with its ring, and a channel to a 1 MiB image file on it.
    private func channelOnTheReactorRing(_ name: String) throws -> (Reactor, ReactorRing, Bdev, BdevChannel) {
        let reactor = try Reactor()
        let ring = try ReactorRing.attach(to: reactor)
        let bdev = Bdev(backend: try URingBdev(path: temporaryImage(name), createSizeBytes: 1 << 20))
        return (reactor, ring, bdev, try bdev.makeChannel(reactor: reactor))
    }
}

/// Counts the requests that completed with success.
private final class SuccessCount: BdevCompletionHandler {
    var completed = 0
    func bdevIOCompleted(tag: UInt64, status: BdevStatus) {
        if case .success = status { completed += 1 }
    }
}
