// NVMe controller registers (NVM Express Base Specification 2.0, section 3.1): offsets in
// BAR0 and the fields the driver and the software controller use. Field positions are
// checked in Tests/NVMeTests/SpecTests.swift.

public enum NVMeRegister {
    public static let cap = 0x00       // 64-bit: capabilities
    public static let vs = 0x08        // version
    public static let intms = 0x0C     // interrupt mask set
    public static let intmc = 0x10     // interrupt mask clear
    public static let cc = 0x14        // controller configuration
    public static let csts = 0x1C      // controller status
    public static let aqa = 0x24       // admin queue attributes
    public static let asq = 0x28       // 64-bit: admin submission queue base
    public static let acq = 0x30       // 64-bit: admin completion queue base
    public static let doorbellBase = 0x1000

    /// Doorbell of submission queue `queue` (tail) or its completion queue (head).
    public static func doorbell(queue: Int, completion: Bool, strideShift: Int) -> Int {
        doorbellBase + (2 * queue + (completion ? 1 : 0)) * (4 << strideShift)
    }
}

/// CAP, the capabilities register.
public struct ControllerCapabilities: Equatable, Sendable {
    public var raw: UInt64
    public init(raw: UInt64) { self.raw = raw }

    /// Maximum entries per queue (MQES is 0-based).
    public var maxQueueEntries: Int { Int(raw & 0xFFFF) + 1 }
    public var contiguousQueuesRequired: Bool { raw >> 16 & 1 == 1 }
    /// Worst-case time for CSTS.RDY to follow CC.EN, in milliseconds (TO is in 500 ms units).
    public var timeoutMs: Int { Int(raw >> 24 & 0xFF) * 500 }
    public var doorbellStrideShift: Int { Int(raw >> 32 & 0xF) }
    public var supportsNVMCommandSet: Bool { raw >> 37 & 1 == 1 }
    /// Memory page sizes as 2^(12 + MPSMIN/MPSMAX).
    public var memoryPageSizeMinShift: Int { 12 + Int(raw >> 48 & 0xF) }
    public var memoryPageSizeMaxShift: Int { 12 + Int(raw >> 52 & 0xF) }

    public static func make(maxQueueEntries: Int, timeoutUnits: Int, strideShift: Int) -> ControllerCapabilities {
        var raw = UInt64(maxQueueEntries - 1) & 0xFFFF
        raw |= 1 << 16  // CQR: contiguous queues
        raw |= UInt64(timeoutUnits & 0xFF) << 24
        raw |= UInt64(strideShift & 0xF) << 32
        raw |= 1 << 37  // CSS: NVM command set
        return ControllerCapabilities(raw: raw)
    }
}

/// CC, controller configuration.
public struct ControllerConfiguration: Equatable, Sendable {
    public var raw: UInt32
    public init(raw: UInt32) { self.raw = raw }

    public var enabled: Bool { raw & 1 == 1 }
    public var commandSet: Int { Int(raw >> 4 & 0x7) }
    public var memoryPageSizeShift: Int { 12 + Int(raw >> 7 & 0xF) }
    public var shutdownNotification: Int { Int(raw >> 14 & 0x3) }
    public var submissionEntrySizeShift: Int { Int(raw >> 16 & 0xF) }
    public var completionEntrySizeShift: Int { Int(raw >> 20 & 0xF) }

    /// Enabled, NVM command set, 4 KiB pages, round robin, 64-byte SQEs, 16-byte CQEs.
    public static let standard = ControllerConfiguration(raw: 1 | (6 << 16) | (4 << 20))
}

/// CSTS, controller status.
public struct ControllerStatus: Equatable, Sendable {
    public var raw: UInt32
    public init(raw: UInt32) { self.raw = raw }
    public var ready: Bool { raw & 1 == 1 }
    public var fatal: Bool { raw >> 1 & 1 == 1 }
    public var shutdownStatus: Int { Int(raw >> 2 & 0x3) }
}
