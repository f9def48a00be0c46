import Atomics

/// SplitMix64: a small, fast generator for load-balancing ties, canary splits and request ids.
/// Not cryptographic; each stream gets its own, seeded from a process-wide sequence so no two
/// streams share a sequence and no syscall is made per request.
struct FastRandom: RandomNumberGenerator {
    private var state: UInt64

    private static let base: UInt64 = {
        var g = SystemRandomNumberGenerator()
        return g.next()
    }()
    private static let counter = ManagedAtomic<UInt64>(0)

    init() {
        let n = Self.counter.loadThenWrappingIncrement(ordering: .relaxed)
        state = Self.base &+ n &* 0x9E37_79B9_7F4A_7C15
    }

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A random (version 4) UUID string, for requests that arrive without `x-request-id`.
    mutating func uuidString() -> String {
        var a = next()
        var b = next()
        a = (a & 0xFFFF_FFFF_FFFF_0FFF) | 0x0000_0000_0000_4000  // version 4
        b = (b & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000  // variant 10
        let hex: [UInt8] = Array("0123456789abcdef".utf8)
        var out = [UInt8]()
        out.reserveCapacity(36)
        for (i, word) in [a, b].enumerated() {
            for nibble in 0..<16 {
                let pos = i * 16 + nibble
                if pos == 8 || pos == 12 || pos == 16 || pos == 20 { out.append(UInt8(ascii: "-")) }
                out.append(hex[Int((word >> UInt64(60 - nibble * 4)) & 0xF)])
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
