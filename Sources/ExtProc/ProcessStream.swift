import Foundation
import GRPCServer
import InferenceRouting
import Logging
import NIOCore
import Protos
import StreamingJSON
import SwiftProtobuf
import Tracing

/// One ext_proc `Process` stream = one HTTP request through the gateway.
///
/// A synchronous state machine on the connection's event loop: every ProcessingRequest is handled
/// to completion when it arrives, replies go out in wire order, nothing blocks. Request side:
/// headers are held (FULL_DUPLEX_STREAMED) until the top-level `model` has streamed past, then the
/// routing reply goes out and the body follows chunk by chunk with only the model value changed.
/// Response side: chunks are echoed at once, with the client's model name restored.
final class ProcessStream: GRPCStreamHandler {
    private let configuration: ExtProcConfiguration
    private let state: RoutingState
    private let logger: Logger
    private let observer: (any ExtProcObserver)?
    /// The logger's level checked once: reading it goes through the handler existential.
    private let debugLogging: Bool
    private var rng = FastRandom()

    private var snapshot: RoutingSnapshot?
    private var requestMode: BodySendMode = .none
    private var responseMode: BodySendMode = .none
    private var sawRequestHeaders = false
    /// After an ImmediateResponse the gateway is done with this stream; ignore the rest.
    private var done = false

    // Request side
    private var info = RequestInfo()
    private var scanner: RequestBodyScanner
    private var bodyBytes = 0
    private var headersReplied = false
    private var routed = false
    /// Body chunks received before routing, not yet sent back; `heldOffset` is the absolute offset
    /// of the first.
    private var held: [ByteBuffer] = []
    private var heldOffset = 0
    /// Bytes of `held` reserved in the process-wide budget.
    private var heldReserved = 0
    private var requestBodyEnded = false
    private var generatedRequestID: String?
    /// Waiting in the admission queue for the pool to have room (sheddable, pool saturated):
    /// since when, and the next re-check.
    private var queuedSince: NIODeadline?
    private var admissionTicket = -1
    private var admissionPriority = 0
    private var admissionCheck: Scheduled<Void>?
    /// Request trailers that came while waiting: answered after the routing and the held body.
    private var requestTrailersPending = false

    // Routing outcome
    private var clientModel: String?
    private var targetModel: String?
    private var rewriteName: String?
    private var endpoint: EndpointRecord?
    /// The prompt's prefix hashes recorded for `endpoint`, kept in case the gateway serves the
    /// request elsewhere.
    private var routedPrefix: PrefixHashes?
    /// The gateway reported another endpoint than the picked one as serving the request.
    private var servedElsewhere = false
    /// Bytes replacing the model value (with quotes), when the model changes.
    private var modelReplacement: [UInt8]?
    /// JSON literals of the target and the requested model when the rules had them encoded already.
    private var quotedTarget: [UInt8]?
    private var quotedClientModel: [UInt8]?

    // Response side
    private var rewriter: ResponseModelRewriter?
    private var segments: [OutputSegment] = []
    private var responseBytes = 0

    // Observation (only when an observer is set)
    private var startTime: NIODeadline?
    private var pickDuration: TimeAmount = .zero
    private var reported = false
    private var observerToken: AnyObject?

    // Tracing (only for sampled requests: `span` is nil otherwise)
    private var span: TraceContext?
    private var parentSpanID: UInt64 = 0
    private var spanStartUnix: UInt64 = 0
    private var spanStartMono: UInt64 = 0
    private var schedulerStart: UInt64 = 0
    private var schedulerEnd: UInt64 = 0
    private var childSpans: [SpanRecord] = []
    private var responseStreaming = false
    /// Where the request went (for the span; the endpoint record itself is released early).
    private var routedAddress: String?
    /// Where the gateway says it sent the request, when not to the picked endpoint.
    private var servedAddress: String?

    init(configuration: ExtProcConfiguration, state: RoutingState, logger: Logger,
         observer: (any ExtProcObserver)? = nil) {
        self.configuration = configuration
        self.state = state
        self.logger = logger
        self.observer = observer
        debugLogging = logger.logLevel <= .debug
        var scan = RequestBodyScanner.Configuration()
        if case .bodyField(let field) = configuration.affinity { scan.affinityField = field }
        scanner = RequestBodyScanner(configuration: scan)
    }

    // MARK: GRPCStreamHandler

    func received(_ message: ByteBuffer, on stream: GRPCServerStream) {
        guard !done else { return }
        do {
            let request = try ExtProcRequest(decoding: message)
            switch request.phase {
            case .requestHeaders?:
                onRequestHeaders(try HeadersView(request.payload), request, stream)
            case .requestBody?:
                onRequestBody(try BodyView(request.payload), stream)
            case .requestTrailers?:
                onRequestTrailers(stream)
            case .responseHeaders?:
                onResponseHeaders(try HeadersView(request.payload), request.metadataContext, stream)
            case .responseBody?:
                onResponseBody(try BodyView(request.payload), stream)
            case .responseTrailers?:
                onResponseTrailers(stream)
            case nil:
                protocolViolation("ProcessingRequest without a request phase", stream)
            }
        } catch {
            done = true
            release()
            report(.protocolError)
            stream.finish(GRPCStatus(.invalidArgument, "invalid ProcessingRequest: \(error)"))
        }
    }

    func receivedEnd(on stream: GRPCServerStream) {
        release()
        // A half-close after routing is a normal end for gateways that skip the response phases.
        report(routed ? .completed : .abandoned)
        stream.finish(.ok)
    }

    func cancelled(_ stream: GRPCServerStream) {
        release()
        report(.abandoned)
    }

