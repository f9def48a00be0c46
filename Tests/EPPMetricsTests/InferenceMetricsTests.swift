import EPPMetrics
import ExtProc
import InferenceRouting
import NIOCore
import StreamingJSON
import XCTest

final class InferenceMetricsTests: XCTestCase {
    private func makeMetrics(endpoints: Int = 3, maxSeries: Int = 500) -> InferenceMetrics {
        let list = (0..<endpoints).map { Endpoint(host: "10.0.0.\($0 + 1)", port: 8000) }
        let snapshot = RoutingSnapshot(rules: RewriteRules(), objectives: Objectives(),
                                       endpoints: EndpointSet(endpoints: list), origin: "test")
        return InferenceMetrics(poolName: "vllm-pool", state: RoutingState(snapshot), maxSeries: maxSeries)
    }

    private func outcome(_ result: RequestOutcome.Result, model: String? = "opt-stable",
                         target: String? = "facebook/opt-125m", rewrite: String? = "opt-stable",
                         usage: TokenUsage? = nil) -> RequestOutcome {
        RequestOutcome(result: result, model: model, targetModel: target, rewriteName: rewrite, requestBodyBytes: 1000,
                       responseBodyBytes: 300, usage: usage, duration: .milliseconds(120), pickDuration: .microseconds(3))
    }

