import NIOConcurrencyHelpers

/// Approximate prefix-cache affinity, as the reference EPP's prefix scorer: the prompt is cut into
/// fixed-size blocks, each block's hash chained to the previous one (seeded with the target model),
/// so equal hashes mean equal prefixes. The index remembers which endpoints were sent which block
/// hashes; an endpoint that already saw a request's first k blocks probably holds them in its KV
/// cache, so sending the request there skips recomputing them.
public struct PrefixHashes: Sendable {
    public let hashes: [UInt64]

    /// Hashes of the whole `blockSize`-byte blocks of `bytes`, at most `maxBlocks`.
    public init(_ bytes: [UInt8], model: String, blockSize: Int = 64, maxBlocks: Int = 64) {
        var seed: UInt64 = 0xcbf2_9ce4_8422_2325  // FNV-1a of the target model
        for b in model.utf8 { seed = (seed ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
        let n = min(bytes.count / max(8, blockSize), maxBlocks)
        let size = max(8, blockSize) & ~7
        var out: [UInt64] = []
        out.reserveCapacity(n)
        var h = seed
        var i = 0
        for _ in 0..<n {
            // Word-wise multiply-xorshift mixing; the chain value carries the whole prefix.
            for _ in 0..<(size / 8) {
                var w: UInt64 = 0
                for k in 0..<8 { w |= UInt64(bytes[i + k]) << (8 * UInt64(k)) }
                h = (h ^ w) &* 0x9E37_79B9_7F4A_7C15
                h ^= h >> 29
                i += 8
            }
            h = (h ^ (h >> 32)) &* 0xD6E8_FEB8_6659_FD93
            out.append(h)
        }
        hashes = out
    }

    public var isEmpty: Bool { hashes.isEmpty }
}

/// Which endpoints were sent which prefix blocks. Bounded memory: two generations of at most
/// `capacity` blocks each; when the current one fills it becomes the previous one and the oldest is
/// dropped, so blocks not seen for a while are forgotten (an LRU by generations).
///
/// Each endpoint owns one of 256 bits (`slotCount`; a block's endpoints are one 32-byte mask). Up to
/// 256 live endpoints every endpoint has a bit of its own (exact); beyond that, newcomers share the
/// least-shared bit, so in a pool of 300 an endpoint may be credited with the blocks of the one it
/// shares with (the load scorers then choose between them) — affinity degrades gradually instead of
/// being lost. `retain(_:)` frees the bits of
/// endpoints that left the pool and clears them from the index, so a new pod never inherits a gone
/// pod's blocks.
public final class PrefixCacheIndex: Sendable {
    /// Endpoints told apart exactly.
    public static let slotCount = 256

    private struct State {
        var current: [UInt64: SlotMask] = [:]
        var previous: [UInt64: SlotMask] = [:]
        /// Endpoint address → its bit.
        var slots: [String: Int] = [:]
        /// Addresses holding each bit.
        var sharers = [Int](repeating: 0, count: PrefixCacheIndex.slotCount)

        /// The bit for `address`, assigning the least-shared one (lowest first) to a newcomer.
        mutating func slot(for address: String) -> Int {
            if let known = slots[address] { return known }
            var best = 0
            for i in 1..<PrefixCacheIndex.slotCount where sharers[i] < sharers[best] { best = i }
            sharers[best] += 1
            slots[address] = best
            return best
        }
    }

    private let state = NIOLockedValueBox(State())
    public let capacity: Int

    public init(capacity: Int = 131_072) {
        self.capacity = max(1, capacity)
    }

    /// For each leading block i, the endpoint bits that saw blocks 0...i; stops at the first block
    /// no endpoint saw.
    public func prefixMasks(_ prefix: PrefixHashes) -> [SlotMask] {
        guard !prefix.isEmpty else { return [] }
        return state.withLockedValue { s in
            var out: [SlotMask] = []
            var alive = SlotMask(repeating: .max)
            for h in prefix.hashes {
                alive &= (s.current[h] ?? .zero) | (s.previous[h] ?? .zero)
                if alive == .zero { break }
                out.append(alive)
            }
            return out
        }
    }

    /// Records that `prefix` was sent to `record`'s endpoint.
    public func record(_ prefix: PrefixHashes, sentTo record: EndpointRecord) {
        guard !prefix.isEmpty else { return }
        let address = record.endpoint.address
        let capacity = self.capacity
        let slot: Int = state.withLockedValue { s in
            let slot = s.slot(for: address)
            let bit = SlotMask.bit(slot)
            for h in prefix.hashes {
                if let m = s.current[h] {
                    if m & bit == .zero { s.current[h] = m | bit }
                } else {
                    s.current[h] = (s.previous[h] ?? .zero) | bit
                    if s.current.count >= capacity {
                        s.previous = s.current
                        s.current = [:]
                        s.current.reserveCapacity(min(capacity, 4096))
                    }
                }
            }
            return slot
        }
        record.setPrefixSlot(slot)
    }

    /// Keeps only the endpoints of `endpoints`: the bits of the others are freed and cleared from
    /// the index. Call when the pool changes (off the request path: it walks the whole index when a
    /// bit is freed).
    public func retain(_ endpoints: EndpointSet) {
        var live = Set<String>(minimumCapacity: endpoints.count)
        for r in endpoints.records { live.insert(r.endpoint.address) }
        state.withLockedValue { s in
            var freed = SlotMask.zero
            for (address, slot) in s.slots where !live.contains(address) {
                s.slots[address] = nil
                s.sharers[slot] -= 1
                if s.sharers[slot] == 0 { freed |= SlotMask.bit(slot) }
            }
            guard freed != .zero else { return }
            let keep = ~freed
            s.current = s.current.compactMapValues { m in m & keep == .zero ? nil : m & keep }
            s.previous = s.previous.compactMapValues { m in m & keep == .zero ? nil : m & keep }
        }
    }

    /// The bit of `record` in the masks, or -1 when it has none yet.
    @inline(__always)
    public func slot(of record: EndpointRecord) -> Int {
        record.prefixSlot
    }

    /// Number of blocks in the index (both generations, shared blocks counted twice).
    public var count: Int { state.withLockedValue { $0.current.count + $0.previous.count } }

    /// Endpoints holding a bit (those recorded and not dropped by `retain`).
    public var trackedEndpoints: Int { state.withLockedValue { $0.slots.count } }
}

/// One bit per endpoint slot of the index (`PrefixCacheIndex.slotCount`).
public typealias SlotMask = SIMD4<UInt64>

extension SlotMask {
    @inline(__always)
    static func bit(_ slot: Int) -> SlotMask {
        var m = SlotMask.zero
        m[slot >> 6] = 1 << UInt64(slot & 63)
        return m
    }
}

extension Array where Element == SlotMask {
    /// How many leading blocks the endpoint with this bit saw (masks from `prefixMasks`).
    @inline(__always)
    public func matchedBlocks(slot: Int) -> Int {
        guard slot >= 0 else { return 0 }
        let word = slot >> 6
        let bit: UInt64 = 1 << UInt64(slot & 63)
        // The masks only lose bits as i grows: binary search for the last one with the bit.
        var lo = 0, hi = count
        while lo < hi {
            let mid = (lo + hi) / 2
            if self[mid][word] & bit != 0 { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }
}

/// A request's prefix blocks matched against the index, ready for scoring candidates.
public struct PrefixMatch {
    public let masks: [SlotMask]
    public let blocks: Int
    public let index: PrefixCacheIndex

    public init(_ prefix: PrefixHashes, index: PrefixCacheIndex) {
        self.masks = index.prefixMasks(prefix)
        self.blocks = prefix.hashes.count
        self.index = index
    }

    /// Share (0…1) of the prompt's leading blocks `record` was sent before.
    @inline(__always)
    public func score(of record: EndpointRecord) -> Double {
        guard blocks > 0, !masks.isEmpty else { return 0 }
        return Double(masks.matchedBlocks(slot: index.slot(of: record))) / Double(blocks)
    }
}
