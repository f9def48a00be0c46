import InferenceRouting
import Logging
import NIOCore
import OpenSSLTLS
import NIOHTTP1
import NIOPosix

/// Scrapes every endpoint's vLLM `/metrics` on a fixed interval and publishes each result into
/// the endpoint's record, where the picker reads it without waiting.
///
/// All state lives on one event loop (give it one of its own, so parsing never delays the request
/// path). One keep-alive HTTP/1.1 connection per endpoint and at most one scrape outstanding per
/// endpoint; a scrape that has not answered within the timeout closes its connection and counts
/// as a failure. Failures leave the last sample to age out (the policy's staleness threshold) and
/// back the endpoint's scrapes off (the interval doubling, up to a second), logged once per change.
public final class ModelServerScraper: Sendable {
    public struct Configuration: Sendable {
        public var path = "/metrics"
        /// Which series carry the load (vLLM's names by default).
        public var names = MetricNames.vllm
        /// 0: the endpoint's own port (vLLM serves metrics beside the API).
        public var port = 0
        public var interval: TimeAmount = .milliseconds(50)
        public var timeout: TimeAmount = .seconds(1)
        /// Larger responses are dropped (a vLLM exposition is ~10–200 KB).
        public var maxBodyBytes = 8 << 20
        /// Scrape over HTTPS with this client context (nil: plain HTTP).
        public var tls: TLSContext?

        public init() {}
    }

    private let loop: any EventLoop
    private let configuration: Configuration
    private let endpoints: @Sendable () -> EndpointSet
    private let logger: Logger
    private let scraping: NIOLoopBoundBox<Scraping?>

    /// - Parameter endpoints: the endpoints to follow, read once per interval.
    public init(configuration: Configuration, eventLoop: any EventLoop,
                endpoints: @escaping @Sendable () -> EndpointSet, logger: Logger) {
        loop = eventLoop
        self.configuration = configuration
        self.endpoints = endpoints
        self.logger = logger
        scraping = .makeEmptyBox(valueType: Scraping.self, eventLoop: eventLoop)
    }

    public func start() {
        let (box, configuration, endpoints, logger, loop) = (scraping, configuration, endpoints, logger, loop)
        loop.execute {
            guard box.value == nil else { return }
            let s = Scraping(configuration: configuration, loop: loop, endpoints: endpoints, logger: logger)
            box.value = s
            s.start()
        }
    }

    /// Stops scraping and closes every connection.
    public func shutdown() async {
        let box = scraping
        try? await loop.submit {
            box.value?.stop()
            box.value = nil
        }.get()
    }
}

/// The scraper's loop-confined state.
private final class Scraping {
    let configuration: ModelServerScraper.Configuration
    let loop: any EventLoop
    let endpoints: @Sendable () -> EndpointSet
    let logger: Logger
    var targets: [String: ScrapeTarget] = [:]
    var task: RepeatedTask?

    init(configuration: ModelServerScraper.Configuration, loop: any EventLoop,
         endpoints: @escaping @Sendable () -> EndpointSet, logger: Logger) {
        self.configuration = configuration
        self.loop = loop
        self.endpoints = endpoints
        self.logger = logger
    }

    func start() {
        guard task == nil else { return }
        let bound = NIOLoopBound(self, eventLoop: loop)
        task = loop.scheduleRepeatedTask(initialDelay: .zero, delay: configuration.interval) { _ in bound.value.tick() }
    }

    func stop() {
        task?.cancel()
        task = nil
        for t in targets.values { t.close() }
        targets = [:]
    }

    /// Follows the endpoint set, then starts a scrape on every endpoint without one outstanding.
    func tick() {
        let set = endpoints()
        let now = NIODeadline.now()
        if targets.count != set.count || targets.keys.contains(where: { set.record(for: $0) == nil }) {
            for (address, t) in targets where set.record(for: address) == nil {
                t.close()
                targets[address] = nil
            }
        }
        for record in set.records {
            let address = record.endpoint.address
            let target: ScrapeTarget
            if let t = targets[address] {
                target = t
                target.record = record
            } else {
                target = ScrapeTarget(record: record, configuration: configuration, loop: loop, logger: logger)
                targets[address] = target
            }
            target.poll(now: now)
        }
    }
}

/// One endpoint: its connection and the scrape in progress.
private final class ScrapeTarget {
    var record: EndpointRecord
    let configuration: ModelServerScraper.Configuration
    let loop: any EventLoop
    let logger: Logger
    private var channel: (any Channel)?
    /// When the outstanding scrape (connect or request) began; nil when idle.
    private var pendingSince: NIODeadline?
    /// Bumped whenever a scrape is abandoned, so late callbacks of the old one are ignored.
    private var generation = 0
    private var failing: Bool?
    /// After failures, scrapes back off (doubling from the interval up to a second) so that an
    /// endpoint without metrics is not hammered; the first success resets it.
    private var consecutiveFailures = 0
    private var retryAt: NIODeadline?
    private var closed = false

    init(record: EndpointRecord, configuration: ModelServerScraper.Configuration, loop: any EventLoop, logger: Logger) {
        self.record = record
        self.configuration = configuration
        self.loop = loop
        self.logger = logger
    }

    var scrapeURL: String {
        let e = record.endpoint
        let port = configuration.port > 0 ? configuration.port : e.port
        let scheme = configuration.tls == nil ? "http" : "https"
        return "\(scheme)://\(e.host.contains(":") ? "[\(e.host)]" : e.host):\(port)\(configuration.path)"
    }

