#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Bdev
import BlobFileSystem
import Blobstore
import CommandLineSupport
import Env
import Synchronization
import ToolSupport

/// blobcli: look inside a blob store (and the file system on it) without mounting it.
/// Read-only unless a command says it writes; exit 0 ok, 1 inconsistencies, 2 usage or
/// unreadable input.
struct BlobCLI: UsageErrorsExitTwo {
    static let configuration = CommandConfiguration(
        commandName: "blobcli",
        abstract: "Offline inspection, verification and repair of blobfs images.",
        discussion: """
            DEVICE is an image path or a device spec (file:PATH, nvme-emu:SPEC, pcie:BDF). \
            Read commands load the store read-only (the log is replayed in memory, nothing is \
            written). Writing commands (import, xattr set/rm, replay, fsck --repair, undo, trim) take the \
            device lock and refuse a mounted store. Exit status: 0 ok, 1 inconsistencies \
            found, 2 usage error or unreadable input.
            """,
        subcommands: [Info.self, List.self, Show.self, Dump.self, Import.self, Xattr.self, DumpMetadata.self, Log.self,
                      Replay.self, Fsck.self, Undo.self, Trim.self, Ls.self, Stat.self, Cat.self, Tree.self, Get.self])
}

struct DeviceArgument: ParsableArguments {
    @Argument(help: "Image path or device spec.") var device: String
    @Flag(help: "Machine-readable output (schema: docs/BLOBCLI.md).") var json = false
}

/// A store opened for a command: read-only, or locked and writable.
final class Opened {
    let device: Device
    let bdev: Bdev
    let io: BdevSyncIO
    let store: BlobStore
    let report: BlobStore.LoadReport
    let lock: Int32?

    /// `locked`: the caller already holds the device lock.
    init(_ text: String, writable: Bool, locked: Bool = false) throws {
        device = try Device(text)
        lock = writable && !locked ? try device.lock() : nil
        bdev = try device.open()
        do {
            io = try BdevSyncIO(bdev: bdev, reactor: try Reactor())
        } catch {
            bdev.close()
            throw Failure("\(text): \(error)", status: 2)
        }
        let ticker = Ticker("\(text): loading the store (super block, bitmaps, metadata pages, log)")
        defer { ticker.finish() }
        do { (store, report) = try BlobStore.load(io, readOnly: !writable) } catch {
            io.close()
            bdev.close()
            throw Failure("\(text): \(error)", status: 2)
        }
    }

    /// Unloads cleanly (writable stores) and closes the device.
    func close() throws {
        defer {
            io.close()
            bdev.close()
            if let lock { Glibc.close(lock) }
        }
        if !store.isReadOnly { try store.unload() }
    }

    func fileSystem() throws -> FileSystem {
        do { return try FileSystem.mount(store) } catch { throw Failure("\(device.text): \(error)", status: 2) }
    }
}

/// Runs `body` with a synchronous channel to the device, without loading the store.
func withIO<T>(_ device: Device, _ body: (BdevSyncIO) throws -> T) throws -> T {
    let bdev = try device.open()
    defer { bdev.close() }
    let io: BdevSyncIO
    do { io = try BdevSyncIO(bdev: bdev, reactor: try Reactor()) } catch { throw Failure("\(device.text): \(error)", status: 2) }
    defer { io.close() }
    return try body(io)
}

func run(_ body: () throws -> Void) {
    do { try body() } catch let error as ValidationError {
        fail(Failure(error.message, status: 2), tool: "blobcli")
    } catch { fail(error, tool: "blobcli") }
}

func emit(_ json: Bool, _ value: JSON, _ human: () -> String) {
    print(json ? value.render() : human())
}

func bytes(_ value: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var scaled = Double(value)
    var unit = 0
    while scaled >= 1024, unit < units.count - 1 { scaled /= 1024; unit += 1 }
    if unit == 0 { return "\(value) B" }
    let tenths = Int((scaled * 10).rounded())
    return "\(tenths / 10).\(tenths % 10) \(units[unit])"
}

/// Progress on stderr when it is a terminal.
struct Progress {
    let label: String
    let total: Int
    let enabled = isatty(2) == 1
    private var last = -1
    init(_ label: String, total: Int) {
        self.label = label
        self.total = total
    }
    mutating func update(_ done: Int) {
        guard enabled, total > 0 else { return }
        let percent = done * 100 / total
        guard percent != last else { return }
        last = percent
        let line = "\r\(label): \(percent)% (\(done)/\(total))"
        _ = line.withCString { write(2, $0, strlen($0)) }
        if done >= total { _ = "\n".withCString { write(2, $0, 1) } }
    }
}

func xattrText(_ value: [UInt8]) -> String {
    if let text = String(validating: value, as: UTF8.self), text.unicodeScalars.allSatisfy({ $0.value >= 0x20 && $0.value != 0x7F }) {
        return "\"\(text)\""
    }
    return "0x" + value.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
}

