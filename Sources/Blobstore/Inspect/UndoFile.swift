#if canImport(Glibc)
import Glibc
#endif
import Bdev
import Env

/// The undo file of an offline repair: FORMAT.md, section "Undo file" (e2fsck's undo_io is
/// the model). Before the repair overwrites a device page for the first time, the page's
/// old bytes are appended here and the file is flushed; `blobcli undo` writes them back.
/// A repair cut short leaves a file whose header says "writing": every entry in it was
/// flushed before its page was touched, so applying it still restores the device.
public enum UndoFile {
    public static let magic: UInt64 = 0x4F44_4E55_424F_4C42  // "BLOBUNDO"
    public static let version: UInt32 = 1
    static let entryMagic: UInt32 = 0x5044_4E55  // "UNDP"
    public static let headerBytes = SuperBlock.pageBytes
    public static let entryHeaderBytes = 16
    public static let entryBytes = entryHeaderBytes + SuperBlock.pageBytes

    /// What the header says.
    public struct Header: Sendable, Equatable {
        /// The repair finished: `finalSlots` fingerprint device pages 0 and 1 as it left them
        /// (an undo checks the device still holds them).
        public var isComplete: Bool
        public var deviceBytes: UInt64
        public var blockBytes: UInt32
        public var storeID: (UInt64, UInt64)
        public var entryCount: UInt64
        public var finalSlots: (UInt64, UInt64)

        public static func == (lhs: Header, rhs: Header) -> Bool { lhs.encode() == rhs.encode() }

        func encode() -> [UInt8] {
            var writer = ByteWriter(count: headerBytes)
            writer.u64(magic)
            writer.u32(version)
            writer.u32(isComplete ? 1 : 0)
            writer.u64(deviceBytes)
            writer.u32(blockBytes)
            writer.u32(UInt32(SuperBlock.pageBytes))
            writer.u64(storeID.0)
            writer.u64(storeID.1)
            writer.u64(entryCount)
            writer.u64(finalSlots.0)
            writer.u64(finalSlots.1)
            writer.sealChecksum(over: 0..<(headerBytes - 4), at: headerBytes - 4)
            return writer.bytes
        }

        static func decode(_ bytes: ArraySlice<UInt8>, path: String) throws(UndoFileError) -> Header {
            var reader = ByteReader(bytes, structure: "undo file \(path) header", base: 0)
            do throws(FormatError) {
                guard bytes.count >= headerBytes else { throw reader.error(.truncated(needed: headerBytes, available: bytes.count)) }
                let found = try reader.u64()
                guard found == magic else { throw reader.error(.badMagic(found: found), at: 0) }
                try reader.verifyChecksum(over: 0..<(headerBytes - 4), at: headerBytes - 4)
                let foundVersion = try reader.u32()
                guard foundVersion == version else { throw reader.error(.unsupportedVersion(foundVersion), at: 8) }
                let state = try reader.u32()
                guard state <= 1 else { throw reader.error(.invalidField(name: "state", value: UInt64(state)), at: 12) }
                let deviceBytes = try reader.u64()
                let blockBytes = try reader.u32()
                let pageBytes = try reader.u32()
                guard pageBytes == UInt32(SuperBlock.pageBytes) else {
                    throw reader.error(.invalidField(name: "page size", value: UInt64(pageBytes)), at: 28)
                }
                let storeID = (try reader.u64(), try reader.u64())
                let count = try reader.u64()
                let slots = (try reader.u64(), try reader.u64())
                try reader.requireZero(reader.position..<(headerBytes - 4))
                return Header(isComplete: state == 1, deviceBytes: deviceBytes, blockBytes: blockBytes, storeID: storeID,
                              entryCount: count, finalSlots: slots)
            } catch { throw .format(error) }
        }
    }

    /// A valid undo file, read whole.
    public struct Contents: Sendable {
        public var header: Header
        /// Device page and its old bytes, in the order they were saved (each page once).
        public var pages: [(page: UInt64, bytes: [UInt8])]
        /// An interrupted repair's last entry, cut short while it was being written (its
        /// page was never overwritten): left out.
        public var tornTail: Bool
    }

