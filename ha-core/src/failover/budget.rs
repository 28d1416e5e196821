//! The retry budget: retries as a share of recent requests plus a small floor per second.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How many windows the budget's time-to-live is split into (as in Finagle and tower).
const SLOTS: usize = 10;
/// Budget arithmetic is in thousandths of a retry, so a ratio such as 0.2 is exact.
const MILLI: i64 = 1000;

/// A retry budget with the semantics of tower's `TpsBudget` (and Finagle's `RetryBudget`):
/// every request deposits `ratio` of a retry, every retry withdraws one, deposits and
/// withdrawals count for `ttl`, and on top of that `floor_per_sec × ttl` retries are always
/// allowed per `ttl` so that a client with little traffic can still retry.
///
/// Why not `tower::retry::budget::TpsBudget` itself: it takes a `std::sync::Mutex` and reads
/// the clock on every deposit, and its constructor panics on out-of-range arguments. This one is
/// a few atomics, clamps its arguments, and reads the clock only on the slow path: a deposit is
/// stamped with the most recent window any caller observed (every call that waits, retries or
/// fails observes the clock). A deposit can therefore look older than it is and expire early,
/// never later: the budget can under-count recent requests but never over-count them.
///
/// ```
/// use ha_core::failover::RetryBudget;
/// use std::time::Duration;
///
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5);
/// let now = tokio::time::Instant::now();
/// assert!(!budget.withdraw(now)); // no requests yet, no floor
/// budget.deposit();
/// budget.deposit();
/// assert!(budget.withdraw(now)); // two requests at 50% fund one retry
/// assert!(!budget.withdraw(now));
/// ```
pub struct RetryBudget {
    epoch: Instant,
    window_nanos: u64,
    /// The newest window number any caller has observed.
    current: AtomicU64,
    /// Per window: `(window number as u32) << 32 | count`.
    deposits: [AtomicU64; SLOTS],
    withdrawals: [AtomicU64; SLOTS],
    reserve: i64,
    deposit_amount: i64,
}

impl RetryBudget {
    /// A budget that allows `retry_ratio` retries per request (clamped to `0.0..=1000.0`) over
    /// the last `ttl` (clamped to 1 s..=60 s), plus `floor_per_sec` retries per second.
    pub fn new(ttl: Duration, floor_per_sec: u32, retry_ratio: f32) -> Self {
        let ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let ratio = if retry_ratio.is_nan() {
            0.0
        } else {
            retry_ratio.clamp(0.0, 1000.0)
        };
        let window_nanos = u64::try_from((ttl / SLOTS as u32).as_nanos()).unwrap_or(u64::MAX);
        RetryBudget {
            epoch: Instant::now(),
            window_nanos: window_nanos.max(1),
            current: AtomicU64::new(0),
            deposits: Default::default(),
            withdrawals: Default::default(),
            reserve: i64::from(floor_per_sec)
                .saturating_mul(ttl.as_secs_f64() as i64)
                .saturating_mul(MILLI),
            deposit_amount: (f64::from(ratio) * MILLI as f64).round() as i64,
        }
    }

    /// Counts one request (no clock read).
    pub fn deposit(&self) {
        let window = self.current.load(Ordering::Relaxed);
        bump(&self.deposits[slot(window)], window);
    }

    /// Advances the budget's idea of the current window to `now`.
    pub fn observe(&self, now: Instant) -> u64 {
        let window = self.window_at(now);
        let prev = self.current.fetch_max(window, Ordering::Relaxed);
        prev.max(window)
    }

    /// Takes one retry from the budget; false when it is exhausted.
    pub fn withdraw(&self, now: Instant) -> bool {
        let window = self.observe(now);
        if self.balance(window) < MILLI {
            return false;
        }
        // Check-then-act: concurrent withdrawals may overdraw by a few, as tower's does.
        bump(&self.withdrawals[slot(window)], window);
        true
    }

    /// Retries still available at `now`, in whole retries.
    pub fn available(&self, now: Instant) -> i64 {
        self.balance(self.observe(now)) / MILLI
    }

    fn window_at(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos / u128::from(self.window_nanos)).unwrap_or(u64::MAX)
    }

    fn balance(&self, window: u64) -> i64 {
        let deposits = live_sum(&self.deposits, window);
        let withdrawals = live_sum(&self.withdrawals, window);
        self.reserve
            .saturating_add(deposits.saturating_mul(self.deposit_amount))
            .saturating_sub(withdrawals.saturating_mul(MILLI))
    }
}

impl Default for RetryBudget {
    /// 20% of the requests of the last 10 s plus 10 retries per second.
    fn default() -> Self {
        RetryBudget::new(Duration::from_secs(10), 10, 0.2)
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let window = self.current.load(Ordering::Relaxed);
        f.debug_struct("RetryBudget")
            .field("reserve", &(self.reserve / MILLI))
            .field("deposit_milli", &self.deposit_amount)
            .field("balance", &(self.balance(window) / MILLI))
            .finish()
    }
}

fn slot(window: u64) -> usize {
    (window % SLOTS as u64) as usize
}

fn tag(window: u64) -> u64 {
    window & u64::from(u32::MAX)
}

/// Adds one to the slot's count for `window`, restarting the count if the slot held an older
/// window.
fn bump(cell: &AtomicU64, window: u64) {
    let want = tag(window);
    let mut cur = cell.load(Ordering::Relaxed);
    loop {
        let (held, count) = (cur >> 32, cur & u64::from(u32::MAX));
        let next = if held == want || is_newer(held, want) {
            // Ours, or a racing caller already moved the slot on: count it there.
            if count == u64::from(u32::MAX) {
                return;
            }
            cur + 1
        } else {
            (want << 32) | 1
        };
        match cell.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(actual) => cur = actual,
        }
    }
}

/// True when window tag `a` is newer than `b` (wrapping u32 arithmetic).
fn is_newer(a: u64, b: u64) -> bool {
    let d = (a.wrapping_sub(b)) & u64::from(u32::MAX);
    d != 0 && d < u64::from(u32::MAX / 2)
}

/// The sum of the counts of the slots that hold one of the last `SLOTS` windows up to `window`.
fn live_sum(cells: &[AtomicU64; SLOTS], window: u64) -> i64 {
    let now = tag(window);
    cells
        .iter()
        .map(|c| {
            let v = c.load(Ordering::Relaxed);
            let (held, count) = (v >> 32, v & u64::from(u32::MAX));
            let age = now.wrapping_sub(held) & u64::from(u32::MAX);
            if age < SLOTS as u64 { count as i64 } else { 0 }
        })
        .fold(0i64, i64::saturating_add)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn floor_refills_after_ttl() {
        let b = RetryBudget::new(Duration::from_secs(1), 2, 0.0);
        let now = Instant::now();
        assert!(b.withdraw(now));
        assert!(b.withdraw(now));
        assert!(!b.withdraw(now));
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(b.withdraw(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire() {
        let b = RetryBudget::new(Duration::from_secs(1), 0, 1.0);
        b.deposit();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!b.withdraw(Instant::now()));
        b.deposit();
        assert!(b.withdraw(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_funds_retries() {
        let b = RetryBudget::new(Duration::from_secs(10), 0, 0.2);
        for _ in 0..10 {
            b.deposit();
        }
        let now = Instant::now();
        assert_eq!(b.available(now), 2);
        assert!(b.withdraw(now));
        assert!(b.withdraw(now));
        assert!(!b.withdraw(now));
    }
}
