import Foundation
import NIOCore
import XCTest
@testable import Kubernetes

final class ReflectorTests: XCTestCase {
    func fastOptions(_ selector: String? = nil, timeout: Int = 30) -> ReflectorOptions {
        var o = ReflectorOptions(labelSelector: selector)
        o.watchTimeoutSeconds = timeout
        o.initialBackoff = .milliseconds(50)
        o.maxBackoff = .milliseconds(400)
        o.notInstalledPollInterval = .milliseconds(200)
        o.pageSize = 2
        return o
    }

    func startReflector(_ server: FakeAPIServer, options: ReflectorOptions, resource: ResourceDescriptor = .pods,
                        token: String? = nil) -> (Box<ReflectorSnapshot<Pod>>, Task<Void, Never>) {
        let box = Box(ReflectorSnapshot<Pod>())
        let client = KubernetesClient(config: server.config(token: token), logger: testLogger())
        let reflector = Reflector<Pod>(client: client, resource: resource, namespace: "default", options: options,
                                       logger: testLogger()) { snap in box.value = snap }
        let task = Task { await reflector.run() }
        return (box, task)
    }

    func testListPaginatesThenWatches() async throws {
        let server = try FakeAPIServer()
        for i in 1...5 { try await server.apply(plural: "pods", pod("p\(i)", ip: "10.0.0.\(i)")) }
        try await server.apply(plural: "pods", pod("other", labels: ["app": "other"]))
        let (box, task) = startReflector(server, options: fastOptions("app=vllm"))
        defer { task.cancel() }
        await eventually("synced") { box.value.synced }
        XCTAssertEqual(podNames(box), ["p1", "p2", "p3", "p4", "p5"])
        let v1 = try await server.requestCount("list")
        XCTAssertEqual(v1, 3)  // 5 items, limit 2
        try await server.apply(plural: "pods", pod("p6", ip: "10.0.0.6"))
        try await server.delete(plural: "pods", name: "p1")
        try await server.patch(plural: "pods", name: "p2", subresource: "status", ["status": ["podIP": "10.9.9.9"]])
        await eventually("watch events applied") {
            podNames(box) == ["p2", "p3", "p4", "p5", "p6"] && box.value.objects["default/p2"]?.object.status?.podIP == "10.9.9.9"
        }
        // A pod leaving the selector arrives as DELETED.
        try await server.patch(plural: "pods", name: "p3", ["metadata": ["labels": ["app": "other"]]])
        await eventually("p3 left the selector") { !podNames(box).contains("p3") }
    }

    func testResumeAfterDropWithoutRelistAndSplitChunks() async throws {
        let server = try FakeAPIServer()
        try await server.call("config", ["split_events": true])
        try await server.apply(plural: "pods", pod("a", ip: "10.0.0.1"))
        let (box, task) = startReflector(server, options: fastOptions())
        defer { task.cancel() }
        await eventually("synced") { box.value.synced }
        try await server.apply(plural: "pods", pod("b", ip: "10.0.0.2"))
        await eventually("b") { podNames(box) == ["a", "b"] }
        let lists = try await server.requestCount("list")
        func watchStarts() async -> Int {
            ((try? await server.stats())?["watchStarts"] as? [Any])?.count ?? 0
        }
        for round in 0..<3 {
            let before = await watchStarts()
            try await server.call("drop-watches")
            await eventually("watch resumed (round \(round))") { await watchStarts() > before }
            try await server.apply(plural: "pods", pod("c\(round)", ip: "10.0.1.\(round)"))
            await eventually("c\(round) after drop") { podNames(box).contains("c\(round)") }
        }
        let v2 = try await server.requestCount("list")
        XCTAssertEqual(v2, lists, "a dropped watch resumes without relisting")
        let starts = (try await server.stats())["watchStarts"] as? [[String: Any]] ?? []
        XCTAssertGreaterThanOrEqual(starts.count, 4)
        XCTAssertTrue(starts.allSatisfy { ($0["resourceVersion"] as? String ?? "") != "" }, "every watch resumes from a version")
    }

