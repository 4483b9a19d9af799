// swift-tools-version: 6.0
import PackageDescription

// Layers point down only: Env <- Bdev <- modules <- DeviceSpec <- tools.
// C stays in the C* shim targets (module maps over system headers).
let hotPath: [SwiftSetting] = [
    .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
]

let package = Package(
    name: "blobfs",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "bdevperf", targets: ["bdevperf"]),
        .executable(name: "blobfs", targets: ["blobfs"]),
        .executable(name: "blobcli", targets: ["blobcli"]),
        .library(name: "Bdev", targets: ["Bdev"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/ordo-one/malloc-interposer", from: "1.6.1"),
    ],
    targets: [
        .systemLibrary(name: "CISAL", path: "Sources/CISAL"),
        .systemLibrary(name: "CURing", path: "Sources/CURing"),
        .systemLibrary(name: "CNuma", path: "Sources/CNuma"),
        .systemLibrary(name: "CLinux", path: "Sources/CLinux"),
        .systemLibrary(name: "CVFIO", path: "Sources/CVFIO"),
        .systemLibrary(name: "CFuse", path: "Sources/CFuse", pkgConfig: "fuse3"),
        .systemLibrary(name: "CFuseKernel", path: "Sources/CFuseKernel"),

        .target(
            name: "Env",
            dependencies: ["CISAL", "CNuma", "CLinux", .product(name: "Logging", package: "swift-log")],
            swiftSettings: hotPath),
        .target(name: "Bdev", dependencies: ["Env"], swiftSettings: hotPath),
        .target(name: "PCI", dependencies: ["Env", "CVFIO"]),
        .target(name: "NVMe", dependencies: ["Bdev", "Env", "PCI", "CVFIO"], swiftSettings: hotPath),
        .target(name: "BdevMalloc", dependencies: ["Bdev", "Env"], swiftSettings: hotPath),
        .target(name: "ReactorRing", dependencies: ["Env", "CURing"], swiftSettings: hotPath),
        .target(name: "BdevURing", dependencies: ["Bdev", "Env", "CURing", "ReactorRing"], swiftSettings: hotPath),
        .target(name: "BdevFault", dependencies: ["Bdev", "Env"]),
        .target(name: "DeviceSpec", dependencies: ["Bdev", "BdevMalloc", "BdevURing", "BdevFault", "NVMe", "PCI"]),
        .target(name: "BdevConformance", dependencies: ["Bdev", "Env"]),
        .target(
            name: "AllocationCounting",
            dependencies: [.product(name: "MallocInterposerSwift", package: "malloc-interposer")]),
        .target(name: "Blobstore", dependencies: ["Bdev", "Env"], swiftSettings: hotPath),

        .target(name: "BlobFileSystem", dependencies: ["Blobstore", "Bdev", "Env"], swiftSettings: hotPath),
        .target(
            name: "ToolSupport",
            dependencies: [
                "Blobstore", "BlobFileSystem", "Bdev", "DeviceSpec", "Env",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .target(name: "FuseFrontend", dependencies: ["BlobFileSystem", "Blobstore", "Bdev", "Env", "CFuse", "CFuseKernel", "CURing", "ReactorRing"],
                swiftSettings: hotPath),
        .executableTarget(
            name: "blobfs",
            dependencies: [
                "BlobFileSystem", "FuseFrontend", "Blobstore", "Bdev", "Env", "DeviceSpec", "ToolSupport", "ReactorRing",
                "AllocationCounting",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        .executableTarget(
            name: "blobcli",
            dependencies: [
                "Blobstore", "BlobFileSystem", "Bdev", "Env", "DeviceSpec", "ToolSupport",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),

        .executableTarget(
            name: "bdevperf",
            dependencies: [
                "Bdev", "Env", "DeviceSpec", "Blobstore", "NVMe", "ToolSupport", "AllocationCounting",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: hotPath),

        .executableTarget(
            name: "blobbench",
            dependencies: [
                "Blobstore", "Bdev", "BdevMalloc", "Env", "DeviceSpec", "ToolSupport",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),

        .executableTarget(
            name: "nvme-qemu-check",
            dependencies: ["NVMe", "PCI", "Bdev", "BdevConformance", "Env", "DeviceSpec"]),

        .testTarget(
            name: "BlobFileSystemTests",
            dependencies: ["BlobFileSystem", "Blobstore", "Bdev", "BdevMalloc", "BdevFault", "Env", "ToolSupport"]),
        .testTarget(name: "EnvTests", dependencies: ["Env"]),
        .testTarget(name: "FuseFrontendTests", dependencies: ["FuseFrontend"]),
        .testTarget(name: "NVMeTests", dependencies: ["NVMe", "Bdev", "BdevMalloc", "BdevURing", "BdevConformance", "Env"]),
        .testTarget(name: "BlobstoreTests", dependencies: ["Blobstore", "Bdev", "BdevMalloc", "BdevFault", "Env"]),
        .testTarget(name: "BlobcliTests", dependencies: ["Blobstore", "Bdev", "BdevMalloc", "Env"]),
        .testTarget(
            name: "BdevTests",
            dependencies: ["Bdev", "Env", "BdevMalloc", "BdevURing", "BdevFault", "DeviceSpec", "BdevConformance", "ReactorRing"]),
    ],
    swiftLanguageModes: [.v6]
)
