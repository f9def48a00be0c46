import ArgumentParser
import Logging

/// Command-line flags, named as in the reference EPP so existing manifests work unchanged.
public struct EPPCommand: AsyncParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "epp",
        abstract: "Envoy ext_proc endpoint picker for LLM inference (InferencePool / InferenceModelRewrite).")

    @Option(help: "ext_proc gRPC port (also serves grpc.health.v1).") var grpcPort = 9002
    @Option(help: "Separate gRPC health port.") var grpcHealthPort = 9003
    @Option(help: "Prometheus metrics port (GET /metrics over HTTP/1.1); 0 turns the listener off.") var metricsPort = 9090
    @Option(help: "Address every listener binds to.") var bindAddress = "0.0.0.0"
    @Option(help: "Serve TLS (ALPN h2); false serves plaintext h2c.") var secureServing = true
    @Option(help: "Directory with tls.crt and tls.key (reloaded on change); default: a generated self-signed certificate.") var certPath: String?
    @Option(help: "Seconds (or a Go duration: 30s, 2m) in-flight streams may take after SIGTERM/SIGINT.", transform: parseSeconds) var drainTimeout: Double = 30
    @Option(help: "Largest gRPC message accepted, in bytes.") var maxMessageBytes = 4 << 20
    @Option(help: "trace, debug, info, notice, warning, error or critical.") var logLevel = "info"
    @Option(help: "Event-loop threads serving connections (0: one per available core).") var eventLoopThreads = 0
    @Option(help: .hidden) var enableTestEchoService = false

    @Option(help: "Standalone endpoints: ip:port,ip:port (IPv6 as [addr]:port).") var endpoints: String?
    @Option(help: "Standalone mode: directory of InferenceModelRewrite / InferenceObjective manifests, watched.") var configDir: String?
    @Option(help: "InferencePool this EPP serves (rewrites apply when their poolRef names it).") var poolName = ""
    @Option(help: "Namespace of the pool (default: $NAMESPACE, else the service account's, else default).") var poolNamespace: String?
    @Option(help: "API group of the pool: inference.networking.k8s.io or inference.networking.x-k8s.io.") var poolGroup = "inference.networking.k8s.io"
    @Option(help: "kubeconfig path (default: in-cluster, $KUBECONFIG, ~/.kube/config).") var kubeconfig: String?
    @Option(help: "Sticky split key: a request header name, or body:FIELD for a top-level body string.") var splitAffinityHeader: String?
    @Option(help: "Restore the client's model name in responses.") var restoreModelAlias = true
    @Option(help: "Largest request body accepted (413 above).") var maxRequestBodyBytes = 64 << 20
    @Option(help: "Request-body bytes held at once across all requests while they wait to be routed (model after the prompt, admission queue, BUFFERED mode); the request that would pass it gets 503. Default: 1 GiB, or half the container's memory limit when smaller; 0: no limit.") var maxHeldRequestBodyBytes: Int?
    @Option(help: "Scrape each endpoint's model-server metrics (vLLM queue and KV cache) and pick by load; sheddable objectives get 429 when the pool is saturated.") var scrapeModelServerMetrics = true
    @Option(help: "Seconds (or a Go duration: 50ms) between scrapes of each endpoint's metrics.", transform: parseSeconds) var refreshMetricsInterval: Double = 0.05
    @Option(help: "Seconds (or a Go duration: 2s) after which a model server's last metrics no longer count (stale = unknown load).", transform: parseSeconds) var metricsStalenessThreshold: Double = 2
    @Option(help: "Path of the model servers' Prometheus metrics.") var modelServerMetricsPath = "/metrics"
    @Option(help: "Port of the model servers' metrics; 0: the endpoint's own port.") var modelServerMetricsPort = 0
    @Option(help: "Scheme of the model servers' metrics: http or https.") var modelServerMetricsScheme = "http"
    @Option(help: "With https: do not verify the model servers' certificates (they are usually self-signed); false verifies them against the system's trust roots.") var modelServerMetricsHttpsInsecureSkipVerify = true
    @Option(help: "Metric of the requests waiting in a model server, name{label=\"value\",...} (SGLang: sglang:num_queue_reqs).") var totalQueuedRequestsMetric = "vllm:num_requests_waiting"
    @Option(help: "Metric of the requests a model server is running (SGLang: sglang:num_running_reqs).") var totalRunningRequestsMetric = "vllm:num_requests_running"
    @Option(help: "Metric of a model server's KV-cache utilisation, 0-1 (SGLang: sglang:token_usage); vLLM's older vllm:gpu_cache_usage_perc is read when the default is absent.") var kvCacheUsagePercentageMetric = "vllm:kv_cache_usage_perc"
    @Option(help: "vLLM-style LoRA info metric (labels running_lora_adapters, waiting_lora_adapters, max_lora); empty: not read.") var loraInfoMetric = "vllm:lora_requests_info"
    @Option(help: "Prefix-cache affinity: prefer endpoints that were sent the same prompt prefix (weighed with the load).") var prefixCacheScoring = true
    @Option(help: "Prompt bytes per prefix block (~16 tokens).") var prefixCacheBlockBytes = 64
    @Option(help: "Leading prompt blocks hashed per request.") var prefixCacheMaxBlocks = 64
    @Option(help: "Prefix blocks remembered (per generation; the oldest generation is forgotten when one fills).") var prefixCacheCapacity = 131_072
    @Option(help: "Seconds (or a Go duration) a sheddable request waits for a saturated pool to have room before its 429; 0: 429 at once.", transform: parseSeconds) var sheddableQueueTimeout: Double = 0
    @Option(help: "Sheddable requests waiting at most at once (more get 429 at once).") var sheddableQueueCapacity = 1024
    @Option(help: "Endpoints named per request, best first (default 1, or the EndpointPickerConfig picker's maxNumOfEndpoints): the gateway sends to the first and, on a retry, to the next. Needs a gateway that reads the comma-separated list (Envoy's override_host load balancer); ORIGINAL_DST reads one address.") var destinationEndpoints: Int?
    @Option(help: "LoRA affinity: prefer endpoints running the requested adapter, then ones with a free adapter slot (vllm:lora_requests_info).") var loraAffinityScoring = true

    // The reference EPP's other flags, so its manifests and Helm chart start this picker unchanged.
    @Option(help: "Reference EndpointPickerConfig file: the weights of queue-scorer, kv-cache-utilization-scorer, prefix-cache-scorer and lora-affinity-scorer (unreferenced scorers are off) and the prefix scorer's block parameters.") var configFile: String?
    @Option(help: "EndpointPickerConfig as text (instead of --config-file).") var configText: String?
    @Option(help: "Active-passive replicas (Kubernetes mode): only the replica holding the lease reports ready (readiness, \"\", inference-extension, the ext_proc service); liveness stays SERVING.") var haEnableLeaderElection = false
    @Option(name: .customLong("v"), help: "klog-style verbosity, as the reference: 4 = debug, 5 and up = trace (overrides --log-level).") var verbosity: Int?
    @Option(help: "Reference log level (debug, info, warn, error, or a number as --v); overrides --log-level.") var zapLogLevel: String?
    @Option(help: "Reference log encoding; logs are JSON lines either way.") var zapEncoder: String?
    @Option(help: .hidden) var zapDevel = false
    @Option(help: .hidden) var zapStacktraceLevel: String?
    @Option(help: .hidden) var zapTimeEncoding: String?
    @Option(help: "OpenTelemetry tracing: spans per sampled request (gateway.request, routing, scheduling) exported over OTLP/HTTP, and the backend's traceparent set to them. Reads the OTEL_* environment (endpoint, headers, sampler, service name).") var tracing = false
    @Option(help: "Collector URL: OTLP/HTTP traces URL or OTLP/gRPC address (default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else $OTEL_EXPORTER_OTLP_ENDPOINT (+ /v1/traces for OTLP/HTTP), else http://localhost:4318/v1/traces).") var tracingEndpoint: String?
    @Option(help: "OTLP protocol: grpc or http/protobuf (default: $OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or $OTEL_EXPORTER_OTLP_PROTOCOL, else grpc when the endpoint's port is 4317, else http/protobuf).") var tracingProtocol: String?
    @Option(help: "Share of requests without a sampled traceparent that are traced, 0-1 (default: $OTEL_TRACES_SAMPLER / _ARG, else 0.1); a sampled traceparent is always followed.") var tracingSampleRatio: Double?
    @Option(help: "Seconds (or a Go duration) between span exports (default: $OTEL_BSP_SCHEDULE_DELAY ms, else 1 s).", transform: parseSeconds) var tracingExportInterval: Double?
    @Option(help: "Bearer-token auth on /metrics, as the reference: a TokenReview and a SubjectAccessReview (get /metrics) per token, cached; on by default in Kubernetes mode, unavailable standalone.") var metricsEndpointAuth: Bool?
    @Option(help: .hidden) var enablePprof = false
    @Option(help: .hidden) var healthChecking = false
    @Option(help: "Accepted: certificates in --cert-path are always reloaded when they change.") var enableCertReload = false
    @Option(help: "Accepted: pool gauges are computed when /metrics is read.") var refreshPrometheusMetricsInterval: String?
    @Option(help: "Accepted: vLLM's cache-config series is not read.") var cacheInfoMetric: String?

    public init() {}

    /// The log level from --log-level, or the reference's --v / --zap-log-level when given.
    var effectiveLogLevel: Logger.Level {
        var level = Logger.Level(rawValue: logLevel.lowercased()) ?? .info
        func verbose(_ v: Int) -> Logger.Level { v >= 5 ? .trace : v >= 4 ? .debug : .info }
        if let z = zapLogLevel?.lowercased() {
            switch z {
            case "debug": level = .debug
            case "info": level = .info
            case "warn", "warning": level = .warning
            case "error": level = .error
            case "dpanic", "panic", "fatal": level = .critical
            default: if let v = Int(z) { level = verbose(abs(v)) }
            }
        }
        if let verbosity { level = verbose(verbosity) }
        return level
    }

    public func run() async throws {
        var logger = Logger(label: "epp")
        let level = effectiveLogLevel
        LoggingSystem.bootstrap { JSONLogHandler(label: $0, level: level) }
        logger = Logger(label: "epp")
        logger.logLevel = level
        logger.info("starting", metadata: ["log-level": "\(level)"])
        let app = try await EPPApp.start(self, logger: logger)
        await app.runUntilSignalled()
    }

    /// Accepts Go-style flags as Kubernetes manifests pass them: `-flag`, `--flag=value`, an empty
    /// `--flag=` and a bare boolean `--flag` meaning true.
    public static func normalize(_ arguments: [String]) -> [String] {
        let booleans: Set<String> = ["--secure-serving", "--restore-model-alias", "--enable-test-echo-service",
                                     "--scrape-model-server-metrics", "--prefix-cache-scoring", "--lora-affinity-scoring",
                                     "--model-server-metrics-https-insecure-skip-verify", "--ha-enable-leader-election",
                                     "--zap-devel", "--tracing", "--metrics-endpoint-auth", "--enable-pprof",
                                     "--health-checking", "--enable-cert-reload"]
        var out: [String] = []
        var i = 0
        while i < arguments.count {
            var arg = arguments[i]
            if arg == "-v" || arg.hasPrefix("-v=") { arg = "-" + arg }  // klog's -v
            if arg.hasPrefix("-") && !arg.hasPrefix("--") && arg.count > 2 && !(arg.dropFirst().first?.isNumber ?? false) {
                arg = "-" + arg
            }
            if arg.hasPrefix("--") && arg.hasSuffix("=") && arg.count > 3 {
                out += [String(arg.dropLast()), ""]  // the parser reads `--flag=` as a missing value
            } else if booleans.contains(arg) {
                let next = i + 1 < arguments.count ? arguments[i + 1] : nil
                if let next, next == "true" || next == "false" {
                    out.append("\(arg)=\(next)")
                    i += 2
                    continue
                }
                out.append("\(arg)=true")
            } else {
                out.append(arg)
            }
            i += 1
        }
        return out
    }
}

