//! Progress on stderr: a live line per phase on a terminal (indicatif), plain lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::demo::load::Live;
use crate::demo::report::PhaseRow;

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Plain lines on stderr (not a terminal).
    Lines,
    /// A live line per phase on the terminal.
    Bars,
}

impl Progress {
    /// `Bars` when stderr is a terminal, else `Lines`.
    pub fn detect() -> Progress {
        if std::io::stderr().is_terminal() {
            Progress::Bars
        } else {
            Progress::Lines
        }
    }

    /// A line of information.
    pub fn info(&self, line: &str) {
        eprintln!("{line}");
    }

    /// Starts the line of one phase.
    pub fn phase(&self, name: &'static str) -> PhaseLine {
        let bar = match self {
            Progress::Bars => {
                let bar = ProgressBar::new_spinner();
                if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix:<19} {msg}") {
                    bar.set_style(style);
                }
                bar.set_prefix(name);
                bar.enable_steady_tick(Duration::from_millis(100));
                Some(bar)
            }
            Progress::Lines => {
                eprintln!("{name:<19} running");
                None
            }
        };
        PhaseLine { bar, name }
    }
}

/// The live line of one phase.
#[derive(Debug)]
pub struct PhaseLine {
    bar: Option<ProgressBar>,
    name: &'static str,
}

impl PhaseLine {
    /// Shows the counts so far.
    pub fn update(&self, elapsed: Duration, step: &str, live: &Live) {
        if let Some(bar) = &self.bar {
            let flood = live.flood.load(Ordering::Relaxed);
            let flood = if flood > 0 {
                format!(
                    "  flood {flood} ({} x 429)",
                    live.flood_429.load(Ordering::Relaxed)
                )
            } else {
                String::new()
            };
            bar.set_message(format!(
                "{:>5.1}s  {:>6} calls  {:>5} errors  {:>5} acked  {} ryw-viol  {step}{flood}",
                elapsed.as_secs_f64(),
                live.done.load(Ordering::Relaxed),
                live.errors.load(Ordering::Relaxed),
                live.acked.load(Ordering::Relaxed),
                live.violations.load(Ordering::Relaxed),
            ));
        }
    }

    /// A line under the phase (what a fault did).
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("  {}: {line}", self.name)),
            None => eprintln!("  {}: {line}", self.name),
        }
    }

    /// Ends the line without a row.
    pub fn done(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }

    /// Replaces the live line with the phase's result.
    pub fn finish(self, row: &PhaseRow) {
        let line = format!(
            "{:>6} calls  errors {:<28}  err-win {:>6.0}ms  p99 {:>6.0}ms  acked {:>5}  ryw {}  lost {}",
            row.requests,
            row.errors_text(),
            row.longest_error_window_ms,
            row.p99_ms,
            row.writes_acked,
            row.ryw_violations,
            row.acked_lost + row.acked_unverified,
        );
        match self.bar {
            Some(bar) => bar.finish_with_message(line),
            None => eprintln!("{:<19} {line}", self.name),
        }
    }
}
