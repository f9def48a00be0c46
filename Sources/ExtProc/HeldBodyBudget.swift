import Atomics
import Foundation

/// A process-wide cap on request-body bytes the picker holds at once: bodies whose `model` comes
/// after the prompt (the OpenAI Python SDK writes `messages` first), bodies waiting in the
/// admission queue, BUFFERED bodies. `--max-request-body-bytes` bounds one request; without this,
/// a burst of such requests could hold many of them at once and get the process OOM-killed,
/// failing every stream it serves. With it, the request whose next chunk would overflow the
/// budget gets 503 and every other stream goes on.
///
/// Sheddable requests (priority < 0) may only fill half of it: however many of them wait in the
/// admission queue, the other half stays for everyone else.
///
/// One atomic counter, touched only for a chunk the picker holds (a chunk routed on arrival is
/// reserved and released in the same event-loop turn).
public final class HeldBodyBudget: Sendable {
    public let limit: Int
    private let held = ManagedAtomic<Int>(0)

    public init(limit: Int) {
        precondition(limit > 0, "the held-body budget must be positive")
        self.limit = limit
    }

    /// Bytes held now, across all streams.
    public var bytes: Int { held.load(ordering: .relaxed) }

    /// Reserves `count` bytes; false (nothing reserved) when that would pass the limit (half the
    /// limit for a sheddable request).
    func reserve(_ count: Int, sheddable: Bool = false) -> Bool {
        let after = held.wrappingIncrementThenLoad(by: count, ordering: .relaxed)
        if after <= (sheddable ? limit / 2 : limit) { return true }
        held.wrappingDecrement(by: count, ordering: .relaxed)
        return false
    }

    func release(_ count: Int) {
        if count > 0 { held.wrappingDecrement(by: count, ordering: .relaxed) }
    }

    /// The default: 1 GiB, or half the container's memory limit when that is smaller (cgroup v2
    /// `memory.max`, else v1 `memory.limit_in_bytes`), leaving the other half to everything else.
    public static func defaultLimit(cgroupRoot: String = "/sys/fs/cgroup") -> Int {
        let cap = 1 << 30
        for file in ["\(cgroupRoot)/memory.max", "\(cgroupRoot)/memory/memory.limit_in_bytes"] {
            guard let text = try? String(contentsOfFile: file, encoding: .utf8),
                  let value = Int(text.trimmingCharacters(in: .whitespacesAndNewlines)), value > 0 else { continue }
            return min(cap, max(value / 2, 1 << 20))
        }
        return cap
    }
}