    /// Tells the observer how the request ended (once per stream that had request headers).
    private func report(_ result: RequestOutcome.Result) {
        if span != nil { finishTrace(result) }
        guard let observer, sawRequestHeaders, !reported else { return }
        reported = true
        let duration = startTime.map { NIODeadline.now() - $0 } ?? .zero
        let usage = rewriter.flatMap { $0.usage == TokenUsage() ? nil : $0.usage }
        // A body refused before routing may still have named its model.
        let model = clientModel ?? (routed ? nil : scanner.modelValue)
        observer.requestEnded(RequestOutcome(result: result, model: model, targetModel: targetModel,
                                             rewriteName: rewriteName, requestBodyBytes: bodyBytes,
                                             responseBodyBytes: responseBytes, usage: usage, duration: duration,
                                             pickDuration: pickDuration, servedElsewhere: servedElsewhere),
                              wasRouted: routed, routed: observerToken)
        observerToken = nil
    }

    /// Ends in-flight accounting for the chosen endpoint (once), and leaves the admission queue.
    private func release() {
        endpoint?.end()
        endpoint = nil
        // What is still held is never sent once the stream ends or is refused.
        held.removeAll()
        releaseHeldReservation()
        if queuedSince != nil { leaveAdmissionQueue(done ? .evictedOther : .evictedContextCancelled) }
    }

    // MARK: Request headers

    private func onRequestHeaders(_ headers: HeadersView, _ request: ExtProcRequest, _ stream: GRPCServerStream) {
        guard !sawRequestHeaders else { return protocolViolation("second request_headers", stream) }
        sawRequestHeaders = true
        if observer != nil { startTime = .now() }
        if let requestBodyMode = request.requestBodyMode, let responseBodyMode = request.responseBodyMode {
            requestMode = BodySendMode(rawValue: requestBodyMode) ?? .none
            responseMode = BodySendMode(rawValue: responseBodyMode) ?? .none
        } else {
            // Gateways that predate protocol_config expect a prompt headers reply.
            requestMode = .streamed
            responseMode = .streamed
        }
        var affinityHeader: String?
        if case .header(let name) = configuration.affinity { affinityHeader = name }
        var metadata: Envoy_Config_Core_V3_Metadata?
        if let raw = request.metadataContext, raw.readableBytes > 0 {
            // Rare (subset hints; a gateway forwarding envoy.lb sends it empty here): the generic
            // decoder is fine.
            metadata = try? Envoy_Config_Core_V3_Metadata(serializedBytes: Array(raw.readableBytesView))
        }
        do {
            info = try RequestInfo(headers, metadata: metadata, affinityHeader: affinityHeader,
                                   tracing: configuration.tracer != nil)
        } catch {
            return protocolViolation("malformed request headers: \(error)", stream)
        }
        if let tracer = configuration.tracer, let context = tracer.startSpan(parent: info.traceparent, using: &rng) {
            span = context
            parentSpanID = info.traceparent?.spanID ?? 0
            spanStartUnix = WallClock.unixNanoseconds
            spanStartMono = MonotonicClock.nanoseconds
        }
        snapshot = state.snapshot
        if info.requestID == nil { generatedRequestID = rng.uuidString() }

        if headers.endOfStream {
            // No body (GET and friends): route now.
            requestBodyEnded = true
            routeAndReplyHeaders(stream)
            return
        }
        switch requestMode {
        case .fullDuplexStreamed:
            break  // hold the reply until the model is known
        case .buffered, .bufferedPartial:
            // The body comes whole, after this reply; routing goes into the body reply.
            headersReplied = true
            stream.send(Replies.requestHeaders(Replies.common(nil), metadata: nil))
        default:
            // STREAMED or NONE: Envoy forwards headers after this reply, so route on headers.
            routeAndReplyHeaders(stream)
        }
    }

    // MARK: Request body

    private func onRequestBody(_ body: BodyView, _ stream: GRPCServerStream) {
        guard sawRequestHeaders, !requestBodyEnded else { return protocolViolation("unexpected request_body", stream) }
        let chunk = body.body
        bodyBytes += chunk.readableBytes
        if bodyBytes > configuration.maxRequestBodyBytes {
            return fail(.tooLarge(limit: configuration.maxRequestBodyBytes), stream)
        }
        var progress = chunk.withUnsafeReadableBytes { scanner.feed($0) }
        if body.endOfStream {
            requestBodyEnded = true
            progress = scanner.finish()
        }
        if case .invalid(let error) = progress, info.api.requiresModel {
            return fail(.badRequest("invalid JSON body: \(error)", details: "epp_invalid_json"), stream)
        }
        switch requestMode {
        case .fullDuplexStreamed:
            duplexBody(chunk, endOfStream: body.endOfStream, stream)
        case .buffered, .bufferedPartial:
            bufferedBody(chunk, endOfStream: body.endOfStream, stream)
        default:
            streamedBody(chunk, endOfStream: body.endOfStream, stream)
        }
    }

    private func duplexBody(_ chunk: ByteBuffer, endOfStream: Bool, _ stream: GRPCServerStream) {
        if routed {
            if endOfStream, let error = finalValidation() { return fail(error, stream) }
            sendRequestBody(chunk, endOfStream: endOfStream, stream)
            return
        }
        guard hold(chunk, stream) else { return }
        if endOfStream || scanner.progress == .complete {
            // A finished document without a usable model is refused before anything is routed.
            if let error = finalValidation() { return fail(error, stream) }
        } else if !readyToRoute() || awaitingPrefix() {
            return
        }
        if queuedSince != nil { return }  // waiting for admission: the chunk is held
        routeAndFlushHeld(stream)
    }

