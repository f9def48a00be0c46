extension RandomNumberGenerator {
    /// A value in `0..<bound` from a single draw (the high half of `bound × next()`; the bias,
    /// at most bound / 2^64, is irrelevant for weights and tie-breaks). The request path calls it
    /// through an unspecialised generic, where the standard `next(upperBound:)` is a slow
    /// library call.
    @inline(__always)
    mutating func draw(below bound: UInt64) -> UInt64 {
        bound.multipliedFullWidth(by: next()).high
    }
}
