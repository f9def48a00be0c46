import XCTest
@testable import InferenceRouting
import StreamingJSON

struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

func rewrite(_ name: String, ns: String = "default", created: String? = nil, pool: String = "pool",
             group: String? = nil, kind: String? = nil, generation: Int? = 1,
             _ rules: [InferenceModelRewrite.Rule]) -> InferenceModelRewrite {
    InferenceModelRewrite(metadata: ObjectMeta(name: name, namespace: ns, generation: generation, creationTimestamp: created),
                          spec: .init(poolRef: PoolReference(group: group, kind: kind, name: pool), rules: rules))
}

func rule(_ models: [String]?, _ targets: [(String, Int?)]) -> InferenceModelRewrite.Rule {
    InferenceModelRewrite.Rule(matches: models?.map { .init(model: .init(value: $0)) },
                               targets: targets.map { .init(modelRewrite: $0.0, weight: $0.1) })
}

final class RewriteRulesTests: XCTestCase {
    var rng = SplitMix64(seed: 99)

    func testExactBeatsMatchAllAndOldestWins() {
        let rules = RewriteRules([
            rewrite("catchall", created: "2024-01-01T00:00:00Z", [rule(nil, [("fallback", nil)])]),
            rewrite("newer", created: "2024-03-01T00:00:00Z", [rule(["a"], [("a-new", nil)]), rule(["b"], [("b-new", nil)])]),
            rewrite("older", created: "2024-02-01T00:00:00Z", [rule(["a"], [("a-old", nil)])]),
            rewrite("other-pool", pool: "x", [rule(["c"], [("c", nil)])]),
        ], poolName: "pool")
        XCTAssertEqual(rules.decide(model: "a", affinity: nil, using: &rng), RewriteDecision(rewriteName: "default/older", targetModel: "a-old"))
        XCTAssertEqual(rules.decide(model: "b", affinity: nil, using: &rng)?.targetModel, "b-new")
        XCTAssertEqual(rules.decide(model: "c", affinity: nil, using: &rng), RewriteDecision(rewriteName: "default/catchall", targetModel: "fallback"))
        XCTAssertEqual(rules.validations.map(\.resource), ["default/catchall", "default/older", "default/newer"])
        let newer = rules.validations.first { $0.resource == "default/newer" }!
        XCTAssertEqual(newer.reason, "Conflict")
        XCTAssertTrue(newer.accepted) // "b" is still in force
        XCTAssertTrue(newer.message.contains("a (by default/older)"))
        XCTAssertEqual(rules.validations.first { $0.resource == "default/older" }?.reason, "Accepted")
    }

