import NIOConcurrencyHelpers
import NIOCore

/// Holds sheddable requests while the pool is saturated instead of refusing them at once (the
/// reference's flow control, reduced to what matters for shedding): a request waits up to
/// `timeout`, re-checking every `recheckInterval`, and is routed once the pool has room; at most
/// `capacity` requests wait at a time, the rest get 429 at once.
///
/// Room goes to waiters in order: higher priority first; within a priority, round robin between
/// flows — fairness IDs (tenants, sessions) where requests name one, else objectives — (each flow's
/// waiters take ranks 0, 1, 2, … from the rank last served, so a busy flow cannot starve a quiet
/// one); then arrival. A waiter whose check finds room but is not
/// first hands the turn to the first waiter (runs its check on its own event loop) and keeps
/// waiting; a first waiter that finds no room for itself while others do (its subset hint names
/// full endpoints) is skipped for one interval.
///
/// Waiting costs no thread: each waiting stream has one timer on its own event loop. The ordered
/// list is locked only when a request enters, leaves, or finds room — never on the path of a
/// request that does not wait.
public final class AdmissionQueue: Sendable {
    public let timeout: TimeAmount
    public let capacity: Int
    public let recheckInterval: TimeAmount

    private struct Waiter {
        let id: Int
        let priority: Int
        let flow: String
        let rank: Int
        let model: String?
        let targetModel: String?
        /// Skipped as first in line until then (its own check found no room).
        var blockedUntil: NIODeadline = .distantPast
        let takeTurn: @Sendable () -> Void

        /// Whether `self` is served before `other`.
        func precedes(_ other: Waiter) -> Bool {
            if priority != other.priority { return priority > other.priority }
            if rank != other.rank { return rank < other.rank }
            return id < other.id
        }
    }

    private struct State {
        var waiters: [Waiter] = []  // in serving order
        var nextID = 0
        /// Highest rank given to a waiting request of each objective.
        var flowRanks: [String: Int] = [:]
        /// Rank of the last waiter admitted: newcomers start there, not behind everyone's backlog.
        var servedRank = 0
    }

    private let state = NIOLockedValueBox(State())

    public init(timeout: TimeAmount, capacity: Int, recheckInterval: TimeAmount) {
        self.timeout = timeout
        self.capacity = max(0, capacity)
        self.recheckInterval = max(recheckInterval, .milliseconds(1))
    }

    /// Requests waiting now.
    public var count: Int { state.withLockedValue { $0.waiters.count } }

    /// Requests waiting now per priority, objective and model (the flow-control queue-size gauge).
    public struct Group: Hashable, Sendable {
        public var priority: Int
        public var fairnessID: String
        public var model: String
        public var targetModel: String

        public init(priority: Int, fairnessID: String, model: String, targetModel: String) {
            self.priority = priority
            self.fairnessID = fairnessID
            self.model = model
            self.targetModel = targetModel
        }
    }

    public func sizes() -> [Group: Int] {
        state.withLockedValue { s in
            var out: [Group: Int] = [:]
            for w in s.waiters {
                out[Group(priority: w.priority, fairnessID: w.flow, model: w.model ?? "", targetModel: w.targetModel ?? ""), default: 0] += 1
            }
            return out
        }
    }

    /// Takes a place in line; nil when the queue is full. `takeTurn` runs the waiter's admission
    /// check when another waiter hands it the turn.
    func enter(priority: Int, flow: String, model: String? = nil, targetModel: String? = nil,
               takeTurn: @escaping @Sendable () -> Void) -> Int? {
        state.withLockedValue { s in
            guard s.waiters.count < capacity else { return nil }
            let id = s.nextID
            s.nextID += 1
            let rank = max((s.flowRanks[flow] ?? -1) + 1, s.servedRank)
            s.flowRanks[flow] = rank
            let w = Waiter(id: id, priority: priority, flow: flow, rank: rank, model: model, targetModel: targetModel,
                           takeTurn: takeTurn)
            let at = s.waiters.firstIndex { w.precedes($0) } ?? s.waiters.endIndex
            s.waiters.insert(w, at: at)
            return id
        }
    }

    /// Gives the place back: admitted, timed out, refused or gone.
    func leave(_ id: Int, admitted: Bool) {
        state.withLockedValue { s in
            guard let i = s.waiters.firstIndex(where: { $0.id == id }) else { return }
            let w = s.waiters.remove(at: i)
            if admitted { s.servedRank = max(s.servedRank, w.rank) }
            if !s.waiters.contains(where: { $0.flow == w.flow }) { s.flowRanks[w.flow] = nil }
        }
    }

    /// Called by waiter `id` when its check found room: true when the room is its own (it is the
    /// first waiter not skipped); otherwise the first waiter is handed the turn and false returned.
    func claimRoom(_ id: Int, now: NIODeadline = .now()) -> Bool {
        let first: Waiter? = state.withLockedValue { s in
            s.waiters.first { $0.id == id || $0.blockedUntil <= now }
        }
        guard let first, first.id != id else { return true }
        first.takeTurn()
        return false
    }

    /// Waiter `id` checked and found no room for itself: others go before it for one interval.
    func noRoom(_ id: Int, now: NIODeadline = .now()) {
        state.withLockedValue { s in
            guard let i = s.waiters.firstIndex(where: { $0.id == id }) else { return }
            s.waiters[i].blockedUntil = now + recheckInterval
        }
    }
}
