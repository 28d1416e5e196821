//! The result table: one row per phase, as text and as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::lab::IDCS;
use crate::load::{Outcome, Sample};

/// One expectation of a phase and whether the counts met it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked, with the measured value.
    pub what: String,
    /// True when met.
    pub ok: bool,
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseRow {
    /// The phase's name.
    pub phase: String,
    /// How long the measured part ran, in seconds.
    pub seconds: f64,
    /// Calls started in the phase.
    pub requests: u64,
    /// Calls answered.
    pub successes: u64,
    /// Failed calls by kind (`deadline_exceeded`, `no_healthy_endpoint`, `connect`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Share of the answered calls served per IDC (0–1).
    pub share: BTreeMap<String, f64>,
    /// Median latency of every call (answered or failed), ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Longest latency, ms.
    pub max_ms: f64,
    /// The longest run of consecutive failed calls, from the first one's start to the last one's
    /// end, ms (0 without errors).
    pub longest_error_window_ms: f64,
    /// Topology events seen during the phase, by kind.
    pub events: BTreeMap<String, u64>,
    /// The expectations, each with its measured value.
    pub checks: Vec<Check>,
    /// Remarks (set-up problems, lost events).
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

impl PhaseRow {
    /// The counted columns of a phase's row from its calls (checks are added by the phase).
    pub fn from_samples(phase: &str, duration: Duration, samples: &[Sample]) -> PhaseRow {
        let mut errors = BTreeMap::new();
        let mut by_idc: BTreeMap<String, u64> =
            IDCS.iter().map(|(i, _, _)| (i.to_string(), 0)).collect();
        let mut ok = 0u64;
        let mut lat: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
        lat.sort();
        let mut longest = Duration::ZERO;
        let mut run: Option<(tokio::time::Instant, tokio::time::Instant)> = None;
        for s in samples {
            match &s.outcome {
                Outcome::Ok { idc, .. } => {
                    ok += 1;
                    *by_idc.entry(idc.clone()).or_default() += 1;
                    run = None;
                }
                Outcome::Err(kind) => {
                    *errors.entry(kind.to_string()).or_default() += 1;
                    let end = s.start + s.latency;
                    let (first, last_end) = run.unwrap_or((s.start, end));
                    let last_end = last_end.max(end);
                    longest = longest.max(last_end - first);
                    run = Some((first, last_end));
                }
            }
        }
        let share = by_idc
            .into_iter()
            .map(|(k, v)| (k, if ok == 0 { 0.0 } else { v as f64 / ok as f64 }))
            .collect();
        PhaseRow {
            phase: phase.to_string(),
            seconds: duration.as_secs_f64(),
            requests: samples.len() as u64,
            successes: ok,
            errors,
            share,
            p50_ms: millis(percentile(&lat, 0.5)),
            p99_ms: millis(percentile(&lat, 0.99)),
            max_ms: millis(lat.last().copied().unwrap_or_default()),
            longest_error_window_ms: millis(longest),
            events: BTreeMap::new(),
            checks: Vec::new(),
            notes: Vec::new(),
            pass: false,
        }
    }

    /// The errors column: `-` or `kind:n ...` with short kind names.
    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "-".into();
        }
        self.errors
            .iter()
            .map(|(k, v)| {
                let k = match k.as_str() {
                    "deadline_exceeded" => "deadline",
                    "no_healthy_endpoint" => "no_endpoint",
                    other => other,
                };
                format!("{k}:{v}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// When the run started (UTC, `YYYY-MM-DD HH:MM:SS`).
    pub started_at: String,
    /// The topology file the client read.
    pub config: PathBuf,
    /// False when `config` was in the run's temporary directory, removed when the run ended
    /// (no `--config-dir`).
    pub config_kept: bool,
    /// Requested load, calls per second.
    pub rate: u32,
    /// One row per phase, in order.
    pub rows: Vec<PhaseRow>,
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
    /// The table, then each row's checks.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<15} {:>5} {:>6} {:>6}  {:<22} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>8}  result",
            "phase",
            "secs",
            "reqs",
            "ok",
            "errors",
            "bj-a",
            "bj-b",
            "sh-a",
            "p50",
            "p99",
            "max",
            "err-win",
        );
        for r in &self.rows {
            let share =
                |idc: &str| format!("{:.1}%", r.share.get(idc).copied().unwrap_or(0.0) * 100.0);
            let win = if r.longest_error_window_ms > 0.0 {
                fmt_ms(r.longest_error_window_ms)
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "{:<15} {:>5.1} {:>6} {:>6}  {:<22} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>8}  {}",
                r.phase,
                r.seconds,
                r.requests,
                r.successes,
                r.errors_text(),
                share("bj-a"),
                share("bj-b"),
                share("sh-a"),
                fmt_ms(r.p50_ms),
                fmt_ms(r.p99_ms),
                fmt_ms(r.max_ms),
                win,
                if r.pass { "PASS" } else { "FAIL" }
            );
        }
        out.push('\n');
        for r in &self.rows {
            let _ = writeln!(out, "{} {}", r.phase, if r.pass { "PASS" } else { "FAIL" });
            for c in &r.checks {
                let _ = writeln!(out, "  [{}] {}", if c.ok { "ok" } else { "FAIL" }, c.what);
            }
            for n in &r.notes {
                let _ = writeln!(out, "  note: {n}");
            }
        }
        out
    }
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

// === --json ===

/// The `--json` file, opened (created if missing) before the run, so that a path that cannot
/// be written fails at once instead of after the whole run. [`JsonOut::write`] replaces its
/// content; a file this created and never wrote is removed on drop (a failed or interrupted
/// run leaves no empty file behind).
#[derive(Debug)]
pub struct JsonOut {
    path: PathBuf,
    file: Option<std::fs::File>,
    created: bool,
}

impl JsonOut {
    /// Opens `path` for writing without truncating it yet (an existing file keeps its content
    /// until [`JsonOut::write`]).
    pub fn create(path: &std::path::Path) -> Result<JsonOut, crate::DemoError> {
        let io = |source| crate::DemoError::Io {
            path: path.to_path_buf(),
            source,
        };
        let created = !path.exists();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        Ok(JsonOut {
            path: path.to_path_buf(),
            file: Some(file),
            created,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Replaces the file's content with `report` as pretty JSON.
    pub fn write(mut self, report: &Report) -> Result<(), crate::DemoError> {
        use std::io::Write as _;
        let io = |source| crate::DemoError::Io {
            path: self.path.clone(),
            source,
        };
        let text =
            serde_json::to_string_pretty(report).map_err(|e| io(std::io::Error::other(e)))?;
        let Some(mut file) = self.file.take() else {
            return Ok(());
        };
        file.set_len(0).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.write_all(b"\n").map_err(io)?;
        file.sync_all().map_err(io)?;
        self.created = false;
        Ok(())
    }
}

impl Drop for JsonOut {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::time::Instant;

    #[test]
    fn row_counts_shares_percentiles_and_error_window() {
        let t = Instant::now();
        let ok = |ms: u64, idc: &str| Sample {
            start: t + Duration::from_millis(ms),
            latency: Duration::from_millis(2),
            outcome: Outcome::Ok {
                idc: idc.into(),
                endpoint: "127.0.1.11:1".parse().unwrap(),
            },
        };
        let err = |ms: u64, lat: u64| Sample {
            start: t + Duration::from_millis(ms),
            latency: Duration::from_millis(lat),
            outcome: Outcome::Err("deadline_exceeded"),
        };
        let samples = vec![
            ok(0, "bj-a"),
            err(10, 1000),
            err(20, 1000),
            ok(30, "bj-b"),
            err(40, 5),
            ok(50, "bj-a"),
        ];
        let row = PhaseRow::from_samples("x", Duration::from_secs(1), &samples);
        assert_eq!((row.requests, row.successes), (6, 3));
        assert_eq!(row.errors.get("deadline_exceeded"), Some(&3));
        assert!((row.share["bj-a"] - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(row.share["sh-a"], 0.0);
        // The run of two errors: from 10ms to 20ms + 1000ms.
        assert_eq!(row.longest_error_window_ms, 1010.0);
        assert_eq!(row.max_ms, 1000.0);
        assert_eq!(row.errors_text(), "deadline:3");
    }

    #[test]
    fn date_is_formatted() {
        let s = utc_now();
        assert_eq!(s.len(), "2025-01-01 00:00:00 UTC".len());
        assert!(s.starts_with("20"));
    }
}

#[cfg(test)]
mod json_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn report() -> Report {
        Report {
            started_at: "2026-12-03 00:00:00".into(),
            config: "/tmp/topology.toml".into(),
            config_kept: false,
            rate: 300,
            rows: Vec::new(),
            pass: true,
        }
    }

    /// A file name of this test process under the temp dir, removed on drop.
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn scratch(name: &str) -> Scratch {
        Scratch(
            std::env::temp_dir().join(format!("locality-demo-json-{}-{name}", std::process::id())),
        )
    }

    #[test]
    fn json_out_fails_early_on_a_bad_path_and_writes_the_report() {
        let bad = std::env::temp_dir()
            .join("locality-demo-no-such-dir")
            .join("x.json");
        let err = JsonOut::create(&bad).unwrap_err();
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );

        let f = scratch("new.json");
        let out = JsonOut::create(&f.0).unwrap();
        assert!(f.0.exists(), "created at once");
        out.write(&report()).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&f.0).unwrap()).unwrap();
        assert_eq!(v["rate"], 300);

        // A file created but never written (the run failed) is removed again.
        let g = scratch("unused.json");
        drop(JsonOut::create(&g.0).unwrap());
        assert!(!g.0.exists());

        // An existing file keeps its content until the write, and is not removed on failure.
        let h = scratch("old.json");
        std::fs::write(
            &h.0,
            "old content that is longer than the report will be, surely, yes, ".repeat(40),
        )
        .unwrap();
        drop(JsonOut::create(&h.0).unwrap());
        assert!(
            std::fs::read_to_string(&h.0)
                .unwrap()
                .starts_with("old content")
        );
        JsonOut::create(&h.0).unwrap().write(&report()).unwrap();
        let text = std::fs::read_to_string(&h.0).unwrap();
        assert!(
            serde_json::from_str::<serde_json::Value>(&text).is_ok(),
            "{text}"
        );
    }
}
