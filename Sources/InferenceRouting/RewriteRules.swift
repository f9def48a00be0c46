import StreamingJSON

/// The key that makes a weighted split sticky (e.g. a user or session id).
public struct AffinityKey: Sendable, Hashable {
    public var value: String
    public init(_ value: String) { self.value = value }
    public init<C: Collection>(bytes: C) where C.Element == UInt8 { value = String(decoding: bytes, as: UTF8.self) }
}

/// The outcome of a rewrite lookup.
public struct RewriteDecision: Sendable, Equatable {
    /// `namespace/name` of the InferenceModelRewrite that decided.
    public var rewriteName: String
    public var targetModel: String
    /// `targetModel` as a JSON string literal, encoded once when the rules were compiled.
    public var quotedTargetModel: [UInt8]
    /// The requested model as a JSON string literal when an Exact rule matched it (known at
    /// compile time too); nil for a match-all rule.
    public var quotedModel: [UInt8]?

    public init(rewriteName: String, targetModel: String, quotedTargetModel: [UInt8]? = nil, quotedModel: [UInt8]? = nil) {
        self.rewriteName = rewriteName
        self.targetModel = targetModel
        self.quotedTargetModel = quotedTargetModel ?? JSONStringEncoding.quoted(targetModel)
        self.quotedModel = quotedModel
    }

    /// Decisions are equal when they name the same rewrite and target (the encodings follow).
    public static func == (a: RewriteDecision, b: RewriteDecision) -> Bool {
        a.rewriteName == b.rewriteName && a.targetModel == b.targetModel
    }
}

/// Per-resource validation result, for status reporting and logs.
public struct RewriteValidation: Sendable, Equatable {
    /// `namespace/name`.
    public var resource: String
    public var generation: Int?
    public var accepted: Bool
    /// `Accepted`, `MixedWeights`, `NoTargets`, `InvalidWeight`, `EmptyTarget`,
    /// `UnsupportedPoolRef`, `UnsupportedMatchType` or `Conflict`.
    public var reason: String
    public var message: String

    public init(resource: String, generation: Int?, accepted: Bool, reason: String, message: String) {
        self.resource = resource
        self.generation = generation
        self.accepted = accepted
        self.reason = reason
        self.message = message
    }
}

/// Deterministic 64-bit hash for sticky splits: FNV-1a 64 followed by the SplitMix64
/// finalizer. Fixed across processes, replicas and restarts (unlike `Hasher`).
public enum StickyHash {
    public static let offsetBasis: UInt64 = 0xCBF2_9CE4_8422_2325
    public static let prime: UInt64 = 0x0000_0100_0000_01B3

    @inline(__always)
    public static func fnv1a<C: Sequence>(_ bytes: C, seed: UInt64 = offsetBasis) -> UInt64 where C.Element == UInt8 {
        var h = seed
        for b in bytes { h = (h ^ UInt64(b)) &* prime }
        return h
    }

    @inline(__always)
    public static func mix(_ x: UInt64) -> UInt64 {
        var z = x
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Hash of `key` under a rule identity: `mix(fnv1a(identity ‖ 0x00 ‖ key))`.
    public static func hash(identity: String, key: String) -> UInt64 {
        mix(keyed(seed: fnv1a([0], seed: fnv1a(identity.utf8)), key: key))
    }

    @inline(__always)
    static func keyed(seed: UInt64, key: String) -> UInt64 {
        if let h = key.utf8.withContiguousStorageIfAvailable({ fnv1a($0, seed: seed) }) { return h }
        return fnv1a(key.utf8, seed: seed)
    }

    /// Maps a hash uniformly onto `0..<bound` (multiply-high).
    @inline(__always)
    public static func scale(_ h: UInt64, _ bound: UInt64) -> UInt64 {
        h.multipliedFullWidth(by: bound).high
    }
}

/// An immutable, O(1) lookup table of the model rewrites that apply to one pool.
///
/// Precedence: an Exact match beats a match-all rule; across resources the oldest
/// `creationTimestamp` wins (then `namespace/name`; resources without a timestamp come after
/// those with one, in input order); within a resource the first rule in list order wins.
/// Invalid resources are excluded entirely and reported in ``validations``.
public struct RewriteRules: Sendable {
    struct CompiledRule: Sendable {
        let rewriteName: String
        let targets: [String]
        /// `targets` as JSON string literals (what the request body gets).
        let quotedTargets: [[UInt8]]
        /// The Exact match value this entry was stored under, quoted; nil for match-all.
        var quotedMatch: [UInt8]? = nil
        /// Cumulative weights; last = total.
        let cumulative: [UInt64]
        /// FNV-1a state after `identity ‖ 0x00`, so per-request hashing covers only the key.
        let hashSeed: UInt64
        var total: UInt64 { cumulative[cumulative.count - 1] }
    }