    /// The JSON literals a decision carries are encoded when the rules compile; they must equal
    /// what encoding the names per request gives (escapes included).
    func testDecisionsCarryTheNamesAsJSONLiterals() {
        let rules = RewriteRules([
            rewrite("exact", [rule(["al\"ias\u{1}"], [("tar\\get/é", 1), ("other", 1)])]),
            rewrite("all", [rule(nil, [("fallback", nil)])]),
        ], poolName: "pool")
        for _ in 0..<20 {
            let d = rules.decide(model: "al\"ias\u{1}", affinity: nil, using: &rng)!
            XCTAssertEqual(d.quotedTargetModel, JSONStringEncoding.quoted(d.targetModel))
            XCTAssertEqual(d.quotedModel, JSONStringEncoding.quoted("al\"ias\u{1}"))
            XCTAssertEqual(String(decoding: d.quotedModel!, as: UTF8.self), #""al\"ias\u0001""#)
        }
        let all = rules.decide(model: "anything", affinity: nil, using: &rng)!
        XCTAssertEqual(all.quotedTargetModel, Array(#""fallback""#.utf8))
        XCTAssertNil(all.quotedModel, "a match-all rule does not know the requested name in advance")
    }

    func testTiesAndStableRuleOrder() {
        let rules = RewriteRules([
            rewrite("b", created: "2024-01-01T00:00:00Z", [rule(["m"], [("from-b", nil)])]),
            rewrite("a", created: "2024-01-01T00:00:00Z", [rule(["m"], [("from-a", nil)]), rule(["m", "n"], [("second", nil)])]),
            rewrite("untimed1", [rule(["u"], [("u1", nil)])]),
            rewrite("untimed0", [rule(["u"], [("u0", nil)]), rule(nil, [("all", nil)])]),
        ], poolName: nil)
        XCTAssertEqual(rules.decide(model: "m", affinity: nil, using: &rng)?.targetModel, "from-a") // same time → ns/name
        XCTAssertEqual(rules.decide(model: "n", affinity: nil, using: &rng)?.targetModel, "second")
        XCTAssertEqual(rules.decide(model: "u", affinity: nil, using: &rng)?.targetModel, "u1")    // input order
        XCTAssertEqual(rules.decide(model: "zzz", affinity: nil, using: &rng)?.targetModel, "all")
        let b = rules.validations.first { $0.resource == "default/b" }!
        XCTAssertEqual(b.reason, "Conflict")
        XCTAssertFalse(b.accepted) // fully shadowed
    }

    func testInvalidResources() {
        let rules = RewriteRules([
            rewrite("mixed", [rule(["a"], [("x", 1), ("y", nil)])]),
            rewrite("notargets", [rule(["a"], [])]),
            rewrite("zero", [rule(["a"], [("x", 0)])]),
            rewrite("huge", [rule(["a"], [("x", 1_000_001)])]),
            rewrite("empty", [rule(["a"], [("", nil)])]),
            rewrite("group", group: "example.com", [rule(["a"], [("x", nil)])]),
            rewrite("kind", kind: "Service", [rule(["a"], [("x", nil)])]),
            rewrite("regex", [InferenceModelRewrite.Rule(matches: [.init(model: .init(type: "RegularExpression", value: "a.*"))], targets: [.init(modelRewrite: "x")])]),
            rewrite("partlybad", [rule(["b"], [("ok", nil)]), rule(["c"], [("x", -1)])]),
        ], poolName: "pool")
        XCTAssertTrue(rules.isEmpty)
        let reasons = Dictionary(uniqueKeysWithValues: rules.validations.map { ($0.resource, $0.reason) })
        XCTAssertEqual(reasons, [
            "default/mixed": "MixedWeights", "default/notargets": "NoTargets", "default/zero": "InvalidWeight",
            "default/huge": "InvalidWeight", "default/empty": "EmptyTarget", "default/group": "UnsupportedPoolRef",
            "default/kind": "UnsupportedPoolRef", "default/regex": "UnsupportedMatchType", "default/partlybad": "InvalidWeight",
        ])
        XCTAssertTrue(rules.validations.allSatisfy { !$0.accepted })
        XCTAssertNil(rules.decide(model: "b", affinity: nil, using: &rng))
    }

    func testPoolGroupMatching() {
        let r = [rewrite("alpha", group: "inference.networking.x-k8s.io", [rule(["a"], [("x", nil)])]),
                 rewrite("v1", [rule(["b"], [("y", nil)])])]
        let v1 = RewriteRules(r, poolName: "pool")
        XCTAssertNil(v1.decide(model: "a", affinity: nil, using: &rng))
        XCTAssertEqual(v1.decide(model: "b", affinity: nil, using: &rng)?.targetModel, "y")
        let alpha = RewriteRules(r, poolName: "pool", poolGroup: "inference.networking.x-k8s.io")
        XCTAssertEqual(alpha.decide(model: "a", affinity: nil, using: &rng)?.targetModel, "x")
        XCTAssertNil(alpha.decide(model: "b", affinity: nil, using: &rng))
    }

    func testWeightedDistribution() {
        let rules = RewriteRules([rewrite("split", [rule(["m"], [("big", 90), ("small", 10)])])], poolName: "pool")
        var r = SplitMix64(seed: 1234)
        var big = 0
        let n = 100_000
        for _ in 0..<n where rules.decide(model: "m", affinity: nil, using: &r)?.targetModel == "big" { big += 1 }
        XCTAssertEqual(Double(big) / Double(n), 0.9, accuracy: 0.01)
    }

    func testUniformWhenWeightsOmitted() {
        let rules = RewriteRules([rewrite("u", [rule(["m"], [("a", nil), ("b", nil), ("c", nil)])])], poolName: "pool")
        var r = SplitMix64(seed: 5)
        var counts: [String: Int] = [:]
        for _ in 0..<30_000 { counts[rules.decide(model: "m", affinity: nil, using: &r)!.targetModel, default: 0] += 1 }
        for t in ["a", "b", "c"] { XCTAssertEqual(Double(counts[t]!) / 30_000, 1.0 / 3, accuracy: 0.01) }
    }

    func testStickySplit() {
        let make = { RewriteRules([rewrite("split", ns: "prod", [rule(["m"], [("big", 90), ("small", 10)])])], poolName: "pool") }
        let one = make(), two = make()
        var r1 = SplitMix64(seed: 1), r2 = SplitMix64(seed: 2)
        var big = 0
        let n = 20_000
        for i in 0..<n {
            let key = AffinityKey("user-\(i)")
            let a = one.decide(model: "m", affinity: key, using: &r1)!.targetModel
            XCTAssertEqual(a, two.decide(model: "m", affinity: key, using: &r2)!.targetModel)
            XCTAssertEqual(a, one.decide(model: "m", affinity: key, using: &r1)!.targetModel)
            if a == "big" { big += 1 }
        }
        XCTAssertEqual(Double(big) / Double(n), 0.9, accuracy: 0.01)
        // Pin the algorithm: FNV-1a 64 over "prod/split#0" ‖ 0x00 ‖ key, SplitMix64 finalizer,
        // multiply-high onto the weight sum. Changing any of it reshuffles users.
        XCTAssertEqual(StickyHash.fnv1a("a".utf8), 0xAF63_DC4C_8601_EC8C) // FNV-1a test vector
        XCTAssertEqual(StickyHash.hash(identity: "prod/split#0", key: "alice"), 0x1668_9B59_C87C_7306)
        XCTAssertEqual(StickyHash.hash(identity: "prod/split#0", key: "ivan"), 0xFC03_4D4A_1FDD_9075)
        XCTAssertEqual(one.decide(model: "m", affinity: AffinityKey("alice"), using: &r1)?.targetModel, "big")
        XCTAssertEqual(one.decide(model: "m", affinity: AffinityKey("ivan"), using: &r1)?.targetModel, "small")
    }

    func testObjectives() {
        let o = Objectives([
            InferenceObjective(metadata: ObjectMeta(name: "critical"), spec: .init(priority: 10, poolRef: .init(name: "pool"))),
            InferenceObjective(metadata: ObjectMeta(name: "batch"), spec: .init(priority: -1, poolRef: .init(name: "pool"))),
            InferenceObjective(metadata: ObjectMeta(name: "default-prio"), spec: .init(poolRef: .init(name: "pool"))),
            InferenceObjective(metadata: ObjectMeta(name: "elsewhere"), spec: .init(priority: 5, poolRef: .init(name: "other"))),
        ], poolName: "pool")
        XCTAssertEqual(o.priority(for: "critical"), 10)
        XCTAssertEqual(o.priority(for: "batch"), -1)
        XCTAssertEqual(o.priority(for: "default-prio"), 0)
        XCTAssertEqual(o.priority(for: "elsewhere"), 0)
        XCTAssertEqual(o.priority(for: "unknown"), 0)
        XCTAssertEqual(o.priority(for: nil), 0)
    }
}