    /// Reads and checks the whole file: its header, and every entry's checksum.
    public static func read(path: String) throws(UndoFileError) -> Contents {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .system("open \(path)", errno) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .system("stat \(path)", errno) }
        let size = Int(info.st_size)
        var bytes = [UInt8](repeating: 0, count: size)
        var done = 0
        while done < size {
            let got = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, size - done, off_t(done)) }
            if got < 0, errno == EINTR { continue }
            guard got > 0 else { throw .system("read \(path)", got < 0 ? errno : EIO) }
            done += got
        }
        let header = try Header.decode(bytes[...], path: path)
        var pages: [(page: UInt64, bytes: [UInt8])] = []
        var seen: Set<UInt64> = []
        var at = headerBytes
        var torn = false
        while at < size {
            guard at + entryBytes <= size else {
                // A repair that stopped while appending: the page was not written yet.
                guard !header.isComplete else {
                    throw .format(FormatError("undo file \(path) entry \(pages.count)", offset: UInt64(at),
                                              .truncated(needed: entryBytes, available: size - at)))
                }
                torn = true
                break
            }
            let entry = bytes[at..<(at + entryBytes)]
            var reader = ByteReader(entry, structure: "undo file \(path) entry \(pages.count)", base: UInt64(at))
            do throws(FormatError) {
                let found = try reader.u32()
                guard found == entryMagic else { throw reader.error(.badMagic(found: UInt64(found)), at: 0) }
                try reader.verifyChecksum(over: 8..<entryBytes, at: 4)
                _ = try reader.u32()
                let page = try reader.u64()
                guard page < header.deviceBytes / UInt64(SuperBlock.pageBytes) else {
                    throw reader.error(.invalidField(name: "device page", value: page), at: 8)
                }
                guard seen.insert(page).inserted else { throw reader.error(.invalidField(name: "device page saved twice", value: page), at: 8) }
                pages.append((page, Array(entry.suffix(SuperBlock.pageBytes))))
            } catch {
                // Only the last entry of an interrupted repair may be torn.
                guard !header.isComplete, at + entryBytes == size else { throw .format(error) }
                torn = true
            }
            at += entryBytes
        }
        if header.isComplete, UInt64(pages.count) != header.entryCount {
            throw .format(FormatError("undo file \(path) header", offset: 48,
                                      .invalidField(name: "entry count (\(pages.count) entries follow)", value: header.entryCount)))
        }
        return Contents(header: header, pages: pages, tornTail: torn)
    }

    /// Device pages 0 and 1 (both super block slots) as they are now, each as the CRC32C
    /// of its first 4092 bytes and, above it, its last four (a CRC over a page that ends
    /// with its own CRC is the same constant for every valid page).
    static func slotFingerprints(_ io: BdevSyncIO) throws(BlobStoreError) -> (UInt64, UInt64) {
        let bytes = try BlobStore.readPages(io, at: 0, count: 2)
        func fingerprint(_ page: ArraySlice<UInt8>) -> UInt64 {
            let start = page.startIndex
            let crc = page[start..<(start + 4092)].withUnsafeBytes { CRC32C.checksum($0) }
            var last: UInt64 = 0
            for index in 0..<4 { last |= UInt64(page[start + 4092 + index]) << (8 * UInt64(index)) }
            return UInt64(crc) | last << 32
        }
        let pageBytes = SuperBlock.pageBytes
        return (fingerprint(bytes[0..<pageBytes]), fingerprint(bytes[pageBytes..<(2 * pageBytes)]))
    }

    /// What `apply` found and did.
    public struct ApplyReport: Sendable {
        public var restoredPages: [UInt64]
        public var wasComplete: Bool
        public var tornTail: Bool
    }

    /// Writes the saved pages back to the device and flushes. Refuses, writing nothing,
    /// when the file is not for this device (its size or block size), or — for a repair
    /// that finished — when the super block pages are no longer what it left (the device
    /// changed since; `force` overrides). `dryRun`: checks only.
    public static func apply(_ contents: Contents, to io: BdevSyncIO, force: Bool = false,
                             dryRun: Bool = false) throws(UndoFileError) -> ApplyReport {
        let header = contents.header
        guard header.deviceBytes == io.geometry.capacityBytes else {
            throw .mismatch("the undo file is for a device of \(header.deviceBytes) bytes; this one has \(io.geometry.capacityBytes)")
        }
        guard header.blockBytes == UInt32(io.geometry.blockSizeBytes) else {
            throw .mismatch("the undo file is for \(header.blockBytes)-byte blocks; the device has \(io.geometry.blockSizeBytes)")
        }
        if header.isComplete, !force {
            let now: (UInt64, UInt64)
            do { now = try slotFingerprints(io) } catch { throw .device(error) }
            guard now == header.finalSlots else {
                throw .mismatch("the super block pages changed since the repair wrote this undo file (mounted or repaired again?); --force applies it anyway")
            }
        }
        let report = ApplyReport(restoredPages: contents.pages.map(\.page), wasComplete: header.isComplete,
                                 tornTail: contents.tornTail)
        guard !dryRun else { return report }
        let blocksPerPage = UInt64(SuperBlock.pageBytes / io.geometry.blockSizeBytes)
        do {
            for (page, bytes) in contents.pages { try io.writeBytes(bytes, offsetBlocks: page * blocksPerPage) }
            try io.flush()
        } catch { throw .device(.device(error)) }
        return report
    }
}

