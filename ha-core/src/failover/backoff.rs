//! Optional pause between tries.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The pause before retry `n` (1-based): `base × 2^(n-1)`, at most `max`; with jitter, a value
/// drawn uniformly from the upper half of that, `[d/2, d]` ("equal jitter", so it stays bounded
/// both ways).
///
/// By default [`Failover`](super::Failover) has no backoff: a retry goes to another endpoint at
/// once. The randomness is injected, so tests are deterministic.
///
/// ```
/// use ha_core::failover::Backoff;
/// use std::time::Duration;
///
/// let b = Backoff::exponential(Duration::from_millis(10), Duration::from_millis(25));
/// assert_eq!(b.delay(1), Duration::from_millis(10));
/// assert_eq!(b.delay(2), Duration::from_millis(20));
/// assert_eq!(b.delay(3), Duration::from_millis(25));
///
/// // `rng` returns a value in [0, 1): here always the middle.
/// let b = b.with_jitter(|| 0.5);
/// assert_eq!(b.delay(1), Duration::from_micros(7_500));
/// ```
#[derive(Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    rng: Option<Arc<dyn Fn() -> f64 + Send + Sync>>,
}

impl Backoff {
    /// Exponential backoff from `base` up to `max`, without jitter.
    pub fn exponential(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            rng: None,
        }
    }

    /// Adds equal jitter drawn from `rng`, which must return values in `[0, 1)` (others are
    /// clamped).
    #[must_use]
    pub fn with_jitter(mut self, rng: impl Fn() -> f64 + Send + Sync + 'static) -> Self {
        self.rng = Some(Arc::new(rng));
        self
    }

    /// Adds equal jitter drawn from the thread-local generator of `rand`.
    #[must_use]
    pub fn with_random_jitter(self) -> Self {
        self.with_jitter(rand::random::<f64>)
    }

    /// The pause before retry `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        let shift = retry.saturating_sub(1).min(31);
        let d = self
            .base
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max)
            .min(self.max);
        match &self.rng {
            None => d,
            Some(rng) => {
                let r = rng();
                let r = if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
                d / 2 + (d / 2).mul_f64(r)
            }
        }
    }
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("base", &self.base)
            .field("max", &self.max)
            .field("jitter", &self.rng.is_some())
            .finish()
    }
}