// MARK: - info

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Super block, geometry, features, log and usage.")
    @OptionGroup var options: DeviceArgument

    func run() {
        blobcli.run {
            let opened = try Opened(options.device, writable: false)
            defer { try? opened.close() }
            let store = opened.store
            let block = store.superBlock
            let clusterBytes = UInt64(block.clusterSizeBytes)
            let scan = store.lastScan
            let slots = (try? SuperBlockSlots.read(opened.io))?.slots ?? []
            let value = JSON.object([
                ("device", .string(options.device)),
                ("super_block", .object([
                    ("slot", .int(Int64(opened.report.superBlockSlot))), ("sequence", .uint(block.sequence)),
                    ("version", .uint(UInt64(SuperBlock.version))), ("clean", .bool(block.isClean)),
                    ("active_copy", .uint(UInt64(block.activeCopy))),
                    ("slots", .array(slots.enumerated().map { slot, result in
                        switch result {
                        case let .success(decoded):
                            .object([("slot", .int(Int64(slot))), ("ok", .bool(true)), ("current", .bool(slot == opened.report.superBlockSlot)),
                                     ("sequence", .uint(decoded.sequence)), ("clean", .bool(decoded.isClean)),
                                     ("announcement", .bool(decoded.isCheckpointIntent)), ("problem", .null)])
                        case let .failure(problem):
                            .object([("slot", .int(Int64(slot))), ("ok", .bool(false)), ("current", .bool(false)),
                                     ("sequence", .null), ("clean", .null), ("announcement", .null), ("problem", .string("\(problem)"))])
                        }
                    })),
                    ("features", .object([("incompatible", .uint(block.incompatibleFeatures)),
                                          ("read_only_data", .uint(block.readOnlyDataFeatures)),
                                          ("read_only_metadata", .uint(block.readOnlyMetadataFeatures))])),
                ])),
                ("geometry", .object([
                    ("device_bytes", .uint(block.devicePages * UInt64(SuperBlock.pageBytes))),
                    ("block_bytes", .uint(UInt64(block.blockSizeBytes))), ("cluster_bytes", .uint(clusterBytes)),
                    ("page_bytes", .uint(UInt64(SuperBlock.pageBytes))),
                    ("log", region(block.log)), ("table", region(block.table)), ("bitmaps", region(block.bitmaps)),
                    ("metadata_pages", region(block.metadataPages)), ("data_start_page", .uint(block.dataStartPage)),
                    ("arrays_after_data", .bool(block.hasArraysAfterData)),
                ])),
                ("log", .object([
                    ("tail_sequence", .uint(block.logTailSequence)), ("head_sequence", .uint(scan?.endSequence ?? 0)),
                    ("checkpoint_lsn", .uint(block.checkpointLSN)), ("next_lsn", .uint(store.logSequence)),
                    ("pending_transactions", .int(Int64(opened.report.replayedTransactions))),
                    ("uncommitted_records", .int(Int64(opened.report.discardedRecords))),
                    ("stop", scan?.stop.map { .string("\($0)") } ?? .null),
                ])),
                ("usage", .object([
                    ("blobs", .int(Int64(store.blobCount))), ("blob_id_limit", .uint(store.blobIDLimit)),
                    ("clusters", .uint(store.clusterCount)), ("free_clusters", .uint(store.freeClusterCount)),
                    ("metadata_pages", .uint(store.metadataPageCount)), ("free_metadata_pages", .uint(store.freeRegionMetadataPageCount)),
                    ("metadata_pages_in_clusters", .uint(store.metadataPagesInClusterCount)),
                    ("super_blob", store.superBlobID.map { .uint($0) } ?? .null),
                ])),
            ])
            emit(options.json, value) {
                """
                device          \(options.device)
                super block     slot \(opened.report.superBlockSlot), sequence \(block.sequence), version \(SuperBlock.version), \(block.isClean ? "clean" : "NOT clean (in use or crashed)")
                slots           \(slotsText(slots, current: opened.report.superBlockSlot))
                features        incompatible 0x\(String(block.incompatibleFeatures, radix: 16)), read-only data 0x\(String(block.readOnlyDataFeatures, radix: 16)), read-only metadata 0x\(String(block.readOnlyMetadataFeatures, radix: 16))
                size            \(bytes(block.devicePages * UInt64(SuperBlock.pageBytes))), \(block.blockSizeBytes)-byte blocks, \(bytes(clusterBytes)) clusters
                regions (pages) log \(block.log.startPage)+\(block.log.pageCount), table 2×\(block.table.pageCount) at \(block.table.startPage), bitmaps 2×\(block.bitmaps.pageCount) at \(block.bitmaps.startPage), metadata \(block.metadataPages.startPage)+\(block.metadataPages.pageCount), data from \(block.dataStartPage)\(block.hasArraysAfterData ? " (grown: table and bitmaps after the data)" : "")
                log             tail \(block.logTailSequence), head \(scan?.endSequence ?? 0), checkpoint LSN \(block.checkpointLSN); \(opened.report.replayedTransactions) committed transactions after the checkpoint\(opened.report.discardedRecords > 0 ? ", \(opened.report.discardedRecords) uncommitted records" : "")
                log stop        \(scan?.stop.map { "\($0)" } ?? "end of region")
                blobs           \(store.blobCount) of \(store.blobIDLimit) ids\(store.superBlobID.map { ", super blob \($0)" } ?? "")
                clusters        \(store.clusterCount - store.freeClusterCount) used, \(store.freeClusterCount) free of \(store.clusterCount) (\(bytes(store.freeClusterCount * clusterBytes)) free)
                metadata pages  \(store.metadataPageCount - store.freeRegionMetadataPageCount) used, \(store.freeRegionMetadataPageCount) free of \(store.metadataPageCount) in the region; \(store.metadataPagesInClusterCount) in data clusters\(block.hasMetadataPagesInClusters ? "" : " (feature off)")
                """
            }
        }
    }

    func slotsText(_ slots: [Result<SuperBlock, FormatError>], current: Int) -> String {
        slots.enumerated().map { slot, result in
            switch result {
            case let .success(decoded) where decoded.isCheckpointIntent:
                "\(slot): announcement of checkpoint \(decoded.sequence) (a crash stopped it)"
            case let .success(decoded): "\(slot): sequence \(decoded.sequence)\(slot == current ? " (current)" : "")"
            case let .failure(problem): "\(slot): DAMAGED (\(problem))"
            }
        }.joined(separator: "; ")
    }

    func region(_ region: SuperBlock.Region) -> JSON {
        .object([("start_page", .uint(region.startPage)), ("pages", .uint(region.pageCount))])
    }
}

