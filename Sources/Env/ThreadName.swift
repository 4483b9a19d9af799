import CLinux

/// Names the calling thread (15 bytes; `top -H` and gdb show it).
public func setCurrentThreadName(_ name: String) {
    _ = clinux_set_thread_name(String(name.utf8.prefix(15)) ?? name)
}
