//! The retry schedule: capped exponential backoff with full jitter, per peer.
//!
//! Pure: takes the attempt number and a random fraction, returns a delay. The sender owns the
//! state (attempt count resets on success) and the randomness.

use std::time::Duration;

/// Backoff parameters.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The ceiling for attempt `n` (0-based): `initial * 2^n`, capped at `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry `attempt`: uniformly in [ceiling/2, ceiling] ("equal jitter"), so
    /// peers that failed together do not retry together, yet the delay still grows.
    /// `unit` is a random number in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(10),
    };

    #[test]
    fn delays_double_until_the_cap() {
        assert_eq!(B.ceiling(0), Duration::from_millis(100));
        assert_eq!(B.ceiling(3), Duration::from_millis(800));
        assert_eq!(B.ceiling(20), Duration::from_secs(10));
        assert_eq!(B.ceiling(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_within_half_to_full_ceiling() {
        for unit in [0.0, 0.25, 0.999, 7.0, -1.0] {
            let d = B.delay(4, unit);
            assert!(d >= B.ceiling(4) / 2 && d <= B.ceiling(4), "{d:?}");
        }
        assert_ne!(B.delay(4, 0.0), B.delay(4, 0.9));
    }
}
