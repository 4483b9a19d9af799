#if canImport(Glibc)
import Glibc
#endif
import Env

/// The kinds of request a block device serves.
public enum BdevIOType: UInt8, Sendable, CustomStringConvertible {
    case read, write, flush, writeZeroes, unmap

    public var description: String {
        switch self {
        case .read: "read"
        case .write: "write"
        case .flush: "flush"
        case .writeZeroes: "write-zeroes"
        case .unmap: "unmap"
        }
    }
}

/// What a device is: fixed when it is opened.
public struct BdevGeometry: Sendable, Equatable {
    /// 512 or 4096.
    public var blockSizeBytes: Int
    public var blockCount: UInt64
    /// Every segment of a request must start on this boundary (1: any address).
    public var bufferAlignmentBytes: Int
    /// Whether data outlives the process (close/reopen keeps it).
    public var isPersistent: Bool

    public init(blockSizeBytes: Int, blockCount: UInt64, bufferAlignmentBytes: Int = 1, isPersistent: Bool) {
        self.blockSizeBytes = blockSizeBytes
        self.blockCount = blockCount
        self.bufferAlignmentBytes = bufferAlignmentBytes
        self.isPersistent = isPersistent
    }

    public var capacityBytes: UInt64 { blockCount * UInt64(blockSizeBytes) }

    public static let supportedBlockSizes = [512, 4096]
}

/// Limits of the bdev layer, in one place.
public enum BdevLimits {
    /// Segments in one vectored request.
    public static let segmentCountMax = 64
    /// Requests a channel can hold in flight (its pool size) unless asked otherwise.
    public static let queueDepthDefault = 256
    public static let queueDepthMax = 4096
}

/// Why a request was refused or failed. Refusals are thrown at submission; device
/// failures arrive as the completion status.
public enum BdevError: Error, Equatable, Sendable, CustomStringConvertible {
    case outOfRange(offsetBlocks: UInt64, countBlocks: UInt64, blockCount: UInt64)
    case emptyRequest
    case lengthMismatch(bufferBytes: Int, requestBytes: Int)
    case misalignedBuffer(alignmentBytes: Int)
    case tooManySegments(count: Int, max: Int)
    /// Every pooled request of the channel is in flight: retry after a completion.
    case queueFull
    /// The device failed the request (errno-style code).
    case io(errno: Int32)
    /// The device failed the request with a status of its own protocol (e.g. an NVMe
    /// status field: code, type, retry bits), with its meaning.
    case deviceStatus(code: UInt32, meaning: String)
    case unsupported(String)
    case invalidConfiguration(String)
    case system(SystemError)
    case closed
    /// The device has been unreachable past its loss timeout (a remote target that stays
    /// away): requests fail with this until it returns. Persistent, unlike `.io`: a
    /// caller that cannot make its state durable should stop writing.
    case deviceLost(String)

    public var description: String {
        switch self {
        case let .outOfRange(offset, count, blockCount):
            "request of \(count) blocks at block \(offset) is outside a device of \(blockCount) blocks"
        case .emptyRequest: "request of zero blocks"
        case let .lengthMismatch(buffer, request):
            "buffer of \(buffer) bytes does not match the request's \(request) bytes"
        case let .misalignedBuffer(alignment): "buffer not aligned to \(alignment) bytes"
        case let .tooManySegments(count, max): "\(count) segments; at most \(max)"
        case .queueFull: "no free request in the channel (queue full)"
        case let .io(code): "I/O error (errno \(code))"
        case let .deviceStatus(code, meaning): "device status 0x\(String(code, radix: 16)): \(meaning)"
        case let .unsupported(what): "unsupported: \(what)"
        case let .invalidConfiguration(what): what
        case let .system(error): error.description
        case .closed: "device closed"
        case let .deviceLost(why): "device lost: \(why)"
        }
    }

    /// The POSIX errno a caller of the device sees for this failure: the device's own code
    /// when it gave one, EINVAL for a request the layer refused as malformed, EIO otherwise.
    /// The file system's mapping (`BlobStoreError.errno`) builds on this one.
    public var errno: Int32 {
        switch self {
        case let .io(code): code
        case let .system(error): error.errno
        case .outOfRange, .emptyRequest, .lengthMismatch, .misalignedBuffer, .tooManySegments, .invalidConfiguration: EINVAL
        case .queueFull: EAGAIN
        case .unsupported: EOPNOTSUPP
        case .deviceStatus, .closed, .deviceLost: EIO
        }
    }
}

/// The outcome of a request, delivered to its completion handler.
public enum BdevStatus: Equatable, Sendable {
    case success
    case failed(BdevError)

    public var isSuccess: Bool { self == .success }
}
