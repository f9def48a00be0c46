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

/// An endpoint plus its live in-flight request count, shared across snapshots.
public final class EndpointRecord: Sendable {
    public let endpoint: Endpoint
    private let inFlight: ManagedAtomic<Int>

    public init(endpoint: Endpoint) {
        self.endpoint = endpoint
        self.inFlight = ManagedAtomic(0)
    }

    /// A record for changed metadata (e.g. pod name) at the same address: shares the counter,
    /// so requests begun on `other` still end correctly.
    init(endpoint: Endpoint, sharingCounterOf other: EndpointRecord) {
        self.endpoint = endpoint
        self.inFlight = other.inFlight
    }

    /// Call when a request is sent to this endpoint.
    @inline(__always) public func begin() { inFlight.wrappingIncrement(ordering: .relaxed) }
    /// Call exactly once per `begin()` when the request finishes.
    @inline(__always) public func end() { inFlight.wrappingDecrement(ordering: .relaxed) }
    public var inFlightCount: Int { inFlight.load(ordering: .relaxed) }
}

/// An immutable snapshot of the pool's endpoints with least-in-flight picking.
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