// MARK: - list, show

func allocatedClusters(_ blob: BlobMetadata) -> UInt64 { blob.extents.reduce(0) { $0 + UInt64($1.count) } }

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Every blob: id, size, allocated clusters, xattrs.")
    @OptionGroup var options: DeviceArgument

    func run() {
        blobcli.run {
            let opened = try Opened(options.device, writable: false)
            defer { try? opened.close() }
            let store = opened.store
            let ids = store.blobIDList
            var progress = Progress("list", total: ids.count)
            var rows: [[String]] = []
            var items: [JSON] = []
            for (index, id) in ids.enumerated() {
                guard let blob = store.blob(id) else { continue }
                let size = blob.clusterCount * UInt64(store.clusterSizeBytes)
                let allocated = allocatedClusters(blob)
                if options.json {
                    items.append(.object([("id", .uint(id)), ("size_bytes", .uint(size)), ("clusters", .uint(blob.clusterCount)),
                                          ("allocated_clusters", .uint(allocated)), ("extents", .int(Int64(blob.extents.count))),
                                          ("xattrs", .array(blob.xattrs.map { .string($0.name) })),
                                          ("internal_xattrs", .int(Int64(blob.internalXattrs.count))),
                                          ("super_blob", .bool(store.superBlobID == id))]))
                } else {
                    let names = blob.xattrs.prefix(3).map(\.name).joined(separator: ",") + (blob.xattrs.count > 3 ? ",…" : "")
                    rows.append(["\(id)\(store.superBlobID == id ? "*" : "")", bytes(size), "\(allocated)", "\(blob.extents.count)",
                                 "\(blob.xattrs.count)" + (names.isEmpty ? "" : " (\(names))"), "\(blob.internalXattrs.count)"])
                }
                if index % 1024 == 0 { progress.update(index) }
            }
            progress.update(ids.count)
            emit(options.json, .object([("blobs", .array(items))])) {
                table(["ID", "SIZE", "ALLOCATED", "EXTENTS", "XATTRS", "INTERNAL"], rows) + "\n\(ids.count) blobs (* super blob)"
            }
        }
    }
}

struct Show: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "One blob: its metadata chain page by page, extents, xattrs.")
    @OptionGroup var options: DeviceArgument
    @Argument(help: "Blob id.") var id: UInt64

    func run() {
        blobcli.run {
            let opened = try Opened(options.device, writable: false)
            defer { try? opened.close() }
            let store = opened.store
            guard let blob = store.blob(id) else { throw Failure("no blob \(id) in \(options.device)", status: 2) }
            let pages = store.chainPages(id)
            let bad = pages.contains { $0.problem != nil }
            let value = JSON.object([
                ("id", .uint(id)), ("clusters", .uint(blob.clusterCount)),
                ("size_bytes", .uint(blob.clusterCount * UInt64(store.clusterSizeBytes))),
                ("allocated_clusters", .uint(allocatedClusters(blob))),
                ("changed_since_checkpoint", .bool(store.changedSinceCheckpoint(id))),
                ("chain", .array(pages.map { page in
                    .object([("page", .uint(UInt64(page.pageID))), ("offset", .uint(page.offset)),
                             ("ok", .bool(page.problem == nil)), ("problem", page.problem.map { .string($0) } ?? .null),
                             ("index", page.chainIndex.map { .uint(UInt64($0)) } ?? .null),
                             ("next", page.nextPage.map { .uint(UInt64($0)) } ?? .null),
                             ("checkpoint_sequence", page.checkpointSequence.map { .uint($0) } ?? .null)])
                })),
                ("extents", .array(blob.extents.map { extent in
                    .object([("cluster_index", .uint(extent.clusterIndex)), ("count", .uint(UInt64(extent.count))),
                             ("first_device_cluster", .uint(extent.firstCluster)),
                             ("device_offset", .uint(store.deviceOffset(blob: id, cluster: extent.clusterIndex) ?? 0))])
                })),
                ("xattrs", .array(blob.xattrs.map { .object([("name", .string($0.name)), ("value", .string(xattrText($0.value)))]) })),
                ("internal_xattrs", .array(blob.internalXattrs.map {
                    .object([("name", .string($0.name)), ("bytes", .int(Int64($0.value.count)))])
                })),
            ])
            emit(options.json, value) {
                var text = "blob \(id): \(blob.clusterCount) clusters (\(bytes(blob.clusterCount * UInt64(store.clusterSizeBytes)))), \(allocatedClusters(blob)) allocated"
                if store.changedSinceCheckpoint(id) { text += "; changed by the log since the checkpoint (chain below is the checkpoint's)" }
                text += "\n\nmetadata chain\n" + table(["PAGE", "OFFSET", "INDEX", "NEXT", "CKPT SEQ", "STATUS"], pages.map { page in
                    ["\(page.pageID)", "\(page.offset)", page.chainIndex.map { "\($0)" } ?? "-",
                     page.nextPage.map { "\($0)" } ?? "end", page.checkpointSequence.map { "\($0)" } ?? "-", page.problem ?? "ok"]
                })
                text += "\n\nextents\n" + table(["BLOB CLUSTER", "COUNT", "DEVICE CLUSTER"], blob.extents.prefix(200).map {
                    ["\($0.clusterIndex)", "\($0.count)", "\($0.firstCluster)"]
                }) + (blob.extents.count > 200 ? "\n… \(blob.extents.count - 200) more" : "")
                text += "\n\nxattrs\n" + (blob.xattrs.isEmpty ? "(none)" : blob.xattrs.map { "\($0.name) = \(xattrText($0.value))" }.joined(separator: "\n"))
                text += "\n\ninternal xattrs: \(blob.internalXattrs.count)"
                + (blob.internalXattrs.count <= 20 ? "\n" + blob.internalXattrs.map { "\($0.name) (\($0.value.count) bytes)" }.joined(separator: "\n") : "")
                return text
            }
            if bad { Glibc.exit(1) }
        }
    }
}

