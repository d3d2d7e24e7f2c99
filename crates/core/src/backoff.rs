//! Exponential backoff with full jitter (docs/design.md D2): the n-th retry waits a
//! uniformly random time in `[0, min(cap, initial * multiplier^n)]`.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub multiplier: f64,
    pub cap: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, multiplier: f64, cap: Duration) -> Self {
        debug_assert!(multiplier >= 1.0);
        debug_assert!(cap >= initial);
        Self {
            initial,
            multiplier,
            cap,
        }
    }

    /// The upper bound of the wait before retry number `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.powi(attempt.min(1_000) as i32);
        let ceiling_secs = self.initial.as_secs_f64() * factor;
        if !ceiling_secs.is_finite() || ceiling_secs >= self.cap.as_secs_f64() {
            return self.cap;
        }
        Duration::from_secs_f64(ceiling_secs)
    }

    /// The wait before retry number `attempt`, drawn with `rng`.
    pub fn delay_with<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        let nanos = rng.random_range(0..=ceiling.as_nanos().min(u64::MAX as u128) as u64);
        Duration::from_nanos(nanos)
    }

    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, &mut rand::rng())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn arb_backoff() -> impl Strategy<Value = Backoff> {
        (1u64..5_000, 1.0f64..4.0, 0u64..120_000).prop_map(|(initial, mult, extra)| {
            Backoff::new(
                Duration::from_millis(initial),
                mult,
                Duration::from_millis(initial + extra),
            )
        })
    }

    #[test]
    fn spec_defaults_double_up_to_the_cap() {
        let b = Backoff::new(Duration::from_millis(100), 2.0, Duration::from_secs(30));
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(20), Duration::from_secs(30));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
    }

    proptest! {
        #[test]
        fn ceiling_is_monotone_and_capped(b in arb_backoff(), attempt in 0u32..200) {
            prop_assert!(b.ceiling(attempt) <= b.cap);
            prop_assert!(b.ceiling(attempt) <= b.ceiling(attempt + 1));
            prop_assert!(b.ceiling(attempt) >= b.initial.min(b.cap));
        }

        #[test]
        fn jitter_stays_within_zero_and_ceiling(b in arb_backoff(), attempt in 0u32..200, seed in any::<u64>()) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let d = b.delay_with(attempt, &mut rng);
            prop_assert!(d <= b.ceiling(attempt));
        }
    }

    #[test]
    fn jitter_is_spread_over_the_whole_interval() {
        // Full jitter: draws fall in both halves of [0, ceiling].
        let b = Backoff::new(Duration::from_millis(100), 2.0, Duration::from_secs(30));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let draws: Vec<_> = (0..200).map(|_| b.delay_with(4, &mut rng)).collect();
        let half = b.ceiling(4) / 2;
        assert!(draws.iter().any(|d| *d < half));
        assert!(draws.iter().any(|d| *d > half));
    }
}
