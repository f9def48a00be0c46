import Foundation
import XCTest
@testable import Kubernetes

final class ConfigAndTLSTests: XCTestCase {
    func tempDir() throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("k8s-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        return dir
    }

    func testKubeconfigTokenCADataAndContext() throws {
        let ca = Data("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".utf8).base64EncodedString()
        let yaml = """
        apiVersion: v1
        kind: Config
        current-context: prod
        clusters:
        - name: prod-cluster
          cluster:
            server: https://10.1.2.3:6443
            certificate-authority-data: \(ca)
        - name: dev-cluster
          cluster:
            server: https://[fd00::1]
            insecure-skip-tls-verify: true
        contexts:
        - name: prod
          context: {cluster: prod-cluster, user: admin, namespace: llm}
        - name: dev
          context: {cluster: dev-cluster, user: dev}
        users:
        - name: admin
          user: {token: abc.def}
        - name: dev
          user:
            tokenFile: tok
        """
        let prod = try ClusterConfig.kubeconfig(yaml: yaml, baseDirectory: "/etc/kube")
        XCTAssertEqual(prod.scheme, "https")
        XCTAssertEqual(prod.host, "10.1.2.3")
        XCTAssertEqual(prod.port, 6443)
        XCTAssertEqual(prod.credentials, .token("abc.def"))
        XCTAssertEqual(prod.namespace, "llm")
        XCTAssertEqual(String(decoding: prod.certificateAuthorityPEM ?? [], as: UTF8.self).hasPrefix("-----BEGIN CERTIFICATE-----"), true)
        XCTAssertFalse(prod.insecureSkipTLSVerify)
        let dev = try ClusterConfig.kubeconfig(yaml: yaml, baseDirectory: "/etc/kube", context: "dev")
        XCTAssertEqual(dev.host, "fd00::1")
        XCTAssertEqual(dev.port, 443)
        XCTAssertTrue(dev.insecureSkipTLSVerify)
        XCTAssertEqual(dev.credentials, .tokenFile("/etc/kube/tok"))
        XCTAssertEqual(dev.serverURL, "https://[fd00::1]:443")
        XCTAssertThrowsError(try ClusterConfig.kubeconfig(yaml: yaml, context: "nope"))
    }

    func testKubeconfigClientCertificateFilesAndErrors() throws {
        let dir = try tempDir()
        try "CERT".write(toFile: dir + "/client.crt", atomically: true, encoding: .utf8)
        try "KEY".write(toFile: dir + "/client.key", atomically: true, encoding: .utf8)
        try "CA".write(toFile: dir + "/ca.crt", atomically: true, encoding: .utf8)
        let yaml = """
        current-context: c
        clusters: [{name: k, cluster: {server: "https://kube.example:8443", certificate-authority: ca.crt, tls-server-name: api.internal}}]
        contexts: [{name: c, context: {cluster: k, user: u}}]
        users: [{name: u, user: {client-certificate: client.crt, client-key: \(dir)/client.key}}]
        """
        try yaml.write(toFile: dir + "/config", atomically: true, encoding: .utf8)
        let config = try ClusterConfig.kubeconfig(path: dir + "/config")
        XCTAssertEqual(config.clientCertificatePEM, Array("CERT".utf8))
        XCTAssertEqual(config.clientKeyPEM, Array("KEY".utf8))
        XCTAssertEqual(config.certificateAuthorityPEM, Array("CA".utf8))
        XCTAssertEqual(config.tlsServerName, "api.internal")
        XCTAssertEqual(config.credentials, .none)
        // Resolution order: --kubeconfig, then $KUBECONFIG, then in-cluster, then ~/.kube/config.
        let viaEnv = try ClusterConfig.load(environment: ["KUBECONFIG": "/nonexistent:\(dir)/config"])
        XCTAssertEqual(viaEnv.host, "kube.example")
        let exec = """
        current-context: c
        clusters: [{name: k, cluster: {server: "https://kube.example"}}]
        contexts: [{name: c, context: {cluster: k, user: u}}]
        users: [{name: u, user: {exec: {command: aws}}}]
        """
        XCTAssertThrowsError(try ClusterConfig.kubeconfig(yaml: exec))
        XCTAssertThrowsError(try ClusterConfig.kubeconfig(yaml: "current-context: x\n"))
        XCTAssertThrowsError(try ClusterConfig.load(environment: ["HOME": dir + "/none"]))
    }

    func testInCluster() throws {
        let dir = try tempDir()
        try "tok\n".write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        try "CA".write(toFile: dir + "/ca.crt", atomically: true, encoding: .utf8)
        try "llm-serving\n".write(toFile: dir + "/namespace", atomically: true, encoding: .utf8)
        let env = ["KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"]
        let config = try ClusterConfig.load(environment: env, serviceAccountDirectory: dir)
        XCTAssertEqual(config.serverURL, "https://10.96.0.1:443")
        XCTAssertEqual(config.credentials, .tokenFile(dir + "/token"))
        XCTAssertEqual(config.certificateAuthorityFile, dir + "/ca.crt")
        XCTAssertEqual(config.namespace, "llm-serving")
        let client = KubernetesClient(config: config, logger: testLogger())
        XCTAssertEqual(try client.currentToken(), "tok")
        try "rotated".write(toFile: dir + "/token", atomically: true, encoding: .utf8)
        XCTAssertEqual(try client.currentToken(), "rotated", "the token file is re-read")
        XCTAssertThrowsError(try ClusterConfig.inCluster(environment: [:], serviceAccountDirectory: dir))
    }