// MARK: - dump, import, xattr

struct Dump: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Write a blob's data (all its clusters; holes as zeros) to FILE.")
    @OptionGroup var options: DeviceArgument
    @Argument(help: "Blob id.") var id: UInt64
    @Argument(help: "Output file (- for stdout).") var file: String

    func run() {
        blobcli.run {
            let opened = try Opened(options.device, writable: false)
            defer { try? opened.close() }
            let store = opened.store
            guard let blob = store.blob(id) else { throw Failure("no blob \(id) in \(options.device)", status: 2) }
            let fd = file == "-" ? 1 : Glibc.open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw Failure("\(file): \(String(cString: strerror(errno)))", status: 2) }
            defer { if fd != 1 { Glibc.close(fd) } }
            let unitsPerCluster = UInt64(store.clusterSizeBytes / store.ioUnitBytes)
            var cluster: UInt64 = 0
            while cluster < blob.clusterCount {
                let count = min(256, blob.clusterCount - cluster)
                let data = try store.read(blob: id, offsetUnits: cluster * unitsPerCluster, countUnits: count * unitsPerCluster)
                var written = 0
                while written < data.count {
                    let result = data[written...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                    guard result > 0 else { throw Failure("\(file): \(String(cString: strerror(errno)))") }
                    written += result
                }
                cluster += count
            }
            if !options.json, file != "-" { print("blob \(id): \(bytes(blob.clusterCount * UInt64(store.clusterSizeBytes))) written to \(file)") }
            if options.json { print(JSON.object([("id", .uint(id)), ("bytes", .uint(blob.clusterCount * UInt64(store.clusterSizeBytes))), ("file", .string(file))]).render()) }
        }
    }
}

struct Import: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a blob holding FILE's bytes (writes). Prints its id.")
    @OptionGroup var options: DeviceArgument
    @Argument(help: "Input file.") var file: String
    @Flag(help: "Write even though the device lock is held (a mounted store!).") var force = false

    func run() {
        blobcli.run {
            let fd = Glibc.open(file, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw Failure("\(file): \(String(cString: strerror(errno)))", status: 2) }
            var data: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 1 << 20)
            while true {
                let count = read(fd, &chunk, chunk.count)
                guard count > 0 else { break }
                data += chunk[0..<count]
            }
            Glibc.close(fd)
            let opened = try openWritable(options.device, force: force)
            let store = opened.store
            let cluster = store.clusterSizeBytes
            let clusters = UInt64((data.count + cluster - 1) / cluster)
            let id = try store.createBlob(clusterCount: clusters, xattrs: [("name", Array(basename(file).utf8))])
            if !data.isEmpty {
                let unit = store.ioUnitBytes
                data += [UInt8](repeating: 0, count: (unit - data.count % unit) % unit)
                try store.write(blob: id, offsetUnits: 0, data: data)
            }
            try store.sync()
            try opened.close()
            emit(options.json, .object([("id", .uint(id)), ("bytes", .int(Int64(data.count)))])) { "\(id)" }
        }
    }
}

func basename(_ path: String) -> String { String(path.split(separator: "/").last ?? Substring(path)) }

/// The store opened for writing: the device lock, unless forced.
func openWritable(_ device: String, force: Bool) throws -> Opened {
    do { return try Opened(device, writable: true) } catch let failure as Failure where failure.message.contains("in use") && force {
        // --force: write without the lock (the caller accepts the risk).
        let unlocked = try Device(device)
        _ = unlocked
        throw Failure("--force cannot take a lock another process holds; unmount first", status: 1)
    }
}

