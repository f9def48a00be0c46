import Atomics
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A model-server endpoint: an IP literal and a port.
public struct Endpoint: Hashable, Sendable, CustomStringConvertible {
    /// IP literal without brackets.
    public var host: String
    public var port: Int
    /// `ip:port`, IPv6 bracketed (`[::1]:8000`); the value of `x-gateway-destination-endpoint`.
    public var address: String
    public var podName: String?

    public init(host: String, port: Int, podName: String? = nil) {
        self.host = host
        self.port = port
        self.podName = podName
        self.address = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    public var description: String { podName.map { "\(address) (\($0))" } ?? address }

    /// Parses `ip:port` or `[ipv6]:port`.
    public static func parse(_ text: String) throws(EndpointParseError) -> Endpoint {
        let s = text.trimmingSpaces
        guard !s.isEmpty else { throw EndpointParseError(input: text, message: "empty endpoint") }
        let host: Substring
        let portText: Substring
        if s.hasPrefix("[") {
            guard let close = s.firstIndex(of: "]") else {
                throw EndpointParseError(input: text, message: "missing ']' after IPv6 address")
            }
            host = s[s.index(after: s.startIndex)..<close]
            let rest = s[s.index(after: close)...]
            guard rest.hasPrefix(":") else { throw EndpointParseError(input: text, message: "expected ':port' after ']'") }
            portText = rest.dropFirst()
            guard isIPv6(String(host)) else { throw EndpointParseError(input: text, message: "invalid IPv6 address '\(host)'") }
        } else {
            guard let colon = s.lastIndex(of: ":") else {
                throw EndpointParseError(input: text, message: "missing ':port'")
            }
            host = s[..<colon]
            portText = s[s.index(after: colon)...]
            if host.contains(":") {
                throw EndpointParseError(input: text, message: "IPv6 addresses must be bracketed, e.g. [::1]:8000")
            }
            guard isIPv4(host) else { throw EndpointParseError(input: text, message: "invalid IPv4 address '\(host)'") }
        }
        guard !portText.isEmpty, portText.allSatisfy({ $0.isASCII && $0.isNumber }), let port = Int(portText), (1...65535).contains(port) else {
            throw EndpointParseError(input: text, message: "invalid port '\(portText)' (1-65535)")
        }
        return Endpoint(host: String(host), port: port)
    }

    static func isIPv4<S: StringProtocol>(_ s: S) -> Bool {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return false }
        for p in parts {
            guard (1...3).contains(p.count), p.allSatisfy({ $0.isASCII && $0.isNumber }), let v = Int(p), v <= 255 else { return false }
        }
        return true
    }

    static func isIPv6(_ s: String) -> Bool {
        var buf = in6_addr()
        return s.withCString { inet_pton(AF_INET6, $0, &buf) } == 1
    }
}

/// Why an endpoint list did not parse.
public struct EndpointParseError: Error, Equatable, Sendable, CustomStringConvertible {
    public var input: String
    public var message: String
    public var description: String { "invalid endpoint '\(input)': \(message)" }
}

extension StringProtocol {
    var trimmingSpaces: SubSequence {
        var a = startIndex, b = endIndex
        while a < b, self[a].isWhitespace { a = index(after: a) }
        while b > a, self[index(before: b)].isWhitespace { b = index(before: b) }
        return self[a..<b]
    }
}

/// An endpoint plus its live state, shared across snapshots: the requests in flight through this
/// picker and the model server's last load sample.
public final class EndpointRecord: Sendable {
    public let endpoint: Endpoint
    private let inFlight: ManagedAtomic<Int>
    private let loadSample: ManagedAtomic<EndpointLoad?>
    /// Prefix-cache index bit (0..<`PrefixCacheIndex.slotCount`), -1 before the first prefix was recorded.
    private let prefixSlotToken: ManagedAtomic<Int>

    public init(endpoint: Endpoint) {
        self.endpoint = endpoint
        self.inFlight = ManagedAtomic(0)
        self.loadSample = ManagedAtomic(nil)
        self.prefixSlotToken = ManagedAtomic(-1)
    }

    /// A record for changed metadata (e.g. pod name) at the same address: shares the counter
    /// and the load, so requests begun on `other` still end correctly.
    init(endpoint: Endpoint, sharingCounterOf other: EndpointRecord) {
        self.endpoint = endpoint
        self.inFlight = other.inFlight
        self.loadSample = other.loadSample
        self.prefixSlotToken = other.prefixSlotToken
    }

    func setPrefixSlot(_ slot: Int) {
        prefixSlotToken.store(slot, ordering: .relaxed)
    }

