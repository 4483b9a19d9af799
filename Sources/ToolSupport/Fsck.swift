#if canImport(Glibc)
import Glibc
#endif
import Bdev
import BlobFileSystem
import Blobstore
import Env

/// `fsck` as both tools run it (`blobcli fsck`, `blobfs fsck`): the blob-store verifier on
/// the device as it is and the file-system walk on the replayed state, then with
/// `--repair` the one repair (`StoreRepair` with `FileSystem.repair` above it), every
/// change listed, and the check again. docs/BLOBCLI.md describes the output.
public enum Fsck {
    public struct Request {
        public var repair = false
        /// With `repair`: list the changes, write nothing.
        public var dryRun = false
        public var undoPath: String?
        public var json = false
        /// The command's name in the summary line ("blobcli", "blobfs").
        public var tool: String
        public init(tool: String, repair: Bool = false, dryRun: Bool = false, undoPath: String? = nil, json: Bool = false) {
            self.tool = tool
            self.repair = repair
            self.dryRun = dryRun
            self.undoPath = undoPath
            self.json = json
        }
    }

    /// What a check found: the verifier's problems and the file system's, prefixed.
    public struct Verification: Sendable {
        public var problems: [String]
        public var blobs: Int
        public var clusters: UInt64
        public var pendingTransactions: Int
        public var fileSystem: FileSystemCheckReport?
        public var clean: Bool { problems.isEmpty }
    }

    /// The verifier on the device as it is, then the file-system walk on the state a
    /// read-only load replays (when the store loads and holds a file system).
    public static func check(_ io: BdevSyncIO) -> Verification {
        let verifying = Ticker("fsck: verifying the blob store (page CRCs, chains, cluster owners, bitmaps)")
        let report = Verifier.verify(io)
        verifying.finish()
        var verification = Verification(problems: report.problems, blobs: report.blobCount, clusters: report.clustersInUse,
                                         pendingTransactions: report.pendingTransactions)
        let loading = Ticker("fsck: loading the store for the file-system walk")
        let loaded = try? BlobStore.load(io, readOnly: true)
        loading.finish()
        if let (store, _) = loaded, store.superBlobID == .rootDirectory {
            let walking = Ticker("fsck: walking the file system (directories, links, orphans)")
            defer { walking.finish() }
            let fs = FileSystem.check(store)
            if fs.directories > 0 || !fs.problems.isEmpty {
                verification.fileSystem = fs
                verification.problems += fs.problems.map { "file system: \($0)" }
            }
        }
        return verification
    }

    /// The repair: the blob store's, with the file system's above it when the store held
    /// one before the damage (its super block named blob 0).
    public static func repair(_ io: BdevSyncIO, dryRun: Bool = false, undoPath: String? = nil) -> RepairReport {
        let superBlob = (try? SuperBlockSlots.read(io))?.current?.block.superBlobID
        let options = RepairOptions(dryRun: dryRun, undoPath: undoPath, force: true) { store, salvage in
            let fileSystem = try FileSystem.repair(store, expectFileSystem: superBlob == .rootDirectory || salvage.superBlobBefore == .rootDirectory)
            return (fileSystem.changes, fileSystem.affectedBlobs)
        }
        let repairing = Ticker(dryRun ? "fsck: working out the repair (nothing is written)" : "fsck: repairing")
        defer { repairing.finish() }
        return StoreRepair.repair(io, options: options)
    }

    /// Runs the command on `device` and returns its exit status: 0 clean (or repaired),
    /// 1 problems remain, 2 the store cannot be read or repaired at all (nothing written).
    public static func run(_ device: Device, _ request: Request) throws -> Int32 {
        if let undoPath = request.undoPath {
            var info = stat()
            guard stat(undoPath, &info) != 0 else {
                throw Failure("--undo \(undoPath): the file exists (an undo file is never overwritten); nothing was written", status: 2)
            }
        }
        let lock = try device.lock()
        defer { if let lock { close(lock) } }
        let bdev = try device.open()
        defer { bdev.close() }
        let io: BdevSyncIO
        do { io = try BdevSyncIO(bdev: bdev, reactor: try Reactor()) } catch { throw Failure("\(device.text): \(error)", status: 2) }
        defer { io.close() }
        let before = check(io)
        // Nothing to check without a super block: unreadable input, as for every command.
        if let slots = try? SuperBlockSlots.read(io), slots.current == nil,
           case let .failure(first) = slots.slots[0], case let .failure(second) = slots.slots[1] {
            throw Failure("\(device.text): no valid super block: slot 0: \(first); slot 1: \(second)"
                + (request.repair ? "; not repairable, nothing was written" : ""), status: 2)
        }
        var report: RepairReport?
        var after: Verification?
        if request.repair && !before.clean {
            let repaired = repair(io, dryRun: request.dryRun, undoPath: request.undoPath.map(Device.absolute))
            if repaired.outcome == .notRepairable {
                let why = repaired.refusal.map { "\($0)" } ?? "refused"
                throw Failure("repair: \(why); not repairable, nothing was written", status: 2)
            }
            report = repaired
            if !request.dryRun { after = check(io) }
        }
        let final = after ?? before
        if request.json {
            print(json(before: before, after: after, report: report).render())
        } else {
            print(text(before: before, after: after, report: report, tool: request.tool, device: device.text))
        }
        if report?.outcome == .incomplete, let refusal = report?.refusal {
            fail(Failure("repair stopped: \(refusal)" + (report?.undoPath.map { "; \($0) holds what it overwrote" } ?? "")), tool: request.tool)
        }
        return final.clean ? 0 : 1
    }

