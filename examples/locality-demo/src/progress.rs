//! Progress on stderr: one live line per phase on a terminal (indicatif), plain lines otherwise,
//! nothing when disabled.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::load::LiveSnapshot;
use crate::phases::Phase;
use crate::report::PhaseRow;

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// No progress output (tests).
    Off,
    /// Plain lines on stderr (not a terminal).
    Lines,
    /// A live line per phase on the terminal.
    Bars,
}

impl Progress {
    /// `Bars` when stderr is a terminal, else `Lines`; `Off` when not `enabled`.
    pub fn detect(enabled: bool) -> Progress {
        match (enabled, std::io::stderr().is_terminal()) {
            (false, _) => Progress::Off,
            (true, true) => Progress::Bars,
            (true, false) => Progress::Lines,
        }
    }

    /// A line of information (not tied to a phase).
    pub fn info(&self, line: &str) {
        if *self != Progress::Off {
            eprintln!("{line}");
        }
    }

    /// Starts the line of one phase.
    pub fn phase(&self, phase: Phase, duration: Duration) -> PhaseLine {
        let bar = match self {
            Progress::Bars => {
                let bar = ProgressBar::new_spinner();
                if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix:<15} {msg}") {
                    bar.set_style(style);
                }
                bar.set_prefix(phase.name());
                bar.enable_steady_tick(Duration::from_millis(100));
                Some(bar)
            }
            _ => None,
        };
        if *self == Progress::Lines {
            eprintln!(
                "{:<15} running for {:.1}s",
                phase.name(),
                duration.as_secs_f64()
            );
        }
        PhaseLine {
            mode: *self,
            bar,
            name: phase.name(),
            duration,
        }
    }
}

/// The live line of one phase.
#[derive(Debug)]
pub struct PhaseLine {
    mode: Progress,
    bar: Option<ProgressBar>,
    name: &'static str,
    duration: Duration,
}

impl PhaseLine {
    /// Shows the counts so far.
    pub fn update(&self, elapsed: Duration, live: &LiveSnapshot) {
        if let Some(bar) = &self.bar {
            let ok: u64 = live.by_idc.iter().sum();
            let share = |i: usize| {
                if ok == 0 {
                    0.0
                } else {
                    live.by_idc[i] as f64 * 100.0 / ok as f64
                }
            };
            bar.set_message(format!(
                "{:>4.1}/{:.1}s  {:>6} calls  {:>4} errors  bj-a {:>5.1}%  bj-b {:>5.1}%  sh-a {:>5.1}%",
                elapsed.as_secs_f64(),
                self.duration.as_secs_f64(),
                live.done,
                live.errors,
                share(0),
                share(1),
                share(2)
            ));
        }
    }

    /// Replaces the live line with the phase's result.
    pub fn finish(self, row: &PhaseRow) {
        let share = |idc: &str| row.share.get(idc).copied().unwrap_or(0.0) * 100.0;
        let line = format!(
            "{:>6} calls  errors {:<12}  bj-a {:>5.1}%  bj-b {:>5.1}%  sh-a {:>5.1}%  {}",
            row.requests,
            row.errors_text(),
            share("bj-a"),
            share("bj-b"),
            share("sh-a"),
            if row.pass { "PASS" } else { "FAIL" }
        );
        match (self.mode, self.bar) {
            (_, Some(bar)) => bar.finish_with_message(line),
            (Progress::Lines, None) => eprintln!("{:<15} {line}", self.name),
            _ => {}
        }
    }
}
