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

// Metadata pages and the log: dump-md, log, replay.

// MARK: - dump-md, log, replay

struct DumpMetadata: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "dump-md", abstract: "Every metadata page in use, decoded.")
    @OptionGroup var options: DeviceArgument

    func run() {
        blobcli.run {
            let opened = try Opened(options.device, writable: false)
            defer { try? opened.close() }
            let store = opened.store
            try opened.readAllChains()
            let owners = store.metadataPageOwners
            var progress = Progress("dump-md", total: owners.count)
            var rows: [[String]] = []
            var items: [JSON] = []
            var bad = 0
            for (index, (page, blob)) in owners.enumerated() {
                let inspected = store.inspectMetadataPage(page)
                if inspected.problem != nil { bad += 1 }
                if options.json {
                    items.append(.object([("page", .uint(UInt64(page))), ("offset", .uint(inspected.offset)), ("blob", .blob(blob)),
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
    case let .setSuperBlob(id): "super blob := \(id.map { "\($0)" } ?? "none")"
    case let .snapshot(id, snapshot): "snapshot blob \(id) as blob \(snapshot)"
    case let .setParent(id, parent, backed):
        parent.map { "blob \(id) := clone of \($0) (\(backed) clusters backed)" } ?? "blob \(id) := no parent"
    case let .mergeIntoChild(id, child): "merge snapshot \(id) into its clone \(child)"
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