    private var exact: [String: CompiledRule] = [:]
    private var matchAll: CompiledRule?
    /// One entry per considered resource, in precedence order.
    public private(set) var validations: [RewriteValidation] = []

    /// An empty rule set.
    public init() {}

    /// Builds the rules for a pool.
    /// - Parameters:
    ///   - poolName: rewrites whose `poolRef.name` differs are ignored (not validated); nil
    ///     accepts any name (standalone mode without a pool).
    ///   - poolGroup: the pool's API group; `poolRef.group` (default
    ///     `inference.networking.k8s.io`) must equal it, and `kind` must be `InferencePool`.
    ///   - poolNamespace: if set, rewrites in other namespaces are ignored.
    public init(_ rewrites: [InferenceModelRewrite], poolName: String?, poolGroup: String = InferenceAPI.poolGroupV1,
                poolNamespace: String? = nil) {
        let ordered = rewrites.enumerated().filter { _, r in
            (poolName == nil || r.spec.poolRef.name == poolName)
                && (poolNamespace == nil || (r.metadata.namespace ?? "default") == poolNamespace)
        }.sorted { a, b in
            switch (a.element.metadata.creationTimestamp, b.element.metadata.creationTimestamp) {
            case let (ta?, tb?):
                if ta != tb { return ta < tb }
                let na = a.element.metadata.qualifiedName, nb = b.element.metadata.qualifiedName
                return na != nb ? na < nb : a.offset < b.offset
            case (.some, nil): return true
            case (nil, .some): return false
            case (nil, nil): return a.offset < b.offset
            }
        }.map(\.element)

        var owner: [String: String] = [:]   // exact model → winning resource
        var matchAllOwner: String?
        for r in ordered {
            let name = r.metadata.qualifiedName
            let gen = r.metadata.generation
            func reject(_ reason: String, _ message: String) {
                validations.append(RewriteValidation(resource: name, generation: gen, accepted: false, reason: reason, message: message))
            }
            let ref = r.spec.poolRef
            if ref.effectiveKind != "InferencePool" || ref.effectiveGroup != poolGroup {
                reject("UnsupportedPoolRef", "poolRef \(ref.effectiveGroup)/\(ref.effectiveKind) is not \(poolGroup)/InferencePool")
                continue
            }
            // Validate every rule first: an invalid resource is excluded entirely.
            var compiled: [(rule: CompiledRule, matches: [String]?)] = []
            var problem: (String, String)?
            for (idx, rule) in (r.spec.rules ?? []).enumerated() {
                let targets = rule.targets ?? []
                if targets.isEmpty { problem = ("NoTargets", "rule \(idx) has no targets"); break }
                if targets.contains(where: { $0.modelRewrite.isEmpty }) { problem = ("EmptyTarget", "rule \(idx) has a target with an empty modelRewrite"); break }
                let weighted = targets.filter { $0.weight != nil }.count
                if weighted != 0 && weighted != targets.count {
                    problem = ("MixedWeights", "rule \(idx): either all targets or none must set weight"); break
                }
                if let bad = targets.first(where: { ($0.weight ?? 1) < 1 || ($0.weight ?? 1) > 1_000_000 }) {
                    problem = ("InvalidWeight", "rule \(idx): weight \(bad.weight ?? 0) is outside 1..1000000"); break
                }
                if let m = rule.matches?.first(where: { ($0.model.type ?? "Exact") != "Exact" }) {
                    problem = ("UnsupportedMatchType", "rule \(idx): match type \(m.model.type ?? "") is not supported"); break
                }
                var cum: [UInt64] = []
                var sum: UInt64 = 0
                for t in targets { sum += UInt64(t.weight ?? 1); cum.append(sum) }
                let identity = "\(name)#\(idx)"
                let seed = StickyHash.fnv1a([0], seed: StickyHash.fnv1a(identity.utf8))
                let names = targets.map(\.modelRewrite)
                let cr = CompiledRule(rewriteName: name, targets: names, quotedTargets: names.map { JSONStringEncoding.quoted($0) },
                                      cumulative: cum, hashSeed: seed)
                let values = rule.matches.map { $0.map(\.model.value) }
                compiled.append((cr, (values?.isEmpty ?? true) ? nil : values))
            }
            if let (reason, message) = problem { reject(reason, message); continue }

            var shadowed: [String] = []
            var total = 0
            for (rule, matches) in compiled {
                if let matches {
                    for m in matches {
                        total += 1
                        if let o = owner[m] {
                            if o != name { shadowed.append("\(m) (by \(o))") }
                            continue
                        }
                        owner[m] = name
                        var entry = rule
                        entry.quotedMatch = JSONStringEncoding.quoted(m)
                        exact[m] = entry
                    }
                } else {
                    total += 1
                    if let o = matchAllOwner {
                        if o != name { shadowed.append("* (by \(o))") }
                        continue
                    }
                    matchAllOwner = name
                    matchAll = rule
                }
            }
            if shadowed.isEmpty {
                validations.append(RewriteValidation(resource: name, generation: gen, accepted: true, reason: "Accepted", message: "rewrite is in force"))
            } else {
                // Still accepted while some of its matches are in force.
                validations.append(RewriteValidation(resource: name, generation: gen, accepted: shadowed.count < total, reason: "Conflict",
                                                     message: "matches shadowed by older rewrites: " + shadowed.joined(separator: ", ")))
            }
        }
    }

