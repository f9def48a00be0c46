import Foundation
import Logging
import NIOCore
import Tracing

/// `--tracing` and the OpenTelemetry environment variables an OTel SDK reads, resolved into a
/// tracer and its exporter. Flags win over the environment.
struct TracingSetup {
    var endpoint: String
    /// OTLP/gRPC rather than OTLP/HTTP.
    var grpc: Bool
    var headers: [(String, String)]
    var resource: [(String, String)]
    var sampleRatio: Double
    var interval: Double
    /// TLS to an https collector: its CA file, and a client certificate and key for mutual TLS.
    var trustRootsFile: String?
    var clientCertificateFile: String?
    var clientKeyFile: String?
    /// Things worth a log line (unsupported protocol or sampler asked for).
    var notes: [String] = []

    init(_ options: EPPCommand, environment env: [String: String] = ProcessInfo.processInfo.environment) throws {
        // The protocol: asked for, or else gRPC when the endpoint names the collector's gRPC port
        // 4317 (the reference's Go exporter speaks only gRPC, and its chart points there).
        let proto = options.tracingProtocol ?? env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] ?? env["OTEL_EXPORTER_OTLP_PROTOCOL"]
        var asked: Bool?
        switch proto {
        case "grpc"?: asked = true
        case "http/protobuf"?: asked = false
        case nil: asked = nil
        case let other?:
            notes.append("OTLP protocol \(other) is not supported; using http/protobuf")
            asked = false
        }
        let isGRPCPort = { (url: String) in URLComponents(string: url)?.port == 4317 }
        if let url = options.tracingEndpoint ?? env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].flatMap({ $0.isEmpty ? nil : $0 }) {
            grpc = asked ?? isGRPCPort(url)
            endpoint = url
        } else if let base = env["OTEL_EXPORTER_OTLP_ENDPOINT"], !base.isEmpty {
            grpc = asked ?? isGRPCPort(base)
            // OTLP/HTTP appends the signal's path to the base URL; gRPC uses it as it is.
            endpoint = grpc ? base : (base.hasSuffix("/") ? String(base.dropLast()) : base) + "/v1/traces"
        } else {
            grpc = asked ?? false
            endpoint = grpc ? "http://localhost:4317" : "http://localhost:4318/v1/traces"
        }
        headers = Self.pairs(env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] ?? env["OTEL_EXPORTER_OTLP_HEADERS"] ?? "")
        let file = { (name: String) in
            (env["OTEL_EXPORTER_OTLP_TRACES_" + name] ?? env["OTEL_EXPORTER_OTLP_" + name]).flatMap { $0.isEmpty ? nil : $0 }
        }
        trustRootsFile = file("CERTIFICATE")
        clientCertificateFile = file("CLIENT_CERTIFICATE")
        clientKeyFile = file("CLIENT_KEY")
        guard (clientCertificateFile == nil) == (clientKeyFile == nil) else {
            throw ValidationFailure("tracing: OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together")
        }
        if !endpoint.lowercased().hasPrefix("https:") && (trustRootsFile != nil || clientCertificateFile != nil) {
            notes.append("the OTEL_EXPORTER_OTLP_*CERTIFICATE / CLIENT_KEY files apply to an https:// collector only; \(endpoint) is not")
        }
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
        config.grpc = grpc
        config.headers = headers
        config.resource = resource
        config.interval = .nanoseconds(Int64(interval * 1e9))
        config.trustRootsFile = trustRootsFile
        config.clientCertificateFile = clientCertificateFile
        config.clientKeyFile = clientKeyFile
        for note in notes { logger.warning("tracing: \(note)") }
        logger.info("tracing on", metadata: [
            "endpoint": "\(endpoint)", "protocol": "\(grpc ? "grpc" : "http/protobuf")", "sample-ratio": "\(sampleRatio)", "service": "\(resource[0].1)",
            "export-interval-seconds": "\(interval)",
        ])
        return try OTLPExporter(tracer: tracer, configuration: config, loop: loop, logger: logger)
    }
}
