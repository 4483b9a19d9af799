#if canImport(Glibc)
import Glibc
#endif
import Bdev
import BlobFileSystem
import Env
import FuseFrontend
import Logging
import ToolSupport

/// What the control socket of one mount answers (docs/CONTROL.md has every field). It runs
/// on the control socket's threads; what it needs from the file system it takes in one
/// `Reactor.call` per answer (a copy made between two of the reactor's passes).
final class MountControl: @unchecked Sendable {
    let mountpoint: String
    let deviceText: String
    let deviceKind: String
    let bdev: Bdev
    let counting: CountingBdev?
    let service: FileSystemService
    let server: FuseServer
    let startedNs = MonotonicClock.nowNs()
    /// Set once the control server is bound (the status names it).
    var socketPath = ""
    /// Grows the device and the store (set by the mount: it knows the image file).
    var grow: (@Sendable (_ sizeBytes: UInt64?) throws -> String)?
    private let log = Log.logger("control")

    init(mountpoint: String, deviceText: String, deviceKind: String, bdev: Bdev, counting: CountingBdev?,
         service: FileSystemService, server: FuseServer) {
        self.mountpoint = mountpoint
        self.deviceText = deviceText
        self.deviceKind = deviceKind
        self.bdev = bdev
        self.counting = counting
        self.service = service
        self.server = server
    }

    var reactor: Reactor { service.blobService.reactor }

    func handle(_ request: ControlRequest, _ connection: ControlConnection) {
        let json = request.flags.contains("json")
        switch request.command {
        case "status":
            guard let sample = sample() else { return connection.fail("the file system is not mounted (yet or any more)") }
            let loads = connection.server.reactorLoads()
            let value = statusJSON(sample, loads)
            connection.answer(json ? value.render() + "\n" : statusText(value))
        case "stats":
            stats(request, connection, json: json)
        case "sync":
            let started = MonotonicClock.nowNs()
            let result: String? = reactor.call { [service] in
                do throws(FSError) { try service.syncNow() } catch { return "\(error)" }
                return nil
            }
            if let result { return connection.fail("sync: \(result)") }
            log.info("sync asked on the control socket: done in \(milliseconds(MonotonicClock.nowNs() - started)) ms")
            connection.answer("synced: attributes written back, device flushed, checkpoint written ("
                + "\(milliseconds(MonotonicClock.nowNs() - started)) ms)\n")
        case "checkpoint":
            let started = MonotonicClock.nowNs()
            let result: String? = reactor.call { [service] in
                do throws(FSError) { try service.checkpointNow() } catch { return "\(error)" }
                return nil
            }
            if let result { return connection.fail("checkpoint: \(result)") }
            log.info("checkpoint asked on the control socket: done in \(milliseconds(MonotonicClock.nowNs() - started)) ms")
            connection.answer("checkpoint written (\(milliseconds(MonotonicClock.nowNs() - started)) ms)\n")
        case "grow":
            guard let grow else { return connection.fail("this mount cannot grow") }
            var size: UInt64?
            if let text = request.values["size"] {
                guard let bytes = UInt64(text) else { return connection.fail("grow: bad size '\(text)'") }
                size = bytes
            }
            do { connection.answer(try grow(size) + "\n") } catch { connection.fail("grow: \(error)") }
        default:
            connection.fail("unknown command '\(request.command)' (status, stats, sync, checkpoint, grow)")
        }
    }

    // MARK: - Samples

    /// One moment of the mount: taken on the reactor, device counters beside it.
    struct Sample: Sendable {
        var atNs: UInt64
        var fileSystem: FileSystemService.Status
        var frontEnd: FuseServer.Snapshot?
        var device: CountingBdev.Totals?
        var capacityBytes: UInt64
        var blockBytes: Int
    }

    func sample() -> Sample? {
        let (status, frontEnd) = reactor.call { [service, server] in (service.statusOnReactor(), server.snapshotOnReactor()) }
        guard let status else { return nil }
        let geometry = bdev.geometry
        return Sample(atNs: MonotonicClock.nowNs(), fileSystem: status, frontEnd: frontEnd, device: counting?.totals,
                      capacityBytes: geometry.capacityBytes, blockBytes: geometry.blockSizeBytes)
    }

    // MARK: - status

