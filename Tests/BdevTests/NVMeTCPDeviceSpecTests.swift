import DeviceSpec
import NVMe
import XCTest

/// `nvme-tcp:HOST:PORT/SUBSYSTEM-NQN[?options]` as every tool parses it.
final class NVMeTCPDeviceSpecTests: XCTestCase {
    private func target(_ text: String) throws -> NVMeTCPTarget {
        guard case let .nvmeTCP(target) = try DeviceSpec(parsing: text) else {
            XCTFail("\(text) is not an nvme-tcp spec")
            throw DeviceSpec.ParseError.empty
        }
        return target
    }

    func testAddressPortAndNQN() throws {
        let parsed = try target("nvme-tcp:127.0.0.1:4420/nqn.2026-12.io.blobfs:disk1")
        XCTAssertEqual(parsed.endpoint, TCPEndpoint(host: "127.0.0.1", port: 4420))
        XCTAssertEqual(parsed.subsystemNQN, "nqn.2026-12.io.blobfs:disk1")
        XCTAssertFalse(parsed.options.headerDigest)
        XCTAssertTrue(parsed.options.hostNQN.hasPrefix("nqn.2014-08.org.nvmexpress:uuid:"))
        XCTAssertEqual(parsed.options.hostID.count, 16)
        XCTAssertEqual("\(try DeviceSpec(parsing: "nvme-tcp:127.0.0.1:4420/nqn.a:b"))", "nvme-tcp:127.0.0.1:4420/nqn.a:b")
    }

    func testBracketedIPv6AndOptions() throws {
        let parsed = try target("nvme-tcp:[::1]:4421/nqn.x:y?hostnqn=nqn.h:me&hdgst=1&ddgst=on&kato=5000&ctrl_loss_tmo=7&io_timeout=3")
        XCTAssertEqual(parsed.endpoint, TCPEndpoint(host: "::1", port: 4421))
        XCTAssertEqual(parsed.options.hostNQN, "nqn.h:me")
        XCTAssertTrue(parsed.options.headerDigest)
        XCTAssertTrue(parsed.options.dataDigest)
        XCTAssertEqual(parsed.options.keepAliveTimeoutMs, 5000)
        XCTAssertEqual(parsed.options.deviceLossTimeoutNs, 7_000_000_000)
        XCTAssertEqual(parsed.options.commandTimeoutNs, 3_000_000_000)
        XCTAssertEqual(parsed.description, "[::1]:4421/nqn.x:y?hostnqn=nqn.h:me&hdgst=1&ddgst=on&kato=5000&ctrl_loss_tmo=7&io_timeout=3")
    }

    func testBadSpecsAreRefusedWithTheReason() {
        let bad = [
            "nvme-tcp:127.0.0.1:4420",                 // no NQN
            "nvme-tcp:127.0.0.1/nqn.a:b",              // no port
            "nvme-tcp:127.0.0.1:0/nqn.a:b",            // port 0
            "nvme-tcp:127.0.0.1:70000/nqn.a:b",        // port out of range
            "nvme-tcp::4420/nqn.a:b",                  // no host
            "nvme-tcp:[::1/nqn.a:b",                   // unclosed bracket
            "nvme-tcp:h:1/nqn.a:b?hdgst=2",            // not a flag
            "nvme-tcp:h:1/nqn.a:b?kato=10",            // below a second
            "nvme-tcp:h:1/nqn.a:b?color=blue",         // unknown option
            "nvme-tcp:h:1/nqn.a:b?hdgst",              // no value
            "nvme-tcp:h:1/" + String(repeating: "n", count: 224),  // NQN too long
            "nvme-emu:nvme-tcp:h:1/nqn.a:b",
        ]
        for text in bad {
            XCTAssertThrowsError(try DeviceSpec(parsing: text), text) { error in
                XCTAssertFalse("\(error)".isEmpty)
            }
        }
    }
}
