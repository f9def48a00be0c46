import XCTest
@testable import InferenceRouting

/// Load-aware picking and the saturation detector over scraped model-server samples.
final class LoadScoringTests: XCTestCase {
    let policy = LoadPolicy(enabled: true, stalenessSeconds: 1)
    let t0: UInt64 = 100_000_000_000

    private func pool(_ n: Int) throws -> EndpointSet {
        EndpointSet(endpoints: try EndpointSet.parse(list: (1...n).map { "10.0.0.\($0):80" }.joined(separator: ",")))
    }

    private func counts(_ set: EndpointSet, subset: [String]? = nil, now: UInt64, picks: Int = 2000) -> [String: Int] {
        var rng = SplitMix64(seed: 7)
        var out: [String: Int] = [:]
        for _ in 0..<picks {
            out[set.pick(subset: subset, policy: policy, now: now, using: &rng)!.endpoint.address, default: 0] += 1
        }
        return out
    }

    private func counts(_ set: EndpointSet, model: String, policy: LoadPolicy? = nil, now: UInt64, picks: Int = 2000) -> [String: Int] {
        var rng = SplitMix64(seed: 11)
        var out: [String: Int] = [:]
        for _ in 0..<picks {
            out[set.pick(subset: nil, policy: policy ?? self.policy, now: now, model: model, using: &rng)!.endpoint.address, default: 0] += 1
        }
        return out
    }

    func testLoRAAffinityScores() {
        let a = LoRAAdapters(running: ["x", "y"], waiting: ["z"], maxAdapters: 4)
        XCTAssertEqual(a.affinity(for: "x"), 1, "running here")
        XCTAssertEqual(a.affinity(for: "new"), 0.8, "a free slot (3 of 4 in use)")
        let full = LoRAAdapters(running: ["x", "y"], waiting: ["z", "x"], maxAdapters: 3)
        XCTAssertEqual(full.affinity(for: "z"), 0.6, "waiting here, no free slot")
        XCTAssertEqual(full.affinity(for: "new"), 0, "loading it would evict one")
        XCTAssertEqual(LoRAAdapters(running: [], waiting: [], maxAdapters: 0).affinity(for: "x"), 0)
    }

    /// A sample of a server of `baseModel` with these adapters running (queue 1, KV 0.3 unless given).
    private func sample(_ r: EndpointRecord, running: [String], maxAdapters: Int, waiting: Int = 1, kv: Double = 0.3) {
        r.record(waiting: waiting, running: 2, kvCacheUsage: kv,
                 lora: LoRAAdapters(running: running, waiting: [], maxAdapters: maxAdapters), servedModels: [baseModel], at: t0)
    }
    private let baseModel = "meta-llama/Llama-3.1-8B-Instruct"

    func testAdapterRequestsGoWhereTheAdapterRuns() throws {
        let set = try pool(3)
        sample(set.records[0], running: ["other"], maxAdapters: 1)
        sample(set.records[1], running: ["sql-lora"], maxAdapters: 1)
        sample(set.records[2], running: [], maxAdapters: 1)
        // Equal load: the adapter's home (1.0) beats a free slot (0.8) beats a full server (0).
        XCTAssertEqual(counts(set, model: "sql-lora", now: t0 + 1), ["10.0.0.2:80": 2000])
        XCTAssertEqual(counts(set, model: "tweet-summary", now: t0 + 1), ["10.0.0.3:80": 2000])
        // Load still counts: the adapter's home with a long queue loses to a free slot.
        sample(set.records[1], running: ["sql-lora"], maxAdapters: 1, waiting: 9, kv: 0.9)
        XCTAssertEqual(counts(set, model: "sql-lora", now: t0 + 1), ["10.0.0.3:80": 2000])
    }

