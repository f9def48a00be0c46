import Foundation
import Logging
import NIOCore

/// An API resource collection: `group` "" is the core API (`/api/v1`).
public struct ResourceDescriptor: Sendable, Hashable, CustomStringConvertible {
    public var group: String
    public var version: String
    public var plural: String
    /// Whether this is an optional API (a CRD): a 404 means "not installed yet" and is polled.
    public var optional: Bool

    public init(group: String, version: String, plural: String, optional: Bool? = nil) {
        self.group = group
        self.version = version
        self.plural = plural
        self.optional = optional ?? !(group.isEmpty || group.hasSuffix(".k8s.io") && !group.hasPrefix("inference."))
    }

    public static let pods = ResourceDescriptor(group: "", version: "v1", plural: "pods", optional: false)
    public static let leases = ResourceDescriptor(group: "coordination.k8s.io", version: "v1", plural: "leases", optional: false)

    public var groupVersion: String { group.isEmpty ? version : "\(group)/\(version)" }

    /// `/api/v1[/namespaces/NS]/PLURAL` or `/apis/G/V[/namespaces/NS]/PLURAL`.
    public func collectionPath(namespace: String?) -> String {
        let base = group.isEmpty ? "/api/\(version)" : "/apis/\(group)/\(version)"
        return base + (namespace.map { "/namespaces/\($0)" } ?? "") + "/\(plural)"
    }

    public func objectPath(namespace: String?, name: String, subresource: String? = nil) -> String {
        collectionPath(namespace: namespace) + "/\(name)" + (subresource.map { "/\($0)" } ?? "")
    }

    /// The discovery document of the group/version (404 while a CRD is not installed).
    public var discoveryPath: String { group.isEmpty ? "/api/\(version)" : "/apis/\(group)/\(version)" }

    public var description: String { "\(plural).\(group.isEmpty ? "core" : group)/\(version)" }
}

/// Tunables of a reflector (defaults as for a real cluster; tests shorten them).
public struct ReflectorOptions: Sendable {
    public var labelSelector: String?
    public var fieldSelector: String?
    /// `timeoutSeconds` of each watch request (the server ends the watch then; we resume).
    public var watchTimeoutSeconds: Int = 300
    /// Spread watch timeouts over [t, 2t) as client-go does, so replicas do not reconnect in lockstep.
    public var jitterWatchTimeout: Bool = true
    /// `limit` of list pages.
    public var pageSize: Int = 500
    /// Try watch-list (`sendInitialEvents=true`) first; fall back to list+watch if the server refuses.
    public var useWatchList: Bool = false
    /// How often an optional API that is not installed is polled.
    public var notInstalledPollInterval: Duration = .seconds(10)
    public var initialBackoff: Duration = .milliseconds(500)
    public var maxBackoff: Duration = .seconds(30)
    /// Deadline of a single list page request.
    public var requestTimeout: Duration = .seconds(30)

    public init(labelSelector: String? = nil, fieldSelector: String? = nil) {
        self.labelSelector = labelSelector
        self.fieldSelector = fieldSelector
    }
}

/// What a reflector publishes after every change: the whole cache.
public struct ReflectorSnapshot<T: Sendable>: Sendable {
    /// Keyed by `namespace/name`.
    public var objects: [String: KubeObject<T>]
    /// An initial list completed (or the optional API is known not to be installed).
    public var synced: Bool
    /// False while an optional API (CRD) answers 404.
    public var installed: Bool
    /// The last resourceVersion seen (opaque).
    public var resourceVersion: String?

    public init(objects: [String: KubeObject<T>] = [:], synced: Bool = false, installed: Bool = true, resourceVersion: String? = nil) {
        self.objects = objects
        self.synced = synced
        self.installed = installed
        self.resourceVersion = resourceVersion
    }
}

/// Capped exponential back-off with jitter (each delay uniformly in [d/2, d]).
struct Backoff {
    let initial: Duration
    let maximum: Duration
    private(set) var current: Duration

    init(initial: Duration, maximum: Duration) {
        self.initial = initial
        self.maximum = maximum
        self.current = initial
    }

    mutating func next() -> Duration {
        let d = current
        current = min(current * 2, maximum)
        let ms = Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
        return .milliseconds(Int64(ms / 2 + Double.random(in: 0...(ms / 2))))
    }

