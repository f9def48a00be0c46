import ExtProc
import InferenceRouting
import NIOConcurrencyHelpers
import NIOCore
import Prometheus

/// The picker's Prometheus metrics, named as the reference EPP names them so existing dashboards
/// and alerts keep working.
///
/// Request-path cost: each request looks its label set up once in a small locked dictionary (no
/// registry lookup, no allocation after the first request of a model/target pair) and bumps atomic
/// counters and its eight histograms under one lock (`SeriesHistograms`). Everything else happens
/// when Prometheus scrapes.
public final class InferenceMetrics: ExtProcObserver, Sendable {
    public let registry: PrometheusCollectorRegistry
    private let poolName: String
    private let state: RoutingState
    private let series = NIOLockedValueBox<[SeriesKey: Series]>([:])
    private let readyPods: Gauge
    private let averageQueue: Gauge
    private let averageKVCache: Gauge
    /// What counts as a fresh load sample (the picker's policy); off → the averages stay 0.
    private let loadPolicy: LoadPolicy
    /// The admission queue whose waiters `inference_extension_flow_control_queue_size` counts.
    private let admissionQueue: AdmissionQueue?
    /// The budget whose use `inference_extension_held_request_body_bytes` reports.
    private let heldBodyBudget: HeldBodyBudget?
    private let heldBodyBytes: Gauge
    private let servedElsewhere: Counter
    private let queueGauges = NIOLockedValueBox<[AdmissionQueue.Group: Gauge]>([:])
    private let queueDurations = NIOLockedValueBox<[QueueDurationKey: ValueHistogram]>([:])
    /// Model names come from clients: past this many label sets, new ones are counted under
    /// `model_name="other"` so that a client sending random names cannot grow memory without bound.
    public let maxSeries: Int
    static let overflowLabel = "other"

    public init(poolName: String, state: RoutingState, registry: PrometheusCollectorRegistry = .init(),
                maxSeries: Int = 500, loadPolicy: LoadPolicy = .off, admissionQueue: AdmissionQueue? = nil,
                heldBodyBudget: HeldBodyBudget? = nil) {
        self.registry = registry
        self.admissionQueue = admissionQueue
        self.heldBodyBudget = heldBodyBudget
        heldBodyBytes = registry.makeGauge(descriptor: metric("inference_extension_held_request_body_bytes",
            "Request-body bytes the picker holds now while their requests wait to be routed (capped by --max-held-request-body-bytes)."))
        servedElsewhere = registry.makeCounter(descriptor: metric("inference_extension_served_by_fallback_total",
            "Requests the gateway reported as served by another endpoint than the picked one (x-gateway-destination-endpoint-served): a fallback from the list, or the gateway's own choice."),
            labels: [("name", poolName)])
        self.loadPolicy = loadPolicy
        self.poolName = poolName
        self.state = state
        self.maxSeries = maxSeries
        readyPods = registry.makeGauge(descriptor: metric("inference_pool_ready_pods",
            "The number of ready pods in the inference server pool."), labels: [("name", poolName)])
        averageQueue = registry.makeGauge(descriptor: metric("inference_pool_average_queue_size",
            "The average number of requests pending in the model server queue."), labels: [("name", poolName)])
        averageKVCache = registry.makeGauge(descriptor: metric("inference_pool_average_kv_cache_utilization",
            "The average kv cache utilization for an inference server pool."), labels: [("name", poolName)])
    }

    // MARK: ExtProcObserver

    public func requestRouted(model: String?, targetModel: String?, rewriteName: String?) -> AnyObject? {
        let s = series(SeriesKey(model: model ?? "", target: targetModel ?? "", rewrite: rewriteName))
        s.running.increment()
        return s
    }

    public func requestEnded(_ outcome: RequestOutcome, wasRouted: Bool, routed: AnyObject?) {
        let s = (routed as? Series)
            ?? series(SeriesKey(model: outcome.model ?? "", target: outcome.targetModel ?? "", rewrite: outcome.rewriteName))
        if wasRouted { s.running.decrement() }
        if outcome.servedElsewhere { servedElsewhere.increment() }
        s.requests.increment()
        s.rewriteDecisions?.increment()
        var observed = RequestObservation()
        observed[.requestSizes] = Double(outcome.requestBodyBytes)
        if wasRouted { observed[.pickDuration] = outcome.pickDuration.seconds }
        if case .completed = outcome.result {
            observed[.duration] = outcome.duration.seconds
            observed[.responseSizes] = Double(outcome.responseBodyBytes)
            if let usage = outcome.usage {
                observed[.inputTokens] = usage.promptTokens.map(Double.init)
                observed[.outputTokens] = usage.completionTokens.map(Double.init)
                observed[.cachedTokens] = usage.cachedTokens.map(Double.init)
                // NTPOT, as the reference: the whole latency over the output tokens.
                if let out = usage.completionTokens, out > 0 { observed[.timePerOutputToken] = outcome.duration.seconds / Double(out) }
            }
        }
        s.histograms.record(observed)
        switch outcome.result {
        case .completed:
            break
        case .refused(let status, _):
            errorCounter(s.key, code: Self.errorCode(status: status)).increment()
        case .protocolError:
            errorCounter(s.key, code: "ProtocolError").increment()
        case .abandoned:
            break  // the client or the gateway gave up: not the picker's error
        }
    }

