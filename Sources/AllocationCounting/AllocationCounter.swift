#if canImport(Glibc)
import Glibc
#endif
import MallocInterposerSwift
import Synchronization

/// Counts heap allocations with ordo-one's malloc interposer (bdevperf's measured
/// phase; a blobfs daemon's requests with BLOBFS_COUNT_ALLOCATIONS=1). The interposer
/// must be loaded before libc's malloc is bound: if it is not (LD_PRELOAD unset), the
/// program re-executes itself once with it preloaded.
public final class AllocationCounter: Sendable {
    public static let shared = AllocationCounter()
    private let counted = Mutex<Int>(0)

    public static var isInterposed: Bool {
        MallocInterposerSwift.initialize()
        MallocInterposerSwift.hook()
        let probe = UnsafeMutableRawPointer.allocate(byteCount: 24, alignment: 8)
        probe.deallocate()
        MallocInterposerSwift.unhook()
        let seen = MallocInterposerSwift.getStatistics().mallocCount
        MallocInterposerSwift.reset()
        return seen > 0
    }

    public static func ensureInterposed() {
        if isInterposed || getenv("BLOBFS_ALLOCATIONS_REEXEC") != nil { return }
        guard let library = loadedLibrary(named: "libMallocInterposerSwift.so") else { return }
        setenv("LD_PRELOAD", library, 1)
        setenv("BLOBFS_ALLOCATIONS_REEXEC", "1", 1)
        execv("/proc/self/exe", CommandLine.unsafeArgv)
        // execv returned: run without counting.
    }

    /// Path of a loaded shared object, from /proc/self/maps.
    private static func loadedLibrary(named name: String) -> String? {
        guard let file = fopen("/proc/self/maps", "r") else { return nil }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 4096)
        while fgets(&line, Int32(line.count), file) != nil {
            var text = line.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            if text.hasSuffix("\n") { text.removeLast() }
            if text.hasSuffix("/" + name), let slash = text.firstIndex(of: "/") { return String(text[slash...]) }
        }
        return nil
    }

    public func start() {
        MallocInterposerSwift.reset()
        MallocInterposerSwift.hook()
    }

    public func stop() {
        MallocInterposerSwift.unhook()
        let stats = MallocInterposerSwift.getStatistics()
        counted.withLock { $0 = stats.mallocCount }
    }

    public var count: Int { counted.withLock { $0 } }

    /// Allocations since `start`, while counting goes on (any thread).
    public var running: Int { MallocInterposerSwift.getStatistics().mallocCount }
}