    private func statusJSON(_ sample: Sample, _ loads: (now: [Reactor.Load], earlier: [Reactor.Load])) -> JSON {
        let fs = sample.fileSystem
        let now = sample.atNs
        func ago(_ ns: UInt64) -> JSON { ns == 0 ? .null : .double(seconds(now &- ns)) }
        let wallNow = realtimeSeconds()
        func wall(_ ns: UInt64) -> JSON { ns == 0 ? .null : .double(wallNow - seconds(now &- ns)) }
        let front = sample.frontEnd
        let reactors: [JSON] = loads.now.enumerated().map { index, load in
            let earlier = index < loads.earlier.count && loads.earlier[index].name == load.name ? loads.earlier[index] : nil
            return .object([
                ("name", .string(load.name)), ("cpu", load.cpu.map { .int(Int64($0)) } ?? .null),
                ("polling", .string(load.polling == .spin ? "spin" : "interrupt")),
                ("busy_share_recent", .double(load.busyShare(since: earlier))),
                ("busy_share_total", .double(load.busyShare())),
                ("busy_seconds", .double(seconds(load.busyNs))), ("slept_seconds", .double(seconds(load.sleptNs))),
                ("passes", .uint(load.passes)), ("sleeps", .uint(load.sleeps)),
            ])
        }
        let errorsAnswered = front?.errors ?? []
        func answered(_ code: Int32) -> UInt64 { errorsAnswered.first { $0.errno == code }?.count ?? 0 }
        let dataBytes = fs.clusters * fs.clusterBytes
        let freeBytes = fs.freeClusters * fs.clusterBytes
        let device: JSON = .object([
            ("spec", .string(deviceText)), ("kind", .string(deviceKind)), ("name", .string(bdev.name)),
            ("capacity_bytes", .uint(sample.capacityBytes)), ("block_bytes", .int(Int64(sample.blockBytes))),
            ("store_bytes", .uint(fs.storeBytes)),
        ])
        var transportMembers: [(String, JSON)] = []
        transportMembers.append(("kind", front.map { .string($0.transport) } ?? .null))
        transportMembers.append(("queues", front.map { .int(Int64($0.queues)) } ?? .null))
        transportMembers.append(("entries_per_queue", front.map { .int(Int64($0.entriesPerQueue)) } ?? .null))
        transportMembers.append(("description", .string(front?.description ?? "")))
        transportMembers.append(("protocol_minor", front.map { .uint(UInt64($0.kernelMinor)) } ?? .null))
        transportMembers.append(("writeback_cache", .bool(front?.writebackCache ?? false)))
        transportMembers.append(("max_write_bytes", front.map { .int(Int64($0.maxWriteBytes)) } ?? .null))
        transportMembers.append(("statistics", .bool(front?.statisticsKept ?? false)))
        let metadataPages: JSON = .object([
            ("region", .uint(fs.metadataRegionPages)),
            ("region_used", .uint(fs.metadataRegionPages - fs.metadataRegionFreePages)),
            ("in_clusters", .uint(fs.metadataPagesInClusters)),
        ])
        let logFill = fs.logPages == 0 ? 0 : Double(fs.logPagesInUse) / Double(fs.logPages)
        let log: JSON = .object([("pages", .uint(fs.logPages)), ("pages_in_use", .uint(fs.logPagesInUse)), ("fill", .double(logFill))])
        let inodes: JSON = .object([("limit", .uint(fs.blobIDLimit)), ("used", .uint(fs.blobs))])
        let space: JSON = .object([
            ("cluster_bytes", .uint(fs.clusterBytes)), ("clusters", .uint(fs.clusters)),
            ("free_clusters", .uint(fs.freeClusters)),
            ("data_bytes", .uint(dataBytes)), ("used_data_bytes", .uint(dataBytes - min(dataBytes, freeBytes))),
            ("available_bytes", .uint(fs.freeBytesForWriting)),
            ("writeback_reserve_bytes", .uint(fs.writebackReserveBytes)),
            ("metadata_pages", metadataPages), ("log", log), ("inodes", inodes),
        ])
        let checkpoint: JSON = .object([
            ("sequence", .uint(fs.checkpointSequence)), ("seconds_ago", ago(fs.lastCheckpointNs)),
            ("unix_time", wall(fs.lastCheckpointNs)), ("since_mount", .uint(fs.checkpoints)),
        ])
        let flush: JSON = .object([
            ("seconds_ago", ago(fs.lastFlushNs)), ("unix_time", wall(fs.lastFlushNs)),
            ("since_mount", .uint(fs.flushes)), ("failed", .uint(fs.flushFailures)),
        ])
        var errorMembers: [(String, JSON)] = []
        errorMembers.append(("read_only_reason", fs.readOnlyReason.map { .string($0) } ?? .null))
        errorMembers.append(("device_errors", .uint(fs.deviceErrors)))
        errorMembers.append(("flush_failures", .uint(fs.flushFailures)))
        errorMembers.append(("eio_answers", .uint(answered(EIO))))
        errorMembers.append(("erofs_answers", .uint(answered(EROFS))))
        errorMembers.append(("enospc_answers", .uint(answered(ENOSPC))))
        errorMembers.append(("requests_held", .int(Int64(front?.requestsHeld ?? 0))))
        errorMembers.append(("double_answers", .int(Int64(front?.doubleAnswers ?? 0))))
        var members: [(String, JSON)] = []
        members.append(("version", .int(1)))
        members.append(("mountpoint", .string(mountpoint)))
        members.append(("pid", .int(Int64(getpid()))))
        members.append(("uptime_seconds", .double(seconds(now &- startedNs))))
        members.append(("control_socket", .string(socketPath)))
        members.append(("device", device))
        members.append(("transport", .object(transportMembers)))
        members.append(("reactors", .array(reactors)))
        members.append(("space", space))
        members.append(("dirty_inodes", .int(Int64(fs.dirtyInodes))))
        members.append(("cached_inodes", .int(Int64(fs.cachedInodes))))
        members.append(("metadata_cache", .object([("blobs", .int(Int64(fs.metadataCached))),
                                                   ("limit", .int(Int64(fs.metadataCacheLimit))),
                                                   ("evictions", .uint(fs.metadataEvictions))])))
        members.append(("open_files", .int(Int64(fs.openFiles))))
        members.append(("unflushed_commits", .bool(fs.unflushedCommits)))
        members.append(("last_checkpoint", checkpoint))
        members.append(("last_flush", flush))
        members.append(("errors", .object(errorMembers)))
        members.append(("read_only", .bool(fs.readOnly)))
        return .object(members)
    }