public enum UndoFileError: Error, Sendable, CustomStringConvertible {
    case format(FormatError)
    case system(String, Int32)
    /// The file does not belong to this device, or the device changed since.
    case mismatch(String)
    case device(BlobStoreError)

    public var description: String {
        switch self {
        case let .format(error): "\(error)"
        case let .system(what, code): "\(what): \(String(cString: strerror(code)))"
        case let .mismatch(what): what
        case let .device(error): "\(error)"
        }
    }
}

/// Keeps the old bytes of every page a repair overwrites (`MetadataWriteObserver`): each
/// page the first time only, appended and flushed before the write goes to the device.
public final class UndoRecorder: MetadataWriteObserver {
    public let path: String
    private let io: BdevSyncIO
    private let fd: Int32
    private var header: UndoFile.Header
    private var saved: Set<UInt64> = []
    private var fileBytes = UndoFile.headerBytes
    public var savedPageCount: Int { saved.count }

    /// Creates `path` (which must not exist: an earlier undo file is never overwritten).
    public init(path: String, io: BdevSyncIO, storeID: (UInt64, UInt64)) throws(UndoFileError) {
        self.path = path
        self.io = io
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .system("create \(path)", errno) }
        header = UndoFile.Header(isComplete: false, deviceBytes: io.geometry.capacityBytes,
                                 blockBytes: UInt32(io.geometry.blockSizeBytes), storeID: storeID, entryCount: 0,
                                 finalSlots: (0, 0))
        do { try write(header.encode(), at: 0) } catch {
            close(fd)
            unlink(path)
            throw error
        }
    }

    deinit { close(fd) }

    public func willOverwrite(pages: Range<UInt64>) throws(BlobStoreError) {
        let fresh = pages.filter { !saved.contains($0) }
        guard !fresh.isEmpty else { return }
        var entries: [UInt8] = []
        entries.reserveCapacity(fresh.count * UndoFile.entryBytes)
        var index = 0
        while index < fresh.count {
            // Runs of consecutive pages are read at once.
            var end = index + 1
            while end < fresh.count, fresh[end] == fresh[end - 1] + 1 { end += 1 }
            let old = try BlobStore.readPages(io, at: fresh[index], count: UInt64(end - index))
            for (offset, page) in fresh[index..<end].enumerated() {
                var writer = ByteWriter(count: UndoFile.entryBytes)
                writer.u32(UndoFile.entryMagic)
                writer.u32(0)
                writer.u64(page)
                writer.raw(old[(offset * SuperBlock.pageBytes)..<((offset + 1) * SuperBlock.pageBytes)])
                writer.sealChecksum(over: 8..<UndoFile.entryBytes, at: 4)
                entries += writer.bytes
            }
            index = end
        }
        do { try write(entries, at: fileBytes) } catch {
            throw .invalidArgument("undo file \(path): \(error); nothing more was written to the device")
        }
        fileBytes += entries.count
        saved.formUnion(fresh)
        header.entryCount = UInt64(saved.count)
    }

    /// The repair is done: the header records it, with the super block pages it left.
    public func finish() throws(UndoFileError) {
        do { header.finalSlots = try UndoFile.slotFingerprints(io) } catch { throw .device(error) }
        header.isComplete = true
        try write(header.encode(), at: 0)
    }

    /// Writes and flushes: the entry must be on stable storage before its page is overwritten.
    private func write(_ bytes: [UInt8], at offset: Int) throws(UndoFileError) {
        var done = 0
        while done < bytes.count {
            let wrote = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress! + done, bytes.count - done, off_t(offset + done)) }
            if wrote < 0, errno == EINTR { continue }
            guard wrote > 0 else { throw .system("write \(path)", wrote < 0 ? errno : EIO) }
            done += wrote
        }
        guard fsync(fd) == 0 else { throw .system("fsync \(path)", errno) }
    }
}
