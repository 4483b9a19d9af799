#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Bdev
import Blobstore
import DeviceSpec

/// Exit statuses: 0 done, 1 failed or inconsistent, 2 usage or unreadable input.
public struct Failure: Error, CustomStringConvertible {
    public let message: String
    public let status: Int32
    public init(_ message: String, status: Int32 = 1) {
        self.message = message
        self.status = status
    }
    public var description: String { message }
}

/// Prints the error (prefixed with the tool's name) and exits with its status.
public func fail(_ error: Error, tool: String = "blobfs") -> Never {
    let (message, status): (String, Int32) = if let failure = error as? Failure { (failure.message, failure.status) } else {
        ("\(error)", 1)
    }
    let line = "\(tool): \(message)\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
    exit(status)
}

/// A device named on the command line, and how blobfs opens it.
public struct Device: Sendable {
    public let text: String
    public let spec: DeviceSpec
    /// The file the lock is taken on (image files), nil for RAM and PCIe.
    public let lockPath: String?

    public init(_ text: String) throws {
        self.text = text
        let parsed: DeviceSpec
        do { parsed = try DeviceSpec(parsing: text) } catch { throw ValidationError("DEVICE \(text): \(error)") }
        switch parsed {
        case let .file(path):
            // A bare path is an image file or block device through io_uring (DeviceSpec
            // decides that for every tool): the cheapest path per I/O measured here.
            spec = .file(path: Device.absolute(path))
            lockPath = Device.absolute(path)
        case let .nvmeEmulated(.file(path)):
            spec = .nvmeEmulated(namespace: .file(path: Device.absolute(path)))
            lockPath = Device.absolute(path)
        default:
            spec = parsed
            lockPath = nil
        }
    }

    public var isRAM: Bool {
        if case .malloc = spec { return true }
        if case .nvmeEmulated(.malloc) = spec { return true }
        return false
    }

    /// What the device is, for `blobfs status`: io_uring (a file or block device), nvme-emu,
    /// pcie, nvme-tcp or ram.
    public var kind: String {
        switch spec {
        case .file: "io_uring"
        case .nvmeEmulated: "nvme-emu"
        case .pcie: "pcie"
        case .nvmeTCP: "nvme-tcp"
        case .malloc: "ram"
        }
    }

    /// The absolute path with symlinks resolved when it exists (mountpoints: the daemon and
    /// the control commands derive the same socket path from it), else `absolute`.
    public static func canonical(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return absolute(path) }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    public static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX))
        guard getcwd(&buffer, buffer.count) != nil else { return path }
        return String(cString: buffer) + "/" + path
    }

    /// Takes the exclusive lock every writer of the device holds (blobfs mount, mkfs,
    /// fsck, blobcli's writing commands): a mounted store is never written by another.
    public func lock() throws -> Int32? {
        guard let lockPath else { return nil }
        let fd = Glibc.open(lockPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }  // missing: mkfs creates it
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw Failure("\(lockPath) is in use (mounted, or held by another blobfs or blobcli)")
        }
        return fd
    }

    /// The block size an existing store on this image was formatted with (4096 when there
    /// is none or it is not an image file): the image is opened with it.
    public var formattedBlockSize: Int {
        guard let lockPath else { return 4096 }
        let fd = Glibc.open(lockPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return 4096 }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 2 * SuperBlock.pageBytes)
        guard pread(fd, &bytes, bytes.count, 0) == bytes.count else { return 4096 }
        let slots = (0..<2).map { slot in
            Result { () throws(FormatError) in
                try SuperBlock.decode(bytes[(slot * SuperBlock.pageBytes)..<((slot + 1) * SuperBlock.pageBytes)],
                                      offset: UInt64(slot * SuperBlock.pageBytes))
            }
        }
        return SuperBlock.current(slots).map { Int($0.block.blockSizeBytes) } ?? 4096
    }

    public func open(createSizeBytes: UInt64? = nil, blockSize: Int? = nil) throws -> Bdev {
        let blockSize = blockSize ?? formattedBlockSize
        do { return try spec.open(blockSizeBytes: blockSize, createSizeBytes: createSizeBytes) } catch {
            throw Failure("cannot open \(text): \(error)", status: 2)
        }
    }
}

public func parseSize(_ text: String, _ what: String) throws -> UInt64 {
    do { return try DeviceSpec.parseSize(text) } catch { throw ValidationError("\(what): \(error)") }
}

