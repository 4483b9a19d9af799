#if canImport(Glibc)
import Glibc
#endif
import XCTest
import Bdev
import BdevFault
import BdevMalloc
import Env
import Synchronization
import Blobstore
@testable import BlobFileSystem

/// The asynchronous fsync of `FileSystemService` (what FUSE uses), under the fault bdev:
/// once it has answered, the file survives a power cut that drops every unflushed write.
final class FileSystemServiceTests: XCTestCase {
    func testAsynchronousFsyncIsDurable() throws {
        for round in 0..<3 {
            let fault = FaultBdev(wrapping: Bdev(backend: try MallocBdev(blockCount: 4096)))
            let device = Bdev(backend: fault)
            let service = try FileSystemService(bdev: device, format: BlobStore.Options())
            let data = (0..<(10_000 + round * 5000)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ round) }
            let ino = service.perform { fs -> UInt64 in
                let made = try! fs.create(parent: FileSystem.rootIno, name: Array("f\(round)".utf8), mode: 0o644, caller: .root)
                try! fs.write(ino: made.ino, offset: 0, data: data)
                fs.release(ino: made.ino)
                return made.ino
            }
            let answer = Atomic<Int32>(-1)
            service.blobService.reactor.send { service.fsync(ino: ino) { errno in answer.store(errno, ordering: .releasing) } }
            while answer.load(ordering: .acquiring) < 0 { usleep(1000) }
            XCTAssertEqual(answer.load(ordering: .acquiring), 0)
            // Power goes now: nothing after the fsync's answer reaches the medium.
            fault.powerCut(afterWrites: fault.writeCount)
            try? service.stop()
            let reactor = try Reactor()
            _ = try fault.crash(policy: .keepNone, reactor: reactor)
            let io = try BdevSyncIO(bdev: device, reactor: reactor)
            defer { io.close() }
            let fs = try FileSystem.mount(try BlobStore.load(io, readOnly: true).0)
            let found = try fs.lookup(parent: FileSystem.rootIno, name: Array("f\(round)".utf8))
            XCTAssertEqual(found.attributes.size, UInt64(data.count), "round \(round)")
            XCTAssertTrue(try fs.read(ino: found.ino, offset: 0, count: data.count) == data, "round \(round): data after the power cut")
        }
    }
}