    func testBaseModelRequestsAndServersWithoutLoRAIgnoreAdapters() throws {
        let set = try pool(2)
        let base = [baseModel]
        sample(set.records[0], running: ["a"], maxAdapters: 1)
        sample(set.records[1], running: [], maxAdapters: 4)
        // The base model is not an adapter: free slots do not matter, both share the load.
        let c = counts(set, model: base[0], now: t0 + 1)
        XCTAssertEqual(c.count, 2)
        XCTAssertGreaterThan(c["10.0.0.1:80"]!, 800)
        // The same adapter request follows the free slot, unless LoRA scoring is off.
        XCTAssertEqual(counts(set, model: "b", now: t0 + 1), ["10.0.0.2:80": 2000])
        var off = policy
        off.loraWeight = 0
        XCTAssertEqual(counts(set, model: "b", policy: off, now: t0 + 1).count, 2)
        // No server reports adapters (LoRA off everywhere): nothing to weigh.
        for r in set.records { r.record(waiting: 1, running: 2, kvCacheUsage: 0.3, at: t0) }
        XCTAssertEqual(counts(set, model: "b", now: t0 + 1).count, 2)
    }

    func testLowestQueueAndKVCacheWins() throws {
        let set = try pool(3)
        set.records[0].record(waiting: 6, running: 2, kvCacheUsage: 0.2, at: t0)
        set.records[1].record(waiting: 0, running: 2, kvCacheUsage: 0.3, at: t0)
        set.records[2].record(waiting: 3, running: 2, kvCacheUsage: 0.1, at: t0)
        // Scores: 2·0 + 2·0.8 = 1.6; 2·1 + 2·0.7 = 3.4; 2·0.5 + 2·0.9 = 2.8.
        XCTAssertEqual(counts(set, now: t0 + 1), ["10.0.0.2:80": 2000])
        // A full KV cache outweighs a short queue.
        set.records[1].record(waiting: 0, running: 2, kvCacheUsage: 1.0, at: t0)
        XCTAssertEqual(counts(set, now: t0 + 1), ["10.0.0.3:80": 2000])
    }

    func testRequestsSentSinceTheSampleCountAsQueued() throws {
        let set = try pool(2)
        set.records[0].record(waiting: 0, running: 0, kvCacheUsage: 0.5, at: t0)
        set.records[1].record(waiting: 3, running: 0, kvCacheUsage: 0.5, at: t0)
        var rng = SplitMix64(seed: 1)
        XCTAssertEqual(set.pick(subset: nil, policy: policy, now: t0, using: &rng)?.endpoint.address, "10.0.0.1:80")
        // Four requests went to .1 after its sample: it now looks busier than .2 (4 > 3).
        for _ in 0..<4 { set.records[0].begin() }
        XCTAssertEqual(set.pick(subset: nil, policy: policy, now: t0, using: &rng)?.endpoint.address, "10.0.0.2:80")
        // A new sample taken with those four in flight resets the estimate to what the server says.
        set.records[0].record(waiting: 1, running: 3, kvCacheUsage: 0.5, at: t0 + 10)
        XCTAssertEqual(set.pick(subset: nil, policy: policy, now: t0 + 20, using: &rng)?.endpoint.address, "10.0.0.1:80")
    }

    func testEqualScoresGoToFewestInFlightThenRandom() throws {
        let set = try pool(3)
        for r in set.records { r.record(waiting: 1, running: 1, kvCacheUsage: 0.4, at: t0) }
        set.records[0].begin()
        // .1 has one in flight since its sample: its queue estimate is worse, so .2/.3 split.
        let c = counts(set, now: t0 + 1)
        XCTAssertNil(c["10.0.0.1:80"])
        XCTAssertEqual(c.count, 2)
        XCTAssertGreaterThan(c["10.0.0.2:80"]!, 800)
        XCTAssertGreaterThan(c["10.0.0.3:80"]!, 800)
    }

    func testStaleOrMissingSamplesOnlyWhenNothingIsFresh() throws {
        let set = try pool(3)
        set.records[0].record(waiting: 50, running: 10, kvCacheUsage: 0.99, at: t0 + 2_000_000_000)  // fresh, heavy
        set.records[1].record(waiting: 0, running: 0, kvCacheUsage: 0, at: t0)                       // stale at t0+2s
        // .3 never scraped.
        XCTAssertEqual(counts(set, now: t0 + 2_000_000_001), ["10.0.0.1:80": 2000])
        // Nothing fresh: fewest in flight, as with scoring off.
        set.records[0].begin(); set.records[2].begin()
        XCTAssertEqual(counts(set, now: t0 + 10_000_000_000), ["10.0.0.2:80": 2000])
    }