    /// `inference_extension_flow_control_request_queue_duration_seconds`, as the reference's flow
    /// control reports it (waits only; a request refused because the queue was full never waited).
    public func requestLeftQueue(_ request: QueuedRequest) {
        var key = QueueDurationKey(priority: request.priority, fairnessID: request.fairnessID, outcome: request.outcome.rawValue,
                                   model: request.model ?? "", target: request.targetModel ?? "")
        let histogram: ValueHistogram = queueDurations.withLockedValue { table in
            if let h = table[key] { return h }
            if table.count >= maxQueueSeries {
                key = QueueDurationKey(priority: request.priority, fairnessID: Self.overflowLabel, outcome: key.outcome,
                                       model: Self.overflowLabel, target: Self.overflowLabel)
                if let h = table[key] { return h }
            }
            let h = registry.makeValueHistogram(descriptor: metric("inference_extension_flow_control_request_queue_duration_seconds",
                "Time a request spent in the flow-control (admission) queue, by outcome."),
                labels: [("fairness_id", key.fairnessID), ("priority", String(key.priority)), ("outcome", key.outcome),
                         ("inference_pool", poolName), ("model_name", key.model), ("target_model_name", key.target)],
                buckets: Buckets.queueDuration)
            table[key] = h
            return h
        }
        histogram.record(request.waited.seconds)
    }

    /// Label sets of the queue metrics kept at most (model names come from clients).
    let maxQueueSeries = 200

    /// The series of a label set, made on first use; past `maxSeries`, the overflow series.
    private func series(_ key: SeriesKey) -> Series {
        series.withLockedValue { table in
            if let s = table[key] { return s }
            var key = key
            if table.count >= maxSeries {
                key = SeriesKey(model: Self.overflowLabel, target: Self.overflowLabel, rewrite: nil)
                if let s = table[key] { return s }
            }
            let s = Series(key, running: runningGauge(key.model), registry: registry)
            table[key] = s
            return s
        }
    }

    // MARK: Scrape

    /// The exposition text (format 0.0.4). Values derived from the routing snapshot are read now.
    public func exposition() -> [UInt8] {
        let endpoints = state.snapshot.endpoints
        readyPods.set(Int64(endpoints.count))
        // Means over the endpoints whose last scrape is fresh; 0 when none is.
        let load = endpoints.averageLoad(policy: loadPolicy, now: MonotonicClock.nanoseconds)
        averageQueue.set(load?.queue ?? 0)
        averageKVCache.set(load?.kvCache ?? 0)
        heldBodyBytes.set(Int64(heldBodyBudget?.bytes ?? 0))
        updateQueueSizes()
        var out: [UInt8] = []
        out.reserveCapacity(16 << 10)
        registry.emit(into: &out)
        let all = series.withLockedValue { table in table.values.map(\.histograms) }
        SeriesHistograms.emit(all.sorted { $0.renderedLabels.lexicographicallyPrecedes($1.renderedLabels) }, into: &out)
        emitPerPodQueues(endpoints, into: &out)
        return out
    }

    /// `inference_extension_flow_control_queue_size` per priority, objective and model: the
    /// requests waiting now. A label set seen once stays, at 0 when its waiters are gone, so
    /// autoscalers summing it (scale from zero on queued demand) see 0 rather than no data.
    private func updateQueueSizes() {
        guard let admissionQueue else { return }
        var sizes: [AdmissionQueue.Group: Int] = [:]
        queueGauges.withLockedValue { gauges in
            for (group, n) in admissionQueue.sizes() {
                var g = group
                if gauges[g] == nil && gauges.count >= maxQueueSeries {
                    g = AdmissionQueue.Group(priority: group.priority, fairnessID: Self.overflowLabel,
                                             model: Self.overflowLabel, targetModel: Self.overflowLabel)
                }
                sizes[g, default: 0] += n
                if gauges[g] == nil {
                    gauges[g] = registry.makeGauge(descriptor: metric("inference_extension_flow_control_queue_size",
                        "Number of requests waiting in the flow-control (admission) queue."),
                        labels: [("fairness_id", g.fairnessID), ("priority", String(g.priority)), ("inference_pool", poolName),
                                 ("model_name", g.model), ("target_model_name", g.targetModel)])
                }
            }
            for (g, gauge) in gauges { gauge.set(Int64(sizes[g] ?? 0)) }
        }
    }

