import Foundation
import XCTest
@testable import InferenceRouting

final class EndpointPickerConfigTests: XCTestCase {
    /// The reference Helm chart's default-plugins.yaml (shared with the integration tests).
    let chartDefault = try! String(contentsOf: URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures/reference-chart-default-plugins.yaml"), encoding: .utf8)

    func testTheReferenceChartsDefaultGivesItsWeights() throws {
        let c = try EndpointPickerConfig.parse(chartDefault)
        XCTAssertEqual([c.queueWeight, c.kvCacheWeight, c.prefixWeight, c.loraWeight], [2, 2, 3, 0])
        XCTAssertEqual(c.notes, [])
        var policy = LoadPolicy(enabled: true)
        c.apply(to: &policy)
        XCTAssertEqual([policy.queueWeight, policy.kvCacheWeight, policy.prefixWeight, policy.loraWeight], [2, 2, 3, 0])
    }

    func testUnreferencedScorersAreOffAndOmittedWeightsAreOne() throws {
        let c = try EndpointPickerConfig.parse("""
        apiVersion: inference.networking.x-k8s.io/v1alpha1
        kind: EndpointPickerConfig
        plugins:
        - {type: queue-scorer}
        - {type: kv-cache-utilization-scorer, name: kv}
        - {type: lora-affinity-scorer}
        - {type: max-score-picker}
        schedulingProfiles:
        - name: default
          plugins:
          - {pluginRef: kv}
          - {pluginRef: max-score-picker}
        """)
        XCTAssertEqual([c.queueWeight, c.kvCacheWeight, c.prefixWeight, c.loraWeight], [0, 1, 0, 0])
        XCTAssertEqual(c.notes, [])
    }

    func testWithoutProfilesEveryPluginCountsOnce() throws {
        let c = try EndpointPickerConfig.parse("""
        {"apiVersion": "inference.networking.x-k8s.io/v1alpha1", "kind": "EndpointPickerConfig",
         "plugins": [{"type": "queue-scorer"}, {"type": "lora-affinity-scorer"}, {"type": "decode-filter"}]}
        """)
        XCTAssertEqual([c.queueWeight, c.kvCacheWeight, c.prefixWeight, c.loraWeight], [1, 0, 0, 1])
        XCTAssertEqual(c.notes, ["plugin type decode-filter is not supported here; ignored"])
    }

    func testPrefixParametersAndProfileChoice() throws {
        let c = try EndpointPickerConfig.parse("""
        apiVersion: inference.networking.x-k8s.io/v1alpha1
        kind: EndpointPickerConfig
        plugins:
        - type: prefix-cache-scorer
          parameters: {hashBlockSize: 5, maxPrefixBlocksToMatch: 10000, lruCapacityPerServer: 31250}
        - type: queue-scorer
        schedulingProfiles:
        - name: prefill
          plugins: [{pluginRef: queue-scorer}]
        - name: default
          plugins: [{pluginRef: prefix-cache-scorer, weight: 50}]
        """)
        XCTAssertEqual(c.prefixWeight, 50)
        XCTAssertEqual(c.queueWeight, 0, "only the default profile counts")
        XCTAssertEqual(c.prefixBlockBytes, 8, "5 characters round up to one 8-byte word")
        XCTAssertEqual(c.prefixMaxBlocks, 4096)
        XCTAssertEqual(c.notes.count, 2, "\(c.notes)")
        let tokens = try EndpointPickerConfig.parse("""
        kind: EndpointPickerConfig
        plugins: [{type: prefix-cache-scorer, parameters: {blockSizeTokens: 16}}]
        """)
        XCTAssertEqual(tokens.prefixBlockBytes, 64)
    }

    func testBrokenConfigsAreErrors() {
        let cases: [(String, String)] = [
            ("kind: Deployment", "kind must be EndpointPickerConfig"),
            ("- a\n- b", "not a mapping"),
            ("kind: EndpointPickerConfig\nplugins: {type: x}", "plugins must be a list"),
            ("kind: EndpointPickerConfig\nplugins: [{name: x}]", "needs a type"),
            ("kind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: d, plugins: [{pluginRef: nope}]}]",
             "pluginRef nope names no plugin"),
            ("kind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer, weight: -1}]}]",
             "must be a number ≥ 0"),
            ("kind: EndpointPickerConfig\nplugins: [{type: prefix-cache-scorer, parameters: {hashBlockSize: 0}}]", "positive integer"),
            ("apiVersion: v1\nkind: EndpointPickerConfig", "unsupported apiVersion"),
            ("kind: [", "not YAML"),
        ]
        for (text, message) in cases {
            XCTAssertThrowsError(try EndpointPickerConfig.parse(text), text) { error in
                XCTAssertTrue("\(error)".contains(message), "\(error) should say \(message)")
            }
        }
    }

    func testThePickersMaxNumOfEndpoints() throws {
        let text = { (value: String) in """
            apiVersion: inference.networking.x-k8s.io/v1alpha1
            kind: EndpointPickerConfig
            plugins:
            - {type: queue-scorer}
            - type: max-score-picker
              parameters: {maxNumOfEndpoints: \(value)}
            schedulingProfiles:
            - name: default
              plugins:
              - {pluginRef: queue-scorer}
              - {pluginRef: max-score-picker}
            """ }
        XCTAssertEqual(try EndpointPickerConfig.parse(text("3")).maxEndpoints, 3)
        XCTAssertNil(try EndpointPickerConfig.parse(chartDefault).maxEndpoints)
        XCTAssertThrowsError(try EndpointPickerConfig.parse(text("0")))
        XCTAssertThrowsError(try EndpointPickerConfig.parse(text("two")))
    }
}