    func poll(now: NIODeadline) {
        if let since = pendingSince {
            guard now - since >= configuration.timeout else { return }
            failed("no answer within \(configuration.timeout.nanoseconds / 1_000_000) ms")
            dropChannel()
        }
        if let retryAt, now < retryAt { return }
        pendingSince = now
        if let channel, channel.isActive {
            send(on: channel)
        } else {
            connect()
        }
    }

    func close() {
        closed = true
        dropChannel()
    }

    private func dropChannel() {
        generation += 1
        pendingSince = nil
        channel?.close(promise: nil)
        channel = nil
    }

    private func connect() {
        let e = record.endpoint
        let port = configuration.port > 0 ? configuration.port : e.port
        let generation = self.generation
        let bound = NIOLoopBound(self, eventLoop: loop)
        let maxBody = configuration.maxBodyBytes
        let tls = configuration.tls
        ClientBootstrap(group: loop)
            .connectTimeout(configuration.timeout)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(
                            OpenSSLHandler(context: tls, role: .client(serverHostname: e.host), handshakeTimeout: nil))
                    }
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(ScrapeResponseHandler(maxBodyBytes: maxBody) { result in
                        bound.value.finished(result, generation: generation)
                    })
                }
            }
            .connect(host: e.host, port: port)
            .whenComplete { result in
                let target = bound.value
                guard target.generation == generation, !target.closed else {
                    if case .success(let ch) = result { ch.close(promise: nil) }
                    return
                }
                switch result {
                case .success(let ch):
                    target.channel = ch
                    target.send(on: ch)
                case .failure(let error):
                    target.pendingSince = nil
                    // Refused or unreachable: the server cannot take requests either, so its last
                    // sample must not keep attracting them until it goes stale.
                    target.record.forgetLoad()
                    target.failed("cannot connect: \(error)")
                }
            }
    }

    private func send(on channel: any Channel) {
        var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: configuration.path)
        head.headers.add(name: "host", value: "\(record.endpoint.address)")
        head.headers.add(name: "accept", value: "text/plain;version=0.0.4")
        head.headers.add(name: "user-agent", value: "swift-epp")
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
    }

    /// The response (or the connection's end) of the scrape of `generation`.
    fileprivate func finished(_ result: ScrapeResponseHandler.Result, generation: Int) {
        guard generation == self.generation, !closed else { return }
        switch result {
        case .response(let status, let body, let keepAlive):
            pendingSince = nil
            if !keepAlive { dropChannel() }
            guard status == 200 else { return failed("HTTP \(status)") }
            guard let m = LoadMetrics.parse(body.readableBytesView, names: configuration.names) else {
                return failed("no \(configuration.names.queued) or \(configuration.names.kvCache) in the response")
            }
            record.record(waiting: m.waiting, running: m.running, kvCacheUsage: m.kvCacheUsage, lora: m.lora,
                          servedModels: m.servedModels)
            consecutiveFailures = 0
            retryAt = nil
            if failing != false {
                if failing == true { logger.info("model server metrics back", metadata: ["url": "\(scrapeURL)"]) }
                failing = false
            }
        case .failure(let why):
            dropChannel()
            failed(why)
        case .closed:
            // Idle keep-alive connection closed by the server: reconnect on the next scrape.
            if pendingSince != nil { dropChannel(); failed("connection closed before the response") } else { dropChannel() }
        }
    }

    private func failed(_ why: String) {
        consecutiveFailures += 1
        let cap = max(configuration.interval, .seconds(1))
        let delay = configuration.interval * Int64(1 << min(consecutiveFailures, 20))
        retryAt = .now() + min(delay, cap)
        if failing != true {
            logger.warning("model server metrics unavailable", metadata: ["url": "\(scrapeURL)", "reason": "\(why)"])
            failing = true
        } else if logger.logLevel <= .debug {
            logger.debug("model server scrape failed", metadata: ["url": "\(scrapeURL)", "reason": "\(why)"])
        }
    }
}

/// Collects one HTTP response at a time and reports it.
private final class ScrapeResponseHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart

    enum Result {
        case response(status: Int, body: ByteBuffer, keepAlive: Bool)
        case failure(String)
        case closed
    }

    private let maxBodyBytes: Int
    private let report: (Result) -> Void
    private var head: HTTPResponseHead?
    private var body: ByteBuffer?
    private var tooLarge = false

    init(maxBodyBytes: Int, report: @escaping (Result) -> Void) {
        self.maxBodyBytes = maxBodyBytes
        self.report = report
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h):
            guard h.status.code >= 200 else { return }  // 1xx
            head = h
            body = nil
            tooLarge = false
        case .body(var chunk):
            guard head != nil, !tooLarge else { return }
            if (body?.readableBytes ?? 0) + chunk.readableBytes > maxBodyBytes {
                tooLarge = true
                body = nil
            } else if body == nil {
                body = chunk
            } else {
                body!.writeBuffer(&chunk)
            }
        case .end:
            guard let h = head else { return }
            head = nil
            if tooLarge {
                report(.failure("response larger than \(maxBodyBytes) bytes"))
            } else {
                report(.response(status: Int(h.status.code), body: body ?? ByteBuffer(), keepAlive: h.isKeepAlive))
            }
            body = nil
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        report(.failure("\(error)"))
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        report(.closed)
        context.fireChannelInactive()
    }
}