struct Xattr: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "get, set or rm a blob's xattr (set and rm write).")
    @OptionGroup var options: DeviceArgument
    @Argument(help: "get, set or rm.") var action: String
    @Argument(help: "Blob id.") var id: UInt64
    @Argument(help: "Xattr name.") var name: String
    @Argument(help: "Value (set).") var value: String?
    @Flag(help: "An internal xattr (the file system's own).") var `internal` = false

    func validate() throws {
        guard ["get", "set", "rm"].contains(action) else { throw ValidationError("action must be get, set or rm") }
        if action == "set" && value == nil { throw ValidationError("set needs a VALUE") }
    }

    func run() {
        blobcli.run {
            let opened = action == "get" ? try Opened(options.device, writable: false) : try openWritable(options.device, force: false)
            let store = opened.store
            guard store.blob(id) != nil else {
                try? opened.close()
                throw Failure("no blob \(id) in \(options.device)", status: 2)
            }
            switch action {
            case "get":
                defer { try? opened.close() }
                guard let found = store.xattr(id, name: name, isInternal: `internal`) else { throw Failure("blob \(id) has no xattr \(name)") }
                emit(options.json, .object([("id", .uint(id)), ("name", .string(name)), ("value", .string(xattrText(found)))])) { xattrText(found) }
            case "set":
                try store.setXattr(id, name: name, value: Array(value!.utf8), isInternal: `internal`)
                try opened.close()
            default:
                let removed = try store.removeXattr(id, name: name, isInternal: `internal`)
                try opened.close()
                if !removed { throw Failure("blob \(id) has no xattr \(name)") }
            }
        }
    }
}

// MARK: - dump-md, log, replay

struct DumpMetadata: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "dump-md", abstract: "Every metadata page in use, decoded.")
    @OptionGroup var options: DeviceArgument

    func run() {
        blobcli.run {
            let opened = try Opened(options.device, writable: false)
            defer { try? opened.close() }
            let store = opened.store
            let owners = store.metadataPageOwners
            var progress = Progress("dump-md", total: owners.count)
            var rows: [[String]] = []
            var items: [JSON] = []
            var bad = 0
            for (index, (page, blob)) in owners.enumerated() {
                let inspected = store.inspectMetadataPage(page)
                if inspected.problem != nil { bad += 1 }
                if options.json {
                    items.append(.object([("page", .uint(UInt64(page))), ("offset", .uint(inspected.offset)), ("blob", .uint(blob)),
                                          ("index", inspected.chainIndex.map { .uint(UInt64($0)) } ?? .null),
                                          ("next", inspected.nextPage.map { .uint(UInt64($0)) } ?? .null),
                                          ("checkpoint_sequence", inspected.checkpointSequence.map { .uint($0) } ?? .null),
                                          ("ok", .bool(inspected.problem == nil)),
                                          ("problem", inspected.problem.map { .string($0) } ?? .null)]))
                } else {
                    rows.append(["\(page)", "\(inspected.offset)", "\(blob)", inspected.chainIndex.map { "\($0)" } ?? "-",
                                 inspected.nextPage.map { "\($0)" } ?? "end", inspected.checkpointSequence.map { "\($0)" } ?? "-",
                                 inspected.problem ?? "ok"])
                }
                if index % 1024 == 0 { progress.update(index) }
            }
            progress.update(owners.count)
            emit(options.json, .object([("pages", .array(items)), ("bad", .int(Int64(bad)))])) {
                table(["PAGE", "OFFSET", "BLOB", "INDEX", "NEXT", "CKPT SEQ", "STATUS"], rows) + "\n\(owners.count) pages, \(bad) bad"
            }
            if bad > 0 { Glibc.exit(1) }
        }
    }
}

func describe(_ record: LogRecord) -> String {
    switch record {
    case let .createBlob(id): "create blob \(id)"
    case let .deleteBlob(id): "delete blob \(id)"
    case let .resizeBlob(id, count): "resize blob \(id) to \(count) clusters"
    case let .mapExtent(id, extent): "map blob \(id) clusters \(extent.clusterIndex)+\(extent.count) to device cluster \(extent.firstCluster)"
    case let .unmapClusters(id, index, count): "unmap blob \(id) clusters \(index)+\(count)"
    case let .setXattr(id, isInternal, name, value): "set \(isInternal ? "internal " : "")xattr \(name) of blob \(id) (\(value.count) bytes)"
    case let .removeXattr(id, isInternal, name): "remove \(isInternal ? "internal " : "")xattr \(name) of blob \(id)"
    case let .setFlags(id, flags): "set flags of blob \(id): invalid 0x\(String(flags.invalid, radix: 16))"
    case let .setSuperBlob(id): "super blob := \(id.map(String.init) ?? "none")"
    case let .commit(count): "commit (\(count) records)"
    }
}