    /// `inference_pool_per_pod_queue_size{name, model_server_pod}` (the reference's per-pod gauge):
    /// one series per endpoint with a fresh load sample, written here rather than kept in the
    /// registry so that pods that left the pool or stopped reporting drop out at once. The pod is
    /// its name, or its address when it has none (standalone `--endpoints`).
    private func emitPerPodQueues(_ endpoints: EndpointSet, into out: inout [UInt8]) {
        let now = MonotonicClock.nanoseconds
        var lines: [(pod: String, waiting: Int)] = []
        for r in endpoints.records {
            guard let l = r.freshLoad(now: now, loadPolicy) else { continue }
            lines.append((r.endpoint.podName ?? r.endpoint.address, l.waiting))
        }
        guard !lines.isEmpty else { return }
        out.append(contentsOf: "# HELP inference_pool_per_pod_queue_size The total number of requests pending in the model server queue for each underlying pod.\n# TYPE inference_pool_per_pod_queue_size gauge\n".utf8)
        for (pod, waiting) in lines.sorted(by: { $0.pod < $1.pod }) {
            out.append(contentsOf: #"inference_pool_per_pod_queue_size{model_server_pod=""#.utf8)
            out.appendEscapedLabelValue(pod)
            out.append(contentsOf: #"",name=""#.utf8)
            out.appendEscapedLabelValue(poolName)
            out.append(contentsOf: "\"} \(waiting)\n".utf8)
        }
    }

    /// `error_code` label values as the reference uses them.
    static func errorCode(status: Int) -> String {
        switch status {
        case 400: return "BadRequest"
        case 413: return "RequestTooLarge"
        case 429: return "InferencePoolResourceExhausted"
        case 503: return "ServiceUnavailable"
        default: return status >= 500 ? "Internal" : "BadRequest"
        }
    }

    /// One gauge per model, shared by its series; called when a series is made.
    private func runningGauge(_ model: String) -> Gauge {
        registry.makeGauge(descriptor: metric("inference_objective_running_requests",
            "Inference objective number of running requests in each model."), labels: [("model_name", model)])
    }

    /// Errors are rare: the registry's own lookup is fine here.
    private func errorCounter(_ key: SeriesKey, code: String) -> Counter {
        registry.makeCounter(descriptor: metric("inference_objective_request_error_total",
            "Counter of inference objective requests errors broken out for each model and target model."), labels: [("model_name", key.model), ("target_model_name", key.target), ("error_code", code)])
    }
}

private struct QueueDurationKey: Hashable, Sendable {
    var priority: Int
    var fairnessID: String
    var outcome: String
    var model: String
    var target: String
}

private struct SeriesKey: Hashable, Sendable {
    var model: String
    var target: String
    var rewrite: String?
}

/// The metrics of one (model, target model, rewrite) label set, resolved once.
private final class Series: Sendable {
    let key: SeriesKey
    let running: Gauge
    let requests: Counter
    let rewriteDecisions: Counter?
    let histograms: SeriesHistograms

    init(_ key: SeriesKey, running: Gauge, registry r: PrometheusCollectorRegistry) {
        self.key = key
        self.running = running
        let labels = [("model_name", key.model), ("target_model_name", key.target)]
        requests = r.makeCounter(descriptor: metric("inference_objective_request_total",
            "Counter of inference objective requests broken out for each model and target model."), labels: labels)
        rewriteDecisions = key.rewrite.map {
            r.makeCounter(descriptor: metric("inference_extension_model_rewrite_decisions_total",
                "Counter of InferenceModelRewrite decisions: which rule sent a model to which target."),
                labels: [("model_rewrite_name", $0), ("model_name", key.model), ("target_model", key.target)])
        }
        histograms = SeriesHistograms(labels: labels)
    }
}

/// A metric name as given (no namespace or unit suffix added) with its help text.
func metric(_ name: String, _ help: String) -> MetricNameDescriptor {
    MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
}

enum Buckets {
    static let queueDuration: [Double] = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
    static let requestDuration: [Double] = [
        0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60, 120, 180,
        240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600,
    ]
    static let pickDuration: [Double] = [0.000_01, 0.000_05, 0.000_1, 0.000_2, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
    /// Bytes: 64 B … 1 GiB in powers of two.
    static let sizes: [Double] = (6...30).map { Double(1 << $0) }
    /// Seconds per output token: a millisecond to ten seconds.
    static let timePerOutputToken: [Double] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10]
    /// Tokens: 1, then 8 … 1Mi in powers of two.
    static let tokens: [Double] = [1] + (3...20).map { Double(1 << $0) }
}

private extension TimeAmount {
    var seconds: Double { Double(nanoseconds) / 1e9 }
}
