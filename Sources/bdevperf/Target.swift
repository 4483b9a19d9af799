import Bdev
import Blobstore
import Env

/// What a job drives: a raw bdev channel, or a blob through the blob store's data path
/// (the same jobs on both give the blob store's overhead as a ratio).
protocol PerfTarget: AnyObject {
    var unitBytes: Int { get }
    var unitCount: UInt64 { get }
    var inFlight: Int { get }
    func read(into buffer: borrowing DMABuffer, bufferOffset: Int, offsetUnits: UInt64, countUnits: UInt64,
              handler: any BdevCompletionHandler, tag: UInt64) throws
    func write(from buffer: borrowing DMABuffer, bufferOffset: Int, offsetUnits: UInt64, countUnits: UInt64,
               handler: any BdevCompletionHandler, tag: UInt64) throws
    func close()
}

final class BdevTarget: PerfTarget {
    let channel: BdevChannel
    init(_ channel: BdevChannel) { self.channel = channel }
    var unitBytes: Int { channel.bdev.geometry.blockSizeBytes }
    var unitCount: UInt64 { channel.bdev.geometry.blockCount }
    var inFlight: Int { channel.inFlight }

    func read(into buffer: borrowing DMABuffer, bufferOffset: Int, offsetUnits: UInt64, countUnits: UInt64,
              handler: any BdevCompletionHandler, tag: UInt64) throws {
        try channel.read(into: buffer, bufferOffset: bufferOffset, offsetBlocks: offsetUnits, countBlocks: countUnits,
                         handler: handler, tag: tag)
    }

    func write(from buffer: borrowing DMABuffer, bufferOffset: Int, offsetUnits: UInt64, countUnits: UInt64,
               handler: any BdevCompletionHandler, tag: UInt64) throws {
        try channel.write(from: buffer, bufferOffset: bufferOffset, offsetBlocks: offsetUnits, countBlocks: countUnits,
                          handler: handler, tag: tag)
    }

    func close() { channel.close() }
}

final class BlobTarget: PerfTarget {
    let channel: BlobChannel
    let handle: BlobHandle
    let unitBytes: Int
    let unitCount: UInt64

    init(channel: BlobChannel, handle: BlobHandle, clusterBytes: Int) {
        self.channel = channel
        self.handle = handle
        unitBytes = channel.bdevChannel.bdev.geometry.blockSizeBytes
        unitCount = handle.clusterCount * UInt64(clusterBytes / unitBytes)
    }

    var inFlight: Int { channel.inFlight }

    func read(into buffer: borrowing DMABuffer, bufferOffset: Int, offsetUnits: UInt64, countUnits: UInt64,
              handler: any BdevCompletionHandler, tag: UInt64) throws {
        try channel.read(handle, offsetUnits: offsetUnits, countUnits: countUnits, into: buffer,
                         bufferOffset: bufferOffset, handler: handler, tag: tag)
    }

    func write(from buffer: borrowing DMABuffer, bufferOffset: Int, offsetUnits: UInt64, countUnits: UInt64,
               handler: any BdevCompletionHandler, tag: UInt64) throws {
        try channel.write(handle, offsetUnits: offsetUnits, countUnits: countUnits, from: buffer,
                          bufferOffset: bufferOffset, handler: handler, tag: tag)
    }

    func close() {
        channel.close()
        channel.bdevChannel.close()
    }
}

/// Formats a blob store on the device and fills one blob spanning every cluster, so
/// that the measured phase reads and overwrites allocated data.
final class BlobSetup: @unchecked Sendable {
    let store: BlobStore
    let blobID: BlobID
    private let io: BdevSyncIO

    init(bdev: Bdev) throws {
        io = try BdevSyncIO(bdev: bdev, reactor: try Reactor())
        store = try BlobStore.format(io)
        blobID = try store.createBlob(clusterCount: store.freeClusterCount)
        let chunk = [UInt8](repeating: 0xA5, count: 1 << 20)
        let unitsPerChunk = UInt64(chunk.count / store.ioUnitBytes)
        let totalUnits = store.clusterCount * UInt64(store.clusterSizeBytes / store.ioUnitBytes)
        var unit: UInt64 = 0
        while unit < totalUnits {
            let count = min(unitsPerChunk, totalUnits - unit)
            try store.write(blob: blobID, offsetUnits: unit, data: Array(chunk[0..<Int(count) * store.ioUnitBytes]))
            unit += count
        }
    }

    func makeTarget(reactor: Reactor, queueDepth: Int) throws -> BlobTarget {
        let bdevChannel = try store.bdevChannelDevice.makeChannel(reactor: reactor, queueDepth: queueDepth)
        return BlobTarget(channel: store.makeChannel(bdevChannel, queueDepth: queueDepth),
                          handle: try store.openBlob(blobID), clusterBytes: store.clusterSizeBytes)
    }
}
