import Dispatch
import EPPMetrics
import ExtProc
import InferenceRouting
import Kubernetes
import Foundation
import GRPCServer
import Logging
import ModelServerMetrics
import NIOCore
import NIOHTTP1
import NIOPosix
import OpenSSLTLS
import Tracing

/// The running process: listeners, health, and the signal-driven drain.
final class EPPApp: Sendable {
    let servers: [GRPCServer]
    let metricsServer: MetricsServer?
    let health: HealthStatusStore
    let logger: Logger
    let drainTimeout: Double
    let group: MultiThreadedEventLoopGroup
    let source: any RoutingSource
    let scraper: (scraper: ModelServerScraper, group: MultiThreadedEventLoopGroup)?
    let exporter: OTLPExporter?

    private init(servers: [GRPCServer], metricsServer: MetricsServer?, health: HealthStatusStore, logger: Logger,
                 drainTimeout: Double, group: MultiThreadedEventLoopGroup, source: any RoutingSource,
                 scraper: (scraper: ModelServerScraper, group: MultiThreadedEventLoopGroup)?, exporter: OTLPExporter?) {
        self.exporter = exporter
        self.source = source
        self.scraper = scraper
        self.servers = servers
        self.metricsServer = metricsServer
        self.health = health
        self.logger = logger
        self.drainTimeout = drainTimeout
        self.group = group
    }

    static let extProcServiceName = "envoy.service.ext_proc.v3.ExternalProcessor"