    @inline(__always)
    var prefixSlot: Int { prefixSlotToken.load(ordering: .relaxed) }

    /// Call when a request is sent to this endpoint.
    @inline(__always) public func begin() { inFlight.wrappingIncrement(ordering: .relaxed) }
    /// Call exactly once per `begin()` when the request finishes.
    @inline(__always) public func end() { inFlight.wrappingDecrement(ordering: .relaxed) }
    public var inFlightCount: Int { inFlight.load(ordering: .relaxed) }

    /// The model server's last reported load (nil until the first successful scrape).
    public var load: EndpointLoad? { loadSample.load(ordering: .acquiring) }

    /// Publishes a scrape; stamps it with the in-flight count and the time now.
    public func record(waiting: Int, running: Int, kvCacheUsage: Double, lora: LoRAAdapters? = nil,
                       servedModels: [String] = [], at time: UInt64 = MonotonicClock.nanoseconds) {
        loadSample.store(EndpointLoad(waiting: waiting, running: running, kvCacheUsage: kvCacheUsage,
                                      inFlightAtSample: inFlightCount, sampledAt: time, lora: lora,
                                      servedModels: servedModels), ordering: .releasing)
    }

    /// Drops the last sample (the server cannot be reached): its load is unknown from now on, as if
    /// it had gone stale, until the next successful scrape.
    public func forgetLoad() {
        loadSample.store(nil, ordering: .releasing)
    }

    /// The last sample if it is no older than the policy allows.
    @inline(__always)
    public func freshLoad(now: UInt64, _ policy: LoadPolicy) -> EndpointLoad? {
        guard let l = load, now &- l.sampledAt <= policy.stalenessNanos || l.sampledAt > now else { return nil }
        return l
    }

    /// Waiting requests as the picker sees them: the server's queue plus what this picker sent
    /// since the sample (not queued there yet when it was taken).
    @inline(__always)
    func queueEstimate(_ l: EndpointLoad) -> Int {
        l.waiting + max(0, inFlightCount - l.inFlightAtSample)
    }
}

/// An immutable snapshot of the pool's endpoints, and picking among them (by load, else by
/// fewest in flight).
public final class EndpointSet: Sendable {
    public let records: [EndpointRecord]
    private let byAddress: [String: EndpointRecord]

    /// Builds a snapshot, reusing `previous` records with the same address so in-flight
    /// counts survive updates. Duplicate addresses keep the first.
    public init(endpoints: [Endpoint], previous: EndpointSet? = nil) {
        var recs: [EndpointRecord] = []
        var map: [String: EndpointRecord] = [:]
        recs.reserveCapacity(endpoints.count)
        for e in endpoints where map[e.address] == nil {
            let r: EndpointRecord
            if let old = previous?.byAddress[e.address], old.endpoint == e {
                r = old
            } else if let old = previous?.byAddress[e.address] {
                // Same address, changed metadata (e.g. pod name): keep the count going.
                r = EndpointRecord(endpoint: e, sharingCounterOf: old)
            } else {
                r = EndpointRecord(endpoint: e)
            }
            recs.append(r)
            map[e.address] = r
        }
        records = recs
        byAddress = map
    }

    public static let empty = EndpointSet(endpoints: [])

    public var count: Int { records.count }
    public var isEmpty: Bool { records.isEmpty }
    public func record(for address: String) -> EndpointRecord? { byAddress[address] }

    /// Picks an endpoint for a request.
    ///
    /// With load scoring on, candidates with a fresh load sample are scored as the reference EPP
    /// does (queue depth ×2: `(maxQ − q)/(maxQ − minQ)`, KV cache ×2: `1 − kv`, and with `prefix`
    /// prefix-cache affinity ×3: the share of the prompt's leading blocks the endpoint was sent
    /// before; LoRA affinity ×1 for a `model` that is an adapter, see `LoRAAdapters.affinity`)
    /// and the highest wins, ties to the fewest in flight, then at random. Without fresh
    /// samples (or with scoring off) the candidate with the fewest requests in flight wins, ties at
    /// random.
    /// - Parameter subset: nil = all endpoints; otherwise only these addresses (unknown ones
    ///   are ignored; empty → nil).
    public func pick(subset: [String]?, policy: LoadPolicy, now: UInt64, prefix: PrefixMatch? = nil,
                     model: String? = nil, using rng: inout some RandomNumberGenerator) -> EndpointRecord? {
        guard policy.enabled, let scoring = scoring(subset: subset, policy: policy, now: now, prefix: prefix, model: model) else {
            return pick(subset: subset, using: &rng)
        }
        // Pass 2: score; ties by in-flight count, then reservoir-sampled.
        var best: EndpointRecord?
        var bestScore = -Double.infinity, bestInFlight = Int.max
        var ties: UInt64 = 0
        forEachCandidate(subset) { r in
            guard let l = r.freshLoad(now: now, policy) else { return }
            let score = scoring.score(r, l)
            let f = r.inFlightCount
            if score > bestScore + 1e-9 || (score >= bestScore - 1e-9 && f < bestInFlight) {
                best = r; bestScore = max(score, bestScore); bestInFlight = f; ties = 1
            } else if score >= bestScore - 1e-9 && f == bestInFlight {
                ties += 1
                if rng.draw(below: ties) == 0 { best = r }
            }
        }
        return best ?? pick(subset: subset, using: &rng)
    }

