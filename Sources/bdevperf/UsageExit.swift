#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser

extension BdevPerf {
    /// Bad flags and bad device specs exit with status 2 (the project's usage status),
    /// after the parser's message.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            if exitCode(for: error) == .validationFailure {
                let message = fullMessage(for: error) + "\n"
                _ = message.withCString { write(2, $0, strlen($0)) }
                Glibc.exit(2)
            }
            exit(withError: error)
        }
    }
}
