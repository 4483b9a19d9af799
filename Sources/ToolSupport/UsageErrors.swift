#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser

/// A command whose usage errors (bad flags, bad device specs: ValidationError) exit with
/// status 2, the project's usage status, after the parser's message. Other errors keep
/// ArgumentParser's handling.
public protocol UsageErrorsExitTwo: ParsableCommand {}

extension UsageErrorsExitTwo {
    public static func main() {
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