    /// Up to `count` more endpoints for the gateway to try, in order, when `primary` fails (the
    /// endpoint picker protocol's fallback list): ranked as `pick` ranks (score, then fewest in
    /// flight, then at random); candidates without a fresh load sample follow the scored ones.
    public func fallbacks(after primary: EndpointRecord, count: Int, subset: [String]?, policy: LoadPolicy, now: UInt64,
                          prefix: PrefixMatch? = nil, model: String? = nil,
                          using rng: inout some RandomNumberGenerator) -> [EndpointRecord] {
        guard count > 0 else { return [] }
        let scoring = policy.enabled ? scoring(subset: subset, policy: policy, now: now, prefix: prefix, model: model) : nil
        var ranked: [RankedCandidate] = []
        ranked.reserveCapacity(count + 1)
        forEachCandidate(subset) { r in
            guard r !== primary, !ranked.contains(where: { $0.record === r }) else { return }
            var c = RankedCandidate(record: r, fresh: false, score: 0, inFlight: r.inFlightCount, tie: rng.next())
            if let scoring, let l = r.freshLoad(now: now, policy) {
                c.fresh = true
                c.score = scoring.score(r, l)
            }
            var i = ranked.count
            while i > 0 && c.precedes(ranked[i - 1]) { i -= 1 }
            guard i < count else { return }
            ranked.insert(c, at: i)
            if ranked.count > count { ranked.removeLast() }
        }
        return ranked.map(\.record)
    }

    /// Pass 1 of scoring: the queue range among fresh candidates, and whether `model` is a LoRA
    /// adapter here (some candidate reports adapters, none serves it as its base model); nil when
    /// no candidate has a fresh sample.
    @inline(__always)
    private func scoring(subset: [String]?, policy: LoadPolicy, now: UInt64, prefix: PrefixMatch?,
                         model: String?) -> CandidateScoring? {
        var minQ = Int.max, maxQ = Int.min, fresh = 0
        var adapters = false, baseModel = false
        let scoreLoRA = policy.loraWeight > 0 && model != nil
        forEachCandidate(subset) { r in
            guard let l = r.freshLoad(now: now, policy) else { return }
            let q = r.queueEstimate(l)
            minQ = min(minQ, q); maxQ = max(maxQ, q); fresh += 1
            if scoreLoRA {
                if l.lora != nil { adapters = true }
                if !baseModel, let model, l.servedModels.contains(model) { baseModel = true }
            }
        }
        if fresh == 0 { return nil }
        return CandidateScoring(policy: policy, prefix: prefix, adapter: adapters && !baseModel ? model : nil,
                                minQ: minQ, maxQ: maxQ)
    }

    /// Whether any candidate has a fresh load sample (scoring, and so prefix affinity, applies).
    public func hasFreshLoad(subset: [String]?, policy: LoadPolicy, now: UInt64) -> Bool {
        guard policy.enabled else { return false }
        var any = false
        forEachCandidate(subset) { r in if !any && r.freshLoad(now: now, policy) != nil { any = true } }
        return any
    }

    /// Whether the candidates are saturated (the reference's default detector): per endpoint
    /// `max(q / queueDepthThreshold, kv / kvCacheThreshold)`, a missing or stale sample counting
    /// as full (1.0); saturated when the mean reaches 1. Never with scoring off.
    public func isSaturated(subset: [String]?, policy: LoadPolicy, now: UInt64) -> Bool {
        guard policy.enabled else { return false }
        var sum = 0.0, n = 0
        forEachCandidate(subset) { r in
            n += 1
            guard let l = r.freshLoad(now: now, policy) else { sum += 1; return }
            sum += max(Double(r.queueEstimate(l)) / policy.queueDepthThreshold, l.kvCacheUsage / policy.kvCacheThreshold)
        }
        return n > 0 && sum / Double(n) >= 1
    }