    /// FULL_DUPLEX: routes, then sends what was held (unless routing answered or queued instead).
    private func routeAndFlushHeld(_ stream: GRPCServerStream) {
        routeAndReplyHeaders(stream)
        guard routed, !done else { return }
        // Trailers that came while waiting ended the body themselves: its last piece is no end.
        if !held.isEmpty { flushHeld(endOfStream: requestBodyEnded && !requestTrailersPending, stream) }
    }

    /// STREAMED: routed on headers already; each chunk gets one reply replacing it. Bytes before the
    /// end of the model value are held (replaced by nothing) until the rewrite is known.
    private func streamedBody(_ chunk: ByteBuffer, endOfStream: Bool, _ stream: GRPCServerStream) {
        if endOfStream, let error = finalValidation() { return fail(error, stream) }
        if rewriteDecided {
            stream.send(Replies.bodyReplace(nil, request: true))
            return
        }
        guard hold(chunk, stream) else { return }
        if !endOfStream && !readyToRoute() {
            stream.send(Replies.bodyReplace(Data(), request: true))
            return
        }
        decideModel()
        rewriteDecided = true
        stream.send(Replies.bodyReplace(Data(takeHeld().readableBytesView), request: true))
    }

    /// STREAMED: the model rewrite is known and the rest of the body passes unchanged.
    private var rewriteDecided = false

    /// BUFFERED: the whole body in one message; route and rewrite in the body reply.
    private func bufferedBody(_ chunk: ByteBuffer, endOfStream: Bool, _ stream: GRPCServerStream) {
        guard hold(chunk, stream) else { return }
        if endOfStream, let error = finalValidation() { return fail(error, stream) }
        if queuedSince != nil { return }  // waiting for admission: the chunk is held
        routeBuffered(stream)
    }

    /// BUFFERED: routes and answers the body message (unless routing answered or queued instead).
    private func routeBuffered(_ stream: GRPCServerStream) {
        guard let decision = route(stream) else { return }
        stream.send(Replies.bodyReplace(Data(takeHeld().readableBytesView), headers: decision.mutation, clearRouteCache: true,
                                        metadata: decision.metadata, request: true))
    }

    /// Whether enough of the body is known to route (FULL_DUPLEX) or to rewrite (STREAMED).
    private func readyToRoute() -> Bool {
        switch scanner.progress {
        case .invalid:
            return true  // only reachable for pass-through APIs
        case .complete:
            return true
        case .modelAvailable:
            if case .bodyField = configuration.affinity, scanner.affinityValue == nil { return false }
            return true
        case .incomplete:
            return false
        }
    }

    /// With prefix-cache affinity in play, routing waits until the prompt's hashed blocks (at most
    /// `prefixBlockBytes × prefixMaxBlocks`, 4 KiB by default) have arrived, so that every request
    /// of a conversation is matched on the same blocks however the gateway chunked its body; a few
    /// KiB more at most, then the body streams as before.
    private func awaitingPrefix() -> Bool {
        guard configuration.prefixCache != nil, configuration.loadPolicy.enabled,
              let snapshot, info.api.requiresModel else { return false }
        let limit = configuration.prefixBlockBytes * configuration.prefixMaxBlocks
        if let start = scanner.contentValueStart, scanner.bytesScanned - start >= limit { return false }
        // Past this much body with no prompt-like field yet, stop waiting for one.
        if scanner.contentValueStart == nil && scanner.bytesScanned >= 4 * limit { return false }
        return snapshot.endpoints.hasFreshLoad(subset: info.subset, policy: configuration.loadPolicy,
                                               now: MonotonicClock.nanoseconds)
    }

    /// Checks made once the whole body has been scanned.
    private func finalValidation() -> PickerError? {
        guard info.api.requiresModel else { return nil }
        if case .invalid(let error) = scanner.progress {
            return .badRequest("invalid JSON body: \(error)", details: "epp_invalid_json")
        }
        guard let type = scanner.modelType else {
            return .badRequest("missing required field: model", details: "epp_missing_model")
        }
        if scanner.modelValue == nil {
            return .badRequest("field model must be a string, got \(type.rawValue)", details: "epp_invalid_model")
        }
        if let required = info.api.requiredField, !scanner.hasKey(required) {
            return .badRequest("missing required field: \(required)", details: "epp_missing_field")
        }
        return nil
    }

    private func onRequestTrailers(_ stream: GRPCServerStream) {
        guard sawRequestHeaders else { return protocolViolation("unexpected request_trailers", stream) }
        if !requestBodyEnded && requestMode == .fullDuplexStreamed {
            // Trailers end the body: finish it (end_of_stream false, the trailers follow).
            requestBodyEnded = true
            if case .invalid(let error) = scanner.finish(), info.api.requiresModel, bodyBytes > 0 {
                return fail(.badRequest("invalid JSON body: \(error)", details: "epp_invalid_json"), stream)
            }
            if bodyBytes > 0, let error = finalValidation() { return fail(error, stream) }
            if !routed && queuedSince == nil {
                routeAndReplyHeaders(stream)
                guard !done else { return }
                if routed && !held.isEmpty { flushHeld(endOfStream: false, stream) }
            }
        } else if !headersReplied && queuedSince == nil {
            routeAndReplyHeaders(stream)
            guard !done else { return }
        }
        if queuedSince != nil {
            // Waiting for admission: the reply follows the routing and the held body.
            requestTrailersPending = true
            return
        }
        stream.send(Replies.trailers(request: true))
    }

    // MARK: Routing

    private struct RouteDecision {
        var changes: ReplyEncoding.HeaderChanges
        var address: String

