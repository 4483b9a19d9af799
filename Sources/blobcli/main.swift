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

/// A blob id on the command line: its number.
extension BlobID: ExpressibleByArgument {
    public init?(argument: String) {
        guard let raw = UInt64(argument) else { return nil }
        self.init(rawValue: raw)
    }
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

    /// Every blob's chain read (what walks them all: list, dump-md); one that cannot be
    /// read is the store not loading (exit 2), as before chains were read on first use.
    func readAllChains() throws {
        do { try store.readAllChains() } catch { throw Failure("\(device.text): \(error)", status: 2) }
    }

    /// The blob's metadata; a chain that cannot be read exits 2 naming it.
    func blob(_ id: BlobID) throws -> BlobMetadata? {
        if let blob = store.blob(id) { return blob }
        if let failure = store.chainReadFailure { throw Failure("\(device.text): \(failure)", status: 2) }
        return nil
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

BlobCLI.main()