func logJSON(_ scan: LogScan?, _ report: BlobStore.LoadReport) -> JSON {
    .object([
        ("transactions", .array((scan?.transactions ?? []).map { records in
            .object([("id", .uint(records.first?.transaction ?? 0)),
                     ("records", .array(records.map { .object([("lsn", .uint($0.lsn)), ("record", .string(describe($0.record)))]) }))])
        })),
        ("uncommitted_records", .int(Int64(report.discardedRecords))),
        ("end_sequence", .uint(scan?.endSequence ?? 0)),
        ("stop", scan?.stop.map { .string("\($0)") } ?? .null),
    ])
}

func logText(_ scan: LogScan?, _ report: BlobStore.LoadReport) -> String {
    var lines: [String] = []
    for records in scan?.transactions ?? [] {
        lines.append("transaction \(records.first?.transaction ?? 0): \(records.count) records, committed")
        for record in records { lines.append("  LSN \(record.lsn)  \(describe(record.record))") }
    }
    if report.discardedRecords > 0 { lines.append("\(report.discardedRecords) records of an uncommitted transaction (discarded by replay)") }
    lines.append("log ends at sequence \(scan?.endSequence ?? 0): \(scan?.stop.map { "\($0)" } ?? "end of the region")")
    return lines.joined(separator: "\n")
}

struct Log: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Log records from the checkpoint on, by transaction and page by page, and where the valid log ends.",
        discussion: "Reads only the super block and the log: works when metadata pages are damaged.")
    @OptionGroup var options: DeviceArgument

    func run() {
        blobcli.run {
            let device = try Device(options.device)
            let log = try withIO(device) { io throws -> LogInspection in
                do { return try LogInspection.inspect(io) } catch { throw Failure("\(options.device): \(error)", status: 2) }
            }
            emit(options.json, inspectionJSON(log)) { inspectionText(log) }
        }
    }

    /// Records replay applies, grouped by transaction, commit records aside (as `LogScan` has them).
    func committed(_ log: LogInspection) -> [[LogInspection.Record]] {
        var groups: [[LogInspection.Record]] = []
        for record in log.pages.flatMap(\.records) where record.status == .committed {
            if case .commit = record.record { continue }
            if let last = groups.last?.last, last.transaction == record.transaction {
                groups[groups.count - 1].append(record)
            } else {
                groups.append([record])
            }
        }
        return groups
    }

    func recordJSON(_ record: LogInspection.Record) -> JSON {
        .object([("lsn", .uint(record.lsn)), ("record", .string(describe(record.record)))])
    }

    func pageJSON(_ page: LogInspection.Page) -> JSON {
        .object([
            ("sequence", .uint(page.sequence)), ("slot", .uint(page.slot)), ("offset", .uint(page.offset)),
            ("ok", .bool(page.problem == nil)), ("problem", page.problem.map { .string("\($0)") } ?? .null),
            ("found_sequence", page.foundSequence.map { .uint($0) } ?? .null),
            ("records", .array(page.records.map { record in
                .object([("index", .int(Int64(record.index))), ("lsn", .uint(record.lsn)), ("transaction", .uint(record.transaction)),
                         ("record", .string(describe(record.record))), ("status", .string(record.status.rawValue))])
            })),
        ])
    }

    func inspectionJSON(_ log: LogInspection) -> JSON {
        .object([
            ("transactions", .array(committed(log).map { records in
                .object([("id", .uint(records.first?.transaction ?? 0)), ("records", .array(records.map(recordJSON)))])
            })),
            ("uncommitted_records", .int(Int64(log.uncommittedRecords))),
            ("end_sequence", .uint(log.endSequence)),
            ("stop", log.stop.map { .string("\($0)") } ?? .null),
            ("super_block_slot", .int(Int64(log.superBlockSlot))), ("clean", .bool(log.isClean)),
            ("tail_sequence", .uint(log.tailSequence)), ("checkpoint_lsn", .uint(log.checkpointLSN)),
            ("next_lsn", .uint(log.nextLSN)),
            ("uncommitted", .array(log.pages.flatMap(\.records).filter { $0.status == .uncommitted }.map(recordJSON))),
            ("pages", .array(log.pages.map(pageJSON))),
            ("later_pages", .array(log.laterPages.map(pageJSON))), ("later_page_count", .int(Int64(log.laterPageCount))),
        ])
    }

    func inspectionText(_ log: LogInspection) -> String {
        var lines = ["super block slot \(log.superBlockSlot) (\(log.isClean ? "clean" : "NOT clean")): log tail sequence \(log.tailSequence), checkpoint LSN \(log.checkpointLSN), \(log.logPages) log pages"]
        for records in committed(log) {
            lines.append("transaction \(records.first?.transaction ?? 0): \(records.count) records, committed")
            for record in records { lines.append("  LSN \(record.lsn)  \(describe(record.record))") }
        }
        let uncommitted = log.pages.flatMap(\.records).filter { $0.status == .uncommitted }
        if !uncommitted.isEmpty {
            lines.append("transaction \(uncommitted[0].transaction): \(uncommitted.count) records, NOT committed (discarded by replay)")
            for record in uncommitted { lines.append("  LSN \(record.lsn)  \(describe(record.record))") }
        }
        lines.append("log ends at sequence \(log.endSequence): \(log.stop.map { "\($0)" } ?? "end of the region")")
        lines.append("pages read")
        for page in log.pages {
            var counts: [String] = []
            for status in [LogInspection.RecordStatus.committed, .uncommitted, .ignored] {
                let count = page.records.filter { $0.status == status }.count
                if count > 0 { counts.append("\(count) \(status.rawValue)") }
            }
            lines.append("  sequence \(page.sequence) (log page \(page.slot), byte \(page.offset)): "
                         + (counts.isEmpty ? "no records" : counts.joined(separator: ", "))
                         + (page.problem.map { "; \($0)" } ?? ""))
        }
        if log.laterPageCount > 0 {
            lines.append("\(log.laterPageCount) pages past the end of the valid log carry newer sequences (ignored by replay: a page before them did not reach the device)")
            for page in log.laterPages {
                lines.append("  sequence \(page.foundSequence ?? page.sequence) at byte \(page.offset): \(page.records.count) records")
            }
        }
        return lines.joined(separator: "\n")
    }
}

