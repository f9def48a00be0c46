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

    public init(waiting: Int, running: Int, kvCacheUsage: Double, inFlightAtSample: Int, sampledAt: UInt64) {
        self.waiting = max(0, waiting)
        self.running = max(0, running)
        self.kvCacheUsage = kvCacheUsage.isFinite ? min(1, max(0, kvCacheUsage)) : 0
        self.inFlightAtSample = inFlightAtSample
        self.sampledAt = sampledAt
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
