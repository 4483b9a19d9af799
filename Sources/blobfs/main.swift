#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Bdev
import BlobFileSystem
import Blobstore
import ToolSupport
import DeviceSpec
import Env
import FuseFrontend
import Logging

/// The blobfs command: make, mount, check and unmount a file system on a device.
struct Blobfs: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(
        commandName: "blobfs",
        abstract: "A POSIX file system on a blob store, mounted through FUSE.",
        discussion: """
            DEVICE is an image file or block device path (through io_uring; file:PATH says the \
            same), malloc:SIZE (RAM, formatted at mount), nvme-emu:PATH (the NVMe driver over the \
            in-process software controller) or pcie:DDDD:BB:DD.F.
            """,
        subcommands: [Mkfs.self, Mount.self, Fsck.self, Unmount.self, Status.self, Stats.self, Sync.self, Checkpoint.self, Grow.self])
}

// MARK: - mkfs

struct Mkfs: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(abstract: "Make an empty file system on DEVICE.")
    @Argument(help: "Image path or device spec.") var device: String
    @Option(help: "Size of the image to create (e.g. 4G); an existing image keeps its size unless --force.") var size: String?
    @Option(help: "Cluster size in bytes (a power of two, 4096 to 1048576).") var clusterSize: Int = 4096
    @Option(help: "Block size in bytes: 512 or 4096.") var blockSize: Int = 4096
    @Option(help: "Inodes to make room for (blob ids, and a metadata page region that holds them all); default: one per 8 KiB of device with 4 KiB clusters (metadata pages past the region go to data clusters), else one per 32 KiB; at most 16 Mi (a load reads the blob table whole: 4 bytes an inode).")
    var inodes: UInt64?
    @Option(help: "Size of the metadata log (e.g. 128M): a multiple of 4 KiB from 256K to 4G; default: a sixty-fourth of the device, 256 KiB to 64 MiB. A longer log checkpoints less often and takes longer to replay after a crash.")
    var logSize: String?
    @Flag(help: "Overwrite an existing blob store, or resize an existing image to --size.") var force = false
    @Flag(help: "Allocate the image file's blocks now (fallocate) instead of leaving it sparse: writes and fsyncs no longer pay for the backing file system's allocation.")
    var preallocate = false

    func validate() throws {
        guard blockSize == 512 || blockSize == 4096 else { throw ValidationError("--block-size must be 512 or 4096") }
        if let inodes { guard inodes >= 16, inodes <= 1 << 26 else { throw ValidationError("--inodes must be 16...67108864") } }
        guard clusterSize >= 4096, clusterSize <= 1 << 20, clusterSize & (clusterSize - 1) == 0 else {
            throw ValidationError("--cluster-size must be a power of two from 4096 to 1048576")
        }
        _ = try logPages()
    }

    /// --log-size in 4 KiB pages.
    private func logPages() throws -> UInt64? {
        guard let logSize else { return nil }
        let bytes = try parseSize(logSize, "--log-size")
        guard bytes % 4096 == 0, bytes >= 256 << 10, BlobStore.logPagesRange.contains(bytes / 4096) else {
            throw ValidationError("--log-size must be a multiple of 4 KiB from 256K to 4G (not \(logSize))")
        }
        return bytes / 4096
    }

    func run() throws {
        do { try make() } catch { fail(error) }
    }

    private func make() throws {
        let device = try Device(device)
        let bytes = try size.map { try parseSize($0, "--size") }
        if device.isRAM { throw Failure("a RAM device lives only in its process: use `blobfs mount \(device.text) DIR`", status: 2) }
        var createSize: UInt64?
        if let path = device.lockPath {
            var info = stat()
            if stat(path, &info) != 0 {
                guard let bytes else { throw Failure("\(path) does not exist; give --size to create an image", status: 2) }
                createSize = bytes
            } else if let bytes, (info.st_mode & S_IFMT) == S_IFREG, UInt64(info.st_size) != bytes {
                guard force else {
                    throw Failure("\(path) is \(info.st_size) bytes, not \(bytes): add --force to resize it", status: 2)
                }
                guard truncate(path, off_t(bytes)) == 0 else { throw Failure("resize \(path): \(String(cString: strerror(errno)))") }
            }
        }
        if let path = device.lockPath, let createSize {
            // Created here rather than by the device module so that it can be preallocated.
            let fd = Glibc.open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw Failure("create \(path): \(String(cString: strerror(errno)))", status: 2) }
            defer { close(fd) }
            guard ftruncate(fd, off_t(createSize)) == 0 else {
                unlink(path)
                throw Failure("size \(path): \(String(cString: strerror(errno)))")
            }
            // A failed mkfs leaves no image it made behind.
            do { try format(device) } catch { unlink(path); throw error }
        } else {
            try format(device)
        }
    }

    private func format(_ device: Device) throws {
        if preallocate, let path = device.lockPath {
            let fd = Glibc.open(path, O_RDWR | O_CLOEXEC)
            var info = stat()
            guard fd >= 0, fstat(fd, &info) == 0 else { throw Failure("open \(path): \(String(cString: strerror(errno)))", status: 2) }
            defer { close(fd) }
            let status = posix_fallocate(fd, 0, info.st_size)
            guard status == 0 else { throw Failure("preallocate \(path): \(String(cString: strerror(status)))") }
        }
        let lock = try device.lock()
        defer { if let lock { close(lock) } }
        let bdev = try device.open(blockSize: blockSize)
        defer { bdev.close() }
        let reactor = try Reactor()
        let io = try BdevSyncIO(bdev: bdev, reactor: reactor)
        defer { io.close() }
        if !force, let (existing, _) = try? BlobStore.load(io) {
            try? existing.unload()
            throw Failure("\(device.text) already holds a blob store: add --force to overwrite it")
        }
        let start = MonotonicClock.nowNs()
        let store: BlobStore
        // Each inode costs at least one metadata page; a tenth more covers directories'
        // and fragmented files' longer chains.
        let options = BlobStore.Options(clusterSizeBytes: clusterSize, logPages: try logPages(),
                                        metadataPages: inodes.map { $0 + $0 / 10 + 64 },
                                        blobIDLimit: inodes)
        let formatting = Ticker("blobfs mkfs: formatting \(device.text) (super block, log, table, bitmaps)")
        defer { formatting.finish() }
        do { store = try BlobStore.format(io, options: options) } catch {
            // The sizes asked for (--log-size, --inodes, --cluster-size) do not fit the
            // device: a usage error; anything else is the device failing.
            let usage: Bool
            switch error {
            case .noSpace, .invalidArgument: usage = true
            default: usage = false
            }
            throw Failure("format \(device.text): \(error)", status: usage ? 2 : 1)
        }
        let fs = try FileSystem.format(store, owner: Caller(uid: getuid(), gid: getgid()))
        try fs.unmount()
        try store.unload()
        formatting.finish()
        let statistics = fs.statistics()
        let elapsed = Double(MonotonicClock.nowNs() - start) / 1e9
        print("blobfs: made a file system on \(device.text): \(formatBytes(bdev.geometry.capacityBytes)), "
              + "\(statistics.blocks) clusters of \(clusterSize) B, up to \(statistics.files) inodes, in \(fixed(elapsed, 2)) s")
    }
}