    mutating func reset() { current = initial }
}

/// List+watch cache of one collection (namespace-scoped or cluster-wide), generic over the decoded type.
///
/// Lists (paginated with `limit`/`continue`), then watches from the list's resourceVersion with bookmarks and
/// `timeoutSeconds`; resumes from the last resourceVersion seen after a clean end or a dropped connection
/// (no relist); relists and replaces the cache (dropping what vanished) on 410 Gone, either an HTTP 410 or
/// an ERROR event with code 410. Errors back off exponentially (with jitter, capped); 401/403 are logged as
/// credential/RBAC problems and retried. An optional API answering 404 is logged once and polled.
/// Objects that fail to decode are logged with their name and left out of the cache.
public final class Reflector<T: Decodable & Sendable>: Sendable {
    public let resource: ResourceDescriptor
    public let namespace: String?
    public let options: ReflectorOptions
    let client: KubernetesClient
    let logger: Logger
    let onUpdate: @Sendable (ReflectorSnapshot<T>) -> Void

    public init(client: KubernetesClient, resource: ResourceDescriptor, namespace: String?, options: ReflectorOptions = ReflectorOptions(),
                logger: Logger, onUpdate: @escaping @Sendable (ReflectorSnapshot<T>) -> Void) {
        self.client = client
        self.resource = resource
        self.namespace = namespace
        self.options = options
        var logger = logger
        logger[metadataKey: "resource"] = "\(resource)"
        if let selector = options.labelSelector { logger[metadataKey: "labelSelector"] = "\(selector)" }
        if let selector = options.fieldSelector { logger[metadataKey: "fieldSelector"] = "\(selector)" }
        self.logger = logger
        self.onUpdate = onUpdate
    }

    private struct State {
        var cache: [String: KubeObject<T>] = [:]
        var resourceVersion: String?
        var synced = false
        var installed = true
        var watchListUnsupported = false
        var skipped: [String: String] = [:]  // key → resourceVersion already logged as undecodable
    }

    private enum Outcome: Error { case notInstalled, relist }

    /// Runs until the task is cancelled.
    public func run() async {
        var state = State()
        var backoff = Backoff(initial: options.initialBackoff, maximum: options.maxBackoff)
        var loggedNotInstalled = false
        while !Task.isCancelled {
            do {
                if state.resourceVersion == nil {
                    var listed = false
                    if options.useWatchList && !state.watchListUnsupported {
                        listed = try await watchList(&state)
                    }
                    if !listed {
                        try await list(&state)
                    }
                    if loggedNotInstalled {
                        logger.info("API is installed now")
                        loggedNotInstalled = false
                    }
                    backoff.reset()
                }
                let started = ContinuousClock.now
                let events = try await watch(&state)
                // Clean end (timeoutSeconds or a server-side close): resume from the last version.
                if events > 0 || ContinuousClock.now - started > .seconds(1) {
                    backoff.reset()
                } else {
                    try await Task.sleep(for: backoff.next())
                }
            } catch is CancellationError {
                return
            } catch Outcome.relist {
                state.resourceVersion = nil
                logger.info("resourceVersion expired (410): relisting")
            } catch Outcome.notInstalled {
                if !loggedNotInstalled {
                    logger.notice("API not installed (404); polling every \(options.notInstalledPollInterval) until it appears")
                    loggedNotInstalled = true
                }
                state.resourceVersion = nil
                if state.installed || !state.synced || !state.cache.isEmpty {
                    state.installed = false
                    state.synced = true
                    state.cache = [:]
                    publish(state)
                }
                do { try await Task.sleep(for: options.notInstalledPollInterval) } catch { return }
            } catch let error as KubernetesError where error.isGone {
                state.resourceVersion = nil
                logger.info("410 Gone: relisting", metadata: ["error": "\(error)"])
            } catch let error as KubernetesError where error.isAuthError {
                let delay = backoff.next()
                logger.error("API server refused our credentials (\(error.code == 401 ? "401 Unauthorized: check the token / client certificate" : "403 Forbidden: check the RBAC Role")); retrying in \(delay)",
                             metadata: ["error": "\(error)"])
                do { try await Task.sleep(for: delay) } catch { return }
            } catch {
                if Task.isCancelled { return }
                let delay = backoff.next()
                logger.warning("list/watch failed; retrying in \(delay)", metadata: ["error": "\(error)"])
                do { try await Task.sleep(for: delay) } catch { return }
            }
        }
    }

