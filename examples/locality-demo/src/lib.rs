//! # locality-demo
//!
//! HTTP downstreams in three IDCs, followed through drain, death, DNS failure and poisoning.
//!
//! [`run`] starts a small lab in-process (DNS for regions `north` and `south`, two `/who`
//! backends in each of `bj-a`, `bj-b`, `sh-a`, each behind a fault proxy), writes a topology
//! TOML, builds a client from it exactly as a service would (`Failover` over `LocalityBalance`
//! over a hyper client, local IDC `bj-a`), drives a steady bounded load, runs the [`Phase`]s and
//! returns a [`Report`]: one row per phase with counts, shares per IDC, latencies, the longest
//! error window and a PASS/FAIL computed from the counts.
//!
//! ```no_run
//! # async fn demo() -> Result<(), locality_demo::DemoError> {
//! let report = locality_demo::run(locality_demo::Options::default()).await?;
//! print!("{}", report.table());
//! assert!(report.pass);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod lab;
pub mod load;
pub mod phases;
pub mod progress;
pub mod report;

use std::path::PathBuf;
use std::time::Duration;

use ha_core::EventBus;

pub use phases::{MIN_SECONDS_PER_PHASE, Phase};
pub use report::{Check, JsonOut, PhaseRow, Report};

use crate::client::DemoClient;
use crate::config::{TempDir, Tuning, write_topology};
use crate::lab::{DemoLab, Ports};
use crate::load::{EventLog, Load};
use crate::progress::Progress;

/// Errors that stop the demo (a failed expectation is not one: it is a FAIL row).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A lab server could not start or change (e.g. its address is in use: try another
    /// `--port-offset`).
    #[error("lab: {0} (is another demo or lab running on these ports? try --port-offset)")]
    Lab(#[from] ha_lab::LabError),
    /// ha-core refused something (configuration, discovery, control).
    #[error("ha-core: {0}")]
    Ha(#[from] ha_core::HaError),
    /// The topology file was refused.
    #[error("{0}")]
    Config(#[from] ha_core::ConfigError),
    /// A file could not be written.
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Bad options.
    #[error("{0}")]
    Usage(String),
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// The phases, in order (default: all of [`Phase::ALL`]).
    pub phases: Vec<Phase>,
    /// Length of each phase in seconds (default 5, at least [`MIN_SECONDS_PER_PHASE`]; a few
    /// phases need longer and run longer, see [`Phase::duration`], noted in their rows).
    pub seconds_per_phase: f64,
    /// Calls per second (default 300).
    pub rate: u32,
    /// Most calls in flight at once (default 256); ticks beyond it are skipped, not queued.
    pub max_in_flight: usize,
    /// Added to every port of the lab (default 0: DNS 15353, backends 18080, proxies 18081).
    pub port_offset: u16,
    /// Where to write `topology.toml`, kept after the run (default: a new directory under the
    /// system's temp dir, removed when [`run`] returns, see [`config::TempDir`]).
    pub config_dir: Option<PathBuf>,
    /// Show progress on stderr.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            phases: Phase::ALL.to_vec(),
            seconds_per_phase: 5.0,
            rate: 300,
            max_in_flight: 256,
            port_offset: 0,
            config_dir: None,
            progress: true,
        }
    }
}

/// Runs the demo: starts the lab, writes the topology, builds the client, runs the phases,
/// stops everything it started, and returns the report (whether or not every row passed).
pub async fn run(opts: Options) -> Result<Report, DemoError> {
    if opts.phases.is_empty() {
        return Err(DemoError::Usage("no phase to run".into()));
    }
    if !(opts.seconds_per_phase.is_finite()
        && opts.seconds_per_phase > 0.0
        && opts.seconds_per_phase <= 600.0)
    {
        return Err(DemoError::Usage(format!(
            "--seconds-per-phase must be in [{MIN_SECONDS_PER_PHASE}, 600], got {}",
            opts.seconds_per_phase
        )));
    }
    if opts.seconds_per_phase < MIN_SECONDS_PER_PHASE {
        return Err(DemoError::Usage(format!(
            "--seconds-per-phase must be at least {MIN_SECONDS_PER_PHASE} (the shortest a phase \
             can measure; blackhole and the DNS phases run at least 3, recovery at least 7, \
             whatever the value), got {}",
            opts.seconds_per_phase
        )));
    }
    if opts.rate == 0 || opts.rate > 5000 {
        return Err(DemoError::Usage(format!(
            "--rate must be in 1..=5000, got {}",
            opts.rate
        )));
    }
    let progress = Progress::detect(opts.progress);
    let started_at = report::utc_now();
    let ports = Ports::with_offset(opts.port_offset)?;
    let tuning = Tuning::for_phase(opts.seconds_per_phase);
    // Without --config-dir the file goes to a directory of our own that is removed when this
    // function returns or its future is dropped (an error, a failed start, Ctrl-C).
    let temp = match &opts.config_dir {
        Some(_) => None,
        None => Some(TempDir::create()?),
    };
    let dir = match (&opts.config_dir, &temp) {
        (Some(dir), _) => dir.clone(),
        (None, Some(temp)) => temp.path().to_owned(),
        (None, None) => std::env::temp_dir(),
    };
    let config = write_topology(&dir, ports, &tuning)?;
    progress.info(&format!(
        "topology written to {} ({})",
        config.display(),
        if temp.is_some() {
            "copy it now: it is removed at exit; --config-dir DIR keeps it"
        } else {
            "copy it"
        }
    ));
    let longer: Vec<String> = opts
        .phases
        .iter()
        .map(|p| (p, p.duration(opts.seconds_per_phase, &tuning).as_secs_f64()))
        .filter(|(_, d)| *d > opts.seconds_per_phase)
        .map(|(p, d)| format!("{} {d:.1}s", p.name()))
        .collect();
    if !longer.is_empty() {
        progress.info(&format!(
            "phases that need longer than {}s run their minimum: {}",
            opts.seconds_per_phase,
            longer.join(", ")
        ));
    }
    let lab = DemoLab::start(ports).await?;
    progress.info(&format!(
        "lab up: dns north {} south {}, 6 backends behind fault proxies on :{} ({} calls/s)",
        lab.north.addr(),
        lab.south.addr(),
        ports.proxy,
        opts.rate
    ));
    let rows = run_phases(&lab, &opts, &tuning, &config, progress).await;
    lab.stop().await;
    let rows = rows?;
    let pass = rows.iter().all(|r| r.pass);
    Ok(Report {
        started_at,
        config,
        config_kept: temp.is_none(),
        rate: opts.rate,
        rows,
        pass,
    })
}

async fn run_phases(
    lab: &DemoLab,
    opts: &Options,
    tuning: &Tuning,
    config: &std::path::Path,
    progress: Progress,
) -> Result<Vec<PhaseRow>, DemoError> {
    let events = EventBus::new(16_384);
    let log = EventLog::start(&events);
    let client = DemoClient::build(config, tuning, events).await?;
    let load = Load::start(
        client.service.clone(),
        opts.rate,
        opts.max_in_flight,
        tuning.deadline + Duration::from_secs(1),
    );
    let env = phases::Env {
        lab,
        client: &client,
        load: &load,
        events: &log,
        tuning: *tuning,
        progress: &progress,
    };
    let mut rows = Vec::new();
    let mut result = Ok(());
    for phase in &opts.phases {
        match phases::run_phase(&env, *phase, opts.seconds_per_phase).await {
            Ok(row) => rows.push(row),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    load.stop().await;
    result.map(|()| rows)
}
