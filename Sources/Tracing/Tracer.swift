import Atomics
import NIOConcurrencyHelpers

/// A finished span, as the request path hands it over: plain values, exported later off the
/// request path.
public struct SpanRecord: Sendable {
    public enum Kind: Sendable { case server, `internal` }

    public enum Value: Sendable, Equatable {
        case string(String)
        case int(Int)
        case bool(Bool)
    }

    public var name: String
    public var kind: Kind
    public var context: TraceContext
    /// 0: a root span.
    public var parentSpanID: UInt64
    public var startUnixNanos: UInt64
    public var endUnixNanos: UInt64
    public var attributes: [(String, Value)]
    /// Set for a span that ended in an error (OTLP status ERROR with this message).
    public var errorMessage: String?

    public init(name: String, kind: Kind, context: TraceContext, parentSpanID: UInt64, startUnixNanos: UInt64,
                endUnixNanos: UInt64, attributes: [(String, Value)] = [], errorMessage: String? = nil) {
        self.name = name
        self.kind = kind
        self.context = context
        self.parentSpanID = parentSpanID
        self.startUnixNanos = startUnixNanos
        self.endUnixNanos = endUnixNanos
        self.attributes = attributes
        self.errorMessage = errorMessage
    }
}

/// Decides which requests are traced and collects their spans for the exporter.
///
/// Sampling is parent-based, as in the reference (`parentbased_traceidratio`): a request whose
/// `traceparent` is sampled is traced, one whose parent is not is not, and a request without a
/// parent is traced when its (new, random) trace id falls under `sampleRatio`. Untraced requests
/// cost one branch; traced ones append their spans to a bounded queue (one short lock per
/// request), which the exporter drains; spans past `maxQueuedSpans` are dropped and counted.
public final class Tracer: Sendable {
    public let sampleRatio: Double
    public let maxQueuedSpans: Int
    private let queue = NIOLockedValueBox<[SpanRecord]>([])
    private let droppedSpans = ManagedAtomic<Int>(0)
    /// Trace ids whose low 63 bits are below this are sampled (the OpenTelemetry rule, so every
    /// service sampling by ratio keeps the same traces).
    private let bound: UInt64

    public init(sampleRatio: Double, maxQueuedSpans: Int = 16_384) {
        let ratio = min(max(sampleRatio, 0), 1)
        self.sampleRatio = ratio
        self.maxQueuedSpans = maxQueuedSpans
        bound = ratio >= 1 ? .max : UInt64(ratio * Double(UInt64(1) << 63))
    }

    /// The context of a new server span for a request with `parent` (its `traceparent`, if any),
    /// or nil when the request is not traced.
    public func startSpan(parent: TraceContext?, using rng: inout some RandomNumberGenerator) -> TraceContext? {
        let traceID: TraceID
        if let parent {
            guard parent.sampled else { return nil }
            traceID = parent.traceID
        } else {
            var id = TraceID(high: rng.next(), low: rng.next())
            if !id.isValid { id.low = 1 }
            guard (id.low >> 1) < bound || sampleRatio >= 1 else { return nil }
            traceID = id
        }
        return TraceContext(traceID: traceID, spanID: newSpanID(using: &rng), sampled: true)
    }

    public func newSpanID(using rng: inout some RandomNumberGenerator) -> UInt64 {
        let id: UInt64 = rng.next()
        return id == 0 ? 1 : id
    }

    /// Queues finished spans for export.
    public func record(_ spans: [SpanRecord]) {
        let accepted = queue.withLockedValue { q -> Bool in
            guard q.count + spans.count <= maxQueuedSpans else { return false }
            q.append(contentsOf: spans)
            return true
        }
        if !accepted { droppedSpans.wrappingIncrement(by: spans.count, ordering: .relaxed) }
    }

    /// Takes up to `limit` queued spans (oldest first).
    func drain(limit: Int) -> [SpanRecord] {
        queue.withLockedValue { q in
            if q.count <= limit {
                // Hand the buffer over whole (keeping its capacity would copy it: it is shared now).
                let all = q
                q = []
                return all
            }
            let batch = Array(q.prefix(limit))
            q.removeFirst(limit)
            return batch
        }
    }

    var queuedCount: Int { queue.withLockedValue { $0.count } }

    /// Spans dropped because the queue was full (the collector slow or unreachable).
    public var dropped: Int { droppedSpans.load(ordering: .relaxed) }
}