        var mutation: HeaderMutation { Replies.mutation(changes) }
        var metadata: Google_Protobuf_Struct { Replies.destinationMetadata(address) }
    }

    /// Works out the target model (when the body was scanned) and the rewritten bytes.
    private func decideModel() {
        guard let snapshot else { return }
        let model = scanner.modelValue
        clientModel = model
        var target = info.modelRewriteHeader ?? model
        if let model {
            var key: AffinityKey?
            switch configuration.affinity {
            case .header: key = info.affinityHeaderValue.map(AffinityKey.init)
            case .bodyField: key = scanner.affinityValue.map(AffinityKey.init)
            case .none: key = nil
            }
            if let decision = snapshot.rules.decide(model: model, affinity: key, using: &rng) {
                target = decision.targetModel
                rewriteName = decision.rewriteName
                quotedTarget = decision.quotedTargetModel
                quotedClientModel = decision.quotedModel
            }
        }
        targetModel = target
        if let model, let target, target != model, scanner.modelRange != nil {
            modelReplacement = quotedTarget ?? JSONStringEncoding.quoted(target)
        }
    }

    /// Picks the endpoint and builds the routing mutation; answers 503 itself when there is none.
    private func route(_ stream: GRPCServerStream) -> RouteDecision? {
        guard span != nil else { return pick(stream) }
        let start = MonotonicClock.nanoseconds
        schedulerStart = 0
        var decision = pick(stream)
        traceRouting(start: start, end: MonotonicClock.nanoseconds, &decision)
        return decision
    }

    private func pick(_ stream: GRPCServerStream) -> RouteDecision? {
        guard let snapshot else { return nil }
        let pickStart: NIODeadline? = observer != nil ? .now() : nil
        decideModel()
        let policy = configuration.loadPolicy
        let picked: EndpointRecord?
        var prefix: PrefixHashes?
        var match: PrefixMatch?
        let now = policy.enabled ? MonotonicClock.nanoseconds : 0
        if policy.enabled {
            // Sheddable (priority < 0) requests wait for a pool with room, as in the reference.
            if info.objective != nil, snapshot.objectives.priority(for: info.objective) < 0,
               snapshot.endpoints.isSaturated(subset: info.subset, policy: policy, now: now) {
                if !enterAdmissionQueue(stream) { fail(.saturated(objective: info.objective ?? ""), stream) }
                return nil
            }
            if span != nil { schedulerStart = MonotonicClock.nanoseconds }
            // Prefix affinity is weighed against load: without fresh load samples it is not
            // used, and not recorded either (the index learns while it can matter).
            if let index = configuration.prefixCache,
               snapshot.endpoints.hasFreshLoad(subset: info.subset, policy: policy, now: now),
               let hashes = prefixHashes() {
                prefix = hashes
                match = PrefixMatch(hashes, index: index)
            }
            picked = snapshot.endpoints.pick(subset: info.subset, policy: policy, now: now, prefix: match,
                                             model: targetModel, using: &rng)
        } else {
            if span != nil { schedulerStart = MonotonicClock.nanoseconds }
            picked = snapshot.endpoints.pick(subset: info.subset, using: &rng)
        }
        if span != nil { schedulerEnd = MonotonicClock.nanoseconds }
        if let pickStart { pickDuration = .now() - pickStart }
        guard let record = picked else {
            let why = info.subset != nil ? "no endpoint matches the gateway's subset hint" : "no ready endpoints in the pool"
            fail(.noEndpoints(why), stream)
            return nil
        }
        record.begin()
        endpoint = record
        if let prefix, let index = configuration.prefixCache {
            index.record(prefix, sentTo: record)
            routedPrefix = prefix
        }
        routed = true
        observerToken = observer?.requestRouted(model: clientModel, targetModel: targetModel, rewriteName: rewriteName)
        var address = record.endpoint.address
        if configuration.destinationEndpoints > 1 {
            // The protocol's fallback list: the header and the metadata name the same endpoints.
            for r in snapshot.endpoints.fallbacks(after: record, count: configuration.destinationEndpoints - 1,
                                                  subset: info.subset, policy: policy, now: now, prefix: match,
                                                  model: targetModel, using: &rng) {
                address += "," + r.endpoint.address
            }
        }
        var changes = ReplyEncoding.HeaderChanges()
        changes.setHeaders.append((WireNames.destinationHeader, address))
        if let id = generatedRequestID {
            changes.setHeaders.append((WireNames.requestIDHeader, id))
        }
        if let length = info.contentLength, let replacement = modelReplacement, let range = scanner.modelRange {
            // Other gateways forward content-length: keep it true to the rewritten body.
            let newLength = length - range.count + replacement.count
            changes.setHeaders.append(("content-length", String(newLength)))
        }
        if debugLogging {
            logger.debug("routed", metadata: [
                "request-id": "\(info.requestID ?? generatedRequestID ?? "")", "model": "\(clientModel ?? "")",
                "target-model": "\(targetModel ?? "")", "rewrite": "\(rewriteName ?? "")", "endpoint": "\(address)",
            ])
        }
        return RouteDecision(changes: changes, address: address)
    }