    static func start(_ options: EPPCommand, logger: Logger) async throws -> EPPApp {
        let threads = options.eventLoopThreads > 0 ? options.eventLoopThreads : min(System.coreCount, allowedCPUCount() ?? .max)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, threads))
        let health = HealthStatusStore(Dictionary(uniqueKeysWithValues: (["liveness"] + readinessServices).map { ($0, .serving) }))
        let tls = try makeTLS(options, logger: logger)
        let pickerConfig = try loadPickerConfig(options, logger: logger)
        noteCompatibilityFlags(options, logger: logger)

        let source = try makeSource(options, group: group, health: health, logger: logger)
        var extProc = ExtProcConfiguration()
        extProc.affinity = .init(flag: options.splitAffinityHeader)
        extProc.restoreModelAlias = options.restoreModelAlias
        extProc.maxRequestBodyBytes = options.maxRequestBodyBytes
        extProc.heldBodyBudget = try makeHeldBodyBudget(options, logger: logger)
        extProc.destinationEndpoints = options.destinationEndpoints ?? pickerConfig?.maxEndpoints ?? 1
        guard (1...ExtProcConfiguration.maxDestinationEndpoints).contains(extProc.destinationEndpoints) else {
            throw ValidationFailure("--destination-endpoints must be 1 to \(ExtProcConfiguration.maxDestinationEndpoints)")
        }
        if extProc.destinationEndpoints > 1 {
            logger.info("each request names a list of endpoints (the first, then fallbacks): the gateway's load balancer must read it (e.g. Envoy's override_host policy; ORIGINAL_DST reads one address)",
                        metadata: ["destination-endpoints": "\(extProc.destinationEndpoints)"])
        }
        let exporter = options.tracing ? try TracingSetup(options).makeExporter(loop: group.next(), logger: logger) : nil
        extProc.tracer = exporter?.tracer
        let scraper = try makeScraper(options, state: source.state, logger: logger)
        extProc.loadPolicy = LoadPolicy(enabled: scraper != nil, stalenessSeconds: options.metricsStalenessThreshold)
        pickerConfig?.apply(to: &extProc.loadPolicy)
        if !options.loraAffinityScoring { extProc.loadPolicy.loraWeight = 0 }
        extProc.admissionQueue = try makeAdmissionQueue(options, scraping: scraper != nil)
        if scraper != nil { try configurePrefixCache(options, pickerConfig, &extProc) }
        if let index = extProc.prefixCache {
            // Pods that leave the pool free their bit in the index for the ones that come.
            source.state.onEndpointsChange { index.retain($0) }
        }
        // No metrics listener → nothing recorded on the request path either.
        let metrics = options.metricsPort > 0
            ? InferenceMetrics(poolName: options.poolName, state: source.state, loadPolicy: extProc.loadPolicy,
                               admissionQueue: extProc.admissionQueue, heldBodyBudget: extProc.heldBodyBudget) : nil
        var mainServices: [any GRPCService] = [
            HealthService(store: health),
            ExtProcService(configuration: extProc, state: source.state, logger: logger, observer: metrics),
        ]
        if options.enableTestEchoService { mainServices.append(EchoService()) }

        var main = GRPCServer.Configuration(host: options.bindAddress, port: options.grpcPort, services: mainServices)
        main.maxMessageBytes = options.maxMessageBytes
        main.tls = tls
        var healthOnly = GRPCServer.Configuration(host: options.bindAddress, port: options.grpcHealthPort, services: [HealthService(store: health)])
        healthOnly.tls = tls

        // Metrics first: once the ext_proc port accepts, every listener is up (probes and tests rely on it).
        var metricsServer: MetricsServer?
        if let metrics {
            metricsServer = try await MetricsServer.start(host: options.bindAddress, port: options.metricsPort, group: group,
                                                          logger: logger, authorize: metricsAuthorizer(options, source, logger),
                                                          exposition: metrics.exposition)
        }
        var servers: [GRPCServer] = []
        for (name, config) in [("ext_proc", main), ("health", healthOnly)] {
            let server = try await GRPCServer.start(configuration: config, group: group, logger: logger)
            servers.append(server)
            logger.info("listening", metadata: [
                "listener": "\(name)", "address": "\(server.localAddress.map { "\($0)" } ?? "?")",
                "tls": "\(tls != nil)",
            ])
        }
        source.start()
        scraper?.scraper.start()
        exporter?.start()
        return EPPApp(servers: servers, metricsServer: metricsServer, health: health, logger: logger,
                      drainTimeout: options.drainTimeout, group: group, source: source, scraper: scraper,
                      exporter: exporter)
    }

    private static func makeHeldBodyBudget(_ options: EPPCommand, logger: Logger) throws -> HeldBodyBudget? {
        let limit = options.maxHeldRequestBodyBytes ?? HeldBodyBudget.defaultLimit()
        guard limit >= 0 else { throw ValidationFailure("--max-held-request-body-bytes must be 0 (no limit) or positive") }
        guard limit > 0 else { return nil }
        if limit < options.maxRequestBodyBytes {
            logger.info("held request bodies are capped below one request's maximum: a request whose model comes after that many bytes gets 503",
                        metadata: ["max-held-request-body-bytes": "\(limit)", "max-request-body-bytes": "\(options.maxRequestBodyBytes)"])
        }
        return HeldBodyBudget(limit: limit)
    }

    /// Prefix-cache affinity (weighed with the load, so only when scraping is on; not at all when
    /// an EndpointPickerConfig leaves the prefix scorer out).
    private static func configurePrefixCache(_ options: EPPCommand, _ pickerConfig: EndpointPickerConfig?,
                                             _ extProc: inout ExtProcConfiguration) throws {
        guard options.prefixCacheScoring, extProc.loadPolicy.prefixWeight > 0 else { return }
        guard options.prefixCacheBlockBytes >= 8, options.prefixCacheBlockBytes % 8 == 0 else {
            throw ValidationFailure("--prefix-cache-block-bytes must be a positive multiple of 8")
        }
        guard (1...4096).contains(options.prefixCacheMaxBlocks) else {
            throw ValidationFailure("--prefix-cache-max-blocks must be 1-4096")
        }
        guard options.prefixCacheCapacity > 0 else { throw ValidationFailure("--prefix-cache-capacity must be positive") }
        extProc.prefixCache = PrefixCacheIndex(capacity: options.prefixCacheCapacity)
        extProc.prefixBlockBytes = pickerConfig?.prefixBlockBytes ?? options.prefixCacheBlockBytes
        extProc.prefixMaxBlocks = pickerConfig?.prefixMaxBlocks ?? options.prefixCacheMaxBlocks
    }

    /// Health service names that follow readiness: the standard ones, the ext_proc service, and
    /// `inference-extension`, which the reference's Helm chart probes.
    static let readinessServices = ["", "readiness", "inference-extension", extProcServiceName]

    /// The reference's EndpointPickerConfig (`--config-file` / `--config-text`), if given.
    private static func loadPickerConfig(_ options: EPPCommand, logger: Logger) throws -> EndpointPickerConfig? {
        let text: String
        let origin: String
        if let path = options.configFile, !path.isEmpty {
            guard options.configText == nil else { throw ValidationFailure("give --config-file or --config-text, not both") }
            do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
                throw ValidationFailure("--config-file \(path): cannot read it (\(error))")
            }
            origin = path
        } else if let t = options.configText, !t.isEmpty {
            text = t
            origin = "--config-text"
        } else {
            return nil
        }
        let config: EndpointPickerConfig
        do { config = try EndpointPickerConfig.parse(text) } catch { throw ValidationFailure("\(origin): \(error)") }
        for note in config.notes { logger.warning("endpoint picker config", metadata: ["source": "\(origin)", "note": "\(note)"]) }
        logger.info("endpoint picker config", metadata: [
            "source": "\(origin)", "queue-weight": "\(config.queueWeight)", "kv-cache-weight": "\(config.kvCacheWeight)",
            "prefix-weight": "\(config.prefixWeight)", "lora-weight": "\(config.loraWeight)",
        ])
        return config
    }

    /// `--metrics-endpoint-auth` (default on in Kubernetes mode, as the reference): scrapers must send
    /// a bearer token the API server accepts and that may `get` the non-resource path `/metrics`.
    private static func metricsAuthorizer(_ options: EPPCommand, _ source: any RoutingSource,
                                          _ logger: Logger) -> (@Sendable (HTTPHeaders) async -> MetricsAccess)? {
        guard let k8s = source as? KubernetesSource else {
            if options.metricsEndpointAuth == true {
                logger.warning("--metrics-endpoint-auth needs the Kubernetes API (Kubernetes mode); /metrics is served without it")
            }
            return nil
        }
        guard options.metricsEndpointAuth ?? true else { return nil }
        logger.info("metrics endpoint auth on: scrapers need a bearer token allowed to get /metrics")
        let reviewer = AccessReviewer(client: k8s.client)
        return { headers in
            var token: String?
            if let value = headers.first(name: "authorization"), value.lowercased().hasPrefix("bearer ") {
                token = String(value.dropFirst(7)).trimmingCharacters(in: .whitespaces)
            }
            switch await reviewer.review(token: token, path: "/metrics") {
            case .allowed: return .allow
            case .unauthenticated(let why): return .deny(status: 401, message: "Unauthorized: \(why)")
            case .forbidden(let user, _):
                return .deny(status: 403, message: "Forbidden: user \"\(user)\" may not get /metrics")
            case .unavailable(let why):
                logger.warning("metrics access review failed", metadata: ["reason": "\(why)"])
                return .deny(status: 500, message: "cannot review the token: \(why)")
            }
        }
    }

    /// Reference flags accepted for its manifests' sake: say which ones change nothing here.
    private static func noteCompatibilityFlags(_ options: EPPCommand, logger: Logger) {
        if options.haEnableLeaderElection && (options.endpoints != nil || options.configDir != nil) {
            logger.warning("--ha-enable-leader-election applies in Kubernetes mode only; ignored")
        }
        if let e = options.zapEncoder, e != "json" { logger.info("--zap-encoder \(e): logs are JSON lines") }
    }

    /// The admission queue for sheddable requests (only meaningful with load scraping, which
    /// detects saturation); nil when `--sheddable-queue-timeout` is 0.
    private static func makeAdmissionQueue(_ options: EPPCommand, scraping: Bool) throws -> AdmissionQueue? {
        guard options.sheddableQueueTimeout.isFinite, options.sheddableQueueTimeout >= 0 else {
            throw ValidationFailure("--sheddable-queue-timeout must be 0 (refuse at once) or a positive number of seconds")
        }
        guard options.sheddableQueueCapacity > 0 else {
            throw ValidationFailure("--sheddable-queue-capacity must be positive")
        }
        guard scraping, options.sheddableQueueTimeout > 0 else { return nil }
        return AdmissionQueue(timeout: .nanoseconds(Int64(options.sheddableQueueTimeout * 1e9)),
                              capacity: options.sheddableQueueCapacity,
                              recheckInterval: .nanoseconds(Int64(options.refreshMetricsInterval * 1e9)))
    }

    /// The model-server scraper on a thread of its own, so parsing expositions never delays a request.
    private static func makeScraper(_ options: EPPCommand, state: RoutingState,
                                    logger: Logger) throws -> (scraper: ModelServerScraper, group: MultiThreadedEventLoopGroup)? {
        guard options.scrapeModelServerMetrics else { return nil }
        guard options.refreshMetricsInterval > 0, options.refreshMetricsInterval.isFinite else {
            throw ValidationFailure("--refresh-metrics-interval must be a positive number of seconds")
        }
        guard options.metricsStalenessThreshold > 0, options.metricsStalenessThreshold.isFinite else {
            throw ValidationFailure("--metrics-staleness-threshold must be a positive number of seconds")
        }
        guard (0...65535).contains(options.modelServerMetricsPort) else {
            throw ValidationFailure("--model-server-metrics-port must be 0 (the endpoint's port) or 1-65535")
        }
        guard options.modelServerMetricsPath.hasPrefix("/") else {
            throw ValidationFailure("--model-server-metrics-path must start with '/'")
        }
        var config = ModelServerScraper.Configuration()
        config.names = try metricNames(options)
        switch options.modelServerMetricsScheme.lowercased() {
        case "http": break
        case "https":
            do {
                config.tls = try TLSContext.client(trustRootsPEM: nil, trustRootsFile: nil, clientCertificatePEM: nil, clientKeyPEM: nil,
                                                   insecureSkipVerify: options.modelServerMetricsHttpsInsecureSkipVerify, alpn: [])
            } catch {
                throw ValidationFailure("--model-server-metrics-scheme https: TLS client setup failed: \(error)")
            }
        default:
            throw ValidationFailure("--model-server-metrics-scheme must be http or https")
        }
        config.path = options.modelServerMetricsPath
        config.port = options.modelServerMetricsPort
        config.interval = .nanoseconds(Int64(options.refreshMetricsInterval * 1e9))
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let scraper = ModelServerScraper(configuration: config, eventLoop: group.next(),
                                         endpoints: { state.snapshot.endpoints }, logger: logger)
        return (scraper, group)
    }

    /// The load metrics to read, from the reference's metric flags.
    static func metricNames(_ options: EPPCommand) throws -> MetricNames {
        func spec(_ flag: String, _ text: String) throws -> MetricSpec {
            do { return try MetricSpec(parsing: text) } catch { throw ValidationFailure("--\(flag): \(error)") }
        }
        var names = MetricNames.vllm
        names.queued = try spec("total-queued-requests-metric", options.totalQueuedRequestsMetric)
        names.running = try spec("total-running-requests-metric", options.totalRunningRequestsMetric)
        names.kvCache = try spec("kv-cache-usage-percentage-metric", options.kvCacheUsagePercentageMetric)
        if names.kvCache != MetricNames.vllm.kvCache { names.kvCacheFallback = nil }
        names.lora = options.loraInfoMetric.isEmpty ? nil : try spec("lora-info-metric", options.loraInfoMetric)
        return names
    }

    private static func makeSource(_ options: EPPCommand, group: any EventLoopGroup, health: HealthStatusStore,
                                   logger: Logger) throws -> any RoutingSource {
        if options.endpoints == nil && options.configDir == nil {
            if !options.poolName.isEmpty {
                return try KubernetesSource(options: options, group: group, health: health, logger: logger)
            }
            logger.warning("no --pool-name (Kubernetes mode) and no --endpoints / --config-dir (standalone mode): every request will get 503")
        }
        var endpoints: [Endpoint] = []
        if let list = options.endpoints, !list.isEmpty {
            do {
                endpoints = try EndpointSet.parse(list: list)
            } catch {
                throw ValidationFailure("--endpoints: \(error)")
            }
        }
        return StandaloneSource(configDir: options.configDir, endpoints: endpoints,
                                poolName: options.poolName.isEmpty ? nil : options.poolName,
                                poolGroup: options.poolGroup, logger: logger)
    }

    /// Serves until SIGTERM or SIGINT, then drains: GOAWAY, in-flight streams finish (up to the
    /// drain timeout), exit.
    func runUntilSignalled() async {
        await waitForTerminationSignal()
        logger.info("shutting down", metadata: ["drain-timeout": "\(drainTimeout)"])
        for service in health.all.keys where service != "liveness" { health.set(service, .notServing) }
        for s in servers { s.initiateGracefulShutdown() }
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(max(0, drainTimeout) * 1e9)
        while servers.contains(where: { $0.connectionCount > 0 }) && DispatchTime.now().uptimeNanoseconds < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        let left = servers.reduce(0) { $0 + $1.connectionCount }
        if left > 0 { logger.warning("drain timeout reached; closing remaining connections", metadata: ["connections": "\(left)"]) }
        await source.stop()
        if let scraper {
            await scraper.scraper.shutdown()
            try? await scraper.group.shutdownGracefully()
        }
        for s in servers { await s.close() }
        // The streams have ended, so their spans are queued: send them before the loops stop.
        await exporter?.shutdown()
        await metricsServer?.close()
        try? await group.shutdownGracefully()
        logger.info("stopped")
    }

    private func waitForTerminationSignal() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let queue = DispatchQueue(label: "epp.signals")
            let once = SignalOnce(continuation)
            for sig in [SIGTERM, SIGINT] {
                signal(sig, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: sig, queue: queue)
                source.setEventHandler { once.fire() }
                source.resume()
                SignalOnce.keep(source)
            }
        }
    }
}

/// CPUs this process may run on (`taskset`, container cpusets), from /proc/self/status: more event
/// loops than that only adds context switches.
func allowedCPUCount() -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed_list:") }) else { return nil }
    var count = 0
    for part in line.dropFirst("Cpus_allowed_list:".count).split(separator: ",") {
        let bounds = part.split(separator: "-").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        if bounds.count == 2 { count += bounds[1] - bounds[0] + 1 } else if bounds.count == 1 { count += 1 }
    }
    return count > 0 ? count : nil
}

struct ValidationFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Resumes the waiting task on the first signal only.
private final class SignalOnce: @unchecked Sendable {
    private var continuation: CheckedContinuation<Void, Never>?
    private static let sourcesLock = NSLock()
    nonisolated(unsafe) private static var sources: [any DispatchSourceSignal] = []

    init(_ continuation: CheckedContinuation<Void, Never>) { self.continuation = continuation }

    /// Only called on the signal queue (serial), so no lock is needed for `continuation`.
    func fire() {
        continuation?.resume()
        continuation = nil
    }

    static func keep(_ source: any DispatchSourceSignal) {
        sourcesLock.lock()
        sources.append(source)
        sourcesLock.unlock()
    }
}