    private func statusText(_ value: JSON) -> String {
        let v = JSONLookup(value)
        var lines: [(String, String)] = []
        lines.append(("mount", "\(v["mountpoint"].string) (daemon pid \(v["pid"].int), up \(fixed(v["uptime_seconds"].double, 1)) s; control socket \(v["control_socket"].string))"))
        let device = v["device"]
        lines.append(("device", "\(device["spec"].string) (\(device["kind"].string)), \(formatBytes(device["capacity_bytes"].uint)), "
            + "\(device["block_bytes"].int)-byte blocks; the store covers \(formatBytes(device["store_bytes"].uint))"))
        let transport = v["transport"]
        lines.append(("transport", transport["description"].string.isEmpty ? "not initialized yet"
            : transport["description"].string + "; protocol 7.\(transport["protocol_minor"].int)"
            + (transport["writeback_cache"].bool ? "; writeback cache" : "")
            + "; max write \(formatBytes(UInt64(transport["max_write_bytes"].int)))"
            + (transport["statistics"].bool ? "" : "; statistics off (no_stats)")))
        for (index, reactor) in v["reactors"].array.enumerated() {
            lines.append((index == 0 ? "reactors" : "", "\(reactor["name"].string): busy \(percent(reactor["busy_share_recent"].double)) "
                + "in the last second, \(percent(reactor["busy_share_total"].double)) since start (\(reactor["polling"].string)"
                + (reactor["cpu"].isNull ? "" : ", CPU \(reactor["cpu"].int)") + ")"))
        }
        let space = v["space"]
        lines.append(("space", "data \(formatBytes(space["used_data_bytes"].uint)) used of \(formatBytes(space["data_bytes"].uint)) "
            + "(\(formatBytes(space["available_bytes"].uint)) available; \(formatBytes(space["writeback_reserve_bytes"].uint)) held for the writeback cache)"))
        let pages = space["metadata_pages"]
        lines.append(("", "metadata pages: \(pages["region_used"].uint) of \(pages["region"].uint) in the region, \(pages["in_clusters"].uint) in data clusters"))
        let log = space["log"]
        lines.append(("", "log: \(log["pages_in_use"].uint) of \(log["pages"].uint) pages in use (\(percent(log["fill"].double)))"))
        lines.append(("", "inodes: \(space["inodes"]["used"].uint) of \(space["inodes"]["limit"].uint)"))
        let cache = v["metadata_cache"]
        lines.append(("", "metadata cache: \(cache["blobs"].int) blobs in memory"
            + (cache["limit"].int == 0 ? " (no limit)" : " of at most \(cache["limit"].int)") + ", \(cache["evictions"].uint) let go"))
        lines.append(("dirty", "\(v["dirty_inodes"].int) inodes with attributes only in memory (of \(v["cached_inodes"].int) cached); "
            + "\(v["open_files"].int) open files; " + (v["unflushed_commits"].bool ? "commits waiting for a flush" : "every commit flushed")))
        let checkpoint = v["last_checkpoint"]
        lines.append(("checkpoint", "sequence \(checkpoint["sequence"].uint), "
            + (checkpoint["seconds_ago"].isNull ? "none since mount" : "\(fixed(checkpoint["seconds_ago"].double, 1)) s ago")
            + " (\(checkpoint["since_mount"].uint) since mount)"))
        let flush = v["last_flush"]
        lines.append(("flush", (flush["seconds_ago"].isNull ? "none yet" : "\(fixed(flush["seconds_ago"].double, 1)) s ago")
            + " (\(flush["since_mount"].uint) since mount, \(flush["failed"].uint) failed)"))
        let errors = v["errors"]
        var seen: [String] = []
        for (key, label) in [("device_errors", "device errors"), ("flush_failures", "failed flushes"), ("eio_answers", "EIO answers"),
                             ("erofs_answers", "EROFS answers"), ("enospc_answers", "ENOSPC answers"),
                             ("double_answers", "double answers")] where errors[key].uint > 0 {
            seen.append("\(errors[key].uint) \(label)")
        }
        seen.append("\(errors["requests_held"].int) requests held now")
        lines.append(("errors", seen.joined(separator: ", ")))
        lines.append(("state", v["read_only"].bool ? "READ-ONLY: \(errors["read_only_reason"].isNull ? "loaded read-only" : errors["read_only_reason"].string)" : "read-write"))
        return lines.map { $0.0.padding(12) + $0.1 }.joined(separator: "\n") + "\n"
    }

