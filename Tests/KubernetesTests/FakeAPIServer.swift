import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Logging
import NIOCore
import XCTest
@testable import Kubernetes

/// Runs Tests/Integration/k8s/fake_apiserver.py (a stand-in for kube-apiserver) as a subprocess.
final class FakeAPIServer: @unchecked Sendable {
    static let packageRoot: URL = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let script = packageRoot.appendingPathComponent("Tests/Integration/k8s/fake_apiserver.py").path

    /// `.venv/bin/python` of the package root (or of /work/main when run from a worktree), or $EPP_TEST_PYTHON.
    static func python() throws -> String {
        if let p = ProcessInfo.processInfo.environment["EPP_TEST_PYTHON"], FileManager.default.isExecutableFile(atPath: p) {
            return p
        }
        let candidate = packageRoot.appendingPathComponent(".venv/bin/python").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        throw XCTSkip("no Python venv at \(candidate) (create it, or set EPP_TEST_PYTHON); skipping API-server tests")
    }

    let process = Process()
    let stdin = Pipe()
    let stdout = Pipe()
    let port: Int
    let tlsDir: String?
    let admin: KubernetesClient

    init(token: String? = nil, tlsDir: String? = nil, generateCerts: Bool = false, install: [String] = []) throws {
        let python = try Self.python()
        process.executableURL = URL(fileURLWithPath: python)
        var args = [Self.script, "--port", "0"]
        if let token { args += ["--token", token] }
        if let tlsDir { args += ["--tls-dir", tlsDir] }
        if generateCerts { args.append("--gen-certs") }
        for group in install { args += ["--install", group] }
        process.arguments = args
        process.standardInput = stdin
        process.standardOutput = stdout
        self.tlsDir = tlsDir
        try process.run()
        // Read "READY <port>" (bounded). Plain poll/read with EINTR retries: FileHandle.availableData
        // traps on a read error, and children exiting (SIGCHLD) can interrupt reads.
        let fd = stdout.fileHandleForReading.fileDescriptor
        let deadline = Date().addingTimeInterval(30)
        var text = ""
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !text.contains("\n") {
            if Date() > deadline { process.terminate(); throw XCTSkip("fake API server did not start within 30 s") }
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&pfd, 1, 200)
            if ready < 0 && errno == EINTR { continue }
            if ready <= 0 { continue }
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                process.terminate()
                throw NSError(domain: "FakeAPIServer", code: 1, userInfo: [NSLocalizedDescriptionKey: "fake API server exited: \(text)"])
            }
            text += String(decoding: buffer[0..<n], as: UTF8.self)
        }
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("READY ") }),
              let port = Int(line.dropFirst(6).trimmingCharacters(in: .whitespaces)) else {
            throw NSError(domain: "FakeAPIServer", code: 2, userInfo: [NSLocalizedDescriptionKey: "bad READY line: \(text)"])
        }
        self.port = port
        var logger = Logger(label: "test-admin")
        logger.logLevel = .error
        admin = KubernetesClient(config: ClusterConfig(scheme: tlsDir == nil ? "http" : "https", host: "127.0.0.1", port: port,
                                                      insecureSkipTLSVerify: true), logger: logger)
    }

    deinit { stop() }

    func stop() {
        if process.isRunning {
            try? stdin.fileHandleForWriting.close()
            process.terminate()
            process.waitUntilExit()
        }
    }

    /// Plain-HTTP client config for this server.
    func config(token: String? = nil) -> ClusterConfig {
        ClusterConfig(scheme: "http", host: "127.0.0.1", port: port, credentials: token.map { .token($0) } ?? .none)
    }

    @discardableResult
    func call(_ op: String, _ body: [String: Any] = [:]) async throws -> [String: Any] {
        let data = try JSONSerialization.data(withJSONObject: body)
        let response = try await admin.send(.init(method: .POST, path: "/admin/\(op)", body: [UInt8](data)))
        return (try? JSONSerialization.jsonObject(with: Data(response.body))) as? [String: Any] ?? [:]
    }

    @discardableResult
    func apply(group: String = "", version: String = "v1", plural: String, namespace: String = "default",
               _ object: [String: Any]) async throws -> [String: Any] {
        try await call("apply", ["group": group, "version": version, "plural": plural, "namespace": namespace, "object": object])
    }

    @discardableResult
    func patch(group: String = "", plural: String, namespace: String = "default", name: String,
               subresource: String? = nil, _ patch: [String: Any]) async throws -> [String: Any] {
        var body: [String: Any] = ["group": group, "plural": plural, "namespace": namespace, "name": name, "patch": patch]
        if let subresource { body["subresource"] = subresource }
        return try await call("patch", body)
    }

    @discardableResult
    func delete(group: String = "", plural: String, namespace: String = "default", name: String) async throws -> [String: Any] {
        try await call("delete", ["group": group, "plural": plural, "namespace": namespace, "name": name])
    }

    func stats() async throws -> [String: Any] {
        let response = try await admin.send(.init(method: .GET, path: "/admin/stats"))
        return (try JSONSerialization.jsonObject(with: Data(response.body))) as? [String: Any] ?? [:]
    }

    func requestCount(_ kind: String) async throws -> Int {
        ((try await stats())["requests"] as? [String: Any])?[kind] as? Int ?? 0
    }

    func statusPatches(_ key: String) async throws -> Int {
        ((try await stats())["statusPatches"] as? [String: Any])?[key] as? Int ?? 0
    }
}

/// Polls `condition` until true or the timeout (bounded).
func eventually(timeout: TimeInterval = 10, _ what: String = "condition", file: StaticString = #filePath, line: UInt = #line,
                _ condition: () async throws -> Bool) async rethrows {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if try await condition() { return }
        try? await Task.sleep(for: .milliseconds(20))
    }
    XCTFail("timed out waiting for \(what)", file: file, line: line)
}

func testLogger(_ label: String = "k8s-test") -> Logger {
    var logger = Logger(label: label)
    logger.logLevel = ProcessInfo.processInfo.environment["K8S_TEST_LOG"].flatMap { Logger.Level(rawValue: $0) } ?? .critical
    return logger
}

func pod(_ name: String, labels: [String: String] = ["app": "vllm"], ip: String? = nil, ready: Bool = true,
         annotations: [String: String]? = nil) -> [String: Any] {
    var meta: [String: Any] = ["name": name, "labels": labels]
    if let annotations { meta["annotations"] = annotations }
    var obj: [String: Any] = ["metadata": meta, "spec": ["containers": [["name": "vllm", "image": "vllm"]]]]
    if let ip {
        obj["status"] = ["phase": "Running", "podIP": ip,
                         "conditions": [["type": "Ready", "status": ready ? "True" : "False"]]]
    }
    return obj
}

/// Thread-safe box for values observed from callbacks.
final class Box<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var _value: T
    init(_ value: T) { _value = value }
    var value: T {
        get { lock.lock(); defer { lock.unlock() }; return _value }
        set { lock.lock(); _value = newValue; lock.unlock() }
    }
    func mutate(_ f: (inout T) -> Void) { lock.lock(); f(&_value); lock.unlock() }
}