    /// Sample lines of the exposition (name{labels} value), without comments.
    private func samples(_ m: InferenceMetrics) -> [String: String] {
        var out: [String: String] = [:]
        for line in String(decoding: m.exposition(), as: UTF8.self).split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " ") else { continue }
            out[String(line[..<space])] = String(line[line.index(after: space)...])
        }
        return out
    }

    func testPerPodQueueGaugesNameThePodAndOnlyFreshOnes() {
        let list = [Endpoint(host: "10.0.0.1", port: 8000, podName: "vllm-a"), Endpoint(host: "10.0.0.2", port: 8000, podName: "vllm-b"),
                    Endpoint(host: "10.0.0.3", port: 8000)]
        let set = EndpointSet(endpoints: list)
        let snapshot = RoutingSnapshot(rules: RewriteRules(), objectives: Objectives(), endpoints: set, origin: "test")
        let m = InferenceMetrics(poolName: "vllm-pool", state: RoutingState(snapshot),
                                 loadPolicy: LoadPolicy(enabled: true, stalenessSeconds: 2))
        XCTAssertFalse(samples(m).keys.contains { $0.hasPrefix("inference_pool_per_pod_queue_size") }, "no samples yet")
        let now = MonotonicClock.nanoseconds
        set.records[0].record(waiting: 3, running: 1, kvCacheUsage: 0.5, at: now)
        set.records[1].record(waiting: 9, running: 1, kvCacheUsage: 0.5, at: now - 5_000_000_000)  // stale
        set.records[2].record(waiting: 1, running: 1, kvCacheUsage: 0.5, at: now)
        let s = samples(m)
        XCTAssertEqual(s[#"inference_pool_per_pod_queue_size{model_server_pod="vllm-a",name="vllm-pool"}"#], "3")
        XCTAssertEqual(s[#"inference_pool_per_pod_queue_size{model_server_pod="10.0.0.3:8000",name="vllm-pool"}"#], "1")
        XCTAssertEqual(s.keys.filter { $0.hasPrefix("inference_pool_per_pod_queue_size") }.count, 2, "the stale pod is left out")
        XCTAssertEqual(s[#"inference_pool_average_queue_size{name="vllm-pool"}"#], "2.0")
    }

    func testCompletedRequestsCountTokensSizesAndDuration() {
        let m = makeMetrics()
        for _ in 0..<3 {
            let token = m.requestRouted(model: "opt-stable", targetModel: "facebook/opt-125m", rewriteName: "opt-stable")
            m.requestEnded(outcome(.completed, usage: TokenUsage(promptTokens: 250, completionTokens: 7, cachedTokens: 16)),
                           wasRouted: true, routed: token)
        }
        let s = samples(m)
        let labels = #"model_name="opt-stable",target_model_name="facebook/opt-125m""#
        XCTAssertEqual(s["inference_objective_request_total{\(labels)}"], "3")
        XCTAssertEqual(s[#"inference_extension_model_rewrite_decisions_total{model_rewrite_name="opt-stable",model_name="opt-stable",target_model="facebook/opt-125m"}"#], "3")
        XCTAssertEqual(s["inference_objective_input_tokens_sum{\(labels)}"], "750.0")
        XCTAssertEqual(s["inference_objective_output_tokens_sum{\(labels)}"], "21.0")
        XCTAssertEqual(s["inference_objective_prompt_cached_tokens_count{\(labels)}"], "3")
        XCTAssertEqual(s["inference_objective_request_sizes_sum{\(labels)}"], "3000.0")
        XCTAssertEqual(s["inference_objective_response_sizes_sum{\(labels)}"], "900.0")
        XCTAssertEqual(s["inference_objective_request_duration_seconds_count{\(labels)}"], "3")
        XCTAssertEqual(s["inference_objective_request_duration_seconds_bucket{\(labels),le=\"0.1\"}"], "0")
        XCTAssertEqual(s["inference_objective_request_duration_seconds_bucket{\(labels),le=\"0.2\"}"], "3")
        XCTAssertEqual(s["inference_extension_scheduler_e2e_duration_seconds_count{\(labels)}"], "3")
        // NTPOT: 120 ms over 7 output tokens ≈ 17 ms per token, in the (0.01, 0.02] bucket.
        XCTAssertEqual(s["inference_objective_normalized_time_per_output_token_seconds_count{\(labels)}"], "3")
        XCTAssertEqual(s["inference_objective_normalized_time_per_output_token_seconds_bucket{\(labels),le=\"0.01\"}"], "0")
        XCTAssertEqual(s["inference_objective_normalized_time_per_output_token_seconds_bucket{\(labels),le=\"0.02\"}"], "3")
        XCTAssertEqual(s[#"inference_objective_running_requests{model_name="opt-stable"}"#], "0.0")
        XCTAssertEqual(s[#"inference_pool_ready_pods{name="vllm-pool"}"#], "3.0")
    }

    func testRunningRequestsFollowRoutedAndEnded() {
        let m = makeMetrics()
        let first = m.requestRouted(model: "a", targetModel: "a", rewriteName: nil)
        _ = m.requestRouted(model: "a", targetModel: "a", rewriteName: nil)
        XCTAssertEqual(samples(m)[#"inference_objective_running_requests{model_name="a"}"#], "2.0")
        m.requestEnded(outcome(.abandoned, model: "a", target: "a", rewrite: nil), wasRouted: true, routed: first)
        XCTAssertEqual(samples(m)[#"inference_objective_running_requests{model_name="a"}"#], "1.0")
        // Without the token (an observer may return none) the series is found by its labels.
        m.requestEnded(outcome(.abandoned, model: "a", target: "a", rewrite: nil), wasRouted: true, routed: nil)
        XCTAssertEqual(samples(m)[#"inference_objective_running_requests{model_name="a"}"#], "0.0")
    }

    func testRefusalsAndProtocolErrorsAreErrorsWithCodesAbandonedIsNot() {
        let m = makeMetrics(endpoints: 0)
        m.requestEnded(outcome(.refused(status: 400, reason: "epp_invalid_json"), model: nil, target: nil, rewrite: nil),
                       wasRouted: false, routed: nil)
        m.requestEnded(outcome(.refused(status: 503, reason: "epp_no_endpoints"), rewrite: nil), wasRouted: false, routed: nil)
        m.requestEnded(outcome(.refused(status: 413, reason: "epp_request_body_too_large"), rewrite: nil), wasRouted: false, routed: nil)
        m.requestEnded(outcome(.protocolError, rewrite: nil), wasRouted: false, routed: nil)
        m.requestEnded(outcome(.abandoned, rewrite: nil), wasRouted: false, routed: nil)
        let s = samples(m)
        XCTAssertEqual(s[#"inference_objective_request_error_total{model_name="",target_model_name="",error_code="BadRequest"}"#], "1")
        let labels = #"model_name="opt-stable",target_model_name="facebook/opt-125m""#
        XCTAssertEqual(s["inference_objective_request_error_total{\(labels),error_code=\"ServiceUnavailable\"}"], "1")
        XCTAssertEqual(s["inference_objective_request_error_total{\(labels),error_code=\"RequestTooLarge\"}"], "1")
        XCTAssertEqual(s["inference_objective_request_error_total{\(labels),error_code=\"ProtocolError\"}"], "1")
        XCTAssertEqual(s["inference_objective_request_total{\(labels)}"], "4")
        // Refused requests have no response: no duration, no response size.
        XCTAssertEqual(s["inference_objective_request_duration_seconds_count{\(labels)}"], "0")
        XCTAssertEqual(s[#"inference_pool_ready_pods{name="vllm-pool"}"#], "0.0")
        XCTAssertEqual(s.keys.filter { $0.hasPrefix("inference_extension_model_rewrite_decisions_total") }, [])
    }

    func testClientChosenModelNamesCannotGrowSeriesWithoutBound() {
        let m = makeMetrics(maxSeries: 10)
        for i in 0..<1000 {
            let name = "random-\(i)"
            let token = m.requestRouted(model: name, targetModel: name, rewriteName: nil)
            m.requestEnded(outcome(.completed, model: name, target: name, rewrite: nil), wasRouted: true, routed: token)
        }
        let s = samples(m)
        let totals = s.filter { $0.key.hasPrefix("inference_objective_request_total{") }
        XCTAssertEqual(totals.count, 11)  // 10 named + "other"
        XCTAssertEqual(s[#"inference_objective_request_total{model_name="other",target_model_name="other"}"#], "990")
        XCTAssertEqual(s[#"inference_objective_running_requests{model_name="other"}"#], "0.0")
        XCTAssertEqual(s.keys.filter { $0.hasPrefix("inference_objective_running_requests{") }.count, 11)
    }
}
