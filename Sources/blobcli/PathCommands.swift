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

// The file system on the store, by path: ls, stat, cat, get, tree.

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
    .object([("name", .string(name)), ("ino", .ino(a.ino)), ("mode", .string(String(a.attributes.mode, radix: 8))),
             ("type", .string(typeLetter(a.attributes.mode))), ("links", .uint(UInt64(a.attributes.nlink))),
             ("uid", .uint(UInt64(a.attributes.uid))), ("gid", .uint(UInt64(a.attributes.gid))), ("size", .uint(a.attributes.size)),
             ("allocated_bytes", .uint(a.allocatedBytes)), ("mtime_ns", .int(a.attributes.mtimeNs)),
             ("ctime_ns", .int(a.attributes.ctimeNs)), ("atime_ns", .int(a.attributes.atimeNs))])
}

func listDirectory(_ fs: FileSystem, _ ino: InodeNumber) throws -> [DirectoryEntry] {
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
                    "inode       \(a.ino) (blob \(a.ino.blobID)), generation \(x.generation)",
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
            func walk(_ ino: InodeNumber, _ prefix: String) throws -> [JSON] {
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
                        items.append(.object([("name", .string(name)), ("ino", .ino(entry.ino)), ("children", .array(children))]))
                    } else {
                        counts.files += 1
                        items.append(.object([("name", .string(name)), ("ino", .ino(entry.ino)), ("size", .uint(a.attributes.size))]))
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
