import Foundation
import Logging
import NIOCore
import Tracing

/// `--tracing` and the OpenTelemetry environment variables an OTel SDK reads, resolved into a
/// tracer and its exporter. Flags win over the environment.
struct TracingSetup {
    var endpoint: String
    var headers: [(String, String)]
    var resource: [(String, String)]
    var sampleRatio: Double
    var interval: Double
    /// Things worth a log line (unsupported protocol or sampler asked for).
    var notes: [String] = []

    init(_ options: EPPCommand, environment env: [String: String] = ProcessInfo.processInfo.environment) throws {
        if let flag = options.tracingEndpoint {
            endpoint = flag
        } else if let traces = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"], !traces.isEmpty {
            endpoint = traces
        } else if let base = env["OTEL_EXPORTER_OTLP_ENDPOINT"], !base.isEmpty {
            endpoint = (base.hasSuffix("/") ? String(base.dropLast()) : base) + "/v1/traces"
        } else {
            endpoint = "http://localhost:4318/v1/traces"
        }
        let proto = env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] ?? env["OTEL_EXPORTER_OTLP_PROTOCOL"]
        if let proto, proto != "http/protobuf" {
            notes.append("OTLP protocol \(proto) is not supported; spans go out as OTLP/HTTP protobuf")
        }
        headers = Self.pairs(env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] ?? env["OTEL_EXPORTER_OTLP_HEADERS"] ?? "")
        var resource = Self.pairs(env["OTEL_RESOURCE_ATTRIBUTES"] ?? "").filter { $0.0 != "service.name" }
        let service = env["OTEL_SERVICE_NAME"]
            ?? Self.pairs(env["OTEL_RESOURCE_ATTRIBUTES"] ?? "").first(where: { $0.0 == "service.name" })?.1
            ?? "swift-epp"
        resource.insert(("service.name", service), at: 0)
        self.resource = resource

        if let ratio = options.tracingSampleRatio {
            sampleRatio = ratio
        } else {
            let argument = env["OTEL_TRACES_SAMPLER_ARG"].flatMap(Double.init)
            switch env["OTEL_TRACES_SAMPLER"] ?? "parentbased_traceidratio" {
            case "parentbased_traceidratio": sampleRatio = argument ?? 0.1
            case "traceidratio":
                sampleRatio = argument ?? 1
                notes.append("sampler traceidratio is applied parent-based (a sampled traceparent is always traced)")
            case "parentbased_always_on", "always_on": sampleRatio = 1
            case "parentbased_always_off", "always_off": sampleRatio = 0
            case let other:
                sampleRatio = argument ?? 0.1
                notes.append("sampler \(other) is not supported; using parentbased_traceidratio")
            }
        }
        guard (0...1).contains(sampleRatio) else { throw ValidationFailure("--tracing-sample-ratio must be between 0 and 1") }
        if let flag = options.tracingExportInterval {
            interval = flag
        } else if let ms = env["OTEL_BSP_SCHEDULE_DELAY"].flatMap(Double.init) {
            interval = ms / 1000
        } else {
            interval = 1
        }
        guard interval > 0 else { throw ValidationFailure("--tracing-export-interval must be positive") }
    }

    /// `key=value,key=value` with percent-encoded values (the OTel environment format).
    static func pairs(_ text: String) -> [(String, String)] {
        text.split(separator: ",").compactMap { item in
            guard let eq = item.firstIndex(of: "=") else { return nil }
            let key = item[..<eq].trimmingCharacters(in: .whitespaces)
            let raw = item[item.index(after: eq)...].trimmingCharacters(in: .whitespaces)
            guard !key.isEmpty else { return nil }
            return (key, raw.removingPercentEncoding ?? raw)
        }
    }

    func makeExporter(loop: any EventLoop, logger: Logger) throws -> OTLPExporter {
        let tracer = Tracer(sampleRatio: sampleRatio)
        var config = OTLPExporter.Configuration(endpoint: endpoint)
        config.headers = headers
        config.resource = resource
        config.interval = .nanoseconds(Int64(interval * 1e9))
        for note in notes { logger.warning("tracing: \(note)") }
        logger.info("tracing on", metadata: [
            "endpoint": "\(endpoint)", "sample-ratio": "\(sampleRatio)", "service": "\(resource[0].1)",
            "export-interval-seconds": "\(interval)",
        ])
        return try OTLPExporter(tracer: tracer, configuration: config, loop: loop, logger: logger)
    }
}