    // MARK: - stats

    private func stats(_ request: ControlRequest, _ connection: ControlConnection, json: Bool) {
        guard let first = sample() else { return connection.fail("the file system is not mounted (yet or any more)") }
        guard let intervalText = request.values["interval"] else {
            connection.answer(json ? statsJSON(first, since: nil).render() + "\n" : statsText(first, since: nil))
            return
        }
        guard let interval = Double(intervalText), interval >= 0.1, interval <= 3600 else {
            return connection.fail("stats: --interval must be 0.1 to 3600 seconds")
        }
        let count = request.values["count"].flatMap { Int($0) } ?? 0
        var previous = first
        var sent = 0
        while count == 0 || sent < count {
            // Sleep in short steps: a stopping daemon or a client gone ends the stream soon.
            let until = MonotonicClock.nowNs() + UInt64(interval * 1e9)
            while MonotonicClock.nowNs() < until {
                if connection.server.isStopping || connection.peerClosed { return }
                usleep(UInt32(min(50_000, (until - min(until, MonotonicClock.nowNs())) / 1000 + 1)))
            }
            guard let next = sample() else { return connection.fail("the file system was unmounted") }
            let text = json ? statsJSON(next, since: previous).render(compact: true) + "\n" : statsText(next, since: previous, header: sent % 20 == 0)
            guard connection.answer(text) else { return }
            previous = next
            sent += 1
        }
    }

