#if canImport(Glibc)
import Glibc
#endif
import Bdev

public enum BlobStoreError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A structure on the device is damaged or inconsistent.
    case format(FormatError)
    /// Neither super block slot holds a valid super block.
    case noSuperBlock(slot0: FormatError, slot1: FormatError)
    /// The metadata is internally inconsistent (what, and where).
    case corrupt(String)
    case device(BdevError)
    case noSpace(String)
    case noSuchBlob(BlobID)
    case invalidArgument(String)
    /// The store was loaded read-only.
    case readOnly
    /// The store was made for another geometry (block size, device size).
    case geometry(String)
    /// A data-path write reached a cluster not yet allocated (allocation belongs to the
    /// metadata owner: `BlobStore.write`).
    case unallocated(blob: BlobID, cluster: UInt64)
    /// The device was lost during a write or flush (`BdevError.deviceLost`); the store
    /// refuses every change until it is loaded again (`BlobStore.lostDevice`).
    case deviceLost(BdevError)
    /// The blob is a snapshot: its data is shared with its clones and read-only.
    case snapshotReadOnly(BlobID)
    /// The blob is a snapshot that more than one clone reads from (or, for a snapshot,
    /// any): it cannot be deleted or snapshotted before they are.
    case hasClones(blob: BlobID, count: Int)

    public var description: String {
        switch self {
        case let .format(error): "\(error)"
        case let .noSuperBlock(first, second): "no valid super block: slot 0: \(first); slot 1: \(second)"
        case let .corrupt(what): "inconsistent metadata: \(what)"
        case let .device(error): "device error: \(error)"
        case let .noSpace(what): "no space: \(what)"
        case let .noSuchBlob(id): "no blob \(id)"
        case let .invalidArgument(what): what
        case .readOnly: "the store is open read-only"
        case let .geometry(what): what
        case let .unallocated(blob, cluster): "blob \(blob): cluster \(cluster) is not allocated"
        case let .deviceLost(error): "\(error); the store refuses changes until it is loaded again"
        case let .snapshotReadOnly(id): "blob \(id) is a snapshot: its data is read-only"
        case let .hasClones(id, count): "blob \(id) is the snapshot of \(count) clones"
        }
    }

    /// The one errno mapping of the stack (the file system's `FSError` and the blob
    /// channel's data path both use it): a full store is ENOSPC, a bad argument EINVAL, a
    /// read-only store or a lost device (the store refuses changes until it is loaded
    /// again) EROFS, a damaged structure or a failing device EIO.
    public var errno: Int32 {
        switch self {
        case .noSpace: ENOSPC
        case .invalidArgument: EINVAL
        case .readOnly, .deviceLost, .snapshotReadOnly: EROFS
        case .hasClones: EBUSY
        case .format, .noSuperBlock, .corrupt, .device, .noSuchBlob, .geometry, .unallocated: EIO
        }
    }
}
