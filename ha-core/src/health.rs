//! Passive health: outlier detection per endpoint.
//!
//! Every call's outcome feeds its endpoint's [`EndpointHealth`]. An endpoint is *ejected* after
//! `consecutive_failures` failures in a row, or when its failure rate within `window` reaches
//! `failure_rate` over at least `failure_rate_min_requests` calls. The n-th ejection in a row lasts
//! `base_ejection × 2^(n-1)`, capped at `max_ejection`; the count resets once the endpoint has
//! stayed healthy for `max_ejection`. When an ejection ends, the endpoint is *due a probe*: the
//! balancer sends it exactly one call at a time; a success restores it (and its IDC's tier counts
//! it again only after the failback hold), a failure ejects it again for longer. Only the probe's
//! own outcome moves the endpoint out of probing: a call that was in flight before the ejection
//! and answers late counts in the statistics only. A probe that has not answered within
//! `probe_timeout` is abandoned and the next call becomes the probe (the abandoned one's late
//! outcome no longer counts as the probe's). The balancer caps how many endpoints of a set are
//! ejected at once (`max_ejected_percent`, at least one); an endpoint that would be ejected but
//! for the cap is shown as [`Status::Capped`] and counted in `ha_core_ejection_capped_total`.
//!
//! Time is whole milliseconds since the balancer's start, passed in by the caller, so the state
//! machine is exact under paused tokio time and needs no lock: every field is an atomic, and the
//! transitions that matter (healthy → ejected, probe claimed) are compare-and-swap.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::config::HealthSettings;

const HEALTHY: u8 = 0;
const EJECTED: u8 = 1;
const PROBING: u8 = 2;

/// What an endpoint may do right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Takes traffic and counts toward its tier's health.
    Healthy,
    /// Takes traffic, but was restored less than the failback hold ago: it does not yet count
    /// toward its tier's health, so traffic does not rush back to its tier.
    Warming,
    /// Ejected until the given time (ms).
    Ejected {
        /// End of the ejection, in ms since the balancer's start.
        until_ms: u64,
    },
    /// The ejection is over: the next call may be a probe.
    ProbeDue,
    /// Failing enough to be ejected, but the set's ejection cap keeps it in: it still takes
    /// traffic (and counts toward its tier's health) until a success or until the cap allows.
    Capped,
}

/// What an outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing worth an event.
    Unchanged,
    /// The endpoint was ejected.
    Ejected {
        /// For how long.
        for_: Duration,
        /// `consecutive_failures`, `failure_rate` or `probe_failed`.
        reason: &'static str,
    },
    /// A probe succeeded: the endpoint takes traffic again.
    Restored,
    /// The failure would have ejected the endpoint, but the set's ejection cap refused.
    Capped,
}

/// The probe slot an endpoint gave a call (see [`EndpointHealth::try_claim_probe`]): only the
/// outcome of the call holding the current ticket moves the endpoint out of probing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTicket(u32);

/// The health record of one endpoint. All methods are lock-free.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    phase: AtomicU8,
    consecutive: AtomicU32,
    win_start: AtomicU64,
    win_total: AtomicU32,
    win_failed: AtomicU32,
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    /// When the last probe succeeded, ms + 1 (0: never ejected, counts at once).
    restored_at: AtomicU64,
    probe_inflight: AtomicBool,
    /// Bumped for every probe handed out; a ticket of an older probe is stale.
    probe_epoch: AtomicU32,
    /// When the current probe was handed out (ms).
    probe_started: AtomicU64,
    /// The last failure would have ejected the endpoint but for the cap.
    capped: AtomicBool,
}

impl EndpointHealth {
    /// A healthy endpoint that was never ejected.
    pub fn new() -> Self {
        Self::default()
    }

    /// The endpoint's status at `now_ms`, with the failback hold `hold_ms`.
    pub fn status(&self, now_ms: u64, hold_ms: u64) -> Status {
        match self.phase.load(Ordering::Acquire) {
            EJECTED => {
                let until_ms = self.ejected_until.load(Ordering::Acquire);
                if now_ms >= until_ms {
                    Status::ProbeDue
                } else {
                    Status::Ejected { until_ms }
                }
            }
            PROBING => Status::ProbeDue,
            _ => {
                if self.capped.load(Ordering::Acquire) {
                    return Status::Capped;
                }
                let r = self.restored_at.load(Ordering::Acquire);
                if r != 0 && now_ms < (r - 1).saturating_add(hold_ms) {
                    Status::Warming
                } else {
                    Status::Healthy
                }
            }
        }
    }