    private func statsJSON(_ sample: Sample, since earlier: Sample?) -> JSON {
        let elapsedNs = sample.atNs &- (earlier?.atNs ?? startedNs)
        let operations: [JSON] = (sample.frontEnd?.operations ?? []).compactMap { operation in
            let before = earlier?.frontEnd?.operations.first { $0.opcode == operation.opcode }
            let answers = before.map { operation.answers.since($0.answers) } ?? operation.answers
            let received = operation.received &- (before?.received ?? 0)
            if earlier != nil && received == 0 && answers.total == 0 { return nil }
            return .object([
                ("op", .string(operation.name)), ("opcode", .uint(UInt64(operation.opcode))),
                ("received", .uint(received)), ("answered", .uint(answers.total)), ("errors", .uint(answers.errors)),
                ("bytes", .uint(answers.bytes)),
                ("latency_us", .object([
                    ("mean", .double(answers.meanNs / 1000)), ("p50", .double(Double(answers.percentileNs(0.5)) / 1000)),
                    ("p90", .double(Double(answers.percentileNs(0.9)) / 1000)),
                    ("p99", .double(Double(answers.percentileNs(0.99)) / 1000)),
                    ("p999", .double(Double(answers.percentileNs(0.999)) / 1000)),
                    ("max", .double(Double(answers.maxNs) / 1000)),
                ])),
            ])
        }
        var device: JSON = .null
        if let totals = sample.device {
            let before = earlier?.device ?? CountingBdev.Totals()
            device = .object([
                ("reads", .uint(totals.reads &- before.reads)), ("read_bytes", .uint(totals.readBytes &- before.readBytes)),
                ("writes", .uint(totals.writes &- before.writes)), ("write_bytes", .uint(totals.writeBytes &- before.writeBytes)),
                ("flushes", .uint(totals.flushes &- before.flushes)), ("write_zeroes_and_unmaps", .uint(totals.others &- before.others)),
            ])
        }
        let errors: [JSON] = (sample.frontEnd?.errors ?? []).compactMap { entry in
            let before = earlier?.frontEnd?.errors.first { $0.errno == entry.errno }?.count ?? 0
            guard entry.count > before else { return nil }
            return .object([("errno", .int(Int64(entry.errno))), ("name", .string(errnoName(entry.errno))),
                            ("count", .uint(entry.count - before))])
        }
        return .object([
            ("version", .int(1)), ("mountpoint", .string(mountpoint)),
            ("interval", .bool(earlier != nil)), ("seconds", .double(seconds(elapsedNs))),
            ("unix_time", .double(realtimeSeconds())),
            ("statistics", .bool(sample.frontEnd?.statisticsKept ?? false)),
            ("operations", .array(operations)), ("errors_by_errno", .array(errors)), ("device", device),
        ])
    }

    private func statsText(_ sample: Sample, since earlier: Sample?, header: Bool = true) -> String {
        let v = JSONLookup(statsJSON(sample, since: earlier))
        let seconds = max(v["seconds"].double, 1e-9)
        var out = ""
        if earlier == nil {
            out += "FUSE operations since mount (\(fixed(seconds, 1)) s); latency from receipt to answer, µs"
            out += v["statistics"].bool ? "\n" : " (not kept: mounted with no_stats)\n"
            var rows: [[String]] = []
            for operation in v["operations"].array {
                let latency = operation["latency_us"]
                rows.append([operation["op"].string, "\(operation["answered"].uint)", "\(operation["errors"].uint)",
                             formatBytes(operation["bytes"].uint), fixed(latency["mean"].double, 1), fixed(latency["p50"].double, 1),
                             fixed(latency["p90"].double, 1), fixed(latency["p99"].double, 1), fixed(latency["p999"].double, 1),
                             fixed(latency["max"].double, 1)])
            }
            out += table(["operation", "count", "errors", "bytes", "mean", "p50", "p90", "p99", "p99.9", "max"], rows) + "\n"
        } else {
            var rows: [[String]] = []
            for operation in v["operations"].array {
                let latency = operation["latency_us"]
                rows.append([operation["op"].string, fixed(Double(operation["answered"].uint) / seconds, 0),
                             fixed(Double(operation["bytes"].uint) / seconds / 1_048_576, 1),
                             fixed(Double(operation["errors"].uint) / seconds, 0), fixed(latency["p50"].double, 1),
                             fixed(latency["p99"].double, 1)])
            }
            out += "-- \(clockTime()) over \(fixed(seconds, 2)) s\n"
            out += rows.isEmpty ? "(no FUSE requests)\n" : table(["operation", "ops/s", "MiB/s", "errors/s", "p50 µs", "p99 µs"], rows) + "\n"
        }
        let device = v["device"]
        if !device.isNull {
            if earlier == nil {
                out += "device: \(device["reads"].uint) reads (\(formatBytes(device["read_bytes"].uint))), \(device["writes"].uint) writes "
                    + "(\(formatBytes(device["write_bytes"].uint))), \(device["flushes"].uint) flushes, "
                    + "\(device["write_zeroes_and_unmaps"].uint) write-zeroes and unmaps\n"
            } else {
                out += "device: \(fixed(Double(device["reads"].uint) / seconds, 0)) reads/s (\(fixed(Double(device["read_bytes"].uint) / seconds / 1_048_576, 1)) MiB/s), "
                    + "\(fixed(Double(device["writes"].uint) / seconds, 0)) writes/s (\(fixed(Double(device["write_bytes"].uint) / seconds / 1_048_576, 1)) MiB/s), "
                    + "\(fixed(Double(device["flushes"].uint) / seconds, 1)) flushes/s\n"
            }
        }
        let errors = v["errors_by_errno"].array
        if !errors.isEmpty {
            out += "errors answered: " + errors.map { "\($0["name"].string) \($0["count"].uint)" }.joined(separator: ", ") + "\n"
        }
        return out
    }
}

