//! The result: one row per phase, as a table and as JSON.
//!
//! The longest error window of a phase: for each worker of the steady load, a run of
//! consecutive failed calls lasts from the start of its first call to the end of its last; the
//! row shows the longest run of any worker (0 without errors). It is how long one client saw
//! nothing but errors; calls that were slow but answered show in the latency columns instead.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::demo::load::{FloodResult, Sample, Violation};

/// One expectation of a phase and whether the counts met it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked, with the measured value.
    pub what: String,
    /// True when met.
    pub ok: bool,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseRow {
    /// The phase's name.
    pub phase: String,
    /// What the fault did, with the lab's timings (`redis master redis-bj-a ... in 3.10 s`).
    pub fault: Vec<String>,
    /// How long the load ran, seconds.
    pub seconds: f64,
    /// Calls of the steady load.
    pub requests: u64,
    /// Calls answered as expected (a 200, or a 404 for a random read).
    pub successes: u64,
    /// Calls of the steady load per instance.
    pub requests_by_instance: BTreeMap<String, u64>,
    /// Failed calls by kind: `<status> <error code>` (`503 dependency_unavailable`) or the
    /// transport's (`timeout`, `connect`, `transport`).
    pub errors: BTreeMap<String, u64>,
    /// The same per instance called.
    pub errors_by_instance: BTreeMap<String, BTreeMap<String, u64>>,
    /// The longest error window, ms (see the module docs).
    pub longest_error_window_ms: f64,
    /// Median latency of every call of the steady load, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest call, ms.
    pub max_ms: f64,
    /// Writes acknowledged (200 with a version).
    pub writes_acked: u64,
    /// Read-backs done right after an acknowledged write.
    pub ryw_checks: u64,
    /// Read-backs that answered an older version or 404.
    pub ryw_violations: u64,
    /// The first violations, for the record.
    pub violation_samples: Vec<Violation>,
    /// Distinct ids acknowledged in the phase, read again when its load stopped.
    pub ids_verified: u64,
    /// Ids whose version read at the end of the phase was older than acknowledged (or 404).
    pub acked_lost: u64,
    /// Ids that could not be read at the end of the phase (errors until the bound).
    pub acked_unverified: u64,
    /// Acknowledged `(id, version)` pairs of the phase looked for in `/history`.
    pub events_checked: u64,
    /// Those not in `/history` within the bound.
    pub events_missing: u64,
    /// Seconds from the start of the history check (after the last phase) until every
    /// acknowledged version of this phase was in `/history` (`None`: not within the bound).
    pub history_complete_secs: Option<f64>,
    /// Acknowledged writes of the phase whose event lag was probed (see `probe`).
    pub event_lag_samples: u64,
    /// Of those, not seen in `/history` within the probe's bound.
    pub event_lag_unseen: u64,
    /// Median event lag (PUT answered to version in `/history`), ms.
    pub event_lag_p50_ms: f64,
    /// Largest event lag seen, ms.
    pub event_lag_max_ms: f64,
    /// The flood's counts (the flood phase).
    pub flood: Option<FloodResult>,
    /// `kill-lease-holder`: seconds from the SIGKILL of the lease holder until the other
    /// instance held the lease.
    pub takeover_secs: Option<f64>,
    /// The expectations, each with its measured value.
    pub checks: Vec<Check>,
    /// Remarks.
    pub notes: Vec<String>,
    /// True when every check passed.
    pub pass: bool,
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The longest run of consecutive failures of any one worker (see the module docs).
pub fn longest_error_window(samples: &[Sample]) -> Duration {
    let mut by_worker: BTreeMap<usize, Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        by_worker.entry(s.worker).or_default().push(s);
    }
    let mut longest = Duration::ZERO;
    for (_, mut list) in by_worker {
        list.sort_by_key(|s| s.start);
        let mut run: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
        for s in list {
            if s.error.is_some() {
                let end = s.start + s.latency;
                let (first, last) = run.unwrap_or((s.start, end));
                let last = last.max(end);
                longest = longest.max(last - first);
                run = Some((first, last));
            } else {
                run = None;
            }
        }
    }
    longest
}

impl PhaseRow {
    /// The counted columns from the steady load's calls (the checks are the phase's).
    pub fn from_samples(phase: &str, seconds: f64, samples: &[Sample]) -> PhaseRow {
        let mut errors = BTreeMap::new();
        let mut errors_by_instance: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut by_instance = BTreeMap::new();
        let mut ok = 0u64;
        for s in samples {
            *by_instance.entry(s.instance.to_string()).or_default() += 1;
            match &s.error {
                None => ok += 1,
                Some(k) => {
                    *errors.entry(k.clone()).or_default() += 1;
                    *errors_by_instance
                        .entry(s.instance.to_string())
                        .or_default()
                        .entry(k.clone())
                        .or_default() += 1;
                }
            }
        }
        let mut lat: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
        lat.sort();
        PhaseRow {
            phase: phase.to_string(),
            fault: Vec::new(),
            seconds,
            requests: samples.len() as u64,
            successes: ok,
            requests_by_instance: by_instance,
            errors,
            errors_by_instance,
            longest_error_window_ms: millis(longest_error_window(samples)),
            p50_ms: millis(percentile(&lat, 0.5)),
            p99_ms: millis(percentile(&lat, 0.99)),
            max_ms: millis(lat.last().copied().unwrap_or_default()),
            writes_acked: 0,
            ryw_checks: 0,
            ryw_violations: 0,
            violation_samples: Vec::new(),
            ids_verified: 0,
            acked_lost: 0,
            acked_unverified: 0,
            events_checked: 0,
            events_missing: 0,
            history_complete_secs: None,
            event_lag_samples: 0,
            event_lag_unseen: 0,
            event_lag_p50_ms: 0.0,
            event_lag_max_ms: 0.0,
            flood: None,
            takeover_secs: None,
            checks: Vec::new(),
            notes: Vec::new(),
            pass: false,
        }
    }