    /// True if no rule applies to any model.
    public var isEmpty: Bool { exact.isEmpty && matchAll == nil }

    /// Picks the target for a requested model; nil if no rule matches.
    ///
    /// With an affinity key the arm is `StickyHash` of (rule identity, key) scaled to the weight
    /// sum, so all replicas agree; otherwise a weighted random draw from `rng`.
    public func decide(model: String, affinity: AffinityKey?, using rng: inout some RandomNumberGenerator) -> RewriteDecision? {
        guard let rule = exact[model] ?? matchAll else { return nil }
        let n = rule.targets.count
        if n == 1 { return decision(rule, 0) }
        let total = rule.total
        let r: UInt64
        if let affinity {
            r = StickyHash.scale(StickyHash.mix(StickyHash.keyed(seed: rule.hashSeed, key: affinity.value)), total)
        } else {
            r = rng.draw(below: total)
        }
        var i = 0
        while i < n - 1 && r >= rule.cumulative[i] { i += 1 }
        return decision(rule, i)
    }

    private func decision(_ rule: CompiledRule, _ i: Int) -> RewriteDecision {
        RewriteDecision(rewriteName: rule.rewriteName, targetModel: rule.targets[i], quotedTargetModel: rule.quotedTargets[i],
                        quotedModel: rule.quotedMatch)
    }
}

/// InferenceObjective name → priority for one pool.
public struct Objectives: Sendable {
    private var priorities: [String: Int] = [:]

    public init() {}

    /// Builds the table; objectives of other pools are ignored (nil `poolName` accepts all).
    /// When two share a name, the oldest (then input order) wins.
    public init(_ objectives: [InferenceObjective], poolName: String?, poolNamespace: String? = nil) {
        let ordered = objectives.enumerated().sorted { a, b in
            switch (a.element.metadata.creationTimestamp, b.element.metadata.creationTimestamp) {
            case let (ta?, tb?): return ta != tb ? ta < tb : a.offset < b.offset
            case (.some, nil): return true
            case (nil, .some): return false
            case (nil, nil): return a.offset < b.offset
            }
        }
        for (_, o) in ordered {
            if let poolName, o.spec.poolRef.name != poolName { continue }
            if let poolNamespace, (o.metadata.namespace ?? "default") != poolNamespace { continue }
            if priorities[o.metadata.name] == nil { priorities[o.metadata.name] = o.spec.priority ?? 0 }
        }
    }

    /// Priority of a named objective; unknown or nil → 0.
    public func priority(for name: String?) -> Int {
        guard let name else { return 0 }
        return priorities[name] ?? 0
    }

    public var count: Int { priorities.count }
}
