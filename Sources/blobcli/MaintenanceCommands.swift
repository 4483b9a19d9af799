#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Bdev
import BlobFileSystem
import Blobstore
import ToolSupport
import Env
import Synchronization

// Writing maintenance: trim, fsck (check and repair), undo.

// MARK: - trim

struct Trim: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Unmap the free space on the device: free clusters, the log before its tail, free metadata pages (writes).",
        discussion: """
            What fstrim does on a mounted file system, offline: loads the store (a checkpoint, \
            after which the whole log is free), unmaps, and unloads it clean. An image file gets \
            holes punched (its allocated size shrinks); an NVMe namespace gets Write Zeroes with \
            deallocate or Dataset Management. Refuses a mounted store.
            """)
    @OptionGroup var options: DeviceArgument
    @Option(help: "Only free space at or after this byte of the device.") var offset: UInt64 = 0
    @Option(help: "Only free space within this many bytes from --offset (default: to the end).") var length: UInt64?
    @Option(help: "Skip free runs shorter than this many bytes.") var minimum: UInt64 = 0

    func run() {
        blobcli.run {
            let opened = try openWritable(options.device, force: false)
            let result: Result<UInt64, BlobStoreError>
            do {
                // The trimmer's channel needs a reactor of its own (the store's steps its I/O).
                let reactor = try Reactor(name: "trim")
                let trimmer = ClusterTrimmer(store: opened.store, channel: try opened.bdev.makeChannel(
                    reactor: reactor, queueDepth: ClusterTrimmer.requestsInFlightMax))
                var answer: Result<UInt64, BlobStoreError>?
                trimmer.trimFreeSpace(startBytes: offset, lengthBytes: length ?? .max, minimumBytes: minimum) { answer = $0 }
                reactor.run(until: { answer != nil })
                trimmer.close()
                result = answer!
            }
            try opened.close()
            let trimmed: UInt64
            switch result {
            case let .success(bytes): trimmed = bytes
            case let .failure(.invalidArgument(what)): throw Failure(what, status: 2)
            case let .failure(error): throw Failure("\(options.device): trim: \(error)", status: 1)
            }
            emit(options.json, .object([("device", .string(options.device)), ("trimmed_bytes", .uint(trimmed))])) {
                "\(options.device): \(formatBytes(trimmed)) (\(trimmed) bytes) trimmed"
            }
        }
    }
}

// MARK: - fsck

struct Fsck: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Verify the blob store and the file system on it; --repair makes them consistent (writes), listing every change.",
        discussion: """
            --repair ends with a store that passes fsck whatever the damage, short of both super \
            block slots: unreadable metadata is dropped, what it held salvaged where it can be, \
            unnamed inodes linked into /lost+found (docs/BLOBCLI.md). Exit status 0 clean (or \
            repaired), 1 problems remain (or --dry-run found some), 2 unreadable or not repairable \
            (nothing written).
            """)
    @OptionGroup var options: DeviceArgument
    @Flag(help: "Repair what fsck finds (writes).") var repair = false
    @Flag(help: "With --repair: list every change the repair would make, and write nothing.") var dryRun = false
    @Option(help: "With --repair: keep the old contents of every page the repair overwrites in this new file (blobcli undo FILE DEVICE puts them back).")
    var undo: String?

    func validate() throws {
        if dryRun && !repair { throw ValidationError("--dry-run goes with --repair") }
        if undo != nil && !repair { throw ValidationError("--undo goes with --repair") }
        if undo != nil && dryRun { throw ValidationError("--undo with --dry-run: a dry run writes nothing to undo") }
    }

    func run() {
        blobcli.run {
            let status = try ToolSupport.Fsck.run(try Device(options.device),
                                                  .init(tool: "blobcli", repair: repair, dryRun: dryRun, undoPath: undo, json: options.json))
            if status != 0 { Glibc.exit(status) }
        }
    }
}

// MARK: - undo

struct Undo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Put back the pages an fsck --repair --undo FILE overwrote (writes).",
        discussion: """
            Checks the whole undo file first, that it belongs to DEVICE (size, block size) and, \
            when the repair finished, that the super block pages are still what it left (the \
            device was not mounted or repaired since; --force overrides). Exit 0 restored, 2 \
            refused (nothing written).
            """)
    @Argument(help: "The undo file fsck --repair --undo wrote.") var file: String
    @OptionGroup var options: DeviceArgument
    @Flag(help: "Apply even when the super block pages changed since the repair.") var force = false
    @Flag(help: "Check and list the pages, write nothing.") var dryRun = false

    func run() {
        blobcli.run {
            let status = try ToolSupport.Fsck.undo(path: file, device: try Device(options.device), force: force, dryRun: dryRun,
                                                   json: options.json)
            if status != 0 { Glibc.exit(status) }
        }
    }
}
