import Logging

/// Loggers of the project, one label per subsystem.
public enum Log {
    public static func logger(_ subsystem: String) -> Logger {
        Logger(label: "blobfs.\(subsystem)")
    }
}
