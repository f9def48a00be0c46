import GRPCServer
import InferenceRouting
import Logging
import Tracing

/// How requests are picked and rewritten; fixed at start.
public struct ExtProcConfiguration: Sendable {
    /// Where the sticky-split key comes from.
    public enum Affinity: Sendable, Equatable {
        case none
        /// A request header (lower-case name).
        case header(String)
        /// A top-level string field of the JSON body, e.g. `user`.
        case bodyField(String)

        /// Parses `--split-affinity-header`: `NAME` or `body:FIELD`.
        public init(flag: String?) {
            guard let flag, !flag.isEmpty else { self = .none; return }
            if flag.hasPrefix("body:") {
                self = .bodyField(String(flag.dropFirst(5)))
            } else {
                self = .header(flag.lowercased())
            }
        }
    }

    public var affinity: Affinity = .none
    /// Put the client's model name back into responses.
    public var restoreModelAlias = true
    /// Request bodies above this are refused with 413.
    public var maxRequestBodyBytes = 64 << 20
    /// Model-server load scoring and shedding of sheddable requests (needs a scraper feeding the
    /// endpoints' load samples); off: fewest in flight, nothing shed.
    public var loadPolicy: LoadPolicy = .off
    /// Prefix-cache affinity (scored with the load, so only with `loadPolicy` on); nil: off.
    public var prefixCache: PrefixCacheIndex?
    /// Prompt bytes per prefix block, and how many leading blocks are hashed.
    public var prefixBlockBytes = 64
    public var prefixMaxBlocks = 64
    /// Sheddable requests wait here while the pool is saturated; nil: refused at once (429).
    public var admissionQueue: AdmissionQueue?
    /// Caps the request-body bytes held across all streams (503 for the request that would pass
    /// it); nil: no cap beyond `maxRequestBodyBytes` per request.
    public var heldBodyBudget: HeldBodyBudget?
    /// OpenTelemetry tracing of sampled requests; nil: off (no header parsed, nothing recorded).
    public var tracer: Tracer?
    /// Endpoints named per request (1 ... `maxDestinationEndpoints`): the picked one, then fallbacks the
    /// gateway tries in order when it fails (a comma-separated list in the header and the
    /// metadata; needs a gateway that reads lists, such as Envoy's override_host load balancer).
    public var destinationEndpoints = 1
    public static let maxDestinationEndpoints = 16

    public init() {}
}

/// `envoy.service.ext_proc.v3.ExternalProcessor/Process`.
public struct ExtProcService: GRPCService {
    public static let serviceName = "envoy.service.ext_proc.v3.ExternalProcessor"
    let configuration: ExtProcConfiguration
    let state: RoutingState
    let logger: Logger
    let observer: (any ExtProcObserver)?

    /// `observer` hears how every request ended (metrics); it runs on the request path.
    public init(configuration: ExtProcConfiguration, state: RoutingState, logger: Logger,
                observer: (any ExtProcObserver)? = nil) {
        self.configuration = configuration
        self.state = state
        self.logger = logger
        self.observer = observer
    }

    public var methods: [GRPCMethod] {
        let configuration = self.configuration
        let state = self.state
        let logger = self.logger
        let observer = self.observer
        return [
            GRPCMethod(path: "/\(Self.serviceName)/Process") { _ in
                ProcessStream(configuration: configuration, state: state, logger: logger, observer: observer)
            }
        ]
    }
}