    /// Fills the event lag columns from the probes of the phase.
    pub fn set_lags(&mut self, lags: &[Option<Duration>]) {
        let mut seen: Vec<Duration> = lags.iter().flatten().copied().collect();
        seen.sort();
        self.event_lag_samples = lags.len() as u64;
        self.event_lag_unseen = lags.iter().filter(|l| l.is_none()).count() as u64;
        self.event_lag_p50_ms = millis(percentile(&seen, 0.5));
        self.event_lag_max_ms = millis(seen.last().copied().unwrap_or_default());
    }

    /// Adds a check.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        self.checks.push(Check {
            what: what.into(),
            ok,
        });
    }

    /// Sets `pass` from the checks.
    pub fn settle(&mut self) {
        self.pass = !self.checks.is_empty() && self.checks.iter().all(|c| c.ok);
    }

    /// The errors column: `-` or `kind:n` with short kind names.
    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "-".into();
        }
        self.errors
            .iter()
            .map(|(k, v)| format!("{}:{v}", short_kind(k)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The errors per instance: `bj-a connect:12 503:3; sh-a -` (empty without errors).
    pub fn errors_by_instance_text(&self) -> String {
        if self.errors.is_empty() {
            return String::new();
        }
        self.requests_by_instance
            .keys()
            .map(|i| {
                let kinds = self
                    .errors_by_instance
                    .get(i)
                    .filter(|m| !m.is_empty())
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{}:{v}", short_kind(k)))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_else(|| "-".into());
                format!("{i} {kinds}")
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn short_kind(k: &str) -> String {
    k.replace(" dependency_unavailable", "")
        .replace(" outcome_unknown", "?")
        .replace(" rate_limited", "")
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When the run started (UTC).
    pub started_at: String,
    /// How long the lab stack took to start, seconds.
    pub stack_startup_secs: f64,
    /// How long both service instances took to start, seconds.
    pub services_startup_secs: f64,
    /// `--phase-secs`.
    pub phase_secs: f64,
    /// Steady workers per instance.
    pub workers: BTreeMap<String, usize>,
    /// How long the history check waited, seconds.
    pub history_wait_secs: f64,
    /// How long after the services started the history consumer recorded a first write
    /// (before the first phase), seconds; `None`: not within the bound.
    pub consumer_warmup_secs: Option<f64>,
    /// The history check's bound, seconds.
    pub history_bound_secs: f64,
    /// One row per phase, in order.
    pub rows: Vec<PhaseRow>,
    /// Problems of the run outside the phases (cleanup, ...).
    pub notes: Vec<String>,
    /// True when every row passed.
    pub pass: bool,
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}ms")
    } else {
        format!("{v:.1}ms")
    }
}

impl Report {
    /// The table, then each row's checks, faults and notes.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<18} {:>5} {:>6} {:>6}  {:<30} {:>8} {:>7} {:>7} {:>7} {:>6} {:>4} {:>5} {:>6} {:>6} {:>15}  result",
            "phase",
            "secs",
            "reqs",
            "ok",
            "errors",
            "err-win",
            "p50",
            "p99",
            "max",
            "acked",
            "ryw",
            "lost",
            "ev-mis",
            "hist",
            "ev-lag p50/max",
        );
        for r in &self.rows {
            let win = if r.longest_error_window_ms > 0.0 {
                fmt_ms(r.longest_error_window_ms)
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "{:<18} {:>5.1} {:>6} {:>6}  {:<30} {:>8} {:>7} {:>7} {:>7} {:>6} {:>4} {:>5} {:>6} {:>6} {:>15}  {}",
                r.phase,
                r.seconds,
                r.requests,
                r.successes,
                r.errors_text(),
                win,
                fmt_ms(r.p50_ms),
                fmt_ms(r.p99_ms),
                fmt_ms(r.max_ms),
                r.writes_acked,
                r.ryw_violations,
                r.acked_lost + r.acked_unverified,
                r.events_missing,
                r.history_complete_secs
                    .map(|s| format!("{s:.1}s"))
                    .unwrap_or_else(|| "-".into()),
                if r.event_lag_samples == 0 {
                    "-".to_string()
                } else {
                    format!(
                        "{}/{}{}",
                        fmt_ms(r.event_lag_p50_ms),
                        fmt_ms(r.event_lag_max_ms),
                        if r.event_lag_unseen > 0 { "+" } else { "" }
                    )
                },
                if r.pass { "PASS" } else { "FAIL" }
            );
        }
        let _ = writeln!(
            out,
            "\n(errors: `503` dependency_unavailable, `503?` outcome_unknown, `429` rate_limited; \
             err-win: longest run of consecutive failed calls of one worker, first start to last \
             end; ryw: read-your-writes violations; lost: acknowledged writes not read back at \
             the phase's end, lost or unverifiable; ev-mis: acknowledged versions missing from \
             /history after at most {:.0} s; hist: when the phase's last acknowledged version \
             was seen in /history, seconds into that check; ev-lag: PUT answered to version in \
             /history for a sample, `+` when some were never seen)\n",
            self.history_bound_secs
        );
        for r in &self.rows {
            let _ = writeln!(out, "{} {}", r.phase, if r.pass { "PASS" } else { "FAIL" });
            for f in &r.fault {
                let _ = writeln!(out, "  fault: {f}");
            }
            for c in &r.checks {
                let _ = writeln!(out, "  [{}] {}", if c.ok { "ok" } else { "FAIL" }, c.what);
            }
            for n in &r.notes {
                let _ = writeln!(out, "  note: {n}");
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    match now.format(&fmt) {
        Ok(s) => format!("{s} UTC"),
        Err(_) => now.unix_timestamp().to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::demo::load::Op;
    use tokio::time::Instant;

    fn sample(worker: usize, t0: Instant, start_ms: u64, ms: u64, error: bool) -> Sample {
        Sample {
            worker,
            instance: "bj-a",
            op: Op::Get,
            start: t0 + Duration::from_millis(start_ms),
            latency: Duration::from_millis(ms),
            error: error.then(|| "503 dependency_unavailable".to_string()),
        }
    }

    #[test]
    fn the_error_window_is_the_longest_run_of_one_worker() {
        let t0 = Instant::now();
        let samples = vec![
            sample(0, t0, 0, 10, false),
            sample(0, t0, 10, 100, true),
            sample(0, t0, 110, 200, true),
            sample(0, t0, 310, 5, false),
            // Worker 1 fails at the same time: runs are per worker, not merged.
            sample(1, t0, 50, 30, true),
            sample(1, t0, 80, 5, false),
            sample(1, t0, 400, 50, true),
        ];
        assert_eq!(longest_error_window(&samples), Duration::from_millis(300));
        assert_eq!(longest_error_window(&samples[..1]), Duration::ZERO);
    }

    #[test]
    fn errors_are_counted_per_instance_too() {
        let t0 = Instant::now();
        let mut samples = vec![
            sample(0, t0, 0, 1, true),
            sample(0, t0, 1, 1, false),
            sample(1, t0, 2, 1, true),
        ];
        samples[2].instance = "sh-a";
        samples[2].error = Some("connect".into());
        samples.push(Sample {
            instance: "sh-a",
            error: None,
            ..samples[1].clone()
        });
        let row = PhaseRow::from_samples("kill-lease-holder", 1.0, &samples);
        assert_eq!(row.errors.len(), 2);
        assert_eq!(
            row.errors_by_instance["bj-a"]["503 dependency_unavailable"],
            1
        );
        assert_eq!(row.errors_by_instance["sh-a"]["connect"], 1);
        assert_eq!(row.errors_by_instance_text(), "bj-a 503:1; sh-a connect:1");
        let clean = PhaseRow::from_samples("baseline", 1.0, &samples[1..2]);
        assert_eq!(clean.errors_by_instance_text(), "");
    }

    #[test]
    fn a_row_counts_errors_by_kind_and_latency() {
        let t0 = Instant::now();
        let samples: Vec<Sample> = (0..100)
            .map(|i| sample(0, t0, i * 10, i + 1, i == 99))
            .collect();
        let mut row = PhaseRow::from_samples("baseline", 1.0, &samples);
        assert_eq!((row.requests, row.successes), (100, 99));
        assert_eq!(row.errors.get("503 dependency_unavailable"), Some(&1));
        assert_eq!(row.errors_text(), "503:1");
        assert_eq!(row.p50_ms, 50.0);
        assert_eq!(row.p99_ms, 99.0);
        assert_eq!(row.max_ms, 100.0);
        row.settle();
        assert!(!row.pass, "no checks: no pass");
        row.check(true, "a");
        row.settle();
        assert!(row.pass);
        row.check(false, "b");
        row.settle();
        assert!(!row.pass);
        assert_eq!(row.errors_by_instance_text(), "bj-a 503:1");
        row.set_lags(&[
            Some(Duration::from_millis(20)),
            None,
            Some(Duration::from_millis(5)),
        ]);
        assert_eq!((row.event_lag_samples, row.event_lag_unseen), (3, 1));
        assert_eq!((row.event_lag_p50_ms, row.event_lag_max_ms), (5.0, 20.0));
    }
}