// MARK: - fsck

/// The same check and repair as `blobcli fsck` (ToolSupport's `Fsck`).
struct Fsck: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(
        abstract: "Check the blob store and the file system on DEVICE; --repair makes them consistent (writes).",
        discussion: """
            Read-only unless --repair: the log after the checkpoint is replayed in memory, as a \
            mount would. --repair ends with a store that passes fsck and mounts, whatever the \
            damage short of both super block slots, and lists every change (docs/BLOBCLI.md). \
            Exit status: 0 clean (or repaired), 1 problems remain, 2 unreadable, not repairable \
            or usage error (nothing written).
            """)
    @Argument(help: "Image path or device spec.") var device: String
    @Flag(help: "Repair what fsck finds (writes).") var repair = false
    @Flag(help: "With --repair: list every change the repair would make, and write nothing.") var dryRun = false
    @Option(help: "With --repair: keep the old contents of every page the repair overwrites in this new file (blobcli undo FILE DEVICE puts them back).")
    var undo: String?
    @Flag(help: "Machine-readable output (schema: docs/BLOBCLI.md, fsck).") var json = false

    func validate() throws {
        if dryRun && !repair { throw ValidationError("--dry-run goes with --repair") }
        if undo != nil && !repair { throw ValidationError("--undo goes with --repair") }
        if undo != nil && dryRun { throw ValidationError("--undo with --dry-run: a dry run writes nothing to undo") }
    }

    func run() throws {
        do {
            let status = try ToolSupport.Fsck.run(try Device(device),
                                                  .init(tool: "blobfs", repair: repair, dryRun: dryRun, undoPath: undo, json: json))
            if status != 0 { Glibc.exit(status) }
        } catch { fail(error) }
    }
}

