// swift-tools-version:6.0
// swift-epp: an Envoy ext_proc endpoint picker for LLM inference.
// One target per layer; dependencies point downwards only:
//   CNGHTTP2, COpenSSL      C system-library shims
//   OpenSSLTLS              TLS over OpenSSL memory BIOs as a NIO channel handler (server + client)
//   NGHTTP2Server           thin Swift wrapper over nghttp2: the server session driven by NIO, and a
//                           one-request client session (OTLP/gRPC export)
//   GRPCServer              gRPC framing, status, routing, deadlines and the health service
//   Protos                  generated protobuf messages (ext_proc, grpc.health.v1)
//   StreamingJSON           incremental JSON scanning and in-place model rewriting
//   InferenceRouting        picking domain: rewrite rules, objectives, endpoints, manifests
//   ExtProc                 the Process stream state machine tying the above together
//   Kubernetes              API client, reflectors, status writer, leader election
//   ModelServerMetrics      scrapes each model server's /metrics (vLLM load) for the picker
//   EPPMetrics              Prometheus metrics of the request path and the /metrics listener
//   Tracing                 W3C trace context, sampling, OTLP span export over HTTP or gRPC
//   EPP + epp               assembly and the executable
import PackageDescription

/// The request path's targets drop the dynamic exclusivity check in release builds: with NIO's
/// ByteBuffer writes specialised into these modules it was ~10% of the picker's CPU per request
/// (swift_beginAccess + its thread-local access set). Debug builds, which the tests run, keep it.
let hotPath: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

let package = Package(
    name: "swift-epp",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "epp", targets: ["epp"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-atomics.git", from: "1.3.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.0"),
    ],
    targets: [
        .systemLibrary(name: "CNGHTTP2", pkgConfig: "libnghttp2", providers: [.apt(["libnghttp2-dev"])]),
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl", providers: [.apt(["libssl-dev"])]),
        .target(name: "OpenSSLTLS", dependencies: [
            "COpenSSL",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "NGHTTP2Server", dependencies: [
            "CNGHTTP2",
            .product(name: "NIOCore", package: "swift-nio"),
        ], swiftSettings: hotPath),
        .target(name: "GRPCServer", dependencies: [
            "NGHTTP2Server", "Protos",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ], swiftSettings: hotPath),
        .target(name: "Protos", dependencies: [
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ], exclude: ["README.md"]),
        .target(name: "StreamingJSON", dependencies: [], swiftSettings: hotPath),
        .target(name: "InferenceRouting", dependencies: [
            "StreamingJSON",
            .product(name: "Atomics", package: "swift-atomics"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Yams", package: "Yams"),
        ], swiftSettings: hotPath),
        .target(name: "Tracing", dependencies: [
            "Protos", "OpenSSLTLS", "NGHTTP2Server",
            .product(name: "Atomics", package: "swift-atomics"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
        .target(name: "ExtProc", dependencies: [
            "GRPCServer", "Protos", "StreamingJSON", "InferenceRouting", "Tracing",
            .product(name: "Atomics", package: "swift-atomics"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ], swiftSettings: hotPath),
        .target(name: "Kubernetes", dependencies: [
            "OpenSSLTLS", "InferenceRouting",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Yams", package: "Yams"),
        ]),
        .target(name: "ModelServerMetrics", dependencies: [
            "InferenceRouting", "OpenSSLTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "EPPMetrics", dependencies: [
            "ExtProc", "InferenceRouting",
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: hotPath),
        .target(name: "EPP", dependencies: [
            "GRPCServer", "ExtProc", "EPPMetrics", "InferenceRouting", "Kubernetes", "ModelServerMetrics", "OpenSSLTLS",
            "StreamingJSON", "Tracing",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "epp", dependencies: ["EPP"]),

        .testTarget(name: "OpenSSLTLSTests", dependencies: [
            "OpenSSLTLS",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .testTarget(name: "GRPCServerTests", dependencies: [
            "GRPCServer", "NGHTTP2Server",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOEmbedded", package: "swift-nio"),
        ]),
        .testTarget(name: "StreamingJSONTests", dependencies: ["StreamingJSON"]),
        .testTarget(name: "InferenceRoutingTests", dependencies: ["InferenceRouting", "StreamingJSON"]),
        .testTarget(name: "ModelServerMetricsTests", dependencies: [
            "ModelServerMetrics", "InferenceRouting",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "ExtProcTests", dependencies: [
            "ExtProc", "Protos", "InferenceRouting", "StreamingJSON",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
        .testTarget(name: "EPPMetricsTests", dependencies: [
            "EPPMetrics", "ExtProc", "InferenceRouting", "StreamingJSON",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        .testTarget(name: "TracingTests", dependencies: [
            "Tracing", "Protos",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "SwiftProtobuf", package: "swift-protobuf"),
        ]),
        .testTarget(name: "KubernetesTests", dependencies: [
            "Kubernetes", "InferenceRouting",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
    ]
)
