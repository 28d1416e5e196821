//! Time for the limiter: any governor [`Clock`]; by default tokio's clock, so paused-time tests
//! drive it.

use governor::clock::Clock;
use governor::nanos::Nanos;

/// A governor [`Clock`] over `tokio::time::Instant`: paused tokio time (`start_paused = true`)
/// drives the limiter like every other timer in the process.
///
/// ```
/// use governor::clock::{Clock, Reference};
/// let clock = ha_ratelimit::TokioClock::new();
/// let a = clock.now();
/// assert!(clock.now().duration_since(a).as_u64() < 60_000_000_000);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose zero is now.
    pub fn new() -> TokioClock {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}
