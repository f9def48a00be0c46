import InferenceRouting
import ModelServerMetrics
import XCTest

final class LoadMetricsTests: XCTestCase {
    private func parse(_ s: String) -> LoadMetrics? { LoadMetrics.parse(Array(s.utf8)) }

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
        XCTAssertEqual(parse(text), LoadMetrics(waiting: 5, running: 5, kvCacheUsage: 0.5, servedModels: ["facebook/opt-125m"]))
    }

    func testOlderGPUCacheNameAndKVPreferred() {
        XCTAssertEqual(parse("vllm:gpu_cache_usage_perc 0.7\nvllm:num_requests_waiting 2\n"),
                       LoadMetrics(waiting: 2, running: 0, kvCacheUsage: 0.7))
        XCTAssertEqual(parse("vllm:gpu_cache_usage_perc 0.7\nvllm:kv_cache_usage_perc 0.1\n")?.kvCacheUsage, 0.1)
    }

    func testLabelsWithBracesQuotesAndTimestamps() {
        let text = #"vllm:num_requests_waiting{model_name="we}ird \"x\" }",lora=""} 7 1712345678000"# + "\r\n"
            + "\tvllm:kv_cache_usage_perc{a=\"b\"}   0.3\n"
        XCTAssertEqual(parse(text), LoadMetrics(waiting: 7, running: 0, kvCacheUsage: 0.3, servedModels: [#"we}ird "x" }"#]))
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
        XCTAssertNil(LoadMetrics.parse([0xff, 0xfe, 0x00, 0x0a, 0x7b, 0x7d] + Array(repeating: 0x80, count: 1000)))
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
        XCTAssertEqual(parse(text), LoadMetrics(waiting: 4, running: 0, kvCacheUsage: 0.2))
    }

    func testWorksOnASliceWithNonZeroStart() {
        let bytes = Array("junk\nvllm:num_requests_waiting 9\n".utf8)
        XCTAssertEqual(LoadMetrics.parse(bytes[5...])?.waiting, 9)
    }

    // MARK: other model servers (the reference's metric flags)

    func testMetricSelectorsParse() throws {
        XCTAssertEqual(try MetricSpec(parsing: "sglang:num_queue_reqs"), MetricSpec(name: "sglang:num_queue_reqs"))
        let trt = try MetricSpec(parsing: #" nv_trt_llm_request_metrics{ request_type = waiting, model="en\"s" } "#)
        XCTAssertEqual(trt.name, "nv_trt_llm_request_metrics")
        XCTAssertEqual(trt.labels, [.init(name: "request_type", value: "waiting"), .init(name: "model", value: #"en"s"#)])
        XCTAssertEqual(trt.description, #"nv_trt_llm_request_metrics{request_type="waiting",model="en\"s"}"#)
        XCTAssertEqual(try MetricSpec(parsing: "m{}"), MetricSpec(name: "m"))
        for bad in ["", "9lives", "a-b", "m{x}", "m{x=1", #"m{x="1}"#, "m{1x=2}", "m{x=1}y"] {
            XCTAssertThrowsError(try MetricSpec(parsing: bad), bad)
        }
    }

    func testSGLangNames() throws {
        let text = """
        # TYPE sglang:num_running_reqs gauge
        sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.0
        sglang:num_queue_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
        sglang:token_usage{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.42
        sglang:gen_throughput{model_name="meta-llama/Llama-3.1-8B-Instruct"} 120.5
        """
        XCTAssertNil(LoadMetrics.parse(Array(text.utf8)), "vLLM's names find nothing here")
        var names = MetricNames.vllm
        names.queued = try MetricSpec(parsing: "sglang:num_queue_reqs")
        names.running = try MetricSpec(parsing: "sglang:num_running_reqs")
        names.kvCache = try MetricSpec(parsing: "sglang:token_usage")
        XCTAssertEqual(LoadMetrics.parse(Array(text.utf8), names: names),
                       LoadMetrics(waiting: 3, running: 7, kvCacheUsage: 0.42, servedModels: ["meta-llama/Llama-3.1-8B-Instruct"]))
    }

    func testLabelSelectorsPickSeriesOfOneFamily() throws {
        let text = """
        nv_trt_llm_request_metrics{model="ensemble",request_type="waiting",version="1"} 4
        nv_trt_llm_request_metrics{model="ensemble",request_type="scheduled",version="1"} 6
        nv_trt_llm_request_metrics{model="ensemble",request_type="max",version="1"} 512
        nv_trt_llm_request_metrics 99
        nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="ensemble",version="1"} 8192
        nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="ensemble",version="1"} 0.25
        """
        let names = MetricNames(queued: try MetricSpec(parsing: "nv_trt_llm_request_metrics{request_type=waiting}"),
                                running: try MetricSpec(parsing: #"nv_trt_llm_request_metrics{request_type="scheduled"}"#),
                                kvCache: try MetricSpec(parsing: "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"))
        XCTAssertEqual(LoadMetrics.parse(Array(text.utf8), names: names), LoadMetrics(waiting: 4, running: 6, kvCacheUsage: 0.25))
    }

    func testLoRAInfoCanBeLeftUnread() {
        let text = #"vllm:num_requests_waiting 1\#nvllm:lora_requests_info{max_lora="2",running_lora_adapters="a",waiting_lora_adapters=""} 5\#n"#
        XCTAssertNotNil(LoadMetrics.parse(Array(text.utf8))?.lora)
        var names = MetricNames.vllm
        names.lora = nil
        XCTAssertNil(LoadMetrics.parse(Array(text.utf8), names: names)?.lora)
        XCTAssertEqual(LoadMetrics.parse(Array(text.utf8), names: names)?.waiting, 1)
    }
}
