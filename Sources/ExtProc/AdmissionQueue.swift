import Atomics
import NIOCore

/// Holds sheddable requests while the pool is saturated instead of refusing them at once (the
/// reference's flow control, reduced to what matters for shedding): a request waits up to
/// `timeout`, re-checking every `recheckInterval`, and is routed as soon as the pool has room;
/// at most `capacity` requests wait at a time, the rest get 429 at once.
///
/// Waiting costs no thread and no lock: each waiting stream has one timer on its own event loop,
/// and this shared counter bounds how many there are. Only FULL_DUPLEX_STREAMED and BUFFERED
/// streams wait (the gateway is then not timing the reply); STREAMED and NONE streams, routed on
/// their headers, are refused at once as before.
public final class AdmissionQueue: Sendable {
    public let timeout: TimeAmount
    public let capacity: Int
    public let recheckInterval: TimeAmount
    private let waiting = ManagedAtomic(0)

    public init(timeout: TimeAmount, capacity: Int, recheckInterval: TimeAmount) {
        self.timeout = timeout
        self.capacity = max(0, capacity)
        self.recheckInterval = max(recheckInterval, .milliseconds(1))
    }

    /// Requests waiting now.
    public var count: Int { waiting.load(ordering: .relaxed) }

    /// Takes a place in the queue; false when it is full.
    func enter() -> Bool {
        while true {
            let n = waiting.load(ordering: .relaxed)
            if n >= capacity { return false }
            if waiting.compareExchange(expected: n, desired: n + 1, ordering: .relaxed).exchanged { return true }
        }
    }

    /// Gives the place back (admitted, timed out, refused or gone).
    func leave() {
        waiting.wrappingDecrement(ordering: .relaxed)
    }
}