    /// Hashes of the prompt's leading blocks (the first top-level prompt / messages / input value,
    /// raw JSON bytes) among the body held so far, seeded with the target model; nil when not even
    /// one whole block has arrived.
    private func prefixHashes() -> PrefixHashes? {
        guard let start = scanner.contentValueStart, start >= heldOffset else { return nil }
        let limit = configuration.prefixBlockBytes * configuration.prefixMaxBlocks
        var bytes: [UInt8] = []
        var offset = heldOffset
        for chunk in held {
            let n = chunk.readableBytes
            defer { offset += n }
            guard offset + n > start else { continue }
            let from = max(0, start - offset)
            let take = min(n - from, limit - bytes.count)
            if take <= 0 { break }
            if bytes.isEmpty { bytes.reserveCapacity(min(limit, n - from)) }
            bytes.append(contentsOf: chunk.readableBytesView.dropFirst(from).prefix(take))
            if bytes.count >= limit { break }
        }
        guard bytes.count >= configuration.prefixBlockBytes else { return nil }
        return PrefixHashes(bytes, model: targetModel ?? clientModel ?? "",
                            blockSize: configuration.prefixBlockBytes, maxBlocks: configuration.prefixMaxBlocks)
    }

    private func routeAndReplyHeaders(_ stream: GRPCServerStream) {
        guard let decision = route(stream) else { return }
        headersReplied = true
        stream.sendFramed(ReplyEncoding.headersReply(request: true, changes: decision.changes, clearRouteCache: true,
                                                     destination: decision.address))
    }

    // MARK: Sending the request body back

    /// Sends every held chunk, with the model value spliced, as ≤ 62,000-byte pieces.
    private func flushHeld(endOfStream: Bool, _ stream: GRPCServerStream) {
        let (length, splice) = heldPlan()
        if length <= WireNames.maxBodyChunk && (splice != nil || held.count > 1) {
            // One reply: the pieces go out as parts of it, with no joined copy in between.
            var parts = StreamParts(stream: stream)
            ReplyEncoding.streamedBody(count: length, endOfStream: endOfStream, request: true,
                                       into: &parts) { out in
                writeHeld(splice, into: &out)
            }
            dropHeld()
            return
        }
        sendRequestBody(takeHeld(), endOfStream: endOfStream, stream)
    }

    /// Length of the held body once the model value is replaced, and the replacement when the
    /// value lies in the held bytes.
    private func heldPlan() -> (length: Int, splice: (range: Range<Int>, bytes: [UInt8])?) {
        let total = held.reduce(0) { $0 + $1.readableBytes }
        guard let replacement = modelReplacement, let range = scanner.modelRange,
              range.lowerBound >= heldOffset, range.upperBound <= heldOffset + total else {
            return (total, nil)
        }
        return (total - range.count + replacement.count, (range, replacement))
    }

    /// Keeps `chunk` until routing, within the process-wide budget; false when the budget is
    /// spent (the request has been refused).
    private func hold(_ chunk: ByteBuffer, _ stream: GRPCServerStream) -> Bool {
        if let budget = configuration.heldBodyBudget {
            let n = chunk.readableBytes
            let sheddable = (snapshot?.objectives.priority(for: info.objective) ?? 0) < 0
            guard budget.reserve(n, sheddable: sheddable) else {
                fail(.heldBodiesOverBudget(limit: budget.limit), stream)
                return false
            }
            heldReserved += n
        }
        held.append(chunk)
        return true
    }

    private func dropHeld() {
        for c in held { heldOffset += c.readableBytes }
        held.removeAll(keepingCapacity: true)
        releaseHeldReservation()
    }

    private func releaseHeldReservation() {
        guard heldReserved > 0 else { return }
        configuration.heldBodyBudget?.release(heldReserved)
        heldReserved = 0
    }

    /// The held chunks as one body with the model value replaced.
    private func takeHeld() -> ByteBuffer {
        defer { dropHeld() }
        let (length, splice) = heldPlan()
        if splice == nil && held.count == 1 { return held[0] }
        var out = ProtobufAllocator.allocator.buffer(capacity: length)
        writeHeld(splice, into: &out)
        return out
    }

    /// Appends the held chunks to `out`: bytes before the model value, the replacement once, bytes after it.
    private func writeHeld(_ splice: (range: Range<Int>, bytes: [UInt8])?, into out: inout some BodySink) {
        guard let (range, replacement) = splice else {
            for c in held { out.write(c) }
            return
        }
        var offset = heldOffset
        var inserted = false
        for chunk in held {
            let start = offset, end = offset + chunk.readableBytes
            offset = end
            // Bytes before the model value, the replacement once, bytes after it.
            let beforeEnd = min(end, range.lowerBound)
            if beforeEnd > start, let piece = chunk.getSlice(at: chunk.readerIndex, length: beforeEnd - start) {
                out.write(piece)
            }
            if !inserted && end >= range.lowerBound {
                out.write(bytes: replacement)
                inserted = true
            }
            let afterStart = max(start, range.upperBound)
            if end > afterStart, let piece = chunk.getSlice(at: chunk.readerIndex + (afterStart - start), length: end - afterStart) {
                out.write(piece)
            }
        }
    }

    private func sendRequestBody(_ body: ByteBuffer, endOfStream: Bool, _ stream: GRPCServerStream) {
        sendStreamed(body, endOfStream: endOfStream, request: true, stream)
    }

    /// FULL_DUPLEX_STREAMED body replies, split into pieces gateways accept.
    private func sendStreamed(_ body: ByteBuffer, endOfStream: Bool, request: Bool, _ stream: GRPCServerStream) {
        var body = body
        repeat {
            let piece = body.readSlice(length: min(body.readableBytes, WireNames.maxBodyChunk))!
            var parts = StreamParts(stream: stream)
            ReplyEncoding.streamedBody(count: piece.readableBytes, endOfStream: endOfStream && body.readableBytes == 0,
                                       request: request, into: &parts) { $0.write(piece) }
        } while body.readableBytes > 0
    }

    // MARK: Response