    func testGoneRelistsAndReplacesCache() async throws {
        for mode in ["event", "http"] {
            let server = try FakeAPIServer()
            try await server.call("config", ["expired_mode": mode])
            for n in ["a", "b", "c"] { try await server.apply(plural: "pods", pod(n, ip: "10.0.0.1")) }
            let (box, task) = startReflector(server, options: fastOptions())
            await eventually("synced") { box.value.synced && podNames(box) == ["a", "b", "c"] }
            // Drop the watch, change things while it is away, compact the history: the resume gets 410.
            try await server.call("fault", ["match": "/pods$", "code": 503, "count": 3, "watch": true])
            try await server.call("drop-watches")
            try await server.delete(plural: "pods", name: "a")
            try await server.apply(plural: "pods", pod("d", ip: "10.0.0.4"))
            try await server.patch(plural: "pods", name: "b", subresource: "status", ["status": ["podIP": "10.0.0.22"]])
            try await server.call("compact")
            let lists = try await server.requestCount("list")
            await eventually("relisted (\(mode))") {
                podNames(box) == ["b", "c", "d"] && box.value.objects["default/b"]?.object.status?.podIP == "10.0.0.22"
            }
            let v3 = try await server.requestCount("list")
            XCTAssertGreaterThan(v3, lists)
            // Watching continues after the relist.
            try await server.apply(plural: "pods", pod("e", ip: "10.0.0.5"))
            await eventually("e") { podNames(box).contains("e") }
            task.cancel()
            server.stop()
        }
    }

    func testBookmarksAdvanceVersionAndTimeoutReconnects() async throws {
        let server = try FakeAPIServer()
        try await server.apply(plural: "pods", pod("a", ip: "10.0.0.1"))
        let (box, task) = startReflector(server, options: fastOptions(timeout: 1))
        defer { task.cancel() }
        await eventually("synced") { box.value.synced }
        // Unrelated writes (another collection) move the global version; bookmarks carry it.
        try await server.apply(group: "coordination.k8s.io", plural: "leases", ["metadata": ["name": "x"], "spec": [:]])
        try await server.apply(group: "coordination.k8s.io", plural: "leases", ["metadata": ["name": "y"], "spec": [:]])
        await eventually(timeout: 8, "several watches") {
            ((try? await server.stats())?["watchStarts"] as? [Any])?.count ?? 0 >= 3
        }
        let starts = (try await server.stats())["watchStarts"] as? [[String: Any]] ?? []
        let versions = starts.compactMap { $0["resourceVersion"] as? String }
        XCTAssertTrue(versions.contains { Int($0) ?? 0 >= 103 }, "a bookmark advanced the resume version: \(versions)")
        let v4 = try await server.requestCount("list")
        XCTAssertEqual(v4, 1, "timeoutSeconds ends resume without relisting")
        try await server.apply(plural: "pods", pod("b", ip: "10.0.0.2"))
        await eventually("b") { podNames(box) == ["a", "b"] }
    }

    func testBadObjectsAreSkipped() async throws {
        let server = try FakeAPIServer()
        try await server.apply(plural: "pods", pod("good", ip: "10.0.0.1"))
        try await server.apply(plural: "pods", ["metadata": ["name": "bad", "labels": ["app": "vllm"]],
                                                "status": ["podIP": 42, "conditions": "nope"]])
        let (box, task) = startReflector(server, options: fastOptions())
        defer { task.cancel() }
        await eventually("synced") { box.value.synced }
        XCTAssertEqual(podNames(box), ["good"])
        try await server.apply(plural: "pods", ["metadata": ["name": "bad2"], "status": ["conditions": [["type": 1]]]])
        try await server.apply(plural: "pods", pod("good2", ip: "10.0.0.2"))
        await eventually("good2") { podNames(box) == ["good", "good2"] }
        // A good object turning bad leaves the cache; fixed again, it returns.
        try await server.patch(plural: "pods", name: "good", subresource: "status", ["status": ["podIP": ["x"]]])
        await eventually("good left") { podNames(box) == ["good2"] }
        try await server.patch(plural: "pods", name: "good", subresource: "status", ["status": ["podIP": "10.0.0.3"]])
        await eventually("good back") { podNames(box) == ["good", "good2"] }
    }

