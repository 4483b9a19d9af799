#if canImport(Glibc)
import Glibc
#endif
import Blobstore

/// A file-system failure as the caller sees it: a POSIX errno and what went wrong.
public struct FSError: Error, CustomStringConvertible, Equatable {
    public let errno: Int32
    public let message: String

    public init(_ errno: Int32, _ message: String = "") {
        self.errno = errno
        self.message = message
    }

    public var description: String {
        let name = String(cString: strerror(errno))
        return message.isEmpty ? name : "\(name): \(message)"
    }

    /// A blob-store failure with its errno (`BlobStoreError.errno`, the one mapping).
    init(_ error: BlobStoreError) {
        self.init(error.errno, "\(error)")
    }
}

/// Runs a blob-store call, turning its errors into `FSError`.
@inline(__always)
func storeCall<T>(_ body: () throws -> T) throws(FSError) -> T {
    do { return try body() } catch let error as BlobStoreError { throw FSError(error) } catch let error as FSError {
        throw error
    } catch { throw FSError(EIO, "\(error)") }
}