    private func publish(_ state: State) {
        onUpdate(ReflectorSnapshot(objects: state.cache, synced: state.synced, installed: state.installed,
                                   resourceVersion: state.resourceVersion))
    }

    private var collectionPath: String { resource.collectionPath(namespace: namespace) }

    private func selectorQuery() -> [(String, String)] {
        var q: [(String, String)] = []
        if let s = options.labelSelector, !s.isEmpty { q.append(("labelSelector", s)) }
        if let s = options.fieldSelector, !s.isEmpty { q.append(("fieldSelector", s)) }
        return q
    }

    private func timeAmount(_ d: Duration) -> TimeAmount {
        .nanoseconds(d.components.seconds * 1_000_000_000 + d.components.attoseconds / 1_000_000_000)
    }

    /// Decodes an item; nil (logged once per version) when it does not decode.
    private func accept(_ item: LenientItem<T>, state: inout State) -> KubeObject<T>? {
        let meta = item.meta ?? ResourceMeta()
        switch item.result {
        case .success(let object):
            state.skipped[meta.key] = nil
            return KubeObject(meta: meta, object: object)
        case .failure(let failure):
            if state.skipped[meta.key] != meta.resourceVersion {
                state.skipped[meta.key] = meta.resourceVersion ?? ""
                logger.warning("skipping object that does not decode",
                               metadata: ["name": "\(meta.name ?? "<unnamed>")", "namespace": "\(meta.namespace ?? "")",
                                          "resourceVersion": "\(meta.resourceVersion ?? "")", "problem": "\(failure.description)"])
            }
            return nil
        }
    }

    private func list(_ state: inout State) async throws {
        var fresh: [String: KubeObject<T>] = [:]
        var skipped = state.skipped
        var continueToken: String?
        var listVersion: String?
        var pages = 0
        repeat {
            var query = selectorQuery()
            if options.pageSize > 0 { query.append(("limit", String(options.pageSize))) }
            if let token = continueToken { query.append(("continue", token)) }
            let response = try await client.send(.init(path: collectionPath, query: query), timeout: timeAmount(options.requestTimeout))
            if response.status.code == 404 && resource.optional { throw Outcome.notInstalled }
            let page = try response.checked(path: collectionPath).decode(ListEnvelope<T>.self)
            var tmp = State()
            tmp.skipped = skipped
            for item in page.items ?? [] {
                if let obj = accept(item, state: &tmp) {
                    fresh[obj.meta.key] = obj
                }
            }
            skipped = tmp.skipped
            if pages == 0 { listVersion = page.metadata?.resourceVersion }
            continueToken = page.metadata?.continue
            if continueToken?.isEmpty == true { continueToken = nil }
            pages += 1
            try Task.checkCancellation()
        } while continueToken != nil
        state.skipped = skipped
        let removed = state.cache.keys.filter { fresh[$0] == nil }
        if !removed.isEmpty {
            logger.info("relist removed objects deleted while away", metadata: ["removed": "\(removed.sorted())"])
        }
        state.cache = fresh
        state.resourceVersion = listVersion
        state.synced = true
        state.installed = true
        logger.debug("listed", metadata: ["count": "\(fresh.count)", "pages": "\(pages)", "resourceVersion": "\(listVersion ?? "")"])
        publish(state)
    }

