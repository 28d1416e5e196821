//! `membership-service serve --config FILE [--listen ADDR]`: the example membership service.
//! `membership-service demo [--json FILE] [--phase-secs N]`: the service under faults against
//! the lab stack started in this process and the instances as child processes, measured (see
//! `membership_service::demo`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use membership_service::{Service, ServiceConfig};

/// The example membership service.
#[derive(Parser, Debug)]
#[command(name = "membership-service", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the HTTP API.
    Serve {
        /// The configuration (topology + `[app]`).
        #[arg(long)]
        config: PathBuf,
        /// Listen here instead of `[app] listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Start the lab stack in this process and two instances (bj-a, sh-a) as child processes
    /// placed in their IDCs, drive a load through Redis, MySQL and RocketMQ faults, a drain, a
    /// rate-limit flood, a partition of bj-a and the kill of the job's lease holder, and print
    /// PASS/FAIL per phase. Exits 1 when a phase failed, 2 when the demo could not run. Logs: RUST_LOG
    /// (default `error`, without the RocketMQ client's).
    Demo {
        /// Also write the table as JSON to this file (opened at start).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Seconds of load per phase (the fault's own time comes on top), at least 3.
        #[arg(long, default_value_t = 6.0)]
        phase_secs: f64,
        /// Phases to run, in order, comma-separated (default: all).
        #[arg(long, value_delimiter = ',', value_enum, default_values_t = membership_service::demo::Phase::ALL.to_vec())]
        phases: Vec<membership_service::demo::Phase>,
        /// Steady workers calling the bj-a instance (each about 30 calls/s).
        #[arg(long, default_value_t = 6)]
        workers: usize,
        /// Steady workers calling the sh-a instance.
        #[arg(long, default_value_t = 2)]
        workers_sh: usize,
        /// Bound on waiting, after the last phase, for every acknowledged version to show in
        /// /members/{id}/history.
        #[arg(long, default_value_t = 30.0)]
        history_secs: f64,
        /// Start only the bj-a instance (no sh-a instance, no sh-a workers).
        #[arg(long)]
        no_sh_a: bool,
        /// Kept for old scripts: both instances always run as child processes now.
        #[arg(long, hide = true)]
        sh_a_process: bool,
    },
}

async fn terminate() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => tracing::info!("SIGTERM: shutting down"),
        r = tokio::signal::ctrl_c() => {
            if r.is_ok() { tracing::info!("interrupted: shutting down") }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's own lines say what happens; the services' logs only when asked for.
    let default_filter = match cli.cmd {
        // The RocketMQ client logs every failed pull as an error: the demo's faults cause them.
        Cmd::Demo { .. } => "error,rocketmq_client_rust=off,rocketmq_transport=off",
        Cmd::Serve { .. } => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Demo {
            json,
            phase_secs,
            phases,
            workers,
            workers_sh,
            history_secs,
            no_sh_a,
            sh_a_process,
        } => {
            demo(
                json,
                membership_service::demo::Options {
                    phases,
                    phase_secs,
                    workers_bj: workers,
                    workers_sh,
                    history_wait: std::time::Duration::from_secs_f64(
                        history_secs.clamp(0.0, 3600.0),
                    ),
                    with_sh: !no_sh_a,
                    sh_process: sh_a_process,
                },
            )
            .await
        }
        Cmd::Serve { config, listen } => {
            let cfg = match ServiceConfig::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("membership-service: {e}");
                    return ExitCode::from(2);
                }
            };
            let prometheus =
                match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
                    Ok(h) => Some(h),
                    Err(e) => {
                        eprintln!("membership-service: metrics disabled: {e}");
                        None
                    }
                };
            let service = match Service::start(cfg, prometheus).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("membership-service: {e}");
                    return ExitCode::from(1);
                }
            };
            let listener = match service.bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("membership-service: {e}");
                    return ExitCode::from(1);
                }
            };
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "serving");
            }
            match service.serve(listener, terminate()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("membership-service: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `membership-service demo`.
async fn demo(json: Option<PathBuf>, opts: membership_service::demo::Options) -> ExitCode {
    use membership_service::demo::JsonOut;
    let json = match json.as_deref().map(JsonOut::create).transpose() {
        Ok(j) => j,
        Err(e) => {
            eprintln!("membership-service demo: --json: {e}");
            return ExitCode::from(2);
        }
    };
    // On Ctrl-C the run is dropped: the services' tasks end with the process and the stack's
    // servers are killed by its Drop.
    let report = tokio::select! {
        r = Box::pin(membership_service::demo::run(opts)) => match r {
            Ok(r) => r,
            Err(e) => {
                eprintln!("membership-service demo: {e}");
                return ExitCode::from(2);
            }
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("membership-service demo: interrupted");
            return ExitCode::from(130);
        }
    };
    #[allow(clippy::print_stdout)]
    {
        println!(
            "\nmembership-service demo, {}: stack up in {:.1} s, services in {:.1} s, history \
             consumer's first record {}, {:.0} s per phase\n",
            report.started_at,
            report.stack_startup_secs,
            report.services_startup_secs,
            report
                .consumer_warmup_secs
                .map(|s| format!("{s:.1} s after a first write"))
                .unwrap_or_else(|| "never seen".into()),
            report.phase_secs
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
            eprintln!("membership-service demo: cannot write --json {path}: {e}");
            return ExitCode::from(2);
        }
    }
    if report.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
