import Foundation
import XCTest
@testable import Kubernetes

/// Whole-response requests reuse keep-alive connections to the (fake) API server; watches do not.
final class KeepAliveTests: XCTestCase {
    struct PodList: Decodable { var items: [Pod]? }
    let pods = "/api/v1/namespaces/default/pods"

    func connections(_ server: FakeAPIServer) async throws -> Int {
        try await server.stats()["connections"] as? Int ?? -1
    }

    func testSequentialRequestsShareOneConnection() async throws {
        let server = try FakeAPIServer()
        let before = try await connections(server)  // the admin client's own connection is counted once
        let client = KubernetesClient(config: server.config(), logger: testLogger())
        for _ in 0..<20 { _ = try await client.get(PodList.self, path: pods) }
        let lease = #"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"l"}}"#
        _ = try await client.send(.init(method: .POST, path: "/apis/coordination.k8s.io/v1/namespaces/default/leases",
                                        body: Array(lease.utf8))).checked(path: "create")
        _ = try await client.send(.init(method: .DELETE, path: "/apis/coordination.k8s.io/v1/namespaces/default/leases/l"))
            .checked(path: "delete")
        let after = try await connections(server)
        XCTAssertEqual(after - before, 1, "22 requests, one connection")
        XCTAssertEqual(client.connections.idleCount, 1)
    }

    func testTLSConnectionsAreReusedAndTheTokenIsReadPerRequest() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("k8s-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let server = try FakeAPIServer(token: "first", tlsDir: dir, generateCerts: true)
        try "first".write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        let config = ClusterConfig(scheme: "https", host: "127.0.0.1", port: server.port,
                                   certificateAuthorityFile: dir + "/ca.crt", credentials: .tokenFile(dir + "/token"))
        let client = KubernetesClient(config: config, logger: testLogger())
        let before = try await connections(server)
        for _ in 0..<10 { _ = try await client.get(PodList.self, path: pods) }
        // The token rotates: the next request on the same connection carries the new one.
        try await server.call("config", ["token": "second"])
        try "second".write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        _ = try await client.get(PodList.self, path: pods)
        let after = try await connections(server)
        XCTAssertEqual(after - before, 1, "one TLS handshake for 11 requests")
    }

    func testAConnectionTheServerDropsIsRetriedOnceExceptForPOST() async throws {
        let server = try FakeAPIServer()
        let client = KubernetesClient(config: server.config(), logger: testLogger())
        _ = try await client.get(PodList.self, path: pods)
        let before = try await connections(server)
        // The server closes the kept connection as the next GET arrives, unanswered: retried on a new one.
        try await server.call("fault", ["match": "/pods$", "code": -1, "count": 1, "method": "GET"])
        let list = try await client.get(PodList.self, path: pods)
        XCTAssertEqual(list.items?.count ?? 0, 0)
        let after = try await connections(server)
        XCTAssertEqual(after - before, 1)
        // A POST that may have been executed is not sent twice: the caller sees the failure.
        try await server.call("fault", ["match": "/configmaps$", "code": -1, "count": 1, "method": "POST"])
        let cm = #"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}"#
        do {
            _ = try await client.send(.init(method: .POST, path: "/api/v1/namespaces/default/configmaps", body: Array(cm.utf8)))
            XCTFail("a dropped POST must fail")
        } catch let error as KubernetesError {
            guard case .connectionClosed = error else { return XCTFail("\(error)") }
        }
        // A fresh connection that closes unanswered is not retried either.
        try await server.call("fault", ["match": "/pods$", "code": -1, "count": 2, "method": "GET"])
        client.connections.closeAll()
        do {
            _ = try await client.get(PodList.self, path: pods)
            XCTFail("a fresh connection closed unanswered must fail")
        } catch let error as KubernetesError {
            guard case .connectionClosed = error else { return XCTFail("\(error)") }
        }
        // The client still works afterwards.
        try await server.call("clear-faults")
        _ = try await client.get(PodList.self, path: pods)
    }

    func testConcurrentRequestsKeepABoundedNumberIdle() async throws {
        let server = try FakeAPIServer()
        let client = KubernetesClient(config: server.config(), logger: testLogger())
        let pods = self.pods
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<16 { group.addTask { _ = try await client.get(PodList.self, path: pods) } }
            try await group.waitForAll()
        }
        XCTAssertLessThanOrEqual(client.connections.idleCount, client.connections.maxIdle)
        XCTAssertGreaterThan(client.connections.idleCount, 0)
        _ = try await client.get(PodList.self, path: pods)
    }

    func testOversizedResponseFailsAndTheClientRecovers() async throws {
        let server = try FakeAPIServer()
        let client = KubernetesClient(config: server.config(), logger: testLogger())
        do {
            _ = try await client.send(.init(path: pods), maxBodyBytes: 10)
            XCTFail("expected a size error")
        } catch let error as KubernetesError {
            guard case .decoding(let message) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(message.contains("exceeds 10 bytes"), message)
        }
        XCTAssertEqual(client.connections.idleCount, 0, "a connection with an unread response is not kept")
        _ = try await client.get(PodList.self, path: pods)
    }
}
