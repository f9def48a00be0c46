import XCTest
import Foundation
import Yams
@testable import InferenceRouting

final class ResourceDecodingTests: XCTestCase {
    func testPoolV1FromAPIServerJSON() throws {
        let json = #"""
        {"apiVersion":"inference.networking.k8s.io/v1","kind":"InferencePool",
         "metadata":{"name":"vllm","namespace":"ml","uid":"u-1","resourceVersion":"42","generation":3,
                     "creationTimestamp":"2025-01-02T03:04:05Z","labels":{"a":"b"},"managedFields":[{"x":1}]},
         "spec":{"selector":{"matchLabels":{"app":"vllm"}},"targetPorts":[{"number":8000}],"appProtocol":"http",
                 "endpointPickerRef":{"group":"","kind":"Service","name":"epp","port":{"number":9002},"failureMode":"FailClose"}},
         "status":{"parents":[]}}
        """#
        let pool = try JSONDecoder().decode(InferencePool.self, from: Data(json.utf8))
        XCTAssertEqual(pool.metadata.qualifiedName, "ml/vllm")
        XCTAssertEqual(pool.metadata.generation, 3)
        XCTAssertEqual(pool.selectorLabels, ["app": "vllm"])
        XCTAssertEqual(pool.targetPortNumbers, [8000])
        XCTAssertEqual(pool.spec.endpointPickerRef?.port?.number, 9002)
        XCTAssertEqual(pool.group, "inference.networking.k8s.io")
        // Round trip keeps the v1 selector shape.
        let again = try JSONDecoder().decode(InferencePool.self, from: JSONEncoder().encode(pool))
        XCTAssertEqual(again, pool)
        XCTAssertTrue(again.spec.selector.isLabelSelector)
    }

    func testPoolV1Alpha2() throws {
        let yaml = """
        apiVersion: inference.networking.x-k8s.io/v1alpha2
        kind: InferencePool
        metadata:
          name: old
        spec:
          selector:
            app: vllm
            version: 2
          targetPortNumber: 8000
          extensionRef:
            name: epp
            failureMode: FailOpen
        """
        let pool = try YAMLDecoder().decode(InferencePool.self, from: yaml)
        XCTAssertEqual(pool.selectorLabels, ["app": "vllm", "version": "2"])
        XCTAssertEqual(pool.targetPortNumbers, [8000])
        XCTAssertFalse(pool.spec.selector.isLabelSelector)
        XCTAssertEqual(pool.group, "inference.networking.x-k8s.io")
    }

    func testWrongTypeReportsCodingPath() {
        let json = #"{"metadata":{"name":"r"},"spec":{"poolRef":{"name":"p"},"rules":[{"targets":[{"modelRewrite":"x","weight":"heavy"}]}]}}"#
        XCTAssertThrowsError(try JSONDecoder().decode(InferenceModelRewrite.self, from: Data(json.utf8))) { error in
            guard case DecodingError.typeMismatch(_, let ctx) = error else { return XCTFail("\(error)") }
            XCTAssertEqual(ctx.codingPath.map { $0.intValue.map(String.init) ?? $0.stringValue },
                           ["spec", "rules", "0", "targets", "0", "weight"])
        }
    }

    func testConditionsAndObjective() throws {
        let yaml = """
        apiVersion: llm-d.ai/v1alpha2
        kind: InferenceObjective
        metadata: {name: batch, namespace: ns, creationTimestamp: 2024-01-01T00:00:00Z, deletionTimestamp: null}
        spec: {priority: -2, poolRef: {group: inference.networking.k8s.io, name: pool}}
        status:
          conditions:
          - {type: Accepted, status: "True", reason: Accepted, observedGeneration: 1, lastTransitionTime: "2024-01-01T00:00:00Z"}
        """
        let o = try YAMLDecoder().decode(InferenceObjective.self, from: yaml)
        XCTAssertEqual(o.spec.priority, -2)
        XCTAssertEqual(o.metadata.creationTimestamp?.hasPrefix("2024-01-01"), true)
        XCTAssertNil(o.metadata.deletionTimestamp)
        XCTAssertEqual(o.status?.conditions?.first?.status, "True")
        XCTAssertEqual(o.spec.poolRef.effectiveKind, "InferencePool")
    }

    func testListManifest() throws {
        let yaml = """
        apiVersion: v1
        kind: List
        items:
        - apiVersion: inference.networking.x-k8s.io/v1alpha2
          kind: InferenceModelRewrite
          metadata: {name: a}
          spec:
            poolRef: {name: p}
            rules: [{targets: [{modelRewrite: x}]}]
        - apiVersion: inference.networking.x-k8s.io/v1alpha2
          kind: InferenceObjective
          metadata: {name: o}
          spec: {poolRef: {name: p}}
        """
        let r = try ManifestLoader.parse(yaml, file: "list.yaml")
        XCTAssertEqual(r.rewrites.map(\.metadata.qualifiedName), ["default/a"])
        XCTAssertEqual(r.objectives.count, 1)
        XCTAssertThrowsError(try ManifestLoader.parse(yaml.replacingOccurrences(of: "modelRewrite: x", with: "modelRewrite: [x]"), file: "list.yaml")) { e in
            XCTAssertEqual((e as? ManifestError)?.line, 9)
        }
    }
}
