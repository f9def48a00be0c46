import Atomics
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// What a model server last reported about its load (vLLM `/metrics`), and when.
///
/// Immutable; the scraper publishes a new one per scrape into the endpoint's record, the
/// request path only reads it.
public final class EndpointLoad: AtomicReference, Sendable {
    /// `vllm:num_requests_waiting`: requests queued, not yet running.
    public let waiting: Int
    /// `vllm:num_requests_running`.
    public let running: Int
    /// `vllm:kv_cache_usage_perc` (older `vllm:gpu_cache_usage_perc`), 0…1.
    public let kvCacheUsage: Double
    /// This picker's in-flight count for the endpoint when the sample arrived: requests sent
    /// after it are not in `waiting` yet, so the picker adds them itself.
    public let inFlightAtSample: Int
    /// `MonotonicClock.nanoseconds` when the sample arrived.
    public let sampledAt: UInt64
    /// The server's LoRA adapters; nil when it reports none (LoRA off).
    public let lora: LoRAAdapters?
    /// Base models the server serves (`model_name` of its queue gauges): a request for one of
    /// these is not a LoRA request, whatever the adapters.
    public let servedModels: [String]

    public init(waiting: Int, running: Int, kvCacheUsage: Double, inFlightAtSample: Int, sampledAt: UInt64,
                lora: LoRAAdapters? = nil, servedModels: [String] = []) {
        self.waiting = max(0, waiting)
        self.running = max(0, running)
        self.kvCacheUsage = kvCacheUsage.isFinite ? min(1, max(0, kvCacheUsage)) : 0
        self.inFlightAtSample = inFlightAtSample
        self.sampledAt = sampledAt
        self.lora = lora
        self.servedModels = servedModels
    }
}

/// What a vLLM server reports about its LoRA adapters (`vllm:lora_requests_info`).
public struct LoRAAdapters: Sendable, Equatable {
    /// Adapters with requests running.
    public var running: [String]
    /// Adapters with requests waiting.
    public var waiting: [String]
    /// How many adapters the server serves at once (`max_lora`).
    public var maxAdapters: Int

    public init(running: [String], waiting: [String], maxAdapters: Int) {
        self.running = running
        self.waiting = waiting
        self.maxAdapters = max(0, maxAdapters)
    }

    /// The reference's LoRA affinity for a request to `adapter`: 1 when it runs here (no load,
    /// no swap), 0.8 when there is a free slot to load it, 0.6 when requests for it already wait
    /// here, else 0 (loading it would evict another adapter).
    public func affinity(for adapter: String) -> Double {
        if running.contains(adapter) { return 1 }
        var inUse = running.count
        for w in waiting where !running.contains(w) { inUse += 1 }
        if inUse < maxAdapters { return 0.8 }
        return waiting.contains(adapter) ? 0.6 : 0
    }
}

/// Monotonic time in nanoseconds (CLOCK_MONOTONIC), cheap enough for the request path.
public enum MonotonicClock {
    @inline(__always)
    public static var nanoseconds: UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}

/// How the picker weighs model-server load; the reference EPP's default scorers and saturation
/// detector.
public struct LoadPolicy: Sendable, Equatable {
    /// Off: pick by fewest requests in flight through this picker alone, never shed.
    public var enabled: Bool
    /// Samples older than this count as missing.
    public var stalenessNanos: UInt64
    public var queueWeight: Double = 2
    public var kvCacheWeight: Double = 2
    /// Weight of prefix-cache affinity (used when the request carries prefix hashes).
    public var prefixWeight: Double = 3
    /// Weight of LoRA affinity (used for a model no candidate serves as its base model, when
    /// some candidate reports adapters); 0 turns it off.
    public var loraWeight: Double = 1
    /// Saturation: an endpoint is full at this many waiting requests…
    public var queueDepthThreshold: Double = 5
    /// …or at this KV-cache utilization.
    public var kvCacheThreshold: Double = 0.8

    public init(enabled: Bool, stalenessSeconds: Double = 2) {
        self.enabled = enabled
        self.stalenessNanos = UInt64(max(0, stalenessSeconds) * 1e9)
    }

    public static let off = LoadPolicy(enabled: false)
}