    // MARK: - Output

    static func text(before: Verification, after: Verification?, report: RepairReport?, tool: String, device: String) -> String {
        var lines = before.problems.map { "problem: \($0)" }
        if before.clean, before.pendingTransactions > 0 {
            lines.append("note: not cleanly unmounted: \(before.pendingTransactions) committed transactions after the checkpoint (a mount replays them)")
        }
        if let report {
            let prefix = report.dryRun ? "would change" : "changed"
            lines += changeLines(report).map { "\(prefix): \($0)" }
            if let after {
                lines += before.problems.filter { !after.problems.contains($0) }.map { "repaired: \($0)" }
                lines += after.problems.map { "still: \($0)" }
            }
            if let path = report.undoPath {
                lines.append("undo: \(path) holds the old contents of the \(report.undoPageCount) pages the repair overwrote (blobcli undo \(path) \(device) puts them back)")
            }
        }
        let final = after ?? before
        let fs = final.fileSystem.map {
            ", \($0.directories) directories, \($0.files) files, \($0.orphans) orphans"
                + ($0.foreignBlobs > 0 ? ", \($0.foreignBlobs) blobs outside the file system" : "")
        } ?? ""
        let verdict: String
        if report?.dryRun == true {
            verdict = "\(final.problems.count) problems; a repair would make the \(report!.changes.count + report!.bitmapChanges.count) changes listed (dry run: nothing written)"
        } else if final.clean {
            verdict = after != nil ? "repaired, now clean" : "clean"
        } else {
            verdict = "\(final.problems.count) problems"
        }
        lines.append("\(tool) fsck: \(final.blobs) blobs, \(final.clusters) clusters in use\(fs); \(verdict)")
        return lines.joined(separator: "\n")
    }

    /// What the repair wrote (or would), one line per change; bitmap bits by index.
    static func changeLines(_ report: RepairReport) -> [String] {
        var lines = report.rewrittenSuperBlockSlots.map { "rewrote super block slot \($0.slot) (it did not decode: \($0.problem))" }
        lines += report.changes.map(\.text)
        if report.bitmapsWereUnreadable {
            lines.append("rewrote the allocation bitmaps whole (the old ones did not decode: no bit-by-bit list)")
        }
        // With replayed transactions or removed blobs a changed bit is not all damage.
        let fromDamage = report.replayedTransactions == 0 && report.changes.isEmpty
        for change in report.bitmapChanges {
            if change.freedCount > 0 {
                lines.append("freed \(change.freedCount) \(fromDamage ? "leaked " : "")\(noun(change.section, change.freedCount)): "
                             + indexList(change.freed, total: change.freedCount))
            }
            if change.markedCount > 0 {
                lines.append("marked \(change.markedCount) \(noun(change.section, change.markedCount)) used"
                             + (fromDamage ? " (in use, free in the old bitmap)" : "") + ": " + indexList(change.marked, total: change.markedCount))
            }
        }
        if lines.isEmpty { lines.append("rewrote the checkpoint (no bitmap bit changed)") }
        return lines
    }

    static func noun(_ section: BitmapChange.Section, _ count: UInt64) -> String {
        section.rawValue + (count == 1 ? "" : "s")
    }

    static func indexList(_ listed: [UInt64], total: UInt64) -> String {
        listed.map(String.init).joined(separator: ", ") + (total > UInt64(listed.count) ? ", … (first \(listed.count) of \(total))" : "")
    }

