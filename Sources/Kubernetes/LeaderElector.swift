import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// Settings of Lease-based leader election (`coordination.k8s.io/v1`).
public struct LeaderElectionConfig: Sendable {
    public var namespace: String
    public var leaseName: String
    /// This replica's holder identity.
    public var identity: String
    /// How long a lease is valid without renewal (followers take over after this).
    public var leaseDuration: Duration = .seconds(15)
    /// A leader that could not renew for this long steps down.
    public var renewDeadline: Duration = .seconds(10)
    /// How often to try to acquire / renew.
    public var retryPeriod: Duration = .seconds(2)

    public init(namespace: String, leaseName: String, identity: String = LeaderElectionConfig.defaultIdentity()) {
        self.namespace = namespace
        self.leaseName = leaseName
        self.identity = identity
    }

    /// `$POD_NAME` when set (downward API), else `hostname_pid`.
    public static func defaultIdentity(environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let pod = environment["POD_NAME"], !pod.isEmpty { return pod }
        return "\(ProcessInfo.processInfo.hostName)_\(ProcessInfo.processInfo.processIdentifier)"
    }
}

struct Lease: Codable, Sendable {
    struct Spec: Codable, Sendable, Equatable {
        var holderIdentity: String?
        var leaseDurationSeconds: Int?
        var acquireTime: String?
        var renewTime: String?
        var leaseTransitions: Int?
    }
    var apiVersion: String? = "coordination.k8s.io/v1"
    var kind: String? = "Lease"
    var metadata: ResourceMeta
    var spec: Spec?
}

/// Leader election over a `coordination.k8s.io/v1` Lease, as client-go does it: acquire when the lease is
/// free or expired (by local observation of the record, so clocks need not agree), renew every
/// `retryPeriod`, step down when renewal failed for `renewDeadline`. Optimistic concurrency on the
/// lease's resourceVersion makes two candidates never both win. Every replica keeps serving; only the
/// leader's duties (status writes) depend on it.
public final class LeaderElector: Sendable {
    public let config: LeaderElectionConfig
    let client: KubernetesClient
    let logger: Logger
    let onChange: @Sendable (Bool) -> Void
    private let leader = NIOLockedValueBox(false)
    /// Whether we held the lease when `run()` ended (for `release()`).
    private let held = NIOLockedValueBox(false)

    public init(client: KubernetesClient, config: LeaderElectionConfig, logger: Logger,
                onChange: @escaping @Sendable (Bool) -> Void = { _ in }) {
        self.client = client
        self.config = config
        var logger = logger
        logger[metadataKey: "lease"] = "\(config.namespace)/\(config.leaseName)"
        logger[metadataKey: "identity"] = "\(config.identity)"
        self.logger = logger
        self.onChange = onChange
    }

    /// Whether this replica currently holds the lease.
    public var isLeader: Bool { leader.withLockedValue { $0 } }

    private var path: String { ResourceDescriptor.leases.collectionPath(namespace: config.namespace) }

    private func setLeader(_ value: Bool) {
        let changed = leader.withLockedValue { old -> Bool in
            defer { old = value }
            return old != value
        }
        if changed {
            if value { logger.info("became leader") } else { logger.warning("lost leadership") }
            onChange(value)
        }
    }

    private struct Observation {
        var spec: Lease.Spec?
        var at: ContinuousClock.Instant
    }

    /// Runs until cancelled; steps down on cancellation (call `release()` to hand the lease over at once).
    public func run() async {
        var observed: Observation?
        var lastRenew: ContinuousClock.Instant?
        // The same failure every retry period (RBAC refusing leases, say) is logged once, then at debug.
        var lastFailure: String?
        while !Task.isCancelled {
            do {
                let acquired = try await tryAcquireOrRenew(&observed)
                if lastFailure != nil {
                    logger.info("leader election: lease requests work again")
                    lastFailure = nil
                }
                if acquired {
                    lastRenew = .now
                    setLeader(true)
                } else if isLeader, let last = lastRenew, ContinuousClock.now - last > config.renewDeadline {
                    setLeader(false)
                } else if !isLeader {
                    setLeader(false)
                }
            } catch is CancellationError {
                break
            } catch {
                let message = "\(error)"
                if message == lastFailure {
                    logger.debug("leader election: lease request failed again", metadata: ["error": "\(error)"])
                } else if let e = error as? KubernetesError, e.isAuthError {
                    logger.error("leader election: lease access refused (check RBAC for leases: get/create/update)", metadata: ["error": "\(e)"])
                } else {
                    logger.warning("leader election: lease request failed", metadata: ["error": "\(error)"])
                }
                lastFailure = message
                if isLeader, let last = lastRenew, ContinuousClock.now - last > config.renewDeadline {
                    setLeader(false)
                }
            }
            let ms = Double(config.retryPeriod.components.seconds) * 1000 + Double(config.retryPeriod.components.attoseconds) / 1e15
            do { try await Task.sleep(for: .milliseconds(Int64(ms * Double.random(in: 0.9...1.1)))) } catch { break }
        }
        held.withLockedValue { $0 = isLeader }
        setLeader(false)
    }

