//! `membership-service serve --config FILE [--listen ADDR]`: the example membership service.
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
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