    /// When the current status will change by itself: the end of an ejection or of the
    /// failback hold (ms), or `None`.
    pub fn next_change_ms(&self, now_ms: u64, hold_ms: u64) -> Option<u64> {
        match self.status(now_ms, hold_ms) {
            Status::Ejected { until_ms } => Some(until_ms),
            Status::Warming => Some((self.restored_at.load(Ordering::Acquire) - 1) + hold_ms),
            _ => None,
        }
    }

    /// True while the endpoint is ejected or being probed.
    pub fn is_ejected(&self) -> bool {
        self.phase.load(Ordering::Acquire) != HEALTHY
    }

    /// How many ejections in a row the endpoint has had.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Acquire)
    }

    /// Claims the single probe slot of an endpoint whose ejection is over. `Some` when this
    /// call is the probe; the caller must then report its outcome with the ticket to
    /// [`EndpointHealth::on_success`] or [`EndpointHealth::on_failure`] (or
    /// [`EndpointHealth::release_probe`]). A probe in flight for `probe_timeout_ms` or longer is
    /// abandoned: this call takes the slot over.
    pub fn try_claim_probe(&self, now_ms: u64, probe_timeout_ms: u64) -> Option<ProbeTicket> {
        let phase = self.phase.load(Ordering::Acquire);
        let due = phase == PROBING
            || (phase == EJECTED && now_ms >= self.ejected_until.load(Ordering::Acquire));
        if !due {
            return None;
        }
        if self
            .probe_inflight
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            let started = self.probe_started.load(Ordering::Acquire);
            if now_ms < started.saturating_add(probe_timeout_ms)
                || self
                    .probe_started
                    .compare_exchange(started, now_ms, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
            {
                return None;
            }
            // The old probe hung: a new epoch makes its late outcome stale.
            let epoch = self.probe_epoch.fetch_add(1, Ordering::AcqRel) + 1;
            return Some(ProbeTicket(epoch));
        }
        self.probe_started.store(now_ms, Ordering::Release);
        let epoch = self.probe_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.phase.store(PROBING, Ordering::Release);
        Some(ProbeTicket(epoch))
    }

    fn is_current(&self, ticket: Option<ProbeTicket>) -> bool {
        ticket.is_some_and(|t| t.0 == self.probe_epoch.load(Ordering::Acquire))
    }

    /// Gives the probe slot back without an outcome (the probe call was cancelled); a stale
    /// ticket gives nothing back.
    pub fn release_probe(&self, ticket: ProbeTicket) {
        if self.is_current(Some(ticket)) {
            self.probe_inflight.store(false, Ordering::Release);
        }
    }

    /// Records a successful call; `probe` is the ticket when the call was the probe.
    pub fn on_success(
        &self,
        now_ms: u64,
        s: &HealthSettings,
        probe: Option<ProbeTicket>,
    ) -> Verdict {
        // Read before writing: on the common path the line stays shared between cores.
        if self.consecutive.load(Ordering::Relaxed) != 0 {
            self.consecutive.store(0, Ordering::Relaxed);
        }
        if self.capped.load(Ordering::Relaxed) {
            self.capped.store(false, Ordering::Release);
        }
        self.count(now_ms, s, false);
        let phase = self.phase.load(Ordering::Acquire);
        if phase != HEALTHY {
            // Ejected or probing: only the current probe's answer restores the endpoint; a
            // call that was in flight before the ejection is old news.
            if phase != PROBING || !self.is_current(probe) {
                return Verdict::Unchanged;
            }
            if self
                .phase
                .compare_exchange(PROBING, HEALTHY, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.reset_window(now_ms);
                self.restored_at.store(now_ms + 1, Ordering::Release);
                self.probe_inflight.store(false, Ordering::Release);
                return Verdict::Restored;
            }
            return Verdict::Unchanged;
        }
        // A long healthy stretch forgets earlier ejections.
        let r = self.restored_at.load(Ordering::Relaxed);
        if r != 0
            && self.ejections.load(Ordering::Relaxed) != 0
            && now_ms.saturating_sub(r - 1) >= s.max_ejection.as_millis() as u64
        {
            self.ejections.store(0, Ordering::Relaxed);
        }
        Verdict::Unchanged
    }

    /// Records a failed call (`probe`: the ticket when the call was the probe). `may_eject` is
    /// asked (once, only when this failure would eject the endpoint) whether the set's ejection
    /// cap allows one more; it must reserve the slot when it answers true.
    pub fn on_failure(
        &self,
        now_ms: u64,
        s: &HealthSettings,
        probe: Option<ProbeTicket>,
        may_eject: impl FnOnce() -> bool,
    ) -> Verdict {
        let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let (total, failed) = self.count(now_ms, s, true);
        match self.phase.load(Ordering::Acquire) {
            PROBING if !self.is_current(probe) => Verdict::Unchanged,
            PROBING => {
                if self
                    .phase
                    .compare_exchange(PROBING, EJECTED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let for_ = self.eject_for(now_ms, s);
                    self.probe_inflight.store(false, Ordering::Release);
                    return Verdict::Ejected {
                        for_,
                        reason: "probe_failed",
                    };
                }
                Verdict::Unchanged
            }
            EJECTED => Verdict::Unchanged,
            _ => {
                let reason = if consecutive >= s.consecutive_failures {
                    "consecutive_failures"
                } else if total >= s.failure_rate_min_requests
                    && f64::from(failed) >= s.failure_rate * f64::from(total)
                {
                    "failure_rate"
                } else {
                    return Verdict::Unchanged;
                };
                if self
                    .phase
                    .compare_exchange(HEALTHY, EJECTED, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    return Verdict::Unchanged;
                }
                if !may_eject() {
                    self.phase.store(HEALTHY, Ordering::Release);
                    if self.capped.swap(true, Ordering::AcqRel) {
                        return Verdict::Unchanged;
                    }
                    return Verdict::Capped;
                }
                self.capped.store(false, Ordering::Release);
                let for_ = self.eject_for(now_ms, s);
                Verdict::Ejected { for_, reason }
            }
        }
    }

    fn eject_for(&self, now_ms: u64, s: &HealthSettings) -> Duration {
        let n = self.ejections.fetch_add(1, Ordering::AcqRel).min(30);
        let base = s.base_ejection.as_millis() as u64;
        let ms = base
            .saturating_mul(1u64 << n)
            .min(s.max_ejection.as_millis() as u64);
        self.ejected_until.store(now_ms + ms, Ordering::Release);
        self.consecutive.store(0, Ordering::Relaxed);
        self.reset_window(now_ms);
        Duration::from_millis(ms)
    }

    fn reset_window(&self, now_ms: u64) {
        self.win_start.store(now_ms, Ordering::Relaxed);
        self.win_total.store(0, Ordering::Relaxed);
        self.win_failed.store(0, Ordering::Relaxed);
    }

    /// Counts a call in the failure-rate window; returns (total, failed) in the window.
    fn count(&self, now_ms: u64, s: &HealthSettings, failed: bool) -> (u32, u32) {
        let start = self.win_start.load(Ordering::Relaxed);
        if now_ms.saturating_sub(start) >= s.window.as_millis() as u64
            && self
                .win_start
                .compare_exchange(start, now_ms, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.win_total.store(0, Ordering::Relaxed);
            self.win_failed.store(0, Ordering::Relaxed);
        }
        let total = self.win_total.fetch_add(1, Ordering::Relaxed) + 1;
        let f = if failed {
            self.win_failed.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.win_failed.load(Ordering::Relaxed)
        };
        (total, f)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn settings() -> HealthSettings {
        HealthSettings {
            consecutive_failures: 3,
            failure_rate: 0.5,
            failure_rate_min_requests: 10,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(5),
            max_ejected_percent: 50.0,
            probe_timeout: Duration::from_secs(1),
        }
    }

    fn fail_until_ejected(h: &EndpointHealth, now: u64, s: &HealthSettings) -> Duration {
        for _ in 0..100 {
            if let Verdict::Ejected { for_, .. } = h.on_failure(now, s, None, || true) {
                return for_;
            }
        }
        panic!("never ejected");
    }

    #[test]
    fn consecutive_failures_eject() {
        let s = settings();
        let h = EndpointHealth::new();
        assert_eq!(h.on_failure(0, &s, None, || true), Verdict::Unchanged);
        assert_eq!(h.on_failure(1, &s, None, || true), Verdict::Unchanged);
        assert_eq!(
            h.on_failure(2, &s, None, || true),
            Verdict::Ejected {
                for_: Duration::from_secs(1),
                reason: "consecutive_failures"
            }
        );
        assert_eq!(h.status(500, 0), Status::Ejected { until_ms: 1002 });
        assert_eq!(h.status(1002, 0), Status::ProbeDue);
    }

    #[test]
    fn success_resets_consecutive() {
        let s = settings();
        let h = EndpointHealth::new();
        for t in 0..20 {
            h.on_failure(t, &s, None, || true);
            h.on_failure(t, &s, None, || true);
            assert_eq!(h.on_success(t, &s, None), Verdict::Unchanged);
            if h.is_ejected() {
                break;
            }
        }
        // 2 of every 3 calls fail: the failure rate (≥ 0.5 over ≥ 10 calls) ejects.
        assert!(h.is_ejected());
    }

    #[test]
    fn failure_rate_needs_min_requests() {
        let s = settings();
        let h = EndpointHealth::new();
        // 1 failure per 2 successes (rate 0.33) never ejects.
        for t in 0..60 {
            h.on_success(t, &s, None);
            h.on_success(t, &s, None);
            assert_eq!(h.on_failure(t, &s, None, || true), Verdict::Unchanged);
        }
    }

    #[test]
    fn ejection_backoff_doubles_and_caps() {
        let s = settings();
        let h = EndpointHealth::new();
        let mut now = 0;
        let mut seen = Vec::new();
        let first = fail_until_ejected(&h, now, &s);
        seen.push(first.as_millis() as u64);
        for _ in 0..4 {
            now += *seen.last().unwrap();
            let ticket = h.try_claim_probe(now, 1000);
            assert!(ticket.is_some());
            assert!(
                h.try_claim_probe(now, 1000).is_none(),
                "one probe at a time"
            );
            match h.on_failure(now, &s, ticket, || true) {
                Verdict::Ejected { for_, reason } => {
                    assert_eq!(reason, "probe_failed");
                    seen.push(for_.as_millis() as u64);
                }
                v => panic!("{v:?}"),
            }
        }
        assert_eq!(seen, [1000, 2000, 4000, 5000, 5000]);
    }

    #[test]
    fn probe_success_restores_with_hold() {
        let s = settings();
        let h = EndpointHealth::new();
        fail_until_ejected(&h, 0, &s);
        assert!(
            h.try_claim_probe(999, 1000).is_none(),
            "not before the ejection ends"
        );
        let ticket = h.try_claim_probe(1000, 1000);
        assert!(ticket.is_some());
        assert_eq!(h.on_success(1010, &s, ticket), Verdict::Restored);
        assert_eq!(h.status(1010, 3000), Status::Warming);
        assert_eq!(h.next_change_ms(1010, 3000), Some(4010));
        assert_eq!(h.status(4010, 3000), Status::Healthy);
        // Healthy for max_ejection: the backoff is forgotten.
        assert_eq!(h.ejections(), 1);
        h.on_success(1010 + 5000, &s, None);
        assert_eq!(h.ejections(), 0);
    }

    #[test]
    fn cap_refusal_keeps_endpoint_in() {
        let s = settings();
        let h = EndpointHealth::new();
        for t in 0..10 {
            // The third failure would eject (consecutive_failures = 3): the cap refuses, and
            // says so once; the endpoint stays in, shown as capped rather than healthy.
            let want = if t == 2 {
                Verdict::Capped
            } else {
                Verdict::Unchanged
            };
            assert_eq!(h.on_failure(t, &s, None, || false), want, "failure {t}");
        }
        assert!(!h.is_ejected());
        assert_eq!(h.status(10, 0), Status::Capped);
        // A success ends it.
        h.on_success(11, &s, None);
        assert_eq!(h.status(11, 0), Status::Healthy);
    }

    #[test]
    fn only_the_probe_moves_an_endpoint_out_of_probing() {
        // Before: a call in flight before the ejection that answered late restored the
        // endpoint although its probe then failed.
        let s = settings();
        let h = EndpointHealth::new();
        fail_until_ejected(&h, 0, &s);
        let ticket = h.try_claim_probe(1000, 1000);
        assert!(ticket.is_some());
        // The old call's late success: counted, but the endpoint stays in probing.
        assert_eq!(h.on_success(1001, &s, None), Verdict::Unchanged);
        assert_eq!(h.status(1001, 0), Status::ProbeDue);
        // And an old call's late failure does not eject it either.
        assert_eq!(h.on_failure(1002, &s, None, || true), Verdict::Unchanged);
        // The probe's own failure does.
        assert!(matches!(
            h.on_failure(1003, &s, ticket, || true),
            Verdict::Ejected {
                reason: "probe_failed",
                ..
            }
        ));
    }

    #[test]
    fn a_hung_probe_is_abandoned_after_the_probe_timeout() {
        let s = settings();
        let h = EndpointHealth::new();
        fail_until_ejected(&h, 0, &s);
        let hung = h.try_claim_probe(1000, 500);
        assert!(hung.is_some());
        assert!(
            h.try_claim_probe(1499, 500).is_none(),
            "still within its timeout"
        );
        let next = h.try_claim_probe(1500, 500);
        assert!(next.is_some(), "the hung probe is abandoned");
        // The hung probe's late answer is stale; the new probe's answer counts.
        assert_eq!(h.on_success(1600, &s, hung), Verdict::Unchanged);
        h.release_probe(hung.unwrap());
        assert!(
            h.try_claim_probe(1601, 500).is_none(),
            "a stale release frees nothing"
        );
        assert_eq!(h.on_success(1602, &s, next), Verdict::Restored);
    }
}
