import Foundation
import InferenceRouting
import NIOCore
import XCTest
@testable import Kubernetes

let v1Group = "inference.networking.k8s.io"
let alphaGroup = "inference.networking.x-k8s.io"

func poolObject(_ name: String = "pool", selector: [String: String] = ["app": "vllm"], ports: [Int] = [8000]) -> [String: Any] {
    ["metadata": ["name": name],
     "spec": ["selector": ["matchLabels": selector], "targetPorts": ports.map { ["number": $0] },
              "endpointPickerRef": ["name": "epp", "port": ["number": 9002]]]]
}

func rewriteObject(_ name: String, pool: String = "pool", model: String = "opt-stable",
                   targets: [(String, Int?)] = [("facebook/opt-125m", 90), ("facebook/opt-125m-canary", 10)]) -> [String: Any] {
    ["metadata": ["name": name],
     "spec": ["poolRef": ["name": pool],
              "rules": [["matches": [["model": ["type": "Exact", "value": model]]],
                         "targets": targets.map { t -> [String: Any] in
                             var d: [String: Any] = ["modelRewrite": t.0]
                             if let w = t.1 { d["weight"] = w }
                             return d
                         }]]]]
}

final class PoolWatcherTests: XCTestCase {
    func makeConfig(statusWriting: StatusWritingConfig? = nil, timeout: Int = 30) -> PoolWatcherConfig {
        var config = PoolWatcherConfig(namespace: "default", poolName: "pool")
        config.reflector.watchTimeoutSeconds = timeout
        config.reflector.initialBackoff = .milliseconds(50)
        config.reflector.maxBackoff = .milliseconds(400)
        config.reflector.notInstalledPollInterval = .milliseconds(200)
        config.statusWriting = statusWriting
        return config
    }

    func start(_ server: FakeAPIServer, _ config: PoolWatcherConfig) -> (Box<PoolState>, Box<Int>, PoolWatcher, Task<Void, Never>) {
        let box = Box(PoolState())
        let count = Box(0)
        let watcher = PoolWatcher(client: KubernetesClient(config: server.config(), logger: testLogger()), config: config,
                                  logger: testLogger()) { state in
            box.value = state
            count.mutate { $0 += 1 }
        }
        let task = Task { await watcher.run() }
        return (box, count, watcher, task)
    }

    func testEndpointsFollowPodsSelectorAndPool() async throws {
        let server = try FakeAPIServer(install: [v1Group, alphaGroup])
        try await server.apply(group: v1Group, plural: "inferencepools", poolObject(ports: [8000, 8001]))
        try await server.apply(plural: "pods", pod("a", ip: "10.0.0.1"))
        try await server.apply(plural: "pods", pod("b", ip: "10.0.0.2", ready: false))
        try await server.apply(plural: "pods", pod("c"))  // pending, no IP
        try await server.apply(plural: "pods", pod("d", ip: "10.0.0.4", annotations: ["llm-d.ai/active-ports": "8001"]))
        try await server.apply(plural: "pods", pod("x", labels: ["app": "other"], ip: "10.0.0.9"))
        let (box, _, _, task) = start(server, makeConfig())
        defer { task.cancel() }
        func addrs() -> [String] { box.value.endpoints.map(\.address) }
        await eventually("synced") { box.value.synced }
        XCTAssertEqual(addrs(), ["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.4:8001"])
        XCTAssertEqual(box.value.endpoints.first?.podName, "a")
        XCTAssertEqual(box.value.pool?.metadata.name, "pool")
        XCTAssertEqual(box.value.pool?.group, v1Group)

        // Readiness flips, IP changes, terminating pods.
        try await server.patch(plural: "pods", name: "b", subresource: "status",
                               ["status": ["conditions": [["type": "Ready", "status": "True"]]]])
        try await server.patch(plural: "pods", name: "a", subresource: "status",
                               ["status": ["conditions": [["type": "Ready", "status": "False"]]]])
        await eventually("b ready, a not") { addrs() == ["10.0.0.2:8000", "10.0.0.2:8001", "10.0.0.4:8001"] }
        try await server.patch(plural: "pods", name: "b", subresource: "status", ["status": ["podIP": "10.0.1.2"]])
        try await server.patch(plural: "pods", name: "d", ["metadata": ["deletionTimestamp": "2026-01-01T00:00:00Z"]])
        await eventually("IP change + terminating") { addrs() == ["10.0.1.2:8000", "10.0.1.2:8001"] }

        // Pool port and selector changes.
        try await server.apply(group: v1Group, plural: "inferencepools", poolObject(selector: ["app": "other"], ports: [9000]))
        await eventually("selector change") { addrs() == ["10.0.0.9:9000"] }
        try await server.apply(plural: "pods", pod("y", labels: ["app": "other"], ip: "10.0.0.10"))
        await eventually("new pod under new selector") { addrs() == ["10.0.0.9:9000", "10.0.0.10:9000"] }
        let starts = (try await server.stats())["watchStarts"] as? [[String: Any]] ?? []
        XCTAssertTrue(starts.contains { ($0["query"] as? [String: Any])?["labelSelector"] as? String == "app=other" })

        // Pool deleted → no endpoints; re-created → back.
        try await server.delete(group: v1Group, plural: "inferencepools", name: "pool")
        await eventually("pool deleted") { box.value.pool == nil && box.value.endpoints.isEmpty }
        XCTAssertTrue(box.value.synced)
        try await server.apply(group: v1Group, plural: "inferencepools", poolObject())
        await eventually("pool back") { addrs() == ["10.0.1.2:8000"] }
    }

