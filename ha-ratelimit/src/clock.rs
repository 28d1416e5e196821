//! Time for the limiter: any governor [`Clock`].
//!
//! The default, [`DefaultClock`], is governor's own default clock (`QuantaClock`, the TSC read
//! through `quanta`): a check reads the clock once, and on this kind of VM
//! `tokio::time::Instant::now` (a `clock_gettime` call) costs about as much as the rest of the
//! check. Tests that run on paused tokio time pass [`TokioClock`] to
//! [`LimiterBuilder::clock`](crate::LimiterBuilder::clock); tests that step time by hand pass
//! governor's `FakeRelativeClock`.

use governor::clock::Clock;
use governor::nanos::Nanos;

/// The clock [`Limiter::builder`](crate::Limiter::builder) uses: governor's default clock
/// (`QuantaClock`), the same one a bare `governor::DefaultKeyedRateLimiter` reads. It does not
/// follow paused tokio time: pass [`TokioClock`] for that.
pub type DefaultClock = governor::clock::QuantaClock;

/// A governor [`Clock`] over `tokio::time::Instant`: paused tokio time (`start_paused = true`)
/// drives the limiter like every other timer in the process. Pass it to
/// [`LimiterBuilder::clock`](crate::LimiterBuilder::clock) in paused-time tests; it costs a
/// `clock_gettime` per check, so it is not the default.
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
