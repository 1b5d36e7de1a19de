//! Retry delays: exponential backoff with full jitter, and the server's
//! RECONNECT window.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter: the delay before retry number
/// `attempt` (0-based) is uniform in `[0, min(max, initial * 2^attempt)]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first retry delay.
    pub initial: Duration,
    /// Largest ceiling.
    pub max: Duration,
}

impl Default for Backoff {
    /// 500 ms initial, 30 s max.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The upper bound of the delay for retry `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.max)
    }

    /// A random delay in `[0, ceiling(attempt)]`.
    pub fn delay<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return Duration::ZERO;
        }
        rng.gen_range(Duration::ZERO..=ceiling)
    }
}

/// A random delay uniform in `[min_delay_ms, max_delay_ms]` as asked by
/// RECONNECT. A reversed range is treated as `[max, min]`.
pub fn reconnect_delay<R: Rng + ?Sized>(
    min_delay_ms: u32,
    max_delay_ms: u32,
    rng: &mut R,
) -> Duration {
    let (lo, hi) = if min_delay_ms <= max_delay_ms {
        (min_delay_ms, max_delay_ms)
    } else {
        (max_delay_ms, min_delay_ms)
    };
    Duration::from_millis(rng.gen_range(lo..=hi).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn ceiling_doubles_and_saturates() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(500));
        assert_eq!(b.ceiling(1), Duration::from_millis(1000));
        assert_eq!(b.ceiling(5), Duration::from_millis(16_000));
        assert_eq!(b.ceiling(6), Duration::from_secs(30));
        assert_eq!(b.ceiling(40), Duration::from_secs(30));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
        let huge = Backoff {
            initial: Duration::from_secs(u64::MAX / 2),
            max: Duration::MAX,
        };
        assert_eq!(huge.ceiling(3), Duration::MAX);
    }

    #[test]
    fn jitter_stays_in_bounds_and_spreads() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(1);
        for attempt in 0..12 {
            let ceiling = b.ceiling(attempt);
            let mut lo = Duration::MAX;
            let mut hi = Duration::ZERO;
            for _ in 0..2000 {
                let d = b.delay(attempt, &mut rng);
                assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
                lo = lo.min(d);
                hi = hi.max(d);
            }
            // Full jitter: samples reach near both ends of [0, ceiling].
            assert!(lo < ceiling / 10, "attempt {attempt}: min {lo:?}");
            assert!(hi > ceiling * 9 / 10, "attempt {attempt}: max {hi:?}");
        }
        let zero = Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
        };
        assert_eq!(zero.delay(3, &mut rng), Duration::ZERO);
    }

    #[test]
    fn reconnect_delay_in_range() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut seen_lo = false;
        let mut seen_hi = false;
        for _ in 0..5000 {
            let d = reconnect_delay(100, 110, &mut rng);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(110));
            seen_lo |= d == Duration::from_millis(100);
            seen_hi |= d == Duration::from_millis(110);
        }
        assert!(seen_lo && seen_hi, "both ends are inclusive");
        assert_eq!(reconnect_delay(7, 7, &mut rng), Duration::from_millis(7));
        let d = reconnect_delay(50, 40, &mut rng);
        assert!(d >= Duration::from_millis(40) && d <= Duration::from_millis(50));
        let d = reconnect_delay(0, u32::MAX, &mut rng);
        assert!(d <= Duration::from_millis(u32::MAX.into()));
    }
}
