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

// The store: info, list, show, dump, import, xattr.

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
                    ("super_blob", store.superBlobID.map { .blob($0) } ?? .null),
                ])),
            ])
            emit(options.json, value) {
                """
                device          \(options.device)
                super block     slot \(opened.report.superBlockSlot), sequence \(block.sequence), version \(SuperBlock.version), \(block.isClean ? "clean" : "NOT clean (in use or crashed)")
                slots           \(slotsText(slots, current: opened.report.superBlockSlot))
                features        incompatible 0x\(String(block.incompatibleFeatures, radix: 16)), read-only data 0x\(String(block.readOnlyDataFeatures, radix: 16)), read-only metadata 0x\(String(block.readOnlyMetadataFeatures, radix: 16))
                size            \(formatBytes(block.devicePages * UInt64(SuperBlock.pageBytes))), \(block.blockSizeBytes)-byte blocks, \(formatBytes(clusterBytes)) clusters
                regions (pages) log \(block.log.startPage)+\(block.log.pageCount), table 2×\(block.table.pageCount) at \(block.table.startPage), bitmaps 2×\(block.bitmaps.pageCount) at \(block.bitmaps.startPage), metadata \(block.metadataPages.startPage)+\(block.metadataPages.pageCount), data from \(block.dataStartPage)\(block.hasArraysAfterData ? " (grown: table and bitmaps after the data)" : "")
                log             tail \(block.logTailSequence), head \(scan?.endSequence ?? 0), checkpoint LSN \(block.checkpointLSN); \(opened.report.replayedTransactions) committed transactions after the checkpoint\(opened.report.discardedRecords > 0 ? ", \(opened.report.discardedRecords) uncommitted records" : "")
                log stop        \(scan?.stop.map { "\($0)" } ?? "end of region")
                blobs           \(store.blobCount) of \(store.blobIDLimit) ids\(store.superBlobID.map { ", super blob \($0)" } ?? "")
                clusters        \(store.clusterCount - store.freeClusterCount) used, \(store.freeClusterCount) free of \(store.clusterCount) (\(formatBytes(store.freeClusterCount * clusterBytes)) free)
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
    static let configuration = CommandConfiguration(abstract: "Every blob: id, size, allocated clusters, xattrs, the snapshot it is a clone of.")
    @OptionGroup var options: DeviceArgument

    func run() {
        blobcli.run {
            let opened = try Opened(options.device, writable: false)
            defer { try? opened.close() }
            let store = opened.store
            try opened.readAllChains()
            let ids = store.blobIDList
            var progress = Progress("list", total: ids.count)
            var rows: [[String]] = []
            var items: [JSON] = []
            for (index, id) in ids.enumerated() {
                guard let blob = store.blob(id) else { continue }
                let size = blob.clusterCount * UInt64(store.clusterSizeBytes)
                let allocated = allocatedClusters(blob)
                if options.json {
                    items.append(.object([("id", .blob(id)), ("size_bytes", .uint(size)), ("clusters", .uint(blob.clusterCount)),
                                          ("allocated_clusters", .uint(allocated)), ("extents", .int(Int64(blob.extents.count))),
                                          ("xattrs", .array(blob.xattrs.map { .string($0.name) })),
                                          ("internal_xattrs", .int(Int64(blob.internalXattrs.count))),
                                          ("super_blob", .bool(store.superBlobID == id)),
                                          ("snapshot", .bool(blob.isSnapshot)), ("parent", blob.parent.map { .blob($0) } ?? .null),
                                          ("clones", .array(store.clones(of: id).map { .blob($0) }))]))
                } else {
                    let names = blob.xattrs.prefix(3).map(\.name).joined(separator: ",") + (blob.xattrs.count > 3 ? ",…" : "")
                    rows.append(["\(id)\(store.superBlobID == id ? "*" : "")\(blob.isSnapshot ? "s" : "")", formatBytes(size), "\(allocated)", "\(blob.extents.count)",
                                 "\(blob.xattrs.count)" + (names.isEmpty ? "" : " (\(names))"), "\(blob.internalXattrs.count)",
                                 blob.parent.map { "\($0)" } ?? "-"])
                }
                if index % 1024 == 0 { progress.update(index) }
            }
            progress.update(ids.count)
            emit(options.json, .object([("blobs", .array(items))])) {
                table(["ID", "SIZE", "ALLOCATED", "EXTENTS", "XATTRS", "INTERNAL", "PARENT"], rows)
                    + "\n\(ids.count) blobs (* super blob, s snapshot; PARENT: the snapshot a clone reads shared clusters from)"
            }
        }
    }
}

/// Blob `id`'s parents, nearest first: each with the clusters the one below reads from it
/// at most (the backed count) and its own allocated clusters.
func parentChain(_ store: BlobStore, _ id: BlobID) -> [(id: BlobID, backed: UInt64, allocated: UInt64)] {
    var chain: [(id: BlobID, backed: UInt64, allocated: UInt64)] = []
    var current = store.blob(id)
    while let blob = current, let parent = blob.parent, chain.count <= store.blobCount, let next = store.blob(parent) {
        chain.append((parent, blob.backedClusters, allocatedClusters(next)))
        current = next
    }
    return chain
}

struct Show: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "One blob: its metadata chain page by page, extents, xattrs, its chain of snapshots and clones.")
    @OptionGroup var options: DeviceArgument
    @Argument(help: "Blob id.") var id: BlobID

    func run() {
        blobcli.run {
            let opened = try Opened(options.device, writable: false)
            defer { try? opened.close() }
            let store = opened.store
            guard let blob = try opened.blob(id) else {
                throw Failure("no blob \(id) in \(options.device)", status: 2)
            }
            let pages = store.chainPages(id)
            let bad = pages.contains { $0.problem != nil }
            let value = JSON.object([
                ("id", .blob(id)), ("clusters", .uint(blob.clusterCount)),
                ("size_bytes", .uint(blob.clusterCount * UInt64(store.clusterSizeBytes))),
                ("allocated_clusters", .uint(allocatedClusters(blob))),
                ("changed_since_checkpoint", .bool(store.changedSinceCheckpoint(id))),
                ("snapshot", .bool(blob.isSnapshot)),
                ("parents", .array(parentChain(store, id).map { link in
                    .object([("id", .blob(link.id)), ("backed_clusters", .uint(link.backed)),
                             ("allocated_clusters", .uint(link.allocated))])
                })),
                ("clones", .array(store.clones(of: id).map { .blob($0) })),
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
                var text = "blob \(id): \(blob.clusterCount) clusters (\(formatBytes(blob.clusterCount * UInt64(store.clusterSizeBytes)))), \(allocatedClusters(blob)) allocated"
                if store.changedSinceCheckpoint(id) { text += "; changed by the log since the checkpoint (chain below is the checkpoint's)" }
                if blob.isSnapshot { text += "\nsnapshot: its data is read-only" }
                let chain = parentChain(store, id)
                if !chain.isEmpty {
                    text += "\nclone of: " + chain.map { "blob \($0.id) (\($0.backed) clusters backed, \($0.allocated) allocated)" }
                        .joined(separator: " <- ")
                }
                let clones = store.clones(of: id)
                if !clones.isEmpty { text += "\nclones: " + clones.map(String.init).joined(separator: ", ") }
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
    @Argument(help: "Blob id.") var id: BlobID
    @Argument(help: "Output file (- for stdout).") var file: String

    func run() {
        blobcli.run {
            let opened = try Opened(options.device, writable: false)
            defer { try? opened.close() }
            let store = opened.store
            guard let blob = try opened.blob(id) else {
                throw Failure("no blob \(id) in \(options.device)", status: 2)
            }
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
            if !options.json, file != "-" { print("blob \(id): \(formatBytes(blob.clusterCount * UInt64(store.clusterSizeBytes))) written to \(file)") }
            if options.json { print(JSON.object([("id", .blob(id)), ("bytes", .uint(blob.clusterCount * UInt64(store.clusterSizeBytes))), ("file", .string(file))]).render()) }
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
            emit(options.json, .object([("id", .blob(id)), ("bytes", .int(Int64(data.count)))])) { "\(id)" }
        }
    }
}

struct Xattr: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "get, set or rm a blob's xattr (set and rm write).")
    @OptionGroup var options: DeviceArgument
    @Argument(help: "get, set or rm.") var action: String
    @Argument(help: "Blob id.") var id: BlobID
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
                emit(options.json, .object([("id", .blob(id)), ("name", .string(name)), ("value", .string(xattrText(found)))])) { xattrText(found) }
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
