#if canImport(Glibc)
import Glibc
#endif

/// An errno value with its name, the one error type the env layer throws for syscalls.
public struct SystemError: Error, Equatable, Sendable, CustomStringConvertible {
    public let errno: Int32
    public let operation: String

    public init(_ operation: String, errno: Int32 = Glibc.errno) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String {
        "\(operation): \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

/// Retries a syscall while it fails with EINTR; returns its result or throws SystemError.
@inline(__always)
public func retryingOnEINTR<T: BinaryInteger>(_ operation: String, _ call: () -> T) throws(SystemError) -> T {
    while true {
        let result = call()
        if result >= 0 { return result }
        let code = errno
        if code == EINTR { continue }
        throw SystemError(operation, errno: code)
    }
}
