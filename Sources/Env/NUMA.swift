#if canImport(Glibc)
import Glibc
#endif
import CNuma

/// NUMA topology and CPU pinning through libnuma.
public enum NUMA {
    /// Number of configured NUMA nodes (1 when libnuma reports NUMA unavailable).
    public static let nodeCount: Int = {
        guard numa_available() >= 0 else { return 1 }
        return max(1, Int(numa_num_configured_nodes()))
    }()

    public static var cpuCount: Int { Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) }

    /// The node a CPU belongs to (0 on machines without NUMA).
    public static func node(ofCPU cpu: Int) -> Int {
        guard nodeCount > 1 else { return 0 }
        return max(0, Int(numa_node_of_cpu(Int32(cpu))))
    }

    /// Pins the calling thread to one CPU.
    public static func pinCurrentThread(toCPU cpu: Int) throws(SystemError) {
        guard let mask = numa_allocate_cpumask() else { throw SystemError("numa_allocate_cpumask", errno: ENOMEM) }
        defer { numa_free_cpumask(mask) }
        numa_bitmask_setbit(mask, UInt32(cpu))
        if numa_sched_setaffinity(0, mask) != 0 {
            throw SystemError("sched_setaffinity(cpu \(cpu))")
        }
    }
}