    func testAlphaPoolGroup() async throws {
        let server = try FakeAPIServer(install: [alphaGroup])
        try await server.apply(group: alphaGroup, version: "v1alpha2", plural: "inferencepools",
                               ["metadata": ["name": "pool"], "spec": ["selector": ["app": "vllm"], "targetPortNumber": 8000,
                                                                       "extensionRef": ["name": "epp"]]])
        try await server.apply(plural: "pods", pod("a", ip: "10.0.0.1"))
        var config = makeConfig()
        config.poolGroup = alphaGroup
        let (box, _, _, task) = start(server, config)
        defer { task.cancel() }
        await eventually("synced") { box.value.synced && box.value.endpoints.map(\.address) == ["10.0.0.1:8000"] }
        XCTAssertEqual(box.value.pool?.group, alphaGroup)
    }

    func testRewritesObjectivesAndLaterInstalledGroup() async throws {
        let server = try FakeAPIServer(install: [v1Group, alphaGroup])
        try await server.apply(group: v1Group, plural: "inferencepools", poolObject())
        try await server.apply(group: alphaGroup, version: "v1alpha2", plural: "inferencemodelrewrites", rewriteObject("mine"))
        try await server.apply(group: alphaGroup, version: "v1alpha2", plural: "inferencemodelrewrites", rewriteObject("theirs", pool: "other"))
        try await server.apply(group: alphaGroup, version: "v1alpha2", plural: "inferencemodelrewrites",
                               ["metadata": ["name": "broken"], "spec": ["poolRef": ["name": "pool"], "rules": [["targets": [["weight": "x"]]]]]])
        try await server.apply(group: alphaGroup, version: "v1alpha2", plural: "inferenceobjectives",
                               ["metadata": ["name": "critical"], "spec": ["priority": 10, "poolRef": ["name": "pool"]]])
        let (box, _, _, task) = start(server, makeConfig())
        defer { task.cancel() }
        await eventually("synced") { box.value.synced }
        XCTAssertEqual(box.value.rewrites.map(\.metadata.name), ["mine"], "other pools' and undecodable rewrites are left out")
        XCTAssertEqual(box.value.rewrites.first?.apiVersion, "\(alphaGroup)/v1alpha2")
        XCTAssertEqual(box.value.objectives.map(\.metadata.name), ["critical"])
        let rules = RewriteRules(box.value.rewrites, poolName: "pool", poolGroup: v1Group, poolNamespace: "default")
        XCTAssertEqual(rules.validations.map(\.accepted), [true])

        // Weight change, deletion.
        try await server.apply(group: alphaGroup, version: "v1alpha2", plural: "inferencemodelrewrites",
                               rewriteObject("mine", targets: [("facebook/opt-125m", 50), ("facebook/opt-125m-canary", 50)]))
        await eventually("weights changed") { box.value.rewrites.first?.spec.rules?.first?.targets?.first?.weight == 50 }
        try await server.delete(group: alphaGroup, plural: "inferencemodelrewrites", name: "mine")
        await eventually("deleted") { box.value.rewrites.isEmpty }

        // The llm-d.ai group is installed later: discovered without restart.
        try await server.call("install", ["group": "llm-d.ai"])
        try await server.apply(group: "llm-d.ai", version: "v1alpha2", plural: "inferencemodelrewrites", rewriteObject("llmd"))
        await eventually("llm-d.ai rewrite discovered") { box.value.rewrites.map(\.metadata.name) == ["llmd"] }
        XCTAssertEqual(box.value.rewrites.first?.apiVersion, "llm-d.ai/v1alpha2")
    }

    func testSyncedWaitsForPoolAndPods() async throws {
        let server = try FakeAPIServer(install: [v1Group, alphaGroup])
        try await server.apply(group: v1Group, plural: "inferencepools", poolObject())
        // Pods list fails for a while: not synced until it succeeds.
        try await server.call("fault", ["match": "/pods$", "code": 500, "count": 4])
        let (box, _, _, task) = start(server, makeConfig())
        defer { task.cancel() }
        try await Task.sleep(for: .milliseconds(100))
        XCTAssertFalse(box.value.synced)
        await eventually("synced after pod list succeeds") { box.value.synced }
    }