    /// Watch-list: initial ADDED events then the `k8s.io/initial-events-end` bookmark, continuing as a
    /// normal watch. Returns false (after marking the feature unsupported) when the server refuses it.
    private func watchList(_ state: inout State) async throws -> Bool {
        var query = selectorQuery()
        query += [("watch", "1"), ("sendInitialEvents", "true"), ("resourceVersionMatch", "NotOlderThan"),
                  ("allowWatchBookmarks", "true"), ("timeoutSeconds", String(options.watchTimeoutSeconds))]
        var fresh: [String: KubeObject<T>] = [:]
        var initialDone = false
        var lastVersion: String?
        var refused = false
        let request = KubernetesClient.Request(path: collectionPath, query: query)
        do {
            try await client.watch(T.self, request: request, timeout: .seconds(Int64(options.watchTimeoutSeconds) + 30)) { event in
                if !initialDone {
                    switch event.type {
                    case "ADDED":
                        if let obj = accept(event.object, state: &state) { fresh[obj.meta.key] = obj }
                        lastVersion = event.object.meta?.resourceVersion ?? lastVersion
                    case "BOOKMARK":
                        lastVersion = event.object.meta?.resourceVersion ?? lastVersion
                        if event.object.meta?.annotations?["k8s.io/initial-events-end"] == "true" {
                            initialDone = true
                            state.cache = fresh
                            state.resourceVersion = lastVersion
                            state.synced = true
                            state.installed = true
                            publish(state)
                        }
                    case "ERROR":
                        refused = true
                        return false
                    default:
                        break
                    }
                    return true
                }
                return try apply(event, state: &state)
            }
        } catch let error as KubernetesError {
            if case .http(let code, _, _) = error, code == 404, resource.optional { throw Outcome.notInstalled }
            if !initialDone, case .http(let code, _, _) = error, code == 400 || code == 422 || code == 501 {
                refused = true
            } else if !initialDone, error.isAuthError {
                throw error
            } else if initialDone {
                if error.isGone { throw Outcome.relist }
                throw error
            } else {
                throw error
            }
        }
        if !initialDone {
            if !refused {
                logger.info("watch-list ended before its initial-events-end bookmark; using list+watch")
            } else {
                logger.info("server does not support watch-list (sendInitialEvents); falling back to list+watch")
            }
            state.watchListUnsupported = true
            return false
        }
        return true
    }

    /// Applies one watch event to the cache. Throws `Outcome.relist` for an ERROR 410.
    private func apply(_ event: WatchEventEnvelope<T>, state: inout State) throws -> Bool {
        let item = event.object
        logger.trace("watch event", metadata: ["type": "\(event.type)", "name": "\(item.meta?.name ?? "")",
                                               "resourceVersion": "\(item.meta?.resourceVersion ?? "")"])
        switch event.type {
        case "ADDED", "MODIFIED":
            let key = (item.meta ?? ResourceMeta()).key
            if let obj = accept(item, state: &state) {
                state.cache[key] = obj
            } else {
                state.cache[key] = nil  // the object as it now stands is invalid: do not serve it
            }
            if let rv = item.meta?.resourceVersion { state.resourceVersion = rv }
            publish(state)
        case "DELETED":
            let key = (item.meta ?? ResourceMeta()).key
            state.cache[key] = nil
            state.skipped[key] = nil
            if let rv = item.meta?.resourceVersion { state.resourceVersion = rv }
            publish(state)
        case "BOOKMARK":
            if let rv = item.meta?.resourceVersion { state.resourceVersion = rv }
        case "ERROR":
            let status = item.status ?? APIStatus(code: nil)
            if status.code == 410 { throw Outcome.relist }
            throw KubernetesError.watchError(status)
        default:
            logger.warning("unknown watch event type \(event.type)")
        }
        return true
    }

    /// One watch request from `state.resourceVersion`; returns the number of events seen when the server
    /// ends it cleanly.
    private func watch(_ state: inout State) async throws -> Int {
        var query = selectorQuery()
        let base = max(1, options.watchTimeoutSeconds)
        let timeoutSeconds = options.jitterWatchTimeout ? Int.random(in: base..<(2 * base)) : base
        query += [("watch", "1"), ("resourceVersion", state.resourceVersion ?? ""), ("allowWatchBookmarks", "true"),
                  ("timeoutSeconds", String(timeoutSeconds))]
        var count = 0
        let request = KubernetesClient.Request(path: collectionPath, query: query)
        do {
            try await client.watch(T.self, request: request, timeout: .seconds(Int64(timeoutSeconds) + 30)) { event in
                count += 1
                return try apply(event, state: &state)
            }
        } catch let error as KubernetesError {
            if case .http(let code, _, _) = error, code == 404, resource.optional { throw Outcome.notInstalled }
            throw error
        }
        return count
    }
}
