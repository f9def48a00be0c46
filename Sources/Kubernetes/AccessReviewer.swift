import Foundation
import NIOConcurrencyHelpers

/// Decides whether a bearer token may read a non-resource path (the EPP's `/metrics`), as the
/// reference EPP's metrics endpoint auth does: a TokenReview says who the token belongs to, a
/// SubjectAccessReview whether that user may `get` the path. Decisions are cached briefly
/// (allowed 60 s, denied 10 s) so a scrape every few seconds costs the API server little.
public final class AccessReviewer: Sendable {
    public enum Decision: Sendable, Equatable {
        case allowed(user: String)
        /// No token, or one the API server does not accept.
        case unauthenticated(String)
        case forbidden(user: String, reason: String)
        /// The reviews themselves failed (API server unreachable, RBAC missing for the reviews).
        case unavailable(String)
    }

    private let client: KubernetesClient
    private let allowedTTL: Duration
    private let deniedTTL: Duration
    private let maxEntries: Int
    private let cache = NIOLockedValueBox<[String: (decision: Decision, until: ContinuousClock.Instant)]>([:])

    public init(client: KubernetesClient, allowedTTL: Duration = .seconds(60), deniedTTL: Duration = .seconds(10),
                maxEntries: Int = 256) {
        self.client = client
        self.allowedTTL = allowedTTL
        self.deniedTTL = deniedTTL
        self.maxEntries = maxEntries
    }

    /// Whether `token` may `verb` the non-resource `path`.
    public func review(token: String?, path: String, verb: String = "get") async -> Decision {
        guard let token, !token.isEmpty else { return .unauthenticated("no bearer token") }
        let key = "\(verb) \(path) \(token)"
        let now = ContinuousClock.now
        if let hit = cache.withLockedValue({ $0[key] }), hit.until > now { return hit.decision }
        let decision = await decide(token: token, path: path, verb: verb)
        if case .unavailable = decision { return decision }  // not cached: the next scrape tries again
        let ttl: Duration
        if case .allowed = decision { ttl = allowedTTL } else { ttl = deniedTTL }
        cache.withLockedValue { c in
            if c.count >= maxEntries {
                c = c.filter { $0.value.until > now }
                if c.count >= maxEntries { c.removeAll() }
            }
            c[key] = (decision, now + ttl)
        }
        return decision
    }

    private func decide(token: String, path: String, verb: String) async -> Decision {
        let user: ReviewUser
        do {
            let review = TokenReview(spec: .init(token: token))
            let response = try await client.send(.init(method: .POST, path: "/apis/authentication.k8s.io/v1/tokenreviews",
                                                       body: [UInt8](try JSONEncoder().encode(review))), timeout: .seconds(10))
                .checked(path: "tokenreviews").decode(TokenReview.self)
            guard response.status?.authenticated == true, let u = response.status?.user, let name = u.username else {
                return .unauthenticated(response.status?.error ?? "token not accepted")
            }
            user = ReviewUser(username: name, uid: u.uid, groups: u.groups, extra: u.extra)
        } catch {
            return .unavailable("TokenReview: \(error)")
        }
        do {
            let sar = SubjectAccessReview(spec: .init(user: user.username, uid: user.uid, groups: user.groups, extra: user.extra,
                                                      nonResourceAttributes: .init(path: path, verb: verb)))
            let response = try await client.send(.init(method: .POST, path: "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                                                       body: [UInt8](try JSONEncoder().encode(sar))), timeout: .seconds(10))
                .checked(path: "subjectaccessreviews").decode(SubjectAccessReview.self)
            let name = user.username ?? ""
            if response.status?.allowed == true { return .allowed(user: name) }
            return .forbidden(user: name, reason: response.status?.reason ?? "")
        } catch {
            return .unavailable("SubjectAccessReview: \(error)")
        }
    }
}

private struct ReviewUser: Codable {
    var username: String?
    var uid: String?
    var groups: [String]?
    var extra: [String: [String]]?
}

private struct TokenReview: Codable {
    var apiVersion = "authentication.k8s.io/v1"
    var kind = "TokenReview"
    var spec: Spec?
    var status: Status?

    struct Spec: Codable { var token: String }
    struct Status: Codable {
        var authenticated: Bool?
        var user: ReviewUser?
        var error: String?
    }

    init(spec: Spec) { self.spec = spec }
}

private struct SubjectAccessReview: Codable {
    var apiVersion = "authorization.k8s.io/v1"
    var kind = "SubjectAccessReview"
    var spec: Spec?
    var status: Status?

    struct Spec: Codable {
        var user: String?
        var uid: String?
        var groups: [String]?
        var extra: [String: [String]]?
        var nonResourceAttributes: NonResource
    }
    struct NonResource: Codable {
        var path: String
        var verb: String
    }
    struct Status: Codable {
        var allowed: Bool?
        var denied: Bool?
        var reason: String?
    }

    init(spec: Spec) { self.spec = spec }
}
