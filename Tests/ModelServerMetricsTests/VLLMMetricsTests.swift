import InferenceRouting
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
        XCTAssertEqual(parse(text), VLLMMetrics(waiting: 5, running: 5, kvCacheUsage: 0.5, servedModels: ["facebook/opt-125m"]))
    }

    func testOlderGPUCacheNameAndKVPreferred() {
        XCTAssertEqual(parse("vllm:gpu_cache_usage_perc 0.7\nvllm:num_requests_waiting 2\n"),
                       VLLMMetrics(waiting: 2, running: 0, kvCacheUsage: 0.7))
        XCTAssertEqual(parse("vllm:gpu_cache_usage_perc 0.7\nvllm:kv_cache_usage_perc 0.1\n")?.kvCacheUsage, 0.1)
    }

    func testLabelsWithBracesQuotesAndTimestamps() {
        let text = #"vllm:num_requests_waiting{model_name="we}ird \"x\" }",lora=""} 7 1712345678000"# + "\r\n"
            + "\tvllm:kv_cache_usage_perc{a=\"b\"}   0.3\n"
        XCTAssertEqual(parse(text), VLLMMetrics(waiting: 7, running: 0, kvCacheUsage: 0.3, servedModels: [#"we}ird "x" }"#]))
    }

    func testLoRARequestsInfoNewestSeriesWins() {
        // vLLM keeps one series per adapter state it has been in, valued with the time it began.
        let text = """
        # TYPE vllm:lora_requests_info gauge
        vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7123e+09
        vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql-lora, tweet-summary",waiting_lora_adapters="sql-lora-v2"} 1.7125e+09
        vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 1.7124e+09
        vllm:num_requests_waiting{model_name="meta-llama/Llama-3.1-8B-Instruct"} 1
        vllm:num_requests_running{model_name="meta-llama/Llama-3.1-8B-Instruct"} 3
        vllm:kv_cache_usage_perc 0.2
        """
        let m = parse(text)
        XCTAssertEqual(m?.lora, LoRAAdapters(running: ["sql-lora", "tweet-summary"], waiting: ["sql-lora-v2"], maxAdapters: 2))
        XCTAssertEqual(m?.servedModels, ["meta-llama/Llama-3.1-8B-Instruct"])
        // Empty lists, label order and spacing as a server may write them.
        XCTAssertEqual(parse(#"vllm:lora_requests_info{ waiting_lora_adapters = "", max_lora="4" ,running_lora_adapters=""} 5"# +
                             "\nvllm:num_requests_waiting 0\n")?.lora,
                       LoRAAdapters(running: [], waiting: [], maxAdapters: 4))
    }

    func testLoRAInfoWithoutAValidMaxIsIgnored() {
        XCTAssertNil(parse("vllm:num_requests_waiting 1\n")?.lora, "LoRA off: no series")
        for bad in [#"{running_lora_adapters="a",waiting_lora_adapters=""}"#, #"{max_lora="x",running_lora_adapters="a"}"#,
                    #"{max_lora="-1",running_lora_adapters="a"}"#, #"{max_lora="2",running_lora_adapters="a}"#] {
            let m = parse("vllm:lora_requests_info\(bad) 1\nvllm:num_requests_waiting 2\n")
            XCTAssertEqual(m?.waiting, 2, bad)
            XCTAssertNil(m?.lora, bad)
        }
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