    private func onResponseHeaders(_ headers: HeadersView, _ metadata: ByteBuffer?, _ stream: GRPCServerStream) {
        if let metadata { noteServedEndpoint(metadata) }
        var mode = ResponseModelRewriter.Mode.passthrough
        do {
            try headers.forEach { key, value in
                if key.equals("content-type") { mode = Self.responseMode(contentType: value) }
            }
        } catch {
            return protocolViolation("malformed response headers: \(error)", stream)
        }
        responseStreaming = mode == .sse
        var replacement: [UInt8]?
        if configuration.restoreModelAlias, let client = clientModel, let target = targetModel, client != target {
            replacement = quotedClientModel ?? JSONStringEncoding.quoted(client)
        }
        rewriter = ResponseModelRewriter(mode: mode, quotedReplacement: replacement)
        var changes = ReplyEncoding.HeaderChanges()
        if let target = targetModel {
            changes.setHeaders.append((WireNames.targetModelHeader, target))
        }
        if replacement != nil && responseMode != .none {
            // The body may change length.
            changes.removeHeaders.append("content-length")
        }
        stream.sendFramed(ReplyEncoding.headersReply(request: false, changes: changes, clearRouteCache: false, destination: nil))
        if headers.endOfStream { finishResponse(stream) }
    }

    private func onResponseBody(_ body: BodyView, _ stream: GRPCServerStream) {
        if rewriter == nil { rewriter = ResponseModelRewriter(mode: .passthrough, replacement: nil) }
        segments.removeAll(keepingCapacity: true)
        // Text before the model value, the restored name, the rest: one allocation, not three as it grows.
        segments.reserveCapacity(4)
        let chunk = body.body
        responseBytes += chunk.readableBytes
        chunk.withUnsafeReadableBytes { rewriter!.process($0, into: &segments) }
        if body.endOfStream { rewriter!.finish(into: &segments) }
        switch responseMode {
        case .fullDuplexStreamed:
            let length = assembledLength(chunk)
            if length == 0 && !body.endOfStream { break }
            if length <= WireNames.maxBodyChunk && !isChunkItself(chunk) {
                // One reply: the rewritten pieces go out as parts of it.
                var parts = StreamParts(stream: stream)
                ReplyEncoding.streamedBody(count: length, endOfStream: body.endOfStream, request: false,
                                           into: &parts) { out in
                    writeSegments(of: chunk, into: &out)
                }
            } else {
                sendStreamed(assemble(chunk), endOfStream: body.endOfStream, request: false, stream)
            }
        default:
            let unchanged = segments.count == 1 && segments[0] == .input(0..<chunk.readableBytes)
            stream.send(Replies.bodyReplace(unchanged ? nil : Data(assemble(chunk).readableBytesView), request: false))
        }
        if body.endOfStream { finishResponse(stream) }
    }

    /// The gateway reports the endpoint it sent the request to (`envoy.lb` →
    /// `x-gateway-destination-endpoint-served`). When that is not the picked one (it failed and the
    /// gateway fell back), the request's in-flight count and its prompt prefix move to the endpoint
    /// that serves it, so the next picks see where the load and the cache really are.
    private func noteServedEndpoint(_ metadata: ByteBuffer) {
        guard let picked = endpoint,
              let served = try? metadataString(metadata, namespace: WireNames.servedEndpointNamespace,
                                               key: WireNames.servedEndpointKey),
              !served.isEmpty, served != picked.endpoint.address else { return }
        servedElsewhere = true
        picked.end()
        endpoint = snapshot?.endpoints.record(for: served) ?? state.snapshot.endpoints.record(for: served)
        if let now = endpoint {
            now.begin()
            if let routedPrefix, let index = configuration.prefixCache { index.record(routedPrefix, sentTo: now) }
        }
        if span != nil { servedAddress = served }
        if debugLogging {
            logger.debug("served by another endpoint", metadata: [
                "request-id": "\(info.requestID ?? generatedRequestID ?? "")", "picked": "\(picked.endpoint.address)",
                "served": "\(served)",
            ])
        }
    }

    /// Body framing from a `content-type` value, compared as bytes (this runs for every response).
    static func responseMode(contentType: UnsafeRawBufferPointer) -> ResponseModelRewriter.Mode {
        if containsASCIICaseInsensitive(contentType, "text/event-stream") { return .sse }
        if containsASCIICaseInsensitive(contentType, "json") { return .json }
        return .passthrough
    }

    /// Whether the rewriter's output is exactly the chunk (nothing changed, nothing held).
    private func isChunkItself(_ chunk: ByteBuffer) -> Bool {
        if segments.count == 1, case .input(let r) = segments[0], r == 0..<chunk.readableBytes { return true }
        return false
    }

    /// Bytes of the rewriter's output for `chunk`.
    private func assembledLength(_ chunk: ByteBuffer) -> Int {
        var n = 0
        for s in segments {
            switch s {
            case .input(let r): n += r.count
            case .bytes(let b): n += b.count
            }
        }
        return n
    }

    /// Joins rewriter output: the chunk itself when nothing changed (no copy).
    private func assemble(_ chunk: ByteBuffer) -> ByteBuffer {
        if isChunkItself(chunk) { return chunk }
        var out = ProtobufAllocator.allocator.buffer(capacity: chunk.readableBytes + 64)
        writeSegments(of: chunk, into: &out)
        return out
    }

    private func writeSegments(of chunk: ByteBuffer, into out: inout some BodySink) {
        for s in segments {
            switch s {
            case .input(let r):
                if let piece = chunk.getSlice(at: chunk.readerIndex + r.lowerBound, length: r.count) { out.write(piece) }
            case .bytes(let b):
                out.write(bytes: b)
            }
        }
    }

