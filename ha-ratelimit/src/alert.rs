//! Alerts debounced per (limit, kind): a flood makes one alert per interval, not one per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AlertKind {
    /// The limit rejected requests.
    Rejected,
    /// An IDC-share limit's measured load reached the `near_capacity` threshold.
    NearCapacity,
    /// The limit's key table was full and keys with live state were dropped by force.
    KeysEvicted,
    /// The cluster-wide limit's Redis did not answer (an error or the timeout): requests are
    /// decided by the local fallback limiter until it answers again.
    ClusterUnavailable,
}

impl AlertKind {
    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Rejected => "rejected",
            AlertKind::NearCapacity => "near_capacity",
            AlertKind::KeysEvicted => "keys_evicted",
            AlertKind::ClusterUnavailable => "cluster_unavailable",
        }
    }
}

/// One alert, as handed to the hook set with `LimiterBuilder::on_alert`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Alert {
    /// The limit's name.
    pub limit: Arc<str>,
    /// What happened.
    pub kind: AlertKind,
    /// How many more occurrences were folded into this alert since the previous one.
    pub suppressed: u64,
    /// For `NearCapacity`: the IDC, the measured load and the limit's rate, requests per second
    /// (the IDC-level figures are these times the instance count).
    pub load: Option<(Arc<str>, f64, f64)>,
}

/// The hook called on every emitted alert.
pub type AlertHook = Arc<dyn Fn(&Alert) + Send + Sync>;

/// Lets one caller through per interval and counts the others.
#[derive(Debug, Default)]
pub(crate) struct Debounce {
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Debounce {
    /// `Some(suppressed since the last alert)` when this occurrence should alert.
    pub fn fire(&self, now: u64, interval_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + interval_ms,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Admitted requests of a share line over a window, to tell when it is close to its limit.
#[derive(Debug, Default)]
pub(crate) struct LoadWindow {
    start_ms: AtomicU64,
    count: AtomicU64,
}

impl LoadWindow {
    /// Counts one admitted request; at the end of a window returns the window's rate (r/s).
    pub fn record(&self, now: u64, window_ms: u64) -> Option<f64> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let start = self.start_ms.load(Ordering::Relaxed);
        let elapsed = now.saturating_sub(start);
        if elapsed >= window_ms
            && self
                .start_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let n = self.count.swap(0, Ordering::Relaxed);
            return Some(n as f64 * 1000.0 / elapsed as f64);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn debounce_one_per_interval() {
        let d = Debounce::default();
        assert_eq!(d.fire(0, 10_000), Some(0));
        for t in 1..1000 {
            assert_eq!(d.fire(t, 10_000), None);
        }
        assert_eq!(d.fire(9_999, 10_000), None);
        assert_eq!(d.fire(10_000, 10_000), Some(1000));
        assert_eq!(d.fire(10_001, 10_000), None);
    }

    #[test]
    fn load_window_rate() {
        let w = LoadWindow::default();
        for t in 0..999 {
            assert_eq!(w.record(t, 1000), None);
        }
        // 1000 requests over 1000 ms.
        assert_eq!(w.record(1000, 1000), Some(1000.0));
    }
}
