//! `cargo run --release -p locality-demo`: the demo of ha-core's locality, failover and DNS
//! handling against a lab started in-process. See the crate's README.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use locality_demo::{Options, Phase};

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
    /// Seconds per phase (recovery runs at least 7s, a few others at least 2-3s).
    #[arg(long, default_value_t = 5.0)]
    seconds_per_phase: f64,
    /// Write the table as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Calls per second.
    #[arg(long, default_value_t = 300)]
    rate: u32,
    /// Added to every lab port (DNS 15353, backends 18080, proxies 18081).
    #[arg(long, default_value_t = 0)]
    port_offset: u16,
    /// Directory for topology.toml (default: a new directory under the temp dir).
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
    let opts = Options {
        phases: cli.phases,
        seconds_per_phase: cli.seconds_per_phase,
        rate: cli.rate,
        port_offset: cli.port_offset,
        config_dir: cli.config_dir,
        progress: !cli.quiet,
        ..Options::default()
    };
    let report = match locality_demo::run(opts).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("locality-demo: {e}");
            return ExitCode::from(2);
        }
    };
    #[allow(clippy::print_stdout)]
    {
        println!(
            "\nlocality-demo, {}; topology: {}\n",
            report.started_at,
            report.config.display()
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
    if let Some(path) = cli.json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(&path, text + "\n"));
        if let Err(e) = written {
            eprintln!("locality-demo: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if report.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