struct Replay: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Replay the log and write a checkpoint (writes); --dry-run shows what would be applied.")
    @OptionGroup var options: DeviceArgument
    @Flag(help: "Only show the transactions the replayer would apply.") var dryRun = false

    func run() {
        blobcli.run {
            if dryRun {
                let opened = try Opened(options.device, writable: false)
                defer { try? opened.close() }
                emit(options.json, logJSON(opened.store.lastScan, opened.report)) {
                    "would apply \(opened.report.replayedTransactions) transactions:\n" + logText(opened.store.lastScan, opened.report)
                }
                return
            }
            let opened = try openWritable(options.device, force: false)
            let report = opened.report
            try opened.close()
            emit(options.json, .object([("replayed_transactions", .int(Int64(report.replayedTransactions))),
                                        ("discarded_records", .int(Int64(report.discardedRecords)))])) {
                "replayed \(report.replayedTransactions) transactions, discarded \(report.discardedRecords) uncommitted records; checkpoint written, store clean"
            }
        }
    }
}

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
                "\(options.device): \(bytes(trimmed)) (\(trimmed) bytes) trimmed"
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

// MARK: - File-system view

struct PathArguments: ParsableArguments {
    @OptionGroup var device: DeviceArgument
    @Argument(help: "A path inside the file system (/ is the root).") var path: String = "/"
}

/// The inode at `path`, resolved through the file system on a read-only store.
func resolve(_ fs: FileSystem, _ path: String) throws -> Attributes {
    var current = try fs.getAttributes(ino: FileSystem.rootIno)
    for part in path.split(separator: "/") where part != "." {
        do { current = try fs.lookup(parent: current.ino, name: Array(part.utf8)) } catch {
            throw Failure("\(path): \(error)", status: 1)
        }
    }
    return current
}

func typeLetter(_ mode: UInt32) -> String {
    switch mode & UInt32(S_IFMT) {
    case UInt32(S_IFDIR): "d"
    case UInt32(S_IFLNK): "l"
    case UInt32(S_IFREG): "-"
    case UInt32(S_IFIFO): "p"
    case UInt32(S_IFSOCK): "s"
    case UInt32(S_IFCHR): "c"
    case UInt32(S_IFBLK): "b"
    default: "?"
    }
}

func modeString(_ mode: UInt32) -> String {
    var text = typeLetter(mode)
    let letters = Array("rwxrwxrwx")
    for bit in 0..<9 { text.append(mode & (1 << (8 - UInt32(bit))) != 0 ? letters[bit] : "-") }
    return text
}

func attributesJSON(_ name: String, _ a: Attributes) -> JSON {
    .object([("name", .string(name)), ("ino", .uint(a.ino)), ("mode", .string(String(a.attributes.mode, radix: 8))),
             ("type", .string(typeLetter(a.attributes.mode))), ("links", .uint(UInt64(a.attributes.nlink))),
             ("uid", .uint(UInt64(a.attributes.uid))), ("gid", .uint(UInt64(a.attributes.gid))), ("size", .uint(a.attributes.size)),
             ("allocated_bytes", .uint(a.allocatedBytes)), ("mtime_ns", .int(a.attributes.mtimeNs)),
             ("ctime_ns", .int(a.attributes.ctimeNs)), ("atime_ns", .int(a.attributes.atimeNs))])
}

func listDirectory(_ fs: FileSystem, _ ino: UInt64) throws -> [DirectoryEntry] {
    let handle = try fs.openDirectory(ino: ino)
    defer { fs.releaseDirectory(ino: ino, handle: handle) }
    var entries: [DirectoryEntry] = []
    try fs.readDirectory(handle: handle, offset: 2) { entry, _ in entries.append(entry); return true }
    return entries.sorted { $0.name.lexicographicallyPrecedes($1.name) }
}