    /// Gives the lease up (holder cleared) if this replica held it at the end of `run()`, so another
    /// replica takes over without waiting for expiry. Best effort, bounded (5 s per request).
    /// Call it from a task that is not cancelled.
    public func release() async {
        guard held.withLockedValue({ $0 }) else { return }
        held.withLockedValue { $0 = false }
        setLeader(false)
        do {
            let current = try await client.get(Lease.self, path: path + "/\(config.leaseName)")
            guard current.spec?.holderIdentity == config.identity else { return }
            var updated = current
            updated.spec?.holderIdentity = ""
            updated.spec?.leaseDurationSeconds = 1
            updated.spec?.renewTime = microTime(Date())
            _ = try await client.send(.init(method: .PUT, path: path + "/\(config.leaseName)", body: [UInt8](try JSONEncoder().encode(updated))),
                                      timeout: .seconds(5)).checked(path: path)
            logger.info("released the lease")
        } catch {
            logger.warning("could not release the lease", metadata: ["error": "\(error)"])
        }
    }

    private func tryAcquireOrRenew(_ observed: inout Observation?) async throws -> Bool {
        let now = Date()
        let seconds = Int(config.leaseDuration.components.seconds.clamped(to: 1...Int64(Int32.max)))
        let response = try await client.send(.init(path: path + "/\(config.leaseName)"), timeout: .seconds(10))
        if response.status.code == 404 {
            let lease = Lease(metadata: ResourceMeta(name: config.leaseName, namespace: config.namespace),
                              spec: .init(holderIdentity: config.identity, leaseDurationSeconds: seconds,
                                          acquireTime: microTime(now), renewTime: microTime(now), leaseTransitions: 0))
            let created = try await client.send(.init(method: .POST, path: path, body: [UInt8](try JSONEncoder().encode(lease))),
                                                timeout: .seconds(10))
            if created.status.code == 409 { return false }
            _ = try created.checked(path: path)
            observed = Observation(spec: lease.spec, at: .now)
            return true
        }
        let current = try response.checked(path: path).decode(Lease.self)
        if observed?.spec != current.spec {
            observed = Observation(spec: current.spec, at: .now)
        }
        let holder = current.spec?.holderIdentity ?? ""
        let duration = Duration.seconds(current.spec?.leaseDurationSeconds ?? seconds)
        if !holder.isEmpty, holder != config.identity, let seen = observed, ContinuousClock.now - seen.at < duration {
            return false  // held by someone else and not expired
        }
        var updated = current
        var spec = current.spec ?? Lease.Spec()
        if holder != config.identity {
            spec.acquireTime = microTime(now)
            spec.leaseTransitions = (spec.leaseTransitions ?? 0) + (holder.isEmpty ? 0 : 1)
            logger.info("acquiring lease", metadata: ["previousHolder": "\(holder)"])
        }
        spec.holderIdentity = config.identity
        spec.leaseDurationSeconds = seconds
        spec.renewTime = microTime(now)
        updated.spec = spec
        let put = try await client.send(.init(method: .PUT, path: path + "/\(config.leaseName)", body: [UInt8](try JSONEncoder().encode(updated))),
                                        timeout: .seconds(10))
        if put.status.code == 409 { return false }  // someone else wrote first
        let written = try put.checked(path: path).decode(Lease.self)
        observed = Observation(spec: written.spec, at: .now)
        return true
    }
}

/// RFC 3339 with microseconds (`metav1.MicroTime`).
func microTime(_ date: Date) -> String {
    let formatter = DateFormatter()
    formatter.locale = Locale(identifier: "en_US_POSIX")
    formatter.timeZone = TimeZone(identifier: "UTC")
    formatter.dateFormat = "yyyy-MM-dd'T'HH:mm:ss.SSSSSS'Z'"
    return formatter.string(from: date)
}

/// RFC 3339 seconds (`metav1.Time`).
func rfc3339(_ date: Date) -> String {
    let formatter = DateFormatter()
    formatter.locale = Locale(identifier: "en_US_POSIX")
    formatter.timeZone = TimeZone(identifier: "UTC")
    formatter.dateFormat = "yyyy-MM-dd'T'HH:mm:ss'Z'"
    return formatter.string(from: date)
}

extension Comparable {
    func clamped(to range: ClosedRange<Self>) -> Self { min(max(self, range.lowerBound), range.upperBound) }
}
