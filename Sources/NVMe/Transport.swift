import CVFIO
import Env

/// How the driver reaches a controller: its BAR0 registers and the bus addresses of DMA
/// memory. A PCIe function (VFIO or UIO) and the in-process software controller both
/// provide one; the driver code above is the same.
public protocol NVMeTransport: AnyObject, Sendable {
    /// BAR0, mapped. Accessed only through the volatile helpers below.
    var registers: UnsafeMutableRawPointer { get }
    /// The address the controller uses for host memory at `pointer` (DMA pool memory).
    func busAddress(of pointer: UnsafeRawPointer) -> UInt64?
    var name: String { get }
    func close()
    /// Called after each register write: a software controller wakes up to look.
    func registersWritten()
    /// Routes interrupt vector `vector` to `reactor` (woken when the controller posts to a
    /// completion queue created with that vector and interrupts enabled), as MSI-X does;
    /// false when the transport has no interrupts (completions must be polled).
    func connectInterrupt(vector: Int, to reactor: Reactor) -> Bool
    func disconnectInterrupt(vector: Int)
}

extension NVMeTransport {
    @inline(__always) public func read32(_ offset: Int) -> UInt32 { blobfs_mmio_read32(registers + offset) }
    public func registersWritten() {}
    public func connectInterrupt(vector: Int, to reactor: Reactor) -> Bool { false }
    public func disconnectInterrupt(vector: Int) {}
    @inline(__always) public func write32(_ offset: Int, _ value: UInt32) {
        blobfs_mmio_write32(registers + offset, value)
        registersWritten()
    }
    @inline(__always) public func read64(_ offset: Int) -> UInt64 { blobfs_mmio_read64(registers + offset) }
    @inline(__always) public func write64(_ offset: Int, _ value: UInt64) {
        blobfs_mmio_write64(registers + offset, value)
        registersWritten()
    }
}

/// Register memory shared by the driver and the software controller (volatile access
/// on both sides, as over PCIe).
enum MMIO {
    @inline(__always) static func read32(_ base: UnsafeMutableRawPointer, _ offset: Int) -> UInt32 {
        blobfs_mmio_read32(base + offset)
    }
    @inline(__always) static func write32(_ base: UnsafeMutableRawPointer, _ offset: Int, _ value: UInt32) {
        blobfs_mmio_write32(base + offset, value)
    }
    @inline(__always) static func read64(_ base: UnsafeMutableRawPointer, _ offset: Int) -> UInt64 {
        blobfs_mmio_read64(base + offset)
    }
    @inline(__always) static func write64(_ base: UnsafeMutableRawPointer, _ offset: Int, _ value: UInt64) {
        blobfs_mmio_write64(base + offset, value)
    }
}