/// Lets `main` run the parsed command asynchronously without knowing its concrete type.
public protocol AsyncParsableCommandRunnable {
    mutating func runAsync() async throws
}

extension EPPCommand: AsyncParsableCommandRunnable {
    public mutating func runAsync() async throws { try await run() }
}

/// Seconds from a number ("0.05") or a Go duration as the reference's flags take ("50ms", "1m30s",
/// "1.5s"; units ns, us, µs, ms, s, m, h).
func parseSeconds(_ text: String) throws -> Double {
    if let v = Double(text) { return v }
    var rest = Substring(text)
    var sign = 1.0
    if rest.first == "-" { sign = -1; rest = rest.dropFirst() } else if rest.first == "+" { rest = rest.dropFirst() }
    guard !rest.isEmpty else { throw ValidationError("'\(text)' is not a duration") }
    let units: [(String, Double)] = [("ns", 1e-9), ("us", 1e-6), ("µs", 1e-6), ("μs", 1e-6), ("ms", 1e-3), ("s", 1), ("m", 60), ("h", 3600)]
    var total = 0.0
    while !rest.isEmpty {
        let number = rest.prefix { $0.isNumber || $0 == "." }
        guard let value = Double(number) else { throw ValidationError("'\(text)' is not a duration") }
        rest = rest.dropFirst(number.count)
        // Longest unit first: "ms" before "m".
        guard let unit = units.sorted(by: { $0.0.count > $1.0.count }).first(where: { rest.hasPrefix($0.0) }) else {
            throw ValidationError("'\(text)' is not a duration (units: ns, us, ms, s, m, h)")
        }
        rest = rest.dropFirst(unit.0.count)
        total += value * unit.1
    }
    return sign * total
}