    private func onResponseTrailers(_ stream: GRPCServerStream) {
        if var rewriter {
            segments.removeAll(keepingCapacity: true)
            rewriter.finish(into: &segments)
            self.rewriter = rewriter
            // Held bytes at this point can only be a truncated document; they were partly sent
            // already in pass-through, so nothing more can be added after the body ended.
        }
        stream.send(Replies.trailers(request: false))
        finishResponse(stream)
    }

    /// The exchange is over: end the gRPC stream ourselves. Envoy resets Process streams it still
    /// considers open when the HTTP request ends, and a server counts every incoming RST_STREAM
    /// against its rapid-reset budget; a stream we already finished needs no reset.
    private func finishResponse(_ stream: GRPCServerStream) {
        if debugLogging, let usage = rewriter?.usage {
            logger.debug("response complete", metadata: [
                "request-id": "\(info.requestID ?? generatedRequestID ?? "")",
                "prompt-tokens": "\(usage.promptTokens ?? -1)", "completion-tokens": "\(usage.completionTokens ?? -1)",
                "cached-tokens": "\(usage.cachedTokens ?? -1)",
            ])
        }
        release()
        done = true
        report(.completed)
        stream.finish(.ok)
    }

    // MARK: Tracing

    /// Records the routing spans (`gateway.director.handle_request` and, when a pick ran,
    /// `gateway.scheduler.schedule`) and names this request's span as the backend's parent.
    private func traceRouting(start: UInt64, end: UInt64, _ decision: inout RouteDecision?) {
        guard let span, let tracer = configuration.tracer else { return }
        let candidates = info.subset?.count ?? snapshot?.endpoints.count ?? 0
        let target = endpoint.map { $0.endpoint.podName ?? $0.endpoint.address }
        let directorID = tracer.newSpanID(using: &rng)
        var director: [(String, SpanRecord.Value)] = [
            ("gateway.admission.candidate_pods", .int(candidates)),
            ("gateway.admission.priority", .int(snapshot?.objectives.priority(for: info.objective) ?? 0)),
            ("gateway.admission.result", .string(routed ? "admitted" : done ? "rejected" : "queued")),
        ]
        if let target { director.append(("gateway.target_pod.name", .string(target))) }
        childSpans.append(SpanRecord(name: "gateway.director.handle_request", kind: .internal,
                                     context: TraceContext(traceID: span.traceID, spanID: directorID, sampled: true),
                                     parentSpanID: span.spanID, startUnixNanos: unixTime(start),
                                     endUnixNanos: unixTime(end), attributes: director))
        if schedulerStart != 0 {
            var scheduler: [(String, SpanRecord.Value)] = [
                ("gateway.scheduler.candidate_pods", .int(candidates)),
                ("gateway.request.id", .string(info.requestID ?? generatedRequestID ?? "")),
                ("gateway.scheduler.result", .string(endpoint != nil ? "scheduled" : "failed")),
            ]
            if let target { scheduler.append(("gateway.target_pod.name", .string(target))) }
            childSpans.append(SpanRecord(name: "gateway.scheduler.schedule", kind: .internal,
                                         context: TraceContext(traceID: span.traceID, spanID: tracer.newSpanID(using: &rng), sampled: true),
                                         parentSpanID: directorID, startUnixNanos: unixTime(schedulerStart),
                                         endUnixNanos: unixTime(max(schedulerEnd, schedulerStart)), attributes: scheduler))
        }
        if let address = decision?.address { routedAddress = address }
        decision?.changes.setHeaders.append((WireNames.traceparentHeader, span.traceparent))
    }

    /// Ends this request's `gateway.request` span and hands it, with its children, to the exporter.
    private func finishTrace(_ result: RequestOutcome.Result) {
        guard let span, let tracer = configuration.tracer else { return }
        self.span = nil
        var attributes: [(String, SpanRecord.Value)] = []
        if let model = clientModel ?? scanner.modelValue { attributes.append(("gen_ai.request.model", .string(model))) }
        if let target = targetModel { attributes.append(("gateway.target_model", .string(target))) }
        if let rewriteName { attributes.append(("gateway.model_rewrite", .string(rewriteName))) }
        attributes.append(("gateway.request.size_bytes", .int(bodyBytes)))
        attributes.append(("gateway.request.id", .string(info.requestID ?? generatedRequestID ?? "")))
        if let routedAddress { attributes.append(("gateway.destination_endpoint", .string(routedAddress))) }
        if let servedAddress { attributes.append(("gateway.destination_endpoint.served", .string(servedAddress))) }
        if rewriter != nil { attributes.append(("gateway.response.streaming", .bool(responseStreaming))) }
        if let usage = rewriter?.usage {
            if let n = usage.promptTokens { attributes.append(("gen_ai.usage.prompt_tokens", .int(n))) }
            if let n = usage.completionTokens { attributes.append(("gen_ai.usage.completion_tokens", .int(n))) }
        }
        var error: String?
        switch result {
        case .completed:
            attributes.append(("gateway.request.outcome", .string("completed")))
        case .refused(let status, let reason):
            attributes.append(("gateway.request.outcome", .string("refused")))
            attributes.append(("http.response.status_code", .int(status)))
            error = reason
        case .abandoned:
            attributes.append(("gateway.request.outcome", .string("abandoned")))
        case .protocolError:
            attributes.append(("gateway.request.outcome", .string("protocol_error")))
            error = "ext_proc protocol error"
        }
        childSpans.append(SpanRecord(name: "gateway.request", kind: .server, context: span, parentSpanID: parentSpanID,
                                     startUnixNanos: spanStartUnix, endUnixNanos: unixTime(MonotonicClock.nanoseconds),
                                     attributes: attributes, errorMessage: error))
        tracer.record(childSpans)
        childSpans = []
    }