    func testSubsetIsRespected() throws {
        let set = try pool(3)
        set.records[0].record(waiting: 0, running: 0, kvCacheUsage: 0, at: t0)
        set.records[1].record(waiting: 9, running: 0, kvCacheUsage: 0.9, at: t0)
        set.records[2].record(waiting: 5, running: 0, kvCacheUsage: 0.5, at: t0)
        XCTAssertEqual(counts(set, subset: ["10.0.0.2:80", "10.0.0.3:80", "10.9.9.9:80"], now: t0), ["10.0.0.3:80": 2000])
        var rng = SplitMix64(seed: 1)
        XCTAssertNil(set.pick(subset: [], policy: policy, now: t0, using: &rng))
        XCTAssertNil(set.pick(subset: ["10.9.9.9:80"], policy: policy, now: t0, using: &rng))
    }

    func testSaturation() throws {
        let set = try pool(2)
        // Per endpoint max(q/5, kv/0.8): 0.4 and 0.5 → mean 0.45.
        set.records[0].record(waiting: 2, running: 0, kvCacheUsage: 0.1, at: t0)
        set.records[1].record(waiting: 0, running: 0, kvCacheUsage: 0.4, at: t0)
        XCTAssertFalse(set.isSaturated(subset: nil, policy: policy, now: t0))
        // 2.0 and 0.5 → 1.25.
        set.records[0].record(waiting: 10, running: 0, kvCacheUsage: 0.1, at: t0)
        XCTAssertTrue(set.isSaturated(subset: nil, policy: policy, now: t0))
        XCTAssertFalse(set.isSaturated(subset: ["10.0.0.2:80"], policy: policy, now: t0))
        // Stale counts as full: 1.0 and 1.0.
        XCTAssertTrue(set.isSaturated(subset: nil, policy: policy, now: t0 + 5_000_000_000))
        // Requests sent since the sample fill the queue: .1 at kv 0.4 → 0.5, .2 with ten sent since → 10/5 = 2.0.
        set.records[0].record(waiting: 0, running: 0, kvCacheUsage: 0.4, at: t0)
        set.records[1].record(waiting: 0, running: 0, kvCacheUsage: 0.1, at: t0)
        for _ in 0..<10 { set.records[1].begin() }
        XCTAssertTrue(set.isSaturated(subset: nil, policy: policy, now: t0))
        XCTAssertFalse(set.isSaturated(subset: nil, policy: .off, now: t0))
        XCTAssertFalse(EndpointSet.empty.isSaturated(subset: nil, policy: policy, now: t0))
    }

    func testAverageLoadOverFreshSamples() throws {
        let set = try pool(3)
        XCTAssertNil(set.averageLoad(policy: policy, now: t0))
        set.records[0].record(waiting: 2, running: 0, kvCacheUsage: 0.2, at: t0)
        set.records[1].record(waiting: 4, running: 0, kvCacheUsage: 0.4, at: t0)
        set.records[2].record(waiting: 100, running: 0, kvCacheUsage: 1, at: t0 - 5_000_000_000)  // stale
        let avg = try XCTUnwrap(set.averageLoad(policy: policy, now: t0))
        XCTAssertEqual(avg.queue, 3, accuracy: 1e-9)
        XCTAssertEqual(avg.kvCache, 0.3, accuracy: 1e-9)
    }

    func testSamplesSurviveSnapshotUpdatesAndClampOddValues() throws {
        let a = try pool(2)
        a.records[1].record(waiting: -4, running: 1, kvCacheUsage: 7, at: t0)
        XCTAssertEqual(a.records[1].load?.waiting, 0)
        XCTAssertEqual(a.records[1].load?.kvCacheUsage, 1)
        let b = EndpointSet(endpoints: [Endpoint(host: "10.0.0.2", port: 80, podName: "renamed")], previous: a)
        XCTAssertEqual(b.records[0].load?.running, 1)
    }

