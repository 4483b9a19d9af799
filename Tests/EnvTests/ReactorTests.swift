import XCTest
import Synchronization
@testable import Env

final class ReactorTests: XCTestCase {
    func testRingKeepsOrderPerProducerAndLosesNothing() throws {
        let ring = MessageRing<Int>(capacity: 64)
        let producers = 4
        let perProducer = 20_000
        let threads = (0..<producers).map { producer in
            Thread {
                for index in 0..<perProducer {
                    while !ring.push(producer * 1_000_000 + index) { sched_yield() }
                }
            }
        }
        threads.forEach { $0.start() }
        var next = [Int](repeating: 0, count: producers)
        var received = 0
        while received < producers * perProducer {
            guard let value = ring.pop() else { continue }
            let producer = value / 1_000_000
            XCTAssertEqual(value % 1_000_000, next[producer], "producer \(producer) out of order")
            next[producer] += 1
            received += 1
        }
        XCTAssertTrue(ring.isEmpty)
        XCTAssertEqual(next, [Int](repeating: perProducer, count: producers))
    }

    func testRingReportsFull() {
        let ring = MessageRing<Int>(capacity: 4)
        for value in 0..<4 { XCTAssertTrue(ring.push(value)) }
        XCTAssertFalse(ring.push(4))
        XCTAssertEqual(ring.pop(), 0)
        XCTAssertTrue(ring.push(4))
    }

    func testMessagesRunOnTheReactorThread() throws {
        let reactor = try Reactor(name: "test")
        try reactor.start()
        defer { reactor.stop() }
        let onReactor = reactor.call { Reactor.current != nil }
        XCTAssertTrue(onReactor)
        let sum = Atomic<Int>(0)
        for value in 1...1000 { reactor.send { sum.add(value, ordering: .relaxed) } }
        XCTAssertEqual(reactor.call { sum.load(ordering: .relaxed) }, 500_500)
    }

    func testTimedPollerRunsAndIdleReactorSleeps() throws {
        let reactor = try Reactor(name: "timers", configuration: .init(idleBeforeSleepNs: 100_000))
        let ticks = Atomic<Int>(0)
        reactor.registerTimedPoller(periodNs: 5_000_000) {
            ticks.add(1, ordering: .relaxed)
            return .idle
        }
        try reactor.start()
        usleep(200_000)
        reactor.stop()
        let count = ticks.load(ordering: .relaxed)
        XCTAssertGreaterThan(count, 10, "a 5 ms timer over 200 ms")
        XCTAssertLessThan(count, 60)
        XCTAssertGreaterThan(reactor.sleepCount, 5, "the reactor sleeps between timer ticks")
    }

    func testSleepingReactorWakesForAMessage() throws {
        let reactor = try Reactor(name: "wake", configuration: .init(idleBeforeSleepNs: 10_000))
        try reactor.start()
        defer { reactor.stop() }
        usleep(50_000)
        let sleepsBefore = reactor.sleepCount
        XCTAssertGreaterThan(sleepsBefore, 0)
        let start = MonotonicClock.nowNs()
        XCTAssertEqual(reactor.call { 42 }, 42)
        XCTAssertLessThan(MonotonicClock.nowNs() - start, 1_000_000_000, "woken by the message, not a timeout")
    }

    func testWakeFDWakesTheReactor() throws {
        let reactor = try Reactor(name: "fd", configuration: .init(idleBeforeSleepNs: 10_000))
        let event = try EventFD()
        let seen = Atomic<Int>(0)
        let fd = event.fd
        try reactor.registerWakeFD(fd)
        reactor.registerPoller {
            var value: UInt64 = 0
            if read(fd, &value, 8) == 8 {
                seen.add(1, ordering: .relaxed)
                return .busy
            }
            return .idle
        }
        try reactor.start()
        defer { reactor.stop() }
        usleep(50_000)
        let sleeps = reactor.sleepCount
        event.signal()
        let deadline = MonotonicClock.nowNs() + 2_000_000_000
        while seen.load(ordering: .relaxed) == 0 && MonotonicClock.nowNs() < deadline { usleep(1000) }
        XCTAssertEqual(seen.load(ordering: .relaxed), 1)
        XCTAssertGreaterThan(reactor.sleepCount, sleeps - 1)
    }

    /// The bar: an idle reactor process uses under 1% CPU (measured over 10 s
    /// with /proc/self/stat, as the bench script does for a whole process).
    func testIdleReactorUsesUnderOnePercentCPU() throws {
        let reactor = try Reactor(name: "idle")
        reactor.registerTimedPoller(periodNs: 100_000_000) { .idle }  // a housekeeping timer, as real ones have
        try reactor.start()
        defer { reactor.stop() }
        usleep(100_000)
        let before = try processCPUTicks()
        let seconds = 10.0
        usleep(UInt32(seconds * 1_000_000))
        let after = try processCPUTicks()
        let hz = Double(sysconf(Int32(_SC_CLK_TCK)))
        let percent = Double(after - before) / hz / seconds * 100
        print("idle reactor CPU: \(percent)% over \(seconds) s")
        XCTAssertLessThan(percent, 1.0)
    }

    private func processCPUTicks() throws -> Int {
        let stat = try String(contentsOfFile: "/proc/self/stat", encoding: .utf8)
        // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
        let fields = stat[stat.range(of: ")")!.upperBound...].split(separator: " ")
        return Int(fields[11])! + Int(fields[12])!
    }
}

final class ReactorLoadTests: XCTestCase {
    /// A reactor kept busy shows it in its busy share; idle it sleeps and the share drops.
    func testBusyShareFollowsTheWork() throws {
        let reactor = try Reactor(name: "load-test")
        XCTAssertTrue(Reactor.all.contains { $0 === reactor }, "every reactor is in the registry")
        try reactor.start()
        defer { reactor.stop() }
        let before = reactor.load
        // 100 ms of work in 20 messages, then 100 ms idle.
        for _ in 0..<20 {
            reactor.send {
                let end = MonotonicClock.nowNs() + 5_000_000
                while MonotonicClock.nowNs() < end {}
            }
        }
        reactor.call {}
        usleep(20_000)  // a pass is accounted when it ends, after the message that answered `call`
        let busy = reactor.load
        XCTAssertGreaterThanOrEqual(busy.busyNs - before.busyNs, 95_000_000)
        XCTAssertGreaterThan(busy.busyShare(since: before), 0.5)
        usleep(100_000)
        let idle = reactor.load
        XCTAssertLessThan(idle.busyShare(since: busy), 0.2, "asleep, not busy")
        XCTAssertGreaterThan(idle.sleptNs - busy.sleptNs, 50_000_000)
        XCTAssertGreaterThan(idle.passes, before.passes)
    }
}
