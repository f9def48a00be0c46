import XCTest
import Foundation
@testable import InferenceRouting

final class ManifestTests: XCTestCase {
    var dir: String!

    override func setUp() {
        dir = NSTemporaryDirectory() + "epp-manifests-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: dir)
    }

    func write(_ name: String, _ text: String) {
        try! text.write(toFile: dir + "/" + name, atomically: true, encoding: .utf8)
    }

    let multiDoc = """
    apiVersion: inference.networking.x-k8s.io/v1alpha2
    kind: InferenceModelRewrite
    metadata:
      name: split
      creationTimestamp: "2024-01-01T00:00:00Z"
      unknownField: ignored
    spec:
      poolRef:
        name: pool
      rules:
      - matches:
        - model:
            value: llama
        targets:
        - modelRewrite: llama-v1
          weight: 90
        - modelRewrite: llama-v2
          weight: 10
    ---
    apiVersion: llm-d.ai/v1alpha2
    kind: InferenceObjective
    metadata:
      name: critical
      namespace: prod
    spec:
      priority: 5
      poolRef:
        name: pool
    ---
    apiVersion: v1
    kind: ConfigMap
    metadata:
      name: other
    ---
    apiVersion: inference.networking.k8s.io/v1
    kind: InferencePool
    metadata:
      name: pool
    spec:
      selector:
        matchLabels:
          app: vllm
      targetPorts:
      - number: 8000
      - number: 8001
      endpointPickerRef:
        name: epp
        port:
          number: 9002
    """