    func testUnreadableTokenFileFailsBeforeConnecting() async throws {
        // Regression: a token read failure after connecting dropped an unused NIOAsyncChannel (NIO traps).
        let server = try FakeAPIServer()
        var config = server.config()
        config.credentials = .tokenFile("/nonexistent/token")
        let client = KubernetesClient(config: config, logger: testLogger())
        for _ in 0..<20 {
            do {
                _ = try await client.send(.init(path: "/api/v1/namespaces/default/pods"))
                XCTFail("expected a configuration error")
            } catch let error as KubernetesError {
                guard case .configuration = error else { return XCTFail("\(error)") }
            }
        }
    }

    func testQueryEncoding() {
        let r = KubernetesClient.Request(path: "/api/v1/pods", query: [("labelSelector", "app=vllm,tier in (a b)"), ("watch", "1")])
        XCTAssertEqual(r.uri, "/api/v1/pods?labelSelector=app%3Dvllm%2Ctier%20in%20%28a%20b%29&watch=1")
    }

    // MARK: TLS against the fake API server

    func tlsServer() throws -> (FakeAPIServer, String) {
        let dir = try tempDir()
        let server = try FakeAPIServer(token: "secret", tlsDir: dir, generateCerts: true)
        return (server, dir)
    }

    func listPods(_ config: ClusterConfig) async throws -> Int {
        let client = KubernetesClient(config: config, logger: testLogger())
        struct PodList: Decodable { var items: [Pod]? }
        return try await client.get(PodList.self, path: "/api/v1/namespaces/default/pods").items?.count ?? 0
    }

    func testTLSVerifiesCAAndNameWithToken() async throws {
        let (server, dir) = try tlsServer()
        let ca = [UInt8](FileManager.default.contents(atPath: dir + "/ca.crt")!)
        var config = ClusterConfig(scheme: "https", host: "127.0.0.1", port: server.port, certificateAuthorityPEM: ca,
                                   credentials: .token("secret"))
        let n = try await listPods(config)
        XCTAssertEqual(n, 0)
        // DNS name in the SAN (localhost) also verifies.
        config.tlsServerName = "localhost"
        _ = try await listPods(config)
        // Wrong name, wrong CA: refused.
        config.tlsServerName = "kube.example"
        await assertFails(try await self.listPods(config), "wrong host name")
        config.tlsServerName = nil
        config.certificateAuthorityPEM = [UInt8](FileManager.default.contents(atPath: dir + "/other-ca.crt")!)
        await assertFails(try await self.listPods(config), "unknown CA")
        // insecure-skip-tls-verify accepts it; a wrong token is a 401.
        config.insecureSkipTLSVerify = true
        _ = try await listPods(config)
        config.credentials = .token("wrong")
        do {
            _ = try await listPods(config)
            XCTFail("401 expected")
        } catch let error as KubernetesError {
            XCTAssertEqual(error.code, 401)
        }
        // CA file instead of PEM bytes.
        var fileConfig = ClusterConfig(scheme: "https", host: "127.0.0.1", port: server.port,
                                       certificateAuthorityFile: dir + "/ca.crt", credentials: .token("secret"))
        _ = try await listPods(fileConfig)
        fileConfig.credentials = .none
        await assertFails(try await self.listPods(fileConfig), "no token")
    }

    func testTLSClientCertificateViaKubeconfigAndReflector() async throws {
        let (server, dir) = try tlsServer()
        func b64(_ f: String) -> String { FileManager.default.contents(atPath: dir + "/" + f)!.base64EncodedString() }
        let yaml = """
        apiVersion: v1
        kind: Config
        current-context: test
        clusters:
        - name: fake
          cluster:
            server: https://127.0.0.1:\(server.port)
            certificate-authority-data: \(b64("ca.crt"))
        contexts:
        - name: test
          context: {cluster: fake, user: epp}
        users:
        - name: epp
          user:
            client-certificate-data: \(b64("client.crt"))
            client-key-data: \(b64("client.key"))
        """
        let config = try ClusterConfig.kubeconfig(yaml: yaml)
        // The fake server accepts a client certificate signed by its CA instead of a token.
        _ = try await listPods(config)
        // A watch over TLS: the reflector syncs and follows changes.
        let box = Box(ReflectorSnapshot<Pod>())
        let reflector = Reflector<Pod>(client: KubernetesClient(config: config, logger: testLogger()), resource: .pods,
                                       namespace: "default", logger: testLogger()) { box.value = $0 }
        let task = Task { await reflector.run() }
        defer { task.cancel() }
        await eventually("synced over TLS") { box.value.synced }
        let client = KubernetesClient(config: config, logger: testLogger())
        let body = try JSONSerialization.data(withJSONObject: pod("tls-pod", ip: "10.0.0.1"))
        _ = try await client.send(.init(method: .POST, path: "/api/v1/namespaces/default/pods", body: [UInt8](body))).checked(path: "create")
        await eventually("watch event over TLS") { box.value.objects["default/tls-pod"] != nil }
    }

    func assertFails<T>(_ body: @autoclosure () async throws -> T, _ what: String, file: StaticString = #filePath, line: UInt = #line) async {
        do {
            _ = try await body()
            XCTFail("expected failure: \(what)", file: file, line: line)
        } catch {}
    }
}