    // MARK: Fallback lists

    private func addresses(_ rs: [EndpointRecord]) -> [String] { rs.map(\.endpoint.address) }

    func testFallbacksFollowTheScoreThenStaleEndpoints() throws {
        let set = try pool(5)
        set.records[0].record(waiting: 0, running: 1, kvCacheUsage: 0.1, at: t0)
        set.records[1].record(waiting: 4, running: 1, kvCacheUsage: 0.5, at: t0)
        set.records[2].record(waiting: 8, running: 1, kvCacheUsage: 0.9, at: t0)
        // records[3] has no sample; records[4]'s is stale.
        set.records[4].record(waiting: 0, running: 0, kvCacheUsage: 0, at: t0 - 5_000_000_000)
        var rng = SplitMix64(seed: 5)
        let now = t0 + 1
        let primary = set.pick(subset: nil, policy: policy, now: now, using: &rng)!
        XCTAssertEqual(primary.endpoint.address, "10.0.0.1:80")
        let all = set.fallbacks(after: primary, count: 10, subset: nil, policy: policy, now: now, using: &rng)
        XCTAssertEqual(Array(addresses(all).prefix(2)), ["10.0.0.2:80", "10.0.0.3:80"], "scored best first")
        XCTAssertEqual(Set(addresses(all).suffix(2)), ["10.0.0.4:80", "10.0.0.5:80"], "unscored ones last")
        XCTAssertEqual(all.count, 4, "never the primary, never twice")
        XCTAssertEqual(addresses(set.fallbacks(after: primary, count: 1, subset: nil, policy: policy, now: now, using: &rng)),
                       ["10.0.0.2:80"])
        XCTAssertEqual(set.fallbacks(after: primary, count: 0, subset: nil, policy: policy, now: now, using: &rng).count, 0)
        // Unscored endpoints among themselves: fewest in flight first.
        set.records[3].begin()
        defer { set.records[3].end() }
        XCTAssertEqual(Array(addresses(set.fallbacks(after: primary, count: 4, subset: nil, policy: policy, now: now, using: &rng)).suffix(2)),
                       ["10.0.0.5:80", "10.0.0.4:80"])
    }

    func testFallbacksStayInTheSubsetHint() throws {
        let set = try pool(4)
        var rng = SplitMix64(seed: 9)
        let subset = ["10.0.0.2:80", "10.0.0.4:80", "10.0.0.4:80", "10.9.9.9:80"]
        for _ in 0..<50 {
            let primary = set.pick(subset: subset, using: &rng)!
            let more = addresses(set.fallbacks(after: primary, count: 3, subset: subset, policy: .off, now: 0, using: &rng))
            XCTAssertEqual(Set(more + [primary.endpoint.address]), ["10.0.0.2:80", "10.0.0.4:80"])
            XCTAssertEqual(more.count, 1)
        }
    }

    func testFallbacksWithoutScoringAreFewestInFlightThenRandom() throws {
        let set = try pool(4)
        set.records[1].begin(); set.records[1].begin()
        set.records[2].begin()
        defer { set.records[1].end(); set.records[1].end(); set.records[2].end() }
        var rng = SplitMix64(seed: 13)
        var lastSeen = Set<String>()
        for _ in 0..<200 {
            let primary = set.pick(subset: nil, using: &rng)!
            XCTAssertTrue(["10.0.0.1:80", "10.0.0.4:80"].contains(primary.endpoint.address))
            let more = addresses(set.fallbacks(after: primary, count: 3, subset: nil, policy: .off, now: 0, using: &rng))
            XCTAssertEqual(Array(more.suffix(2)), ["10.0.0.3:80", "10.0.0.2:80"])
            lastSeen.insert(primary.endpoint.address)
        }
        XCTAssertEqual(lastSeen, ["10.0.0.1:80", "10.0.0.4:80"], "ties are broken at random")
    }
}