    static func json(before: Verification, after: Verification?, report: RepairReport?) -> JSON {
        let final = after ?? before
        return .object([
            ("clean", .bool(final.clean)),
            ("problems", .array(before.problems.map { .string($0) })),
            ("repaired", .bool(after != nil)),
            ("problems_after_repair", after.map { .array($0.problems.map { .string($0) }) } ?? .null),
            ("repair_changes", report.map(changesJSON) ?? .null),
            ("blobs", .int(Int64(final.blobs))), ("clusters_in_use", .uint(final.clusters)),
            ("pending_transactions", .int(Int64(before.pendingTransactions))),
            ("file_system", final.fileSystem.map { .object([("directories", .int(Int64($0.directories))),
                                                           ("files", .int(Int64($0.files))), ("orphans", .int(Int64($0.orphans)))]) } ?? .null),
        ])
    }

    static func changesJSON(_ report: RepairReport) -> JSON {
        .object([
            ("outcome", .string(report.outcome.rawValue)),
            ("dry_run", .bool(report.dryRun)),
            ("replayed_transactions", .int(Int64(report.replayedTransactions))),
            ("discarded_records", .int(Int64(report.discardedRecords))),
            ("replay_end_lsn", .uint(report.replayEndLSN)),
            ("super_block_slots_rewritten", .array(report.rewrittenSuperBlockSlots.map {
                .object([("slot", .int(Int64($0.slot))), ("problem", .string("\($0.problem)"))])
            })),
            ("bitmaps_rewritten_whole", .bool(report.bitmapsWereUnreadable)),
            ("bitmaps", .array(report.bitmapChanges.map { change in
                let name = switch change.section {
                case .clusters: "clusters"
                case .metadataPages: "metadata_pages"
                case .blobIDs: "blob_ids"
                }
                return .object([("bitmap", .string(name)),
                                ("freed_count", .uint(change.freedCount)), ("freed", .array(change.freed.map { .uint($0) })),
                                ("marked_count", .uint(change.markedCount)), ("marked", .array(change.marked.map { .uint($0) }))])
            })),
            ("changes", .array(report.changes.map { change in
                .object([("kind", .string(change.kind)), ("blob", change.blob.map { .blob($0) } ?? .null),
                         ("ino", change.blob.map { .ino(InodeNumber(blob: $0)) } ?? .null), ("text", .string(change.text))])
            })),
            ("removed_blobs", .array(report.removedBlobs.sorted().map { .blob($0) })),
            ("affected_blobs", .array(report.affectedBlobs.sorted().map { .blob($0) })),
            ("cleared_log_pages", .array(report.clearedLogPages.map { .uint($0) })),
            ("undo_file", report.undoPath.map { .object([("path", .string($0)), ("pages", .int(Int64(report.undoPageCount)))]) } ?? .null),
        ])
    }

    // MARK: - Undo

    /// `blobcli undo FILE DEVICE`: writes the undo file's pages back (after checking it
    /// whole and that it belongs to the device). Exit 0 restored, 2 refused (nothing written).
    public static func undo(path: String, device: Device, force: Bool, dryRun: Bool, json: Bool) throws -> Int32 {
        let contents: UndoFile.Contents
        do { contents = try UndoFile.read(path: path) } catch { throw Failure("\(error); nothing was written", status: 2) }
        let lock = try device.lock()
        defer { if let lock { close(lock) } }
        let bdev = try device.open(blockSize: Int(contents.header.blockBytes))
        defer { bdev.close() }
        let io: BdevSyncIO
        do { io = try BdevSyncIO(bdev: bdev, reactor: try Reactor()) } catch { throw Failure("\(device.text): \(error)", status: 2) }
        defer { io.close() }
        let report: UndoFile.ApplyReport
        do { report = try UndoFile.apply(contents, to: io, force: force, dryRun: dryRun) } catch {
            throw Failure("\(error); nothing was written", status: 2)
        }
        let pages = report.restoredPages
        if json {
            print(JSON.object([
                ("file", .string(path)), ("dry_run", .bool(dryRun)), ("complete", .bool(report.wasComplete)),
                ("torn_tail", .bool(report.tornTail)), ("restored_pages", .int(Int64(pages.count))),
                ("pages", .array(pages.map { .uint($0) })),
            ]).render())
        } else {
            var lines: [String] = []
            if !report.wasComplete {
                lines.append("note: the repair that wrote \(path) did not finish" + (report.tornTail ? " (its last entry was cut short and is skipped: that page was never overwritten)" : ""))
            }
            let listed = pages.prefix(32).map(String.init).joined(separator: ", ") + (pages.count > 32 ? ", …" : "")
            lines.append((dryRun ? "would restore" : "restored") + " \(pages.count) pages of \(device.text) from \(path)" + (pages.isEmpty ? "" : ": \(listed)"))
            print(lines.joined(separator: "\n"))
        }
        return 0
    }
}
