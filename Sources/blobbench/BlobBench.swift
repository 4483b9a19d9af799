import ArgumentParser
import ToolSupport
import Bdev
import Blobstore
import DeviceSpec
import Env
import Foundation
import Logging

/// Blob-store measurements: format time, recovery time against the log tail, and how
/// many small blobs a store holds.
@main
struct BlobBench: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(
        commandName: "blobbench", abstract: "Blob store benchmarks.",
        subcommands: [FormatTime.self, RecoveryTime.self, SmallObjects.self, LoadTime.self, RequestStatistics.self])

    struct DeviceOptions: ParsableArguments {
        @Option(help: "malloc:SIZE, file:PATH or a path.") var device: String
        @Option(help: "Size of an image file to create (a sparse file), e.g. 1T.") var size: String?
        @Option(help: "Block size: 512 or 4096.") var blockSize: Int = 4096
        @Option(help: "Cluster size in bytes.") var clusterSize: Int = 4096

        func open(fresh: Bool) throws -> (Bdev, BdevSyncIO) {
            LoggingSystem.bootstrap(StreamLogHandler.standardError)
            let spec: DeviceSpec
            do { spec = try DeviceSpec(parsing: device) } catch { throw ValidationError("--device: \(error)") }
            if fresh, case let .file(path) = spec { unlink(path) }
            let bytes = try size.map { text -> UInt64 in
                do { return try DeviceSpec.parseSize(text) } catch { throw ValidationError("--size: \(error)") }
            }
            let bdev = try spec.open(blockSizeBytes: blockSize, createSizeBytes: bytes)
            return (bdev, try BdevSyncIO(bdev: bdev, reactor: try Reactor()))
        }
    }

    static func seconds(_ body: () throws -> Void) rethrows -> Double {
        let start = MonotonicClock.nowNs()
        try body()
        return Double(MonotonicClock.nowNs() - start) / 1e9
    }

    struct FormatTime: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "format-time", abstract: "Time to format a store.")
        @OptionGroup var options: DeviceOptions

        func run() throws {
            let (bdev, io) = try options.open(fresh: true)
            defer { io.close(); bdev.close() }
            var store: BlobStore?
            let elapsed = try BlobBench.seconds {
                store = try BlobStore.format(io, options: .init(clusterSizeBytes: options.clusterSize))
                try store!.unload()
            }
            let block = store!.superBlock
            print(String(format: "format of %.0f GiB (%llu clusters of %d B, %llu metadata pages, %llu blob ids): %.3f s",
                         Double(bdev.geometry.capacityBytes) / 1073741824, block.clusterCount, options.clusterSize,
                         block.metadataPages.pageCount, block.blobIDLimit, elapsed))
        }
    }

    struct RecoveryTime: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "recovery-time",
            abstract: "Time to load a store after an unclean stop, for several lengths of log since the checkpoint.")
        @OptionGroup var options: DeviceOptions
        @Option(help: "Log tail lengths in MiB, comma separated.") var logMib: String = "1,16,60"
        @Option(help: "Log size in MiB to format with (default: the store's default, 64 MiB from 4 GiB up).")
        var logSizeMib: UInt64?

        func run() throws {
            let tails = logMib.split(separator: ",").compactMap { Double($0) }
            guard !tails.isEmpty else { throw ValidationError("--log-mib: comma-separated numbers") }
            let (bdev, io) = try options.open(fresh: true)
            defer { bdev.close() }
            var current = io
            print("| log tail (MiB) | log pages | transactions replayed | load time (s) |")
            print("|---:|---:|---:|---:|")
            for tail in tails {
                let store = try BlobStore.format(current, options: .init(clusterSizeBytes: options.clusterSize,
                                                                         logPages: logSizeMib.map { $0 * 256 }))
                let logPages = store.superBlock.log.pageCount
                let pages = UInt64(tail * 256)
                guard pages < logPages else {
                    throw ValidationError("a \(tail) MiB tail does not fit the \(logPages / 256) MiB log of this store")
                }
                let ids = try (0..<64).map { _ in try store.createBlob(clusterCount: 1) }
                // Transactions of 16 set-xattr records of 3 KiB (about 16 log pages each),
                // spread over 64 blobs.
                let value = [UInt8](repeating: 0x5A, count: 3000)
                var round = 0
                while store.logPagesInUse < pages {
                    let records = (0..<16).map {
                        LogRecord.setXattr(id: ids[(round * 16 + $0) % ids.count], internal: false, name: "x", value: value)
                    }
                    try store.commit(records)
                    round += 1
                }
                let used = store.logPagesInUse
                current.close()  // the process "dies": no unload, no checkpoint
                current = try BdevSyncIO(bdev: bdev, reactor: try Reactor())
                var report: BlobStore.LoadReport?
                let elapsed = try BlobBench.seconds { report = try BlobStore.load(current).1 }
                print(String(format: "| %.0f | %llu | %d | %.3f |", tail, used, report!.replayedTransactions, elapsed))
            }
            current.close()
        }
    }

    struct LoadTime: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "load-time",
            abstract: "Time read-only loads of an existing store (the table, every chain, the log tail): what a mount reads.")
        @OptionGroup var options: DeviceOptions
        @Option(help: "Loads to time.") var rounds = 3

        func run() throws {
            let (bdev, io) = try options.open(fresh: false)
            defer { io.close(); bdev.close() }
            for _ in 0..<rounds {
                var blobCount = 0
                let elapsed = try BlobBench.seconds { blobCount = try BlobStore.load(io, readOnly: true).0.blobIDList.count }
                print(String(format: "load of %d blobs: %.3f s", blobCount, elapsed))
            }
        }
    }

    struct SmallObjects: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "small-objects", abstract: "Create COUNT blobs of 4 KiB each and report what they cost.")
        @OptionGroup var options: DeviceOptions
        @Option var count: Int = 100_000
        @Option(help: "Metadata pages to format with.") var metadataPages: UInt64?
        @Option(name: .customLong("blob-ids"), help: "Blob ids to format with.") var blobIDs: UInt64?

        func run() throws {
            let (bdev, io) = try options.open(fresh: true)
            defer { io.close(); bdev.close() }
            let store = try BlobStore.format(io, options: .init(clusterSizeBytes: options.clusterSize,
                                                                metadataPages: metadataPages, blobIDLimit: blobIDs))
            let data = [UInt8](repeating: 0xA5, count: 4096)
            var created = 0
            var failure: String?
            let elapsed = BlobBench.seconds {
                do {
                    for _ in 0..<count {
                        let id = try store.createBlob(clusterCount: UInt64(max(1, 4096 / options.clusterSize)))
                        try store.write(blob: id, offsetUnits: 0, data: data)
                        created += 1
                    }
                    try store.unload()
                } catch { failure = "\(error)" }
            }
            print(String(format: "%d of %d blobs of 4 KiB in a %.2f GiB store (%llu blob ids, %llu metadata pages in the region, %llu clusters of %d B); %llu metadata pages in data clusters; %llu clusters free; %.1f s",
                         created, count, Double(bdev.geometry.capacityBytes) / 1073741824, store.blobIDLimit,
                         store.superBlock.metadataPages.pageCount, store.clusterCount, options.clusterSize,
                         store.metadataPagesInClusterCount, store.freeClusterCount, elapsed))
            if let failure { print("stopped: \(failure)") }
        }
    }
}