    /// Wall-clock time of a monotonic reading, anchored at the span's start.
    private func unixTime(_ monotonic: UInt64) -> UInt64 {
        spanStartUnix &+ (monotonic &- spanStartMono)
    }

    // MARK: Errors

    /// Answers the HTTP request with an error from the gateway and stops processing.
    // MARK: Admission queue

    /// Starts waiting for the pool to have room; false when this request cannot wait (no queue,
    /// queue full, or a body mode in which the gateway is timing the reply).
    private func enterAdmissionQueue(_ stream: GRPCServerStream) -> Bool {
        guard let queue = configuration.admissionQueue, queuedSince == nil,
              requestMode == .fullDuplexStreamed || requestMode == .buffered || requestMode == .bufferedPartial,
              bodyBytes > 0 || !requestBodyEnded  // a request without a body is routed on its headers
        else { return false }
        let loop = stream.eventLoop
        let bound = NIOLoopBound((self, stream), eventLoop: loop)
        let turn: @Sendable () -> Void = {
            loop.execute {
                let (me, stream) = bound.value
                me.checkAdmission(stream, queue, handedTurn: true)
            }
        }
        let priority = snapshot?.objectives.priority(for: info.objective) ?? -1
        guard let ticket = queue.enter(priority: priority, flow: info.flow, model: clientModel, targetModel: targetModel,
                                       takeTurn: turn) else { return false }
        admissionPriority = priority
        admissionTicket = ticket
        queuedSince = .now()
        scheduleAdmissionCheck(stream, queue)
        return true
    }

    private func scheduleAdmissionCheck(_ stream: GRPCServerStream, _ queue: AdmissionQueue) {
        admissionCheck = stream.eventLoop.assumeIsolated().scheduleTask(in: queue.recheckInterval) { [self] in
            admissionCheck = nil
            checkAdmission(stream, queue, handedTurn: false)
        }
    }

    /// Timer, or another waiter handing over the turn: routes the waiting request once the pool has
    /// room and it is its turn, refuses it once it waited too long.
    private func checkAdmission(_ stream: GRPCServerStream, _ queue: AdmissionQueue, handedTurn: Bool) {
        guard let since = queuedSince, !done else { return }
        // Endpoints and rules may have changed while it waited.
        snapshot = state.snapshot
        let saturated = snapshot!.endpoints.isSaturated(subset: info.subset, policy: configuration.loadPolicy,
                                                        now: MonotonicClock.nanoseconds)
        if saturated || (!handedTurn && !queue.claimRoom(admissionTicket)) {
            // Only a subset hint can make the room differ between waiters; then others go first.
            if saturated && info.subset != nil { queue.noRoom(admissionTicket) }
            let waited = NIODeadline.now() - since
            if waited >= queue.timeout {
                leaveAdmissionQueue(.evictedTTL)
                return fail(.queueTimeout(objective: info.objective ?? "", waited: waited), stream)
            }
            if admissionCheck == nil { scheduleAdmissionCheck(stream, queue) }
            return
        }
        leaveAdmissionQueue(.dispatched)
        if requestMode == .fullDuplexStreamed {
            routeAndFlushHeld(stream)
        } else {
            routeBuffered(stream)
        }
        if requestTrailersPending && routed && !done {
            requestTrailersPending = false
            stream.send(Replies.trailers(request: true))
        }
    }

    private func leaveAdmissionQueue(_ outcome: QueueOutcome) {
        admissionCheck?.cancel()
        admissionCheck = nil
        if let since = queuedSince {
            queuedSince = nil
            configuration.admissionQueue?.leave(admissionTicket, admitted: outcome == .dispatched)
            observer?.requestLeftQueue(QueuedRequest(priority: admissionPriority, fairnessID: info.flow,
                                                     model: clientModel, targetModel: targetModel,
                                                     waited: .now() - since, outcome: outcome))
        }
    }

    private func fail(_ error: PickerError, _ stream: GRPCServerStream) {
        guard !done else { return }
        done = true
        release()
        if error.status >= 500 {
            logger.warning("request refused", metadata: ["status": "\(error.status)", "reason": "\(error.message)", "path": "\(info.path)"])
        } else if logger.logLevel <= .info {
            logger.info("request refused", metadata: ["status": "\(error.status)", "reason": "\(error.message)", "path": "\(info.path)"])
        }
        stream.send(Replies.immediate(error, requestID: info.requestID ?? generatedRequestID))
        report(.refused(status: error.status, reason: error.details))
        stream.finish(.ok)
    }

    /// The gateway broke the ext_proc protocol: end this stream only.
    private func protocolViolation(_ what: String, _ stream: GRPCServerStream) {
        done = true
        release()
        report(.protocolError)
        logger.warning("ext_proc protocol violation", metadata: ["what": "\(what)"])
        stream.finish(GRPCStatus(.failedPrecondition, "ext_proc protocol violation: \(what)"))
    }
}

/// Whether `haystack` contains the lower-case ASCII `needle`, ignoring ASCII case.
func containsASCIICaseInsensitive(_ haystack: UnsafeRawBufferPointer, _ needle: StaticString) -> Bool {
    let n = needle.utf8CodeUnitCount
    guard n > 0, haystack.count >= n else { return n == 0 }
    let p = needle.utf8Start
    for start in 0...(haystack.count - n) {
        var i = 0
        while i < n {
            var b = haystack[start + i]
            if b >= UInt8(ascii: "A") && b <= UInt8(ascii: "Z") { b |= 0x20 }
            if b != p[i] { break }
            i += 1
        }
        if i == n { return true }
    }
    return false
}