    func testMultiDocument() {
        write("a.yaml", multiDoc)
        write("b.json", #"{"apiVersion":"inference.networking.x-k8s.io/v1alpha2","kind":"InferencePool","metadata":{"name":"old"},"spec":{"selector":{"app":"x"},"targetPortNumber":8000,"extensionRef":{"name":"epp"}}}"#)
        write("ignored.txt", "garbage: [")
        let snap = ManifestLoader.load(directory: dir)
        XCTAssertEqual(snap.errors, [])
        XCTAssertEqual(snap.rewrites.count, 1)
        XCTAssertEqual(snap.rewrites[0].metadata.namespace, "default")
        XCTAssertEqual(snap.rewrites[0].spec.rules?[0].targets?.map(\.weight), [90, 10])
        XCTAssertEqual(snap.objectives.first?.metadata.qualifiedName, "prod/critical")
        XCTAssertEqual(snap.objectives.first?.spec.priority, 5)
        XCTAssertEqual(snap.pools.map(\.metadata.name), ["pool", "old"])
        XCTAssertEqual(snap.pools[0].selectorLabels, ["app": "vllm"])
        XCTAssertEqual(snap.pools[0].targetPortNumbers, [8000, 8001])
        XCTAssertEqual(snap.pools[1].selectorLabels, ["app": "x"])
        XCTAssertEqual(snap.pools[1].targetPortNumbers, [8000])
        XCTAssertEqual(snap.pools[1].group, "inference.networking.x-k8s.io")
        XCTAssertEqual(snap.notes.count, 1)
        XCTAssertTrue(snap.notes[0].contains("ConfigMap"))
        let rules = RewriteRules(snap.rewrites, poolName: "pool")
        XCTAssertEqual(rules.validations.map(\.reason), ["Accepted"])
    }

    func testBrokenFileKeepsPrevious() {
        write("a.yaml", multiDoc)
        let first = ManifestLoader.load(directory: dir)
        XCTAssertEqual(first.rewrites.count, 1)
        // Wrong type deep inside the second document: weight is a string.
        write("a.yaml", multiDoc.replacingOccurrences(of: "priority: 5", with: "priority: [1]"))
        let second = ManifestLoader.load(directory: dir, previous: first.files)
        XCTAssertEqual(second.errors.count, 1)
        XCTAssertEqual(second.errors.first?.file, "a.yaml")
        XCTAssertEqual(second.errors.first?.line, 26)
        XCTAssertTrue(second.errors.first!.message.contains("spec.priority"), second.errors.first!.message)
        XCTAssertEqual(second.rewrites, first.rewrites)
        XCTAssertEqual(second.objectives, first.objectives)
        // YAML syntax error.
        write("a.yaml", "apiVersion: x\nkind: [\n")
        let third = ManifestLoader.load(directory: dir, previous: second.files)
        XCTAssertEqual(third.errors.first?.line, 3)
        XCTAssertEqual(third.rewrites, first.rewrites)
        // Missing required field.
        write("a.yaml", "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\nmetadata:\n  name: x\nspec:\n  rules: []\n")
        let fourth = ManifestLoader.load(directory: dir, previous: third.files)
        XCTAssertEqual(fourth.errors.first?.line, 5)
        XCTAssertTrue(fourth.errors.first!.message.contains("poolRef"), fourth.errors.first!.message)
        // A new file that is broken from the start contributes nothing.
        write("b.yaml", "kind: InferenceObjective\napiVersion: llm-d.ai/v1alpha2\nmetadata: {}\n")
        let fifth = ManifestLoader.load(directory: dir, previous: fourth.files)
        XCTAssertEqual(fifth.errors.count, 2)
        XCTAssertEqual(fifth.objectives.count, 1)
        // Deleting the file drops its contents.
        try? FileManager.default.removeItem(atPath: dir + "/a.yaml")
        let sixth = ManifestLoader.load(directory: dir, previous: fifth.files)
        XCTAssertEqual(sixth.rewrites.count, 0)
    }

    func testWatcherSeesEdits() throws {
        write("r.yaml", multiDoc)
        let received = Box()
        let watcher = ConfigDirectoryWatcher(directory: dir, interval: .milliseconds(20)) { snap in received.append(snap) }
        watcher.start()
        defer { watcher.stop() }
        XCTAssertTrue(received.wait { $0.count >= 1 })
        XCTAssertEqual(received.last?.rewrites.first?.spec.rules?.first?.targets?.first?.modelRewrite, "llama-v1")
        // Editor-style atomic replace (write temp + rename).
        write("r.yaml", multiDoc.replacingOccurrences(of: "llama-v1", with: "llama-v3"))
        XCTAssertTrue(received.wait { $0.last?.rewrites.first?.spec.rules?.first?.targets?.first?.modelRewrite == "llama-v3" })
        // A broken edit keeps the last good contents and reports the error.
        write("r.yaml", "kind: [")
        XCTAssertTrue(received.wait { !($0.last?.errors.isEmpty ?? true) })
        XCTAssertEqual(received.last?.rewrites.first?.spec.rules?.first?.targets?.first?.modelRewrite, "llama-v3")
    }

    #if os(Linux)
    /// With a re-check interval of an hour, only the change notification (inotify) can deliver
    /// these edits within the wait: an in-place write, then a ConfigMap-style `..data` symlink swap.
    func testWatcherIsWokenByChangesNotByPolling() throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: dir + "/..v1", withIntermediateDirectories: false)
        try multiDoc.write(toFile: dir + "/..v1/r.yaml", atomically: false, encoding: .utf8)
        try fm.createSymbolicLink(atPath: dir + "/..data", withDestinationPath: "..v1")
        try fm.createSymbolicLink(atPath: dir + "/r.yaml", withDestinationPath: "..data/r.yaml")
        let received = Box()
        let watcher = ConfigDirectoryWatcher(directory: dir, interval: .seconds(3600)) { snap in received.append(snap) }
        XCTAssertEqual(watcher.loadNow().rewrites.first?.spec.rules?.first?.targets?.first?.modelRewrite, "llama-v1")
        watcher.start()
        defer { watcher.stop() }
        usleep(100_000)  // the thread has armed its watch
        // A new file written in place (not atomically).
        try multiDoc.replacingOccurrences(of: "name: split", with: "name: other")
            .write(toFile: dir + "/s.yaml", atomically: false, encoding: .utf8)
        XCTAssertTrue(received.wait(timeout: 3) { $0.last?.rewrites.count == 2 })
        // kubelet's update: new data directory, `..data` replaced by renaming a fresh symlink.
        try fm.createDirectory(atPath: dir + "/..v2", withIntermediateDirectories: false)
        try multiDoc.replacingOccurrences(of: "llama-v1", with: "llama-v9")
            .write(toFile: dir + "/..v2/r.yaml", atomically: false, encoding: .utf8)
        try fm.createSymbolicLink(atPath: dir + "/..data_tmp", withDestinationPath: "..v2")
        XCTAssertEqual(rename(dir + "/..data_tmp", dir + "/..data"), 0)
        XCTAssertTrue(received.wait(timeout: 3) {
            $0.last?.rewrites.contains { $0.spec.rules?.first?.targets?.first?.modelRewrite == "llama-v9" } ?? false
        })
    }
    #endif

    func testLoadNowThenWatchReportsOnlyChanges() {
        write("r.yaml", multiDoc)
        let received = Box()
        let watcher = ConfigDirectoryWatcher(directory: dir, interval: .milliseconds(20)) { snap in received.append(snap) }
        XCTAssertEqual(watcher.loadNow().rewrites.count, 1)
        watcher.start()
        defer { watcher.stop() }
        usleep(150_000)
        XCTAssertNil(received.last)
        write("s.yml", multiDoc.replacingOccurrences(of: "name: split", with: "name: split2"))
        XCTAssertTrue(received.wait { $0.last?.rewrites.count == 2 })
    }
}

final class Box: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [ManifestSnapshot] = []
    func append(_ s: ManifestSnapshot) { lock.lock(); items.append(s); lock.unlock() }
    var last: ManifestSnapshot? { lock.lock(); defer { lock.unlock() }; return items.last }
    func wait(timeout: TimeInterval = 5, _ cond: ([ManifestSnapshot]) -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            lock.lock(); let ok = cond(items); lock.unlock()
            if ok { return true }
            usleep(10_000)
        }
        return false
    }
}