// MARK: - unmount

struct Unmount: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(abstract: "Unmount a blobfs mount and wait until its store is clean.")
    @Argument(help: "The mountpoint.") var mountpoint: String
    @Option(help: "Seconds to wait for the daemon to finish.") var timeout: Double = 60

    func run() throws {
        let path = Device.absolute(mountpoint)
        guard let source = mountSource(path) else { fail(Failure("\(path) is not a blobfs mount", status: 2)) }
        let status = runProgram(["fusermount3", "-u", path])
        guard status == 0 else { fail(Failure("fusermount3 -u \(path) failed (status \(status))")) }
        // The daemon unloads the store cleanly, then exits and drops its lock.
        guard source.hasPrefix("/") else { return }
        let deadline = MonotonicClock.nowNs() + UInt64(timeout * 1e9)
        let fd = open(source, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        defer { close(fd) }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            guard MonotonicClock.nowNs() < deadline else { fail(Failure("the blobfs daemon for \(source) did not finish in \(timeout) s")) }
            usleep(20_000)
        }
        flock(fd, LOCK_UN)
    }
}

/// The source of a blobfs mount at `path` (from /proc/self/mountinfo).
func mountSource(_ path: String) -> String? {
    guard let file = fopen("/proc/self/mountinfo", "r") else { return nil }
    defer { fclose(file) }
    var line: UnsafeMutablePointer<CChar>?
    var capacity = 0
    defer { free(line) }
    while getline(&line, &capacity, file) > 0 {
        let fields = String(cString: line!).split(separator: " ")
        guard fields.count > 9, let dash = fields.firstIndex(of: "-"), dash + 2 < fields.count else { continue }
        let point = String(fields[4]).replacingOccurrences(of: "\\040", with: " ")
        guard point == path, fields[dash + 1].hasPrefix("fuse.blobfs") || fields[dash + 1] == "fuse" else { continue }
        return String(fields[dash + 2])
    }
    return nil
}

extension String {
    func replacingOccurrences(of target: String, with replacement: String) -> String {
        guard !target.isEmpty else { return self }
        var result = ""
        var rest = self[...]
        while let range = rest.range(of: target) {
            result += rest[..<range.lowerBound] + replacement
            rest = rest[range.upperBound...]
        }
        return result + rest
    }
}

extension Substring {
    func range(of target: String) -> Range<Substring.Index>? {
        var index = startIndex
        while index < endIndex {
            if self[index...].hasPrefix(target) { return index..<self.index(index, offsetBy: target.count) }
            index = self.index(after: index)
        }
        return nil
    }
}

/// Runs a program found on PATH and returns its exit status.
func runProgram(_ arguments: [String]) -> Int32 {
    var pid: pid_t = 0
    var cArguments = arguments.map { strdup($0) } + [nil]
    defer { cArguments.forEach { free($0) } }
    guard posix_spawnp(&pid, arguments[0], nil, nil, &cArguments, environ) == 0 else { return 127 }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    return (status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
}

Blobfs.main()
