#if canImport(Glibc)
import Glibc
#endif
import Bdev
@testable import Blobstore
import XCTest

/// The one errno mapping: what a caller of the blob store (the file system, the blob
/// channel's data path, FUSE) reports for each failure.
final class ErrnoMappingTests: XCTestCase {
    func testEveryBlobStoreErrorHasTheErrnoItsCallerReports() {
        let cases: [(BlobStoreError, Int32)] = [
            (.noSpace("data"), ENOSPC),
            (.invalidArgument("offset"), EINVAL),
            (.readOnly, EROFS),
            (.deviceLost(.deviceLost("target gone")), EROFS),
            (.corrupt("page 3"), EIO),
            (.format(FormatError("metadata page", offset: 4096, .badChecksum(stored: 1, computed: 2))), EIO),
            (.device(.io(errno: ENOSPC)), EIO),
            (.noSuchBlob(BlobID(rawValue: 7)), EIO),
            (.geometry("block size"), EIO),
            (.unallocated(blob: BlobID(rawValue: 1), cluster: 2), EIO),
        ]
        for (error, expected) in cases { XCTAssertEqual(error.errno, expected, "\(error)") }
    }

    func testADeviceFailureKeepsTheDevicesOwnErrno() {
        XCTAssertEqual(BdevError.io(errno: ENOSPC).errno, ENOSPC)
        XCTAssertEqual(BdevError.outOfRange(offsetBlocks: 9, countBlocks: 1, blockCount: 8).errno, EINVAL)
        XCTAssertEqual(BdevError.queueFull.errno, EAGAIN)
        XCTAssertEqual(BdevError.unsupported("unmap").errno, EOPNOTSUPP)
        XCTAssertEqual(BdevError.deviceLost("gone").errno, EIO)
        XCTAssertEqual(BdevError.deviceStatus(code: 0x281, meaning: "unrecovered read error").errno, EIO)
    }
}
