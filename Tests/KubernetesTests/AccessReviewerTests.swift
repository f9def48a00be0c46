import Foundation
import XCTest
@testable import Kubernetes

/// Token reviews against the fake API server (TokenReview + SubjectAccessReview as kube-apiserver answers them).
final class AccessReviewerTests: XCTestCase {
    func testDecisionsAndCaching() async throws {
        let server = try FakeAPIServer()
        try await server.call("config", [
            "review_tokens": ["prom": ["username": "prometheus"], "alice": ["username": "alice"], "bob": ["username": "bob"]],
            "nonresource_allow": ["prometheus": ["/metrics"]],
        ])
        let client = KubernetesClient(config: server.config(), logger: testLogger())
        let reviewer = AccessReviewer(client: client, allowedTTL: .seconds(60), deniedTTL: .seconds(1))
        let none = await reviewer.review(token: nil, path: "/metrics")
        XCTAssertEqual(none, .unauthenticated("no bearer token"))
        let unknown = await reviewer.review(token: "nobody", path: "/metrics")
        guard case .unauthenticated = unknown else { return XCTFail("\(unknown)") }
        let alice = await reviewer.review(token: "alice", path: "/metrics")
        guard case .forbidden(let user, _) = alice else { return XCTFail("\(alice)") }
        XCTAssertEqual(user, "alice")
        let wrongPath = await reviewer.review(token: "prom", path: "/debug")
        guard case .forbidden = wrongPath else { return XCTFail("\(wrongPath)") }
        let allowed = await reviewer.review(token: "prom", path: "/metrics")
        XCTAssertEqual(allowed, .allowed(user: "prometheus"))

        // Cached: no more reviews for the same token and path.
        let reviews = try await server.requestCount("tokenreview")
        for _ in 0..<5 {
            let again = await reviewer.review(token: "prom", path: "/metrics")
            XCTAssertEqual(again, .allowed(user: "prometheus"))
        }
        let after = try await server.requestCount("tokenreview")
        XCTAssertEqual(after, reviews)

        // A denial is cached briefly: once bob may read /metrics, he can after the denied TTL.
        let bob = await reviewer.review(token: "bob", path: "/metrics")
        guard case .forbidden = bob else { return XCTFail("\(bob)") }
        try await server.call("config", ["nonresource_allow": ["prometheus": ["/metrics"], "bob": ["/metrics"]]])
        let stillDenied = await reviewer.review(token: "bob", path: "/metrics")
        guard case .forbidden = stillDenied else { return XCTFail("cached denial expected, got \(stillDenied)") }
        try await Task.sleep(for: .milliseconds(1100))
        let nowAllowed = await reviewer.review(token: "bob", path: "/metrics")
        XCTAssertEqual(nowAllowed, .allowed(user: "bob"))
    }

    func testAFailedReviewIsNotCached() async throws {
        let server = try FakeAPIServer()
        try await server.call("config", ["review_tokens": ["prom": ["username": "prometheus"]],
                                         "nonresource_allow": ["prometheus": ["/metrics"]]])
        let reviewer = AccessReviewer(client: KubernetesClient(config: server.config(), logger: testLogger()))
        try await server.call("fault", ["match": "/subjectaccessreviews$", "code": 403, "count": 1])
        let refused = await reviewer.review(token: "prom", path: "/metrics")
        guard case .unavailable(let why) = refused else { return XCTFail("\(refused)") }
        XCTAssertTrue(why.contains("SubjectAccessReview"), why)
        let next = await reviewer.review(token: "prom", path: "/metrics")
        XCTAssertEqual(next, .allowed(user: "prometheus"))
    }
}
