#if canImport(Glibc)
import CLinux
import Glibc
#endif

/// An eventfd used to wake a sleeping reactor.
package struct EventFD: ~Copyable {
    package let fd: Int32

    package init() throws(SystemError) {
        let fd = eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        guard fd >= 0 else { throw SystemError("eventfd") }
        self.fd = fd
    }

    deinit { close(fd) }

    package func signal() {
        var one: UInt64 = 1
        _ = write(fd, &one, 8)
    }

    package func drain() {
        var value: UInt64 = 0
        _ = read(fd, &value, 8)
    }
}

/// An epoll set: the reactor's wait-for-anything when it goes to sleep.
package struct Epoll: ~Copyable {
    package let fd: Int32

    package init() throws(SystemError) {
        let fd = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard fd >= 0 else { throw SystemError("epoll_create1") }
        self.fd = fd
    }

    deinit { close(fd) }

    package func add(_ watched: Int32) throws(SystemError) {
        var event = epoll_event()
        event.events = EPOLLIN.rawValue | EPOLLET.rawValue
        event.data.fd = watched
        if epoll_ctl(fd, EPOLL_CTL_ADD, watched, &event) != 0 { throw SystemError("epoll_ctl(add \(watched))") }
    }

    package func remove(_ watched: Int32) {
        _ = epoll_ctl(fd, EPOLL_CTL_DEL, watched, nil)
    }

    /// Waits up to `timeoutMs` (-1: forever; 0: only looks) for any registered fd and calls
    /// `fired` with each fd that did (at most 8 per call: edge-triggered, the rest stay
    /// queued in the set for the next call).
    package func wait(timeoutMs: Int32, _ fired: (Int32) -> Void) {
        var events = (epoll_event(), epoll_event(), epoll_event(), epoll_event(),
                      epoll_event(), epoll_event(), epoll_event(), epoll_event())
        let count = withUnsafeMutableBytes(of: &events) { raw in
            Int(epoll_wait(fd, raw.baseAddress!.assumingMemoryBound(to: epoll_event.self), 8, timeoutMs))
        }
        guard count > 0 else { return }
        withUnsafeBytes(of: &events) { raw in
            let pointer = raw.baseAddress!.assumingMemoryBound(to: epoll_event.self)
            for index in 0..<count { fired(pointer[index].data.fd) }
        }
    }
}
