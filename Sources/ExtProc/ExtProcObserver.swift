import NIOCore
import StreamingJSON

/// What one `Process` stream (one HTTP request through the gateway) came to, reported once when the
/// stream ends. A value built from fields the stream keeps anyway, so reporting costs one call.
public struct RequestOutcome: Sendable {
    public enum Result: Sendable, Equatable {
        /// The response went through to its end.
        case completed
        /// The picker answered itself (ImmediateResponse) with this HTTP status.
        case refused(status: Int, reason: String)
        /// The gateway reset or closed the stream before the response ended (client gone, timeout).
        case abandoned
        /// The gateway broke the ext_proc protocol or sent an undecodable message.
        case protocolError
    }

    public var result: Result
    /// The model the client asked for (`nil` when the body had none or was not JSON).
    public var model: String?
    /// The model the request was sent to (after InferenceModelRewrite).
    public var targetModel: String?
    /// The InferenceModelRewrite resource that decided the target, if one matched.
    public var rewriteName: String?
    public var requestBodyBytes: Int
    public var responseBodyBytes: Int
    /// From the response's `usage` object, when the backend sent one.
    public var usage: TokenUsage?
    /// From the request headers to the end of the stream.
    public var duration: TimeAmount
    /// Time spent choosing the target model and the endpoint (0 when the request was never routed).
    public var pickDuration: TimeAmount
    /// The gateway reported another endpoint than the picked one as serving it (a fallback).
    public var servedElsewhere: Bool

    public init(result: Result, model: String?, targetModel: String?, rewriteName: String?, requestBodyBytes: Int,
                responseBodyBytes: Int, usage: TokenUsage?, duration: TimeAmount, pickDuration: TimeAmount,
                servedElsewhere: Bool = false) {
        self.result = result
        self.model = model
        self.targetModel = targetModel
        self.rewriteName = rewriteName
        self.requestBodyBytes = requestBodyBytes
        self.responseBodyBytes = responseBodyBytes
        self.usage = usage
        self.duration = duration
        self.pickDuration = pickDuration
        self.servedElsewhere = servedElsewhere
    }
}

/// How a request's wait in the admission queue ended (the reference flow control's outcome names).
public enum QueueOutcome: String, Sendable {
    case dispatched = "Dispatched"
    /// Waited `--sheddable-queue-timeout` without room: 429.
    case evictedTTL = "EvictedTTL"
    /// The gateway cancelled the stream (client gone) while it waited.
    case evictedContextCancelled = "EvictedContextCancelled"
    /// Refused for another reason while waiting (e.g. its body proved invalid).
    case evictedOther = "EvictedOther"
}

/// A request that waited in the admission queue.
public struct QueuedRequest: Sendable {
    public var priority: Int
    /// The fairness unit: the request's fairness ID, else its InferenceObjective; "" without either.
    public var fairnessID: String
    public var model: String?
    public var targetModel: String?
    public var waited: TimeAmount
    public var outcome: QueueOutcome
}

/// Receives request outcomes (e.g. to export metrics). Called on the connection's event loop, on
/// the request path: implementations must not block and should do O(1) work. Class-bound, so a
/// stream holds it as one reference (copying a protocol existential per use showed in profiles).
public protocol ExtProcObserver: AnyObject, Sendable {
    /// A request was routed to an endpoint (it is now running until `requestEnded`). What this
    /// returns (e.g. the metric series it looked up) is handed back to `requestEnded`, so a request
    /// costs one lookup however many things are recorded.
    func requestRouted(model: String?, targetModel: String?, rewriteName: String?) -> AnyObject?
    /// The stream ended; `outcome.result` says how. Called exactly once per stream that had request
    /// headers; `routed` is what `requestRouted` returned (nil when the request was never routed).
    func requestEnded(_ outcome: RequestOutcome, wasRouted: Bool, routed: AnyObject?)
    /// A request left the admission queue (only requests that waited).
    func requestLeftQueue(_ request: QueuedRequest)
}

extension ExtProcObserver {
    public func requestLeftQueue(_ request: QueuedRequest) {}
}