// MARK: - Helpers

func seconds(_ ns: UInt64) -> Double { Double(ns) / 1e9 }
func milliseconds(_ ns: UInt64) -> String { fixed(Double(ns) / 1e6, 1) }
func percent(_ share: Double) -> String { fixed(share * 100, 1) + " %" }

func realtimeSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// HH:MM:SS, local time.
func clockTime() -> String {
    var now = time(nil)
    var parts = tm()
    localtime_r(&now, &parts)
    func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
    return "\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec))"
}

/// The symbolic name of the errnos a file system answers with.
func errnoName(_ code: Int32) -> String {
    let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", EIO: "EIO", E2BIG: "E2BIG", EBADF: "EBADF", EAGAIN: "EAGAIN", ENOMEM: "ENOMEM",
        EACCES: "EACCES", EBUSY: "EBUSY", EEXIST: "EEXIST", EXDEV: "EXDEV", ENOTDIR: "ENOTDIR", EISDIR: "EISDIR",
        EINVAL: "EINVAL", EFBIG: "EFBIG", ENOSPC: "ENOSPC", EROFS: "EROFS", EMLINK: "EMLINK", ERANGE: "ERANGE",
        ENAMETOOLONG: "ENAMETOOLONG", ENOSYS: "ENOSYS", ENOTEMPTY: "ENOTEMPTY", ENODATA: "ENODATA", ENOTTY: "ENOTTY",
        EOPNOTSUPP: "EOPNOTSUPP", EPROTO: "EPROTO", EOVERFLOW: "EOVERFLOW", EINTR: "EINTR", ETIMEDOUT: "ETIMEDOUT",
    ]
    return names[code] ?? "errno \(code)"
}

extension String {
    func padding(_ width: Int) -> String { count >= width ? self + " " : self + String(repeating: " ", count: width - count) }
}

/// Read access into a `JSON` value for the text renderings (missing keys read as null).
struct JSONLookup {
    let value: JSON
    init(_ value: JSON) { self.value = value }

    subscript(key: String) -> JSONLookup {
        if case let .object(members) = value, let member = members.first(where: { $0.0 == key }) { return JSONLookup(member.1) }
        return JSONLookup(.null)
    }

    var isNull: Bool { if case .null = value { return true } else { return false } }
    var string: String { if case let .string(text) = value { return text } else { return "" } }
    var bool: Bool { if case let .bool(flag) = value { return flag } else { return false } }
    var array: [JSONLookup] { if case let .array(items) = value { return items.map(JSONLookup.init) } else { return [] } }
    var uint: UInt64 {
        switch value {
        case let .uint(number): number
        case let .int(number): UInt64(max(0, number))
        default: 0
        }
    }
    var int: Int64 {
        switch value {
        case let .int(number): number
        case let .uint(number): Int64(clamping: number)
        default: 0
        }
    }
    var double: Double {
        switch value {
        case let .double(number): number
        case let .int(number): Double(number)
        case let .uint(number): Double(number)
        default: 0
        }
    }
}
