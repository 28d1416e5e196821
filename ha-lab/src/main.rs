//! `ha-lab`: start, inspect, break and stop the lab from a shell. See the crate README.
#![forbid(unsafe_code)]
// Printing the summary and status tables is this binary's job.
#![allow(clippy::print_stdout)]

use std::{
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::Duration,
};

use clap::{Parser, Subcommand};
use ha_lab::{
    Lab, LabError, LabOptions,
    control::{ControlRequest, FaultAction, request},
    lab::{DaemonState, Manifest, probe},
    partition,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Real servers and faults for the ha-* crates.
#[derive(Parser, Debug)]
#[command(name = "ha-lab", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start the lab as a detached daemon and wait until every server answers.
    Up {
        /// Lab directory (lab.json, control socket, logs).
        #[arg(long)]
        dir: PathBuf,
        /// Added to every default port (to run beside another lab).
        #[arg(long, default_value_t = 0)]
        port_offset: u16,
        /// Bound on waiting for the lab to be up, in seconds.
        #[arg(long, default_value_t = 20)]
        timeout_secs: u64,
    },
    /// Run the lab in the foreground (what `up` spawns).
    Serve {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// Added to every default port.
        #[arg(long, default_value_t = 0)]
        port_offset: u16,
    },
    /// Show every server of the lab and whether it answers (exit 1 if any is down).
    Status {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Stop the lab daemon and remove the lab's nftables table (halab_<port offset>).
    Down {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Apply a fault: kill|freeze|thaw|restart|blackhole|heal <target>, latency <MS> <target>
    /// (a request/response round trip through the proxy gains MS: MS/2 each way),
    /// partition <idc>, heal <idc>.
    Fault {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// The fault and its arguments.
        #[arg(required = true, num_args = 1..)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: never in daemon.log (the daemon's stderr) or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ha-lab: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.cmd)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ha-lab: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Result<ExitCode, LabError> {
    match cmd {
        Cmd::Up {
            dir,
            port_offset,
            timeout_secs,
        } => up(&dir, port_offset, Duration::from_secs(timeout_secs)).await,
        Cmd::Serve { dir, port_offset } => serve(dir, port_offset).await,
        Cmd::Status { dir } => status(&dir).await,
        Cmd::Down { dir } => down(&dir).await,
        Cmd::Fault { dir, args } => fault(&dir, &args).await,
    }
}

fn absolute(dir: &Path) -> Result<PathBuf, LabError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| LabError::io(format!("create {}", dir.display()), e))?;
    std::fs::canonicalize(dir).map_err(|e| LabError::io(format!("resolve {}", dir.display()), e))
}

async fn up(dir: &Path, port_offset: u16, wait: Duration) -> Result<ExitCode, LabError> {
    let dir = absolute(dir)?;
    // Refused here, not in the daemon's log: the offset must leave every port below 65536.
    LabOptions::new(&dir).with_port_offset(port_offset)?;
    if let Ok(m) = Manifest::read(&dir)
        && m.daemon_state() == DaemonState::Running
    {
        return Err(LabError::Control(format!(
            "a lab is already running in {} (pid {}); run `ha-lab down --dir {}` first",
            dir.display(),
            m.daemon_pid,
            dir.display()
        )));
    }
    let _ = std::fs::remove_file(Manifest::path(&dir));
    let exe = std::env::current_exe().map_err(|e| LabError::io("find own executable", e))?;
    let log_path = dir.join("daemon.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| LabError::io(format!("create {}", log_path.display()), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| LabError::io(format!("open {}", log_path.display()), e))?;
    // Its own process group: a Ctrl-C in the shell that ran `up` does not reach the daemon.
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(exe)
        .arg("serve")
        .arg("--dir")
        .arg(&dir)
        .arg("--port-offset")
        .arg(port_offset.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0)
        .spawn()
        .map_err(|source| LabError::Spawn {
            name: "daemon".into(),
            program: "ha-lab serve".into(),
            source,
        })?;
    let pid = child.id();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(LabError::Control(format!(
                "the lab daemon exited with {status}; its log ({}):\n{}",
                log_path.display(),
                tail.lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            )));
        }
        if let Ok(m) = Manifest::read(&dir)
            && m.daemon_pid == pid
        {
            let mut all = true;
            for s in &m.servers {
                if !probe(s, Duration::from_millis(500)).await {
                    all = false;
                    break;
                }
            }
            if all {
                println!("lab up in {} (daemon pid {pid})", dir.display());
                print_table(&m, None);
                return Ok(ExitCode::SUCCESS);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            return Err(LabError::Control(format!(
                "the lab was not up within {wait:?}; see {}",
                log_path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn serve(dir: PathBuf, port_offset: u16) -> Result<ExitCode, LabError> {
    let dir = absolute(&dir)?;
    let options = LabOptions::new(&dir).with_port_offset(port_offset)?;
    let lab = Lab::start(options).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| LabError::io("install SIGTERM handler", e))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| LabError::io("install SIGINT handler", e))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
        _ = lab.shutdown_requested() => tracing::info!("shutdown requested"),
    }
    lab.stop().await;
    Ok(ExitCode::SUCCESS)
}

fn print_table(m: &Manifest, states: Option<&[bool]>) {
    println!(
        "{:<16} {:<8} {:<7} {:<6} {:<22} {:<9} {:>8}{}",
        "NAME",
        "KIND",
        "REGION",
        "IDC",
        "ADDRESS",
        "ROLE",
        "PID",
        if states.is_some() { "  STATE" } else { "" }
    );
    for (i, s) in m.servers.iter().enumerate() {
        let state = match states {
            Some(st) => {
                if st.get(i).copied().unwrap_or(false) {
                    "  up"
                } else {
                    "  DOWN"
                }
            }
            None => "",
        };
        println!(
            "{:<16} {:<8} {:<7} {:<6} {:<22} {:<9} {:>8}{}",
            s.name,
            s.kind.to_string(),
            s.region,
            s.idc,
            s.address.to_string(),
            s.role,
            s.pid,
            state
        );
    }
    println!("control: {}", m.control.display());
}

async fn status(dir: &Path) -> Result<ExitCode, LabError> {
    let m = Manifest::read(dir)?;
    let daemon = m.daemon_state() == DaemonState::Running;
    println!(
        "daemon pid {}: {}",
        m.daemon_pid,
        if daemon { "running" } else { "NOT RUNNING" }
    );
    let states =
        futures::future::join_all(m.servers.iter().map(|s| probe(s, Duration::from_secs(1)))).await;
    print_table(&m, Some(&states));
    Ok(if daemon && states.iter().all(|s| *s) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Waits (bounded) until the daemon of `m` no longer runs (gone, or its pid reused).
async fn wait_gone(m: &Manifest, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    while m.daemon_state() == DaemonState::Running {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Sends `signal` to the daemon of `m`, after checking (again) that its pid is still the
/// daemon's: a pid is only ever signalled while it is ours.
fn signal_daemon(m: &Manifest, signal: Signal) {
    if m.daemon_state() != DaemonState::Running {
        return;
    }
    if let Ok(raw) = i32::try_from(m.daemon_pid) {
        let _ = kill(Pid::from_raw(raw), signal);
    }
}

async fn down(dir: &Path) -> Result<ExitCode, LabError> {
    let m = match Manifest::read(dir) {
        Ok(m) => m,
        Err(e) => {
            println!("no running lab in {} ({e})", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
    };
    let pid = m.daemon_pid;
    match m.daemon_state() {
        DaemonState::Running => {
            if let Err(e) = request(
                &m.control,
                &ControlRequest::Shutdown,
                Duration::from_secs(3),
            )
            .await
            {
                tracing::warn!(error = %e, "control shutdown failed; signalling the daemon");
            }
            if !wait_gone(&m, Duration::from_secs(10)).await {
                signal_daemon(&m, Signal::SIGTERM);
                if !wait_gone(&m, Duration::from_secs(5)).await {
                    signal_daemon(&m, Signal::SIGKILL);
                    if !wait_gone(&m, Duration::from_secs(2)).await {
                        return Err(LabError::Control(format!(
                            "daemon pid {pid} survived SIGKILL"
                        )));
                    }
                }
            }
        }
        DaemonState::Gone => println!("the daemon (pid {pid}) is already gone"),
        DaemonState::Replaced { reason } => {
            println!("pid {pid} is no longer this lab's daemon ({reason}): not signalled")
        }
        state => println!("daemon pid {pid}: {state:?}: not signalled"),
    }
    if partition::nft_available() {
        // This lab's own table only: another lab's partitions stay.
        let scope = m.partition_scope();
        if let Err(e) = scope.heal_all() {
            eprintln!("ha-lab: heal table {}: {e}", scope.table());
        }
    }
    let _ = std::fs::remove_file(&m.control);
    let _ = std::fs::remove_file(Manifest::path(dir));
    println!("lab in {} stopped", dir.display());
    Ok(ExitCode::SUCCESS)
}

async fn fault(dir: &Path, args: &[String]) -> Result<ExitCode, LabError> {
    let m = Manifest::read(dir)?;
    let usage = || {
        LabError::Control(
            "usage: fault <kill|freeze|thaw|restart|blackhole|heal> <target> | latency <MS per round trip> <target> | partition <idc> | heal <idc>"
                .into(),
        )
    };
    let idc_names = || {
        m.idcs
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (action, target) = match args {
        [verb, idc] if verb == "partition" => {
            let me = m.idcs.iter().find(|i| i.name == *idc).ok_or_else(|| {
                LabError::Control(format!("unknown idc {idc:?} (known: {})", idc_names()))
            })?;
            let others: Vec<_> = m
                .idcs
                .iter()
                .filter(|i| i.name != *idc)
                .map(|i| i.cidr)
                .collect();
            let scope = m.partition_scope();
            scope.partition(me.cidr, &others)?;
            println!(
                "partitioned {} ({}) from the other IDCs (this lab's ports only, nft table {})",
                me.name,
                me.cidr,
                scope.table()
            );
            return Ok(ExitCode::SUCCESS);
        }
        [verb, idc] if verb == "heal" && m.idcs.iter().any(|i| i.name == *idc) => {
            if let Some(me) = m.idcs.iter().find(|i| i.name == *idc) {
                m.partition_scope().heal(me.cidr)?;
                println!("healed {} ({})", me.name, me.cidr);
            }
            return Ok(ExitCode::SUCCESS);
        }
        [verb, ms, target] if verb == "latency" => {
            let ms: u64 = ms.parse().map_err(|_| {
                LabError::Control(format!("latency wants milliseconds, got {ms:?}"))
            })?;
            (FaultAction::RoundTripLatency { ms }, target)
        }
        [verb, target] => {
            let action = match verb.as_str() {
                "kill" => FaultAction::Kill,
                "freeze" => FaultAction::Freeze,
                "thaw" => FaultAction::Thaw,
                "restart" => FaultAction::Restart,
                "blackhole" => FaultAction::Blackhole,
                "heal" => FaultAction::Heal,
                _ => return Err(usage()),
            };
            (action, target)
        }
        _ => return Err(usage()),
    };
    // Check the name here too, so a typo is reported even when the daemon is gone.
    m.server(target)?;
    request(
        &m.control,
        &ControlRequest::Fault {
            target: target.clone(),
            action,
        },
        Duration::from_secs(10),
    )
    .await?;
    println!("{action} applied to {target}");
    Ok(ExitCode::SUCCESS)
}