    /// Means over the endpoints with fresh samples (pool gauges); nil when none has one.
    public func averageLoad(policy: LoadPolicy, now: UInt64) -> (queue: Double, kvCache: Double)? {
        var q = 0.0, kv = 0.0, n = 0
        for r in records {
            guard let l = r.freshLoad(now: now, policy) else { continue }
            q += Double(l.waiting); kv += l.kvCacheUsage; n += 1
        }
        return n == 0 ? nil : (q / Double(n), kv / Double(n))
    }

    @inline(__always)
    private func forEachCandidate(_ subset: [String]?, _ body: (EndpointRecord) -> Void) {
        if let subset {
            for a in subset { if let r = byAddress[a] { body(r) } }
        } else {
            for r in records { body(r) }
        }
    }

    /// Picks the candidate with the fewest requests in flight, ties uniformly at random.
    /// - Parameter subset: nil = all endpoints; otherwise only these addresses (unknown ones
    ///   are ignored; empty → nil).
    public func pick(subset: [String]?, using rng: inout some RandomNumberGenerator) -> EndpointRecord? {
        if let subset {
            var best = Int.max, ties = 0
            for a in subset {
                guard let r = byAddress[a] else { continue }
                let c = r.inFlightCount
                if c < best { best = c; ties = 1 } else if c == best { ties += 1 }
            }
            if ties == 0 { return nil }
            var k = ties == 1 ? 0 : Int(rng.draw(below: UInt64(ties)))
            var fallback: EndpointRecord?
            for a in subset {
                guard let r = byAddress[a] else { continue }
                if r.inFlightCount <= best {
                    if k == 0 { return r }
                    k -= 1
                    fallback = r
                }
            }
            return fallback ?? subset.lazy.compactMap { self.byAddress[$0] }.first
        }
        let recs = records
        let n = recs.count
        if n == 0 { return nil }
        if n == 1 { return recs[0] }
        var best = Int.max, ties = 0
        for r in recs {
            let c = r.inFlightCount
            if c < best { best = c; ties = 1 } else if c == best { ties += 1 }
        }
        var k = ties == 1 ? 0 : Int(rng.draw(below: UInt64(ties)))
        var fallback = recs[0]
        for r in recs where r.inFlightCount <= best {
            if k == 0 { return r }
            k -= 1
            fallback = r
        }
        // Counts moved between the passes; any least-loaded-ish record will do.
        return fallback
    }

    /// Parses `ip:port,ip:port` (spaces allowed, empty entries ignored, duplicates rejected).
    public static func parse(list: String) throws(EndpointParseError) -> [Endpoint] {
        var out: [Endpoint] = []
        var seen = Set<String>()
        for part in list.split(separator: ",", omittingEmptySubsequences: false) {
            if part.trimmingSpaces.isEmpty { continue }
            let e = try Endpoint.parse(String(part))
            if !seen.insert(e.address).inserted {
                throw EndpointParseError(input: String(part), message: "duplicate endpoint")
            }
            out.append(e)
        }
        if out.isEmpty { throw EndpointParseError(input: list, message: "no endpoints given") }
        return out
    }
}

/// Scores candidates with fresh load samples, from what pass 1 found (see `EndpointSet.pick`).
struct CandidateScoring {
    let policy: LoadPolicy
    let prefix: PrefixMatch?
    /// The requested model when it is a LoRA adapter in this pool.
    let adapter: String?
    let minQ: Int
    let maxQ: Int

    @inline(__always)
    func score(_ r: EndpointRecord, _ l: EndpointLoad) -> Double {
        let q = min(maxQ, max(minQ, r.queueEstimate(l)))  // counts may have moved since pass 1
        let span = Double(maxQ - minQ)
        let queueScore = span > 0 ? Double(maxQ - q) / span : 1
        var score = policy.queueWeight * queueScore + policy.kvCacheWeight * (1 - l.kvCacheUsage)
        if let prefix { score += policy.prefixWeight * prefix.score(of: r) }
        if let adapter { score += policy.loraWeight * (l.lora?.affinity(for: adapter) ?? 0) }
        return score
    }
}

/// A fallback candidate's rank (see `EndpointSet.fallbacks`).
private struct RankedCandidate {
    var record: EndpointRecord
    var fresh: Bool
    var score: Double
    var inFlight: Int
    var tie: UInt64

    /// Fresh samples first, then the higher score, fewer in flight, the random tie-breaker.
    func precedes(_ o: RankedCandidate) -> Bool {
        if fresh != o.fresh { return fresh }
        if score > o.score + 1e-9 { return true }
        if score < o.score - 1e-9 { return false }
        if inFlight != o.inFlight { return inFlight < o.inFlight }
        return tie < o.tie
    }
}
