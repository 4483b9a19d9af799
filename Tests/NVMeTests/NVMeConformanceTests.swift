import XCTest
import Bdev
import BdevConformance
import BdevMalloc
import BdevURing
import Env
@testable import NVMe

final class NVMeConformanceTests: XCTestCase {
    func testConformanceOverRAM() throws {
        let reactor = try Reactor()
        try BdevConformance(reactor: reactor) {
            Bdev(backend: try NVMeBdev.emulated(namespace: Bdev(backend: try MallocBdev(blockCount: 4096))))
        }.run()
    }
}
