import XCTest
@testable import InferenceRouting

final class EndpointsTests: XCTestCase {
    func testParse() throws {
        let list = try EndpointSet.parse(list: "10.0.0.1:8000, [::1]:8001,,[fd00::a:1]:9000 ")
        XCTAssertEqual(list.map(\.address), ["10.0.0.1:8000", "[::1]:8001", "[fd00::a:1]:9000"])
        XCTAssertEqual(list[1].host, "::1")
        XCTAssertEqual(list[1].port, 8001)
        XCTAssertEqual(Endpoint(host: "::1", port: 80).address, "[::1]:80")
    }

    func testParseErrors() {
        func fails(_ s: String, _ fragment: String, line: UInt = #line) {
            do {
                _ = try EndpointSet.parse(list: s)
                XCTFail("expected error for \(s)", line: line)
            } catch {
                XCTAssertTrue(error.message.contains(fragment), "\(error)", line: line)
            }
        }
        fails("10.0.0.1", "missing ':port'")
        fails("10.0.0.1:0", "invalid port")
        fails("10.0.0.1:65536", "invalid port")
        fails("10.0.0.1:http", "invalid port")
        fails("10.0.0.256:80", "invalid IPv4")
        fails("host.example:80", "invalid IPv4")
        fails("::1:80", "must be bracketed")
        fails("[::g]:80", "invalid IPv6")
        fails("[::1]80", "expected ':port'")
        fails("[::1:80", "missing ']'")
        fails("10.0.0.1:80,10.0.0.1:80", "duplicate")
        fails(" , ", "no endpoints")
    }

    func testLeastInFlightAndTies() throws {
        let set = EndpointSet(endpoints: try EndpointSet.parse(list: "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80"))
        var rng = SplitMix64(seed: 3)
        set.records[0].begin(); set.records[0].begin()
        set.records[1].begin()
        XCTAssertEqual(set.pick(subset: nil, using: &rng)?.endpoint.address, "10.0.0.3:80")
        set.records[2].begin()
        // 1 and 2 tie at one in flight: both must be chosen, roughly evenly.
        var counts: [String: Int] = [:]
        for _ in 0..<10_000 { counts[set.pick(subset: nil, using: &rng)!.endpoint.address, default: 0] += 1 }
        XCTAssertNil(counts["10.0.0.1:80"])
        XCTAssertEqual(Double(counts["10.0.0.2:80"]!) / 10_000, 0.5, accuracy: 0.03)
        set.records[1].end()
        XCTAssertEqual(set.records[1].inFlightCount, 0)
        XCTAssertEqual(set.pick(subset: nil, using: &rng)?.endpoint.address, "10.0.0.2:80")
    }

    func testSubsetHint() throws {
        let set = EndpointSet(endpoints: try EndpointSet.parse(list: "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80"))
        var rng = SplitMix64(seed: 4)
        set.records[2].begin()
        XCTAssertNil(set.pick(subset: [], using: &rng))
        XCTAssertNil(set.pick(subset: ["10.9.9.9:80"], using: &rng))
        XCTAssertEqual(set.pick(subset: ["10.0.0.3:80"], using: &rng)?.endpoint.address, "10.0.0.3:80")
        for _ in 0..<100 {
            XCTAssertEqual(set.pick(subset: ["10.0.0.3:80", "10.0.0.1:80", "10.9.9.9:80"], using: &rng)?.endpoint.address, "10.0.0.1:80")
        }
        var seen = Set<String>()
        for _ in 0..<200 { seen.insert(set.pick(subset: ["10.0.0.1:80", "10.0.0.2:80"], using: &rng)!.endpoint.address) }
        XCTAssertEqual(seen, ["10.0.0.1:80", "10.0.0.2:80"])
    }

    func testRecordsSurviveUpdates() throws {
        let a = EndpointSet(endpoints: try EndpointSet.parse(list: "10.0.0.1:80,10.0.0.2:80"))
        a.records[0].begin()
        let b = EndpointSet(endpoints: [Endpoint(host: "10.0.0.1", port: 80), Endpoint(host: "10.0.0.3", port: 80)], previous: a)
        XCTAssertTrue(b.records[0] === a.records[0])
        XCTAssertEqual(b.record(for: "10.0.0.1:80")?.inFlightCount, 1)
        XCTAssertEqual(b.record(for: "10.0.0.3:80")?.inFlightCount, 0)
        XCTAssertNil(b.record(for: "10.0.0.2:80"))
        var rng = SplitMix64(seed: 1)
        XCTAssertEqual(b.pick(subset: nil, using: &rng)?.endpoint.address, "10.0.0.3:80")
        XCTAssertNil(EndpointSet.empty.pick(subset: nil, using: &rng))
        // Same address, new pod name: a new record that shares the in-flight counter.
        let c = EndpointSet(endpoints: [Endpoint(host: "10.0.0.1", port: 80, podName: "pod-b")], previous: b)
        XCTAssertFalse(c.records[0] === a.records[0])
        XCTAssertEqual(c.records[0].endpoint.podName, "pod-b")
        XCTAssertEqual(c.records[0].inFlightCount, 1)
        a.records[0].end()
        XCTAssertEqual(c.records[0].inFlightCount, 0)
    }
}