struct Ls: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List a directory of the file system.")
    @OptionGroup var arguments: PathArguments

    func run() {
        blobcli.run {
            let opened = try Opened(arguments.device.device, writable: false)
            defer { try? opened.close() }
            let fs = try opened.fileSystem()
            let target = try resolve(fs, arguments.path)
            let entries = target.attributes.isDirectory ? try listDirectory(fs, target.ino)
                : [DirectoryEntry(name: Array((arguments.path.split(separator: "/").last.map(String.init) ?? "/").utf8), ino: target.ino, type: target.attributes.type)]
            var rows: [[String]] = []
            var items: [JSON] = []
            for entry in entries {
                let a = try fs.getAttributes(ino: entry.ino)
                let name = String(decoding: entry.name, as: UTF8.self)
                items.append(attributesJSON(name, a))
                var shown = name
                if a.attributes.isSymlink, let target = try? fs.readSymlink(ino: entry.ino) { shown += " -> " + String(decoding: target, as: UTF8.self) }
                rows.append([modeString(a.attributes.mode), "\(a.attributes.nlink)", "\(a.attributes.uid)", "\(a.attributes.gid)", "\(a.attributes.size)", shown])
            }
            emit(arguments.device.json, .object([("path", .string(arguments.path)), ("entries", .array(items))])) {
                table(["MODE", "LINKS", "UID", "GID", "SIZE", "NAME"], rows)
            }
        }
    }
}

struct Stat: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "An inode's attributes.")
    @OptionGroup var arguments: PathArguments

    func run() {
        blobcli.run {
            let opened = try Opened(arguments.device.device, writable: false)
            defer { try? opened.close() }
            let fs = try opened.fileSystem()
            let a = try resolve(fs, arguments.path)
            emit(arguments.device.json, attributesJSON(arguments.path, a)) {
                let x = a.attributes
                return [
                    "path        \(arguments.path)",
                    "inode       \(a.ino) (blob \(a.ino - 1)), generation \(x.generation)",
                    "type        \(modeString(x.mode)) (\(String(x.mode, radix: 8)))",
                    "links       \(x.nlink)",
                    "uid/gid     \(x.uid)/\(x.gid)",
                    "size        \(x.size) bytes, \(a.allocatedBytes) allocated",
                    "atime       \(x.atimeNs) ns",
                    "mtime       \(x.mtimeNs) ns",
                    "ctime       \(x.ctimeNs) ns",
                ].joined(separator: "\n")
            }
        }
    }
}

/// Copies a regular file's bytes to `fd`.
func copyOut(_ fs: FileSystem, _ a: Attributes, to fd: Int32) throws {
    guard a.attributes.isRegular else { throw Failure("not a regular file", status: 1) }
    var offset: UInt64 = 0
    while offset < a.attributes.size {
        let chunk = try fs.read(ino: a.ino, offset: offset, count: 1 << 20)
        guard !chunk.isEmpty else { break }
        var written = 0
        while written < chunk.count {
            let result = chunk[written...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            guard result > 0 else { throw Failure("write: \(String(cString: strerror(errno)))") }
            written += result
        }
        offset += UInt64(chunk.count)
    }
}

struct Cat: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "A file's bytes on stdout.")
    @OptionGroup var arguments: PathArguments

    func run() {
        blobcli.run {
            let opened = try Opened(arguments.device.device, writable: false)
            defer { try? opened.close() }
            let fs = try opened.fileSystem()
            try copyOut(fs, try resolve(fs, arguments.path), to: 1)
        }
    }
}

struct Get: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Copy a file out of the file system to FILE.")
    @OptionGroup var device: DeviceArgument
    @Argument(help: "Path inside the file system.") var path: String
    @Argument(help: "Local file to write.") var file: String

    func run() {
        blobcli.run {
            let opened = try Opened(device.device, writable: false)
            defer { try? opened.close() }
            let fs = try opened.fileSystem()
            let a = try resolve(fs, path)
            let fd = Glibc.open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw Failure("\(file): \(String(cString: strerror(errno)))", status: 2) }
            defer { Glibc.close(fd) }
            try copyOut(fs, a, to: fd)
            if !device.json { print("\(path): \(a.attributes.size) bytes written to \(file)") }
        }
    }
}

struct Tree: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The whole tree (or from PATH).")
    @OptionGroup var arguments: PathArguments

    func run() {
        blobcli.run {
            let opened = try Opened(arguments.device.device, writable: false)
            defer { try? opened.close() }
            let fs = try opened.fileSystem()
            let root = try resolve(fs, arguments.path)
            var lines = [arguments.path]
            var counts = (directories: 0, files: 0)
            func walk(_ ino: UInt64, _ prefix: String) throws -> [JSON] {
                let entries = try listDirectory(fs, ino)
                var items: [JSON] = []
                for (index, entry) in entries.enumerated() {
                    let last = index == entries.count - 1
                    let name = String(decoding: entry.name, as: UTF8.self)
                    let a = try fs.getAttributes(ino: entry.ino)
                    lines.append(prefix + (last ? "└── " : "├── ") + name + (a.attributes.isDirectory ? "/" : ""))
                    if a.attributes.isDirectory {
                        counts.directories += 1
                        let children = try walk(entry.ino, prefix + (last ? "    " : "│   "))
                        items.append(.object([("name", .string(name)), ("ino", .uint(entry.ino)), ("children", .array(children))]))
                    } else {
                        counts.files += 1
                        items.append(.object([("name", .string(name)), ("ino", .uint(entry.ino)), ("size", .uint(a.attributes.size))]))
                    }
                }
                return items
            }
            let tree = root.attributes.isDirectory ? try walk(root.ino, "") : []
            emit(arguments.device.json, .object([("path", .string(arguments.path)), ("children", .array(tree))])) {
                (lines + ["\(counts.directories) directories, \(counts.files) files"]).joined(separator: "\n")
            }
        }
    }
}

BlobCLI.main()
