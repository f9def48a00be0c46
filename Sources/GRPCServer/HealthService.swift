import NIOConcurrencyHelpers
import NIOCore
import Protos

/// Serving status per service name, shared by every health endpoint of the process.
/// Writers are rare (readiness changes); watchers are told on their own event loops.
public final class HealthStatusStore: Sendable {
    public typealias Status = Grpc_Health_V1_HealthCheckResponse.ServingStatus

    private struct Watcher {
        let service: String
        let notify: @Sendable (Status) -> Void
    }
    private struct State {
        var statuses: [String: Status] = [:]
        var watchers: [UInt64: Watcher] = [:]
        var nextID: UInt64 = 0
    }
    private let state = NIOLockedValueBox(State())

    public init(_ initial: [String: Status] = [:]) {
        state.withLockedValue { $0.statuses = initial }
    }

    public func status(of service: String) -> Status? {
        state.withLockedValue { $0.statuses[service] }
    }

    public var all: [String: Status] { state.withLockedValue { $0.statuses } }

    /// Sets a service's status; watchers of that service hear of real changes only.
    public func set(_ service: String, _ status: Status) {
        let toNotify: [Watcher] = state.withLockedValue { s in
            guard s.statuses[service] != status else { return [] }
            s.statuses[service] = status
            return s.watchers.values.filter { $0.service == service }
        }
        for w in toNotify { w.notify(status) }
    }

    func addWatcher(_ service: String, _ notify: @escaping @Sendable (Status) -> Void) -> (UInt64, Status?) {
        state.withLockedValue { s in
            let id = s.nextID
            s.nextID += 1
            s.watchers[id] = Watcher(service: service, notify: notify)
            return (id, s.statuses[service])
        }
    }

    func removeWatcher(_ id: UInt64) {
        _ = state.withLockedValue { $0.watchers.removeValue(forKey: id) }
    }
}

/// `grpc.health.v1.Health`: Check, Watch (server streaming, sends on change) and List.
public struct HealthService: GRPCService {
    public let store: HealthStatusStore

    public init(store: HealthStatusStore) { self.store = store }

    public var methods: [GRPCMethod] {
        let store = self.store
        return [
            .unary(path: "/grpc.health.v1.Health/Check") { bytes, stream in
                guard let request = stream.decode(Grpc_Health_V1_HealthCheckRequest.self, from: bytes) else { return }
                guard let status = store.status(of: request.service) else {
                    stream.finish(GRPCStatus(.notFound, "unknown service \(request.service)"))
                    return
                }
                stream.sendFramed(HealthResponses.framed(status))
                stream.finish(.ok)
            },
            .unary(path: "/grpc.health.v1.Health/List") { bytes, stream in
                guard stream.decode(Grpc_Health_V1_HealthListRequest.self, from: bytes) != nil else { return }
                var response = Grpc_Health_V1_HealthListResponse()
                for (name, status) in store.all {
                    var r = Grpc_Health_V1_HealthCheckResponse()
                    r.status = status
                    response.statuses[name] = r
                }
                stream.send(response)
                stream.finish(.ok)
            },
            GRPCMethod(path: "/grpc.health.v1.Health/Watch") { _ in WatchHandler(store: store) },
        ]
    }
}

/// Pre-framed replies: a Check answer costs no encoding.
enum HealthResponses {
    static let byStatus: [ByteBuffer] = (0...3).map { raw in
        var r = Grpc_Health_V1_HealthCheckResponse()
        r.status = .init(rawValue: raw) ?? .unknown
        let bytes: ProtobufBytes = try! r.serializedBytes()
        return bytes.framed()
    }

    static func framed(_ status: HealthStatusStore.Status) -> ByteBuffer {
        let raw = status.rawValue
        if raw >= 0 && raw < byStatus.count { return byStatus[raw] }
        var r = Grpc_Health_V1_HealthCheckResponse()
        r.status = status
        let bytes: ProtobufBytes = try! r.serializedBytes()
        return bytes.framed()
    }
}

private final class WatchHandler: GRPCStreamHandler {
    let store: HealthStatusStore
    var watcherID: UInt64?
    var started = false
    var last: HealthStatusStore.Status?

    init(store: HealthStatusStore) { self.store = store }

    func received(_ message: ByteBuffer, on stream: GRPCServerStream) {
        guard !started else { return }
        started = true
        guard let request = stream.decode(Grpc_Health_V1_HealthCheckRequest.self, from: message) else { return }
        let loop = stream.eventLoop
        let bound = NIOLoopBound((self, stream), eventLoop: loop)
        let (id, current) = store.addWatcher(request.service) { status in
            loop.execute {
                let (handler, stream) = bound.value
                handler.push(status, on: stream)
            }
        }
        watcherID = id
        push(current ?? .serviceUnknown, on: stream)
    }

    func push(_ status: HealthStatusStore.Status, on stream: GRPCServerStream) {
        guard !stream.isClosed, status != last else { return }
        last = status
        stream.sendFramed(HealthResponses.framed(status))
    }

    func receivedEnd(on stream: GRPCServerStream) {
        if !started { stream.finish(GRPCStatus(.invalidArgument, "Watch needs a request message")) }
        // Otherwise keep streaming until the client cancels.
    }

    func cancelled(_ stream: GRPCServerStream) {
        if let watcherID { store.removeWatcher(watcherID) }
        watcherID = nil
    }

    deinit {
        if let watcherID { store.removeWatcher(watcherID) }
    }
}
