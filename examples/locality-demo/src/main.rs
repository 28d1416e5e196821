//! `cargo run --release -p locality-demo`: the demo of ha-core's locality, failover and DNS
//! handling against a lab started in-process. See the crate's README.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use locality_demo::{JsonOut, Options, Phase};

/// HTTP downstreams in three IDCs, followed through drain, death, DNS failure and poisoning.
///
/// Starts DNS for regions north and south and six /who backends (two per IDC bj-a, bj-b, sh-a,
/// each behind a fault proxy), writes a topology TOML, builds the client from it (Failover over
/// LocalityBalance over hyper, local IDC bj-a), drives a steady load through the phases and
/// prints a table with PASS/FAIL per phase. Exits 1 when a phase failed.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Phases to run, in order, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = Phase::ALL.to_vec())]
    phases: Vec<Phase>,
    /// Seconds per phase, at least 2 (blackhole and the DNS phases run at least 3s, recovery at
    /// least 7s; the table shows what each ran).
    #[arg(long, default_value_t = 5.0)]
    seconds_per_phase: f64,
    /// Write the table as JSON to this file (opened at start: a path that cannot be written
    /// fails before the run).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Calls per second.
    #[arg(long, default_value_t = 300)]
    rate: u32,
    /// Added to every lab port (DNS 15353, backends 18080, proxies 18081).
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
    /// Directory for topology.toml, kept after the run (default: a new directory under the temp
    /// dir, removed at exit).
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    // Logs only when asked for (RUST_LOG=info shows ha-core's events); the table says the rest.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            // Colours only on a terminal, never in a file or a pipe.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let cli = Cli::parse();
    // Opened now, so that a path that cannot be written fails before the run, not after it.
    let json = match cli.json.as_deref().map(JsonOut::create).transpose() {
        Ok(json) => json,
        Err(e) => {
            eprintln!("locality-demo: --json: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = Options {
        phases: cli.phases,
        seconds_per_phase: cli.seconds_per_phase,
        rate: cli.rate,
        port_offset: cli.port_offset,
        config_dir: cli.config_dir,
        progress: !cli.quiet,
        ..Options::default()
    };
    // On Ctrl-C the run's future is dropped: the lab stops and the temporary directory goes
    // (their Drops), and an unwritten --json file is removed.
    let report = tokio::select! {
        r = locality_demo::run(opts) => match r {
            Ok(r) => r,
            Err(e) => {
                eprintln!("locality-demo: {e}");
                return ExitCode::from(2);
            }
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("locality-demo: interrupted");
            return ExitCode::from(130);
        }
    };
    #[allow(clippy::print_stdout)]
    {
        println!(
            "\nlocality-demo, {}; topology: {}{}\n",
            report.started_at,
            report.config.display(),
            if report.config_kept {
                ""
            } else {
                " (removed at exit; --config-dir DIR keeps it)"
            }
        );
        print!("{}", report.table());
        println!(
            "\n{}",
            if report.pass {
                "ALL PHASES PASSED"
            } else {
                "SOME PHASES FAILED"
            }
        );
    }
    if let Some(json) = json {
        let path = json.path().display().to_string();
        if let Err(e) = json.write(&report) {
            eprintln!("locality-demo: cannot write --json {path}: {e}");
            return ExitCode::from(2);
        }
    }
    if report.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