    func testUnreachableAtStartRetriesThenSyncs() async throws {
        // Reserve a port, start the reflector against it while nothing listens, then start the server there.
        let server0 = try FakeAPIServer()
        let port = server0.port
        server0.stop()
        let box = Box(ReflectorSnapshot<Pod>())
        let client = KubernetesClient(config: ClusterConfig(scheme: "http", host: "127.0.0.1", port: port), logger: testLogger())
        let reflector = Reflector<Pod>(client: client, resource: .pods, namespace: "default", options: fastOptions(), logger: testLogger()) { box.value = $0 }
        let task = Task { await reflector.run() }
        defer { task.cancel() }
        try await Task.sleep(for: .milliseconds(700))
        XCTAssertFalse(box.value.synced)
        // Start a server on that port (python binds the given port).
        let python = try FakeAPIServer.python()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: python)
        process.arguments = [FakeAPIServer.script, "--port", String(port)]
        let stdin = Pipe()
        process.standardInput = stdin
        process.standardOutput = Pipe()
        try process.run()
        defer { try? stdin.fileHandleForWriting.close(); process.terminate(); process.waitUntilExit() }
        await eventually(timeout: 10, "synced after the server came up") { box.value.synced }
    }

    func testUnauthorizedIsRetried() async throws {
        let server = try FakeAPIServer(token: "right")
        try await server.apply(plural: "pods", pod("a", ip: "10.0.0.1"))
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tok-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let tokenFile = dir.appendingPathComponent("token").path
        try "wrong\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        var config = server.config()
        config.credentials = .tokenFile(tokenFile)
        let box = Box(ReflectorSnapshot<Pod>())
        let reflector = Reflector<Pod>(client: KubernetesClient(config: config, logger: testLogger()), resource: .pods, namespace: "default",
                                       options: fastOptions(), logger: testLogger()) { box.value = $0 }
        let task = Task { await reflector.run() }
        defer { task.cancel() }
        await eventually("401s") { (try? await server.requestCount("401")) ?? 0 >= 2 }
        XCTAssertFalse(box.value.synced)
        // The token "rotates" to the right one: the next connection re-reads it.
        try "right\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        await eventually("synced with the rotated token") { box.value.synced && box.value.objects.count == 1 }
    }

    func testOptionalAPIInstalledLater() async throws {
        let server = try FakeAPIServer()
        let box = Box(ReflectorSnapshot<Pod>())
        let resource = ResourceDescriptor(group: "example.com", version: "v1", plural: "pods", optional: true)
        let reflector = Reflector<Pod>(client: KubernetesClient(config: server.config(), logger: testLogger()), resource: resource,
                                       namespace: "default", options: fastOptions(), logger: testLogger()) { box.value = $0 }
        let task = Task { await reflector.run() }
        defer { task.cancel() }
        await eventually("known not installed") { box.value.synced && !box.value.installed }
        try await server.call("install", ["group": "example.com"])
        try await server.apply(group: "example.com", plural: "pods", pod("x", ip: "10.0.0.1"))
        await eventually("discovered") { box.value.installed && box.value.objects.count == 1 }
    }

    func testWatchListAndFallback() async throws {
        for supported in [true, false] {
            let server = try FakeAPIServer()
            try await server.call("config", ["watchlist_supported": supported])
            for n in ["a", "b", "c"] { try await server.apply(plural: "pods", pod(n, ip: "10.0.0.1")) }
            var options = fastOptions()
            options.useWatchList = true
            let (box, task) = startReflector(server, options: options)
            await eventually("synced (watch-list \(supported))") { box.value.synced && podNames(box) == ["a", "b", "c"] }
            let v5 = try await server.requestCount("list")
            XCTAssertEqual(v5, supported ? 0 : 2)
            try await server.apply(plural: "pods", pod("d", ip: "10.0.0.1"))
            await eventually("d") { podNames(box).contains("d") }
            task.cancel()
            server.stop()
        }
    }
}

func podNames(_ box: Box<ReflectorSnapshot<Pod>>) -> [String] {
    box.value.objects.values.map { $0.object.metadata.name }.sorted()
}
