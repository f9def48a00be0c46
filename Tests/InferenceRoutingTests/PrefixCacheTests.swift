import XCTest
@testable import InferenceRouting

final class PrefixCacheTests: XCTestCase {
    let policy = LoadPolicy(enabled: true, stalenessSeconds: 1)
    let t0: UInt64 = 100_000_000_000

    private func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }
    private let system = String(repeating: "You are a helpful assistant who answers briefly. ", count: 24)

    func testChainedBlockHashes() {
        let a = PrefixHashes(bytes(system + "question one"), model: "m")
        let b = PrefixHashes(bytes(system + "question two, longer"), model: "m")
        XCTAssertEqual(a.hashes.count, (system.utf8.count + 12) / 64)
        XCTAssertEqual(a.hashes.prefix(18), b.hashes.prefix(18))  // 1152 shared bytes = 18 blocks
        // A different model or an earlier difference changes every block from there on.
        let c = PrefixHashes(bytes(system + "question one"), model: "other")
        XCTAssertTrue(zip(a.hashes, c.hashes).allSatisfy { $0 != $1 })
        let d = PrefixHashes(bytes("X" + system.dropFirst() + "question one"), model: "m")
        XCTAssertTrue(zip(a.hashes, d.hashes).allSatisfy { $0 != $1 })
        // Partial blocks are not hashed; at most maxBlocks are.
        XCTAssertTrue(PrefixHashes(bytes(String(repeating: "x", count: 63)), model: "m").isEmpty)
        XCTAssertEqual(PrefixHashes(bytes(system), model: "m", maxBlocks: 4).hashes.count, 4)
    }

    func testIndexMatchesLeadingBlocksPerEndpoint() throws {
        let set = EndpointSet(endpoints: try EndpointSet.parse(list: "10.0.0.1:80,10.0.0.2:80"))
        let index = PrefixCacheIndex()
        let p = PrefixHashes(bytes(system + "q1"), model: "m")
        index.record(p, sentTo: set.records[0])
        let q = PrefixHashes(bytes(String(system.prefix(640)) + String(repeating: "z", count: 600)), model: "m")
        let m = PrefixMatch(q, index: index)
        XCTAssertEqual(m.masks.count, 10)  // the first 640 bytes match
        XCTAssertEqual(m.score(of: set.records[0]), 10.0 / Double(q.hashes.count), accuracy: 1e-12)
        XCTAssertEqual(m.score(of: set.records[1]), 0)
        index.record(q, sentTo: set.records[1])
        let both = PrefixMatch(q, index: index)
        XCTAssertEqual(both.score(of: set.records[1]), 1, accuracy: 1e-12)
        XCTAssertEqual(both.score(of: set.records[0]), 10.0 / Double(q.hashes.count), accuracy: 1e-12)
    }

    func testEqualLoadFollowsThePrefixButLoadWins() throws {
        let set = EndpointSet(endpoints: try EndpointSet.parse(list: "10.0.0.1:80,10.0.0.2:80"))
        let index = PrefixCacheIndex()
        for r in set.records { r.record(waiting: 0, running: 0, kvCacheUsage: 0.1, at: t0) }
        let p = PrefixHashes(bytes(system + "first"), model: "m")
        index.record(p, sentTo: set.records[1])
        var rng = SplitMix64(seed: 5)
        for i in 0..<200 {
            let q = PrefixHashes(bytes(system + "follow-up \(i)"), model: "m")
            XCTAssertEqual(set.pick(subset: nil, policy: policy, now: t0, prefix: PrefixMatch(q, index: index),
                                   using: &rng)?.endpoint.address, "10.0.0.2:80")
        }
        // Prefix ×3 against queue ×2 + KV cache ×2: a busy, full endpoint loses its prefixes.
        set.records[1].record(waiting: 8, running: 0, kvCacheUsage: 0.9, at: t0)
        let q = PrefixHashes(bytes(system + "later"), model: "m")
        XCTAssertEqual(set.pick(subset: nil, policy: policy, now: t0, prefix: PrefixMatch(q, index: index),
                               using: &rng)?.endpoint.address, "10.0.0.1:80")
    }

    func testGenerationsForgetOldBlocks() throws {
        let set = EndpointSet(endpoints: try EndpointSet.parse(list: "10.0.0.1:80"))
        let index = PrefixCacheIndex(capacity: 40)
        let old = PrefixHashes(bytes(system), model: "m")  // 18 blocks
        index.record(old, sentTo: set.records[0])
        XCTAssertEqual(PrefixMatch(old, index: index).masks.count, 18)
        for k in 0..<6 { index.record(PrefixHashes(bytes("\(k)" + system), model: "m"), sentTo: set.records[0]) }
        XCTAssertEqual(PrefixMatch(old, index: index).masks.count, 0)
        XCTAssertLessThanOrEqual(index.count, 80)
    }

    private func pool(_ n: Int, net: Int) throws -> EndpointSet {
        EndpointSet(endpoints: try EndpointSet.parse(list: (0..<n).map { "10.\(net).\($0 / 200).\($0 % 200):80" }
            .joined(separator: ",")))
    }

    /// A pool of 200 (e.g. 50 pods × 4 data-parallel ranks): every endpoint is told apart.
    func testUpTo256EndpointsEachHaveTheirOwnBit() throws {
        let set = try pool(200, net: 4)
        let index = PrefixCacheIndex()
        let prompts = (0..<200).map { PrefixHashes(bytes("conversation \($0) " + system), model: "m") }
        for (p, r) in zip(prompts, set.records) { index.record(p, sentTo: r) }
        XCTAssertEqual(Set(set.records.map { index.slot(of: $0) }).count, 200)
        for (k, p) in prompts.enumerated() {
            let m = PrefixMatch(p, index: index)
            XCTAssertEqual(m.score(of: set.records[k]), 1, "endpoint \(k) lost its blocks")
            XCTAssertEqual(set.records.filter { m.score(of: $0) > 0 }.count, 1, "prompt \(k) credited to others")
        }
    }

    /// Before, an endpoint past the index's width wiped the index, and affinity was lost on nearly
    /// every request; past 256 endpoints bits are shared instead.
    func testMoreThan256EndpointsShareBitsAndKeepTheirBlocks() throws {
        let n = 300
        let set = try pool(n, net: 1)
        let index = PrefixCacheIndex()
        let prompts = (0..<n).map { PrefixHashes(bytes("conversation \($0) " + system), model: "m") }
        for (p, r) in zip(prompts, set.records) { index.record(p, sentTo: r) }
        XCTAssertEqual(index.trackedEndpoints, n)
        for (k, p) in prompts.enumerated() {
            let m = PrefixMatch(p, index: index)
            XCTAssertEqual(m.score(of: set.records[k]), 1, "endpoint \(k) lost its blocks")
            let credited = set.records.filter { m.score(of: $0) > 0 }.count
            XCTAssertLessThanOrEqual(credited, 2, "prompt \(k): at most the endpoint and the one sharing its bit")
        }
        // Each bit is held by at most two of the 300.
        let bits = Dictionary(grouping: set.records, by: { index.slot(of: $0) })
        XCTAssertEqual(bits.count, PrefixCacheIndex.slotCount)
        XCTAssertLessThanOrEqual(bits.values.map(\.count).max() ?? 0, 2)
    }

    func testPodsThatLeaveFreeTheirBitAndTheirBlocks() throws {
        let n = PrefixCacheIndex.slotCount
        let address = { (k: Int) in "10.2.\(k / 200).\(k % 200):80" }
        let old = EndpointSet(endpoints: try EndpointSet.parse(list: (0..<n).map(address).joined(separator: ",")))
        let index = PrefixCacheIndex()
        let prompts = (0..<n).map { PrefixHashes(bytes("conversation \($0) " + system), model: "m") }
        for (p, r) in zip(prompts, old.records) { index.record(p, sentTo: r) }
        // Pod 0 is replaced by a new pod (a rolling update): the index is told of the new set.
        let list = ["10.2.9.9:80"] + (1..<n).map(address)
        let new = EndpointSet(endpoints: try EndpointSet.parse(list: list.joined(separator: ",")), previous: old)
        index.retain(new)
        XCTAssertEqual(index.trackedEndpoints, n - 1)
        XCTAssertTrue(PrefixMatch(prompts[0], index: index).masks.isEmpty, "the gone pod's blocks are forgotten")
        let newcomer = new.records[0]
        index.record(PrefixHashes(bytes("fresh " + system), model: "m"), sentTo: newcomer)
        XCTAssertEqual(index.slot(of: newcomer), index.slot(of: old.records[0]), "takes the freed bit, shares none")
        XCTAssertEqual(PrefixMatch(prompts[0], index: index).score(of: newcomer), 0, "does not inherit the gone pod's blocks")
        XCTAssertEqual(PrefixMatch(PrefixHashes(bytes("fresh " + system), model: "m"), index: index).score(of: newcomer), 1)
        for k in 1..<n {
            XCTAssertEqual(PrefixMatch(prompts[k], index: index).score(of: new.records[k]), 1, "pod \(k) keeps its blocks")
        }
        // A set without changes frees nothing.
        let before = index.count
        index.retain(new)
        XCTAssertEqual(index.count, before)
    }

    func testABitSharedWithAPodThatStaysIsNotCleared() throws {
        let n = PrefixCacheIndex.slotCount
        let set = try pool(n + 1, net: 3)
        let index = PrefixCacheIndex()
        let p = PrefixHashes(bytes(system), model: "m")
        for r in set.records { index.record(p, sentTo: r) }
        let shared = index.slot(of: set.records[n])
        XCTAssertEqual(shared, index.slot(of: set.records[0]))
        // The last endpoint leaves; endpoint 0 still holds the bit, so its blocks stay.
        index.retain(EndpointSet(endpoints: Array(set.records.prefix(n).map(\.endpoint)), previous: set))
        XCTAssertEqual(PrefixMatch(p, index: index).score(of: set.records[0]), 1)
    }
}