    func testStatusWrittenOncePerGeneration() async throws {
        let server = try FakeAPIServer(install: [v1Group, alphaGroup])
        try await server.apply(group: v1Group, plural: "inferencepools", poolObject())
        try await server.apply(group: alphaGroup, version: "v1alpha2", plural: "inferencemodelrewrites", rewriteObject("seed"))
        let (box, _, _, task) = start(server, makeConfig(statusWriting: StatusWritingConfig(leaderElection: nil)))
        defer { task.cancel() }
        let key = "inferencemodelrewrites/seed"
        func condition() async throws -> [String: Any]? {
            let obj = try await server.call("get", ["group": alphaGroup, "plural": "inferencemodelrewrites", "namespace": "default", "name": "seed"])
            return ((obj["status"] as? [String: Any])?["conditions"] as? [[String: Any]])?.first { $0["type"] as? String == "Accepted" }
        }
        await eventually("status written") { (try? await condition())?["status"] as? String == "True" }
        var c = try await condition()
        XCTAssertEqual(c?["reason"] as? String, "Accepted")
        XCTAssertEqual(c?["observedGeneration"] as? Int, 1)
        await eventually("status seen back") { box.value.rewrites.first?.status?.conditions?.first?.status == "True" }
        try await Task.sleep(for: .milliseconds(400))
        var patches = try await server.statusPatches(key)
        XCTAssertEqual(patches, 1, "no write loop")

        // New generation (mixed weights → rejected).
        try await server.apply(group: alphaGroup, version: "v1alpha2", plural: "inferencemodelrewrites",
                               rewriteObject("seed", targets: [("a", 1), ("b", nil)]))
        await eventually("rejection written") { (try? await condition())?["status"] as? String == "False" }
        c = try await condition()
        XCTAssertEqual(c?["reason"] as? String, "MixedWeights")
        XCTAssertEqual(c?["observedGeneration"] as? Int, 2)
        try await Task.sleep(for: .milliseconds(400))
        patches = try await server.statusPatches(key)
        XCTAssertEqual(patches, 2)

        // A label change (metadata only, same generation) writes nothing.
        try await server.patch(group: alphaGroup, plural: "inferencemodelrewrites", name: "seed", ["metadata": ["labels": ["x": "y"]]])
        try await Task.sleep(for: .milliseconds(400))
        patches = try await server.statusPatches(key)
        XCTAssertEqual(patches, 2)
        // Someone else overwrites the status: it is put back.
        try await server.patch(group: alphaGroup, plural: "inferencemodelrewrites", name: "seed", subresource: "status",
                               ["status": ["conditions": [["type": "Accepted", "status": "True", "reason": "Other"]]]])
        await eventually("status restored") { (try? await condition())?["reason"] as? String == "MixedWeights" }
    }

    func testLeaderElectionOnlyOneWrites() async throws {
        let server = try FakeAPIServer(install: [v1Group, alphaGroup])
        try await server.apply(group: v1Group, plural: "inferencepools", poolObject())
        try await server.apply(group: alphaGroup, version: "v1alpha2", plural: "inferencemodelrewrites", rewriteObject("seed"))
        func election(_ id: String) -> StatusWritingConfig {
            var e = LeaderElectionConfig(namespace: "default", leaseName: "epp-pool", identity: id)
            // Long enough that a takeover within the test can only come from the leader releasing the lease.
            e.leaseDuration = .seconds(30)
            e.renewDeadline = .seconds(20)
            e.retryPeriod = .milliseconds(200)
            var s = StatusWritingConfig(leaderElection: e)
            s.retryDelay = .milliseconds(200)
            return s
        }
        let (_, _, w1, t1) = start(server, makeConfig(statusWriting: election("one")))
        let (_, _, w2, t2) = start(server, makeConfig(statusWriting: election("two")))
        defer { t1.cancel(); t2.cancel() }
        await eventually("a leader") { w1.isStatusWriter || w2.isStatusWriter }
        try await Task.sleep(for: .milliseconds(600))
        XCTAssertTrue(w1.isStatusWriter != w2.isStatusWriter, "exactly one leader")
        await eventually("status written") { (try? await server.statusPatches("inferencemodelrewrites/seed")) == 1 }
        for i in 0..<3 {
            try await server.apply(group: alphaGroup, version: "v1alpha2", plural: "inferencemodelrewrites",
                                   rewriteObject("r\(i)", model: "m\(i)"))
        }
        await eventually("new rewrites written") {
            var all = true
            for i in 0..<3 {
                let n = try? await server.statusPatches("inferencemodelrewrites/r\(i)")
                all = all && n == 1
            }
            return all
        }
        try await Task.sleep(for: .milliseconds(500))
        for i in 0..<3 {
            let n = try await server.statusPatches("inferencemodelrewrites/r\(i)")
            XCTAssertEqual(n, 1, "written once, by one replica")
        }
        // The leader shuts down and releases its lease: the other takes over at once and writes.
        let (leaderTask, follower) = w1.isStatusWriter ? (t1, w2) : (t2, w1)
        leaderTask.cancel()
        await eventually(timeout: 5, "follower takes over after the release") { follower.isStatusWriter }
        try await server.apply(group: alphaGroup, version: "v1alpha2", plural: "inferencemodelrewrites", rewriteObject("late", model: "late"))
        await eventually("new leader writes") { (try? await server.statusPatches("inferencemodelrewrites/late")) == 1 }
    }
}
