import ModelServerMetrics
import XCTest

final class VLLMMetricsTests: XCTestCase {
    private func parse(_ s: String) -> VLLMMetrics? { VLLMMetrics.parse(Array(s.utf8)) }

    func testRealVLLMExposition() {
        // Shape of a vLLM 0.10 /metrics page (two engines of one model), trimmed.
        let text = """
        # HELP vllm:num_requests_running Number of requests in model execution batches.
        # TYPE vllm:num_requests_running gauge
        vllm:num_requests_running{engine="0",model_name="facebook/opt-125m"} 3.0
        vllm:num_requests_running{engine="1",model_name="facebook/opt-125m"} 2.0
        # HELP vllm:num_requests_waiting Number of requests waiting to be processed.
        # TYPE vllm:num_requests_waiting gauge
        vllm:num_requests_waiting{engine="0",model_name="facebook/opt-125m"} 4.0
        vllm:num_requests_waiting{engine="1",model_name="facebook/opt-125m"} 1.0
        # TYPE vllm:kv_cache_usage_perc gauge
        vllm:kv_cache_usage_perc{engine="0",model_name="facebook/opt-125m"} 0.25
        vllm:kv_cache_usage_perc{engine="1",model_name="facebook/opt-125m"} 0.5
        vllm:num_requests_waiting_total_seconds 99
        vllm:prompt_tokens_total{model_name="facebook/opt-125m"} 123456.0
        """
        XCTAssertEqual(parse(text), VLLMMetrics(waiting: 5, running: 5, kvCacheUsage: 0.5))
    }

    func testOlderGPUCacheNameAndKVPreferred() {
        XCTAssertEqual(parse("vllm:gpu_cache_usage_perc 0.7\nvllm:num_requests_waiting 2\n"),
                       VLLMMetrics(waiting: 2, running: 0, kvCacheUsage: 0.7))
        XCTAssertEqual(parse("vllm:gpu_cache_usage_perc 0.7\nvllm:kv_cache_usage_perc 0.1\n")?.kvCacheUsage, 0.1)
    }

    func testLabelsWithBracesQuotesAndTimestamps() {
        let text = #"vllm:num_requests_waiting{model_name="we}ird \"x\" }",lora=""} 7 1712345678000"# + "\r\n"
            + "\tvllm:kv_cache_usage_perc{a=\"b\"}   0.3\n"
        XCTAssertEqual(parse(text), VLLMMetrics(waiting: 7, running: 0, kvCacheUsage: 0.3))
    }

    func testNotVLLMOrGarbage() {
        XCTAssertNil(parse(""))
        XCTAssertNil(parse("# only comments\nprocess_cpu_seconds_total 12\n"))
        XCTAssertNil(parse(#"{"error":"not found"}"#))
        XCTAssertNil(VLLMMetrics.parse([0xff, 0xfe, 0x00, 0x0a, 0x7b, 0x7d] + Array(repeating: 0x80, count: 1000)))
    }

    func testMalformedLinesAreSkippedOneByOne() {
        let text = """
        vllm:num_requests_waiting{model_name="x" 12
        vllm:kv_cache_usage_perc notanumber
        vllm:kv_cache_usage_perc NaN
        vllm:num_requests_waiting -3
        vllm:num_requests_waiting +Inf
        vllm:num_requests_waitingX 50
        vllm:num_requests_waiting
        vllm:num_requests_waiting 4
        vllm:kv_cache_usage_perc 0.2
        """
        XCTAssertEqual(parse(text), VLLMMetrics(waiting: 4, running: 0, kvCacheUsage: 0.2))
    }

    func testWorksOnASliceWithNonZeroStart() {
        let bytes = Array("junk\nvllm:num_requests_waiting 9\n".utf8)
        XCTAssertEqual(VLLMMetrics.parse(bytes[5...])?.waiting, 9)
    }
}
