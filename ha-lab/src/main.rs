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
    control::{ControlRequest, FaultAction, StackFault, request},
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
        /// Added to every default port (to run beside another lab; not with --stack, whose
        /// ports are picked free).
        #[arg(long, default_value_t = 0, conflicts_with = "stack")]
        port_offset: u16,
        /// Bound on waiting for the lab to be up, in seconds (default 20, with --stack 120).
        #[arg(long)]
        timeout_secs: Option<u64>,
        /// Run the membership service's stack instead of the default lab: Redis + Sentinel,
        /// MariaDB with its HA simulator, RocketMQ; writes DIR/membership-service.toml (bj-a)
        /// and DIR/membership-service-sh-a.toml (sh-a). Needs the `mariadb` feature.
        #[arg(long)]
        stack: bool,
        /// With --stack: the admin token written into the service configs.
        #[arg(long, default_value = "lab-admin-token", requires = "stack")]
        admin_token: String,
        /// With --stack: without RocketMQ (the service configs have no [dependencies.events]).
        #[arg(long, requires = "stack")]
        no_mq: bool,
    },
    /// Run the lab in the foreground (what `up` spawns).
    Serve {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// Added to every default port.
        #[arg(long, default_value_t = 0, conflicts_with = "stack")]
        port_offset: u16,
        /// Run the stack (see `up --stack`).
        #[arg(long)]
        stack: bool,
        /// With --stack: the admin token written into the service configs.
        #[arg(long, default_value = "lab-admin-token", requires = "stack")]
        admin_token: String,
        /// With --stack: without RocketMQ (the service configs have no [dependencies.events]).
        #[arg(long, requires = "stack")]
        no_mq: bool,
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
    /// partition <idc>, heal <idc>. On a stack (`up --stack`) also: kill redis-master,
    /// failover redis, kill mysql-primary, switchover mysql, kill|restart mq-broker@<idc>,
    /// kill|freeze|thaw redis-master|mysql-primary|mq-broker@<idc>|mq-namesrv@<idc>, and by IDC
    /// kill|freeze|thaw|restart redis@<idc>|sentinel@<idc> (a Redis node restarts as a replica
    /// of the current master), kill|freeze|thaw mysql@<idc>; there, partition|heal <idc> cut
    /// the IDC across Redis, MariaDB (the HA simulator promotes outside it) and RocketMQ, the
    /// processes placed in its cgroup (`place`, `run`) included, held by the daemon.
    Fault {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// The fault and its arguments.
        #[arg(required = true, num_args = 1..)]
        args: Vec<String>,
    },
    /// On a stack (`up --stack`): move a running process into an IDC's cgroup, so that
    /// `fault partition <idc>` cuts its new connections as it cuts the IDC's servers.
    Place {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// The IDC (bj-a, bj-b, sh-a).
        #[arg(long)]
        idc: String,
        /// The process.
        #[arg(long)]
        pid: u32,
    },
    /// On a stack (`up --stack`): run a command placed in an IDC's cgroup (this process moves
    /// in, then executes the command in its place), e.g. `ha-lab run --dir lab --idc bj-a --
    /// membership-service serve --config lab/membership-service.toml`.
    Run {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// The IDC (bj-a, bj-b, sh-a).
        #[arg(long)]
        idc: String,
        /// The command and its arguments.
        #[arg(required = true, last = true, num_args = 1..)]
        command: Vec<String>,
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
            stack,
            admin_token,
            no_mq,
        } => {
            let wait = Duration::from_secs(timeout_secs.unwrap_or(if stack { 120 } else { 20 }));
            let stack = stack.then_some(StackArgs { admin_token, no_mq });
            up(&dir, port_offset, wait, stack.as_ref()).await
        }
        Cmd::Serve {
            dir,
            port_offset,
            stack: false,
            ..
        } => serve(dir, port_offset).await,
        Cmd::Serve {
            dir,
            stack: true,
            admin_token,
            no_mq,
            ..
        } => serve_stack(dir, StackArgs { admin_token, no_mq }).await,
        Cmd::Status { dir } => status(&dir).await,
        Cmd::Down { dir } => down(&dir).await,
        Cmd::Fault { dir, args } => fault(&dir, &args).await,
        Cmd::Place { dir, idc, pid } => {
            println!("{}", place(&dir, &idc, pid).await?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run { dir, idc, command } => {
            place(&dir, &idc, std::process::id()).await?;
            let (prog, args) = command
                .split_first()
                .ok_or_else(|| LabError::Control("run: no command given".into()))?;
            use std::os::unix::process::CommandExt;
            // Returns only when the command could not be executed.
            let e = std::process::Command::new(prog).args(args).exec();
            Err(LabError::io(format!("run {prog}"), e))
        }
    }
}

fn absolute(dir: &Path) -> Result<PathBuf, LabError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| LabError::io(format!("create {}", dir.display()), e))?;
    std::fs::canonicalize(dir).map_err(|e| LabError::io(format!("resolve {}", dir.display()), e))
}

/// Asks the stack daemon of `dir` to move `pid` into `idc`'s cgroup.
async fn place(dir: &Path, idc: &str, pid: u32) -> Result<String, LabError> {
    let m = Manifest::read(dir)?;
    if !m.stack {
        return Err(LabError::Control(format!(
            "the lab in {} is not a stack: placing a process into an IDC needs `ha-lab up --stack`",
            dir.display()
        )));
    }
    if !m.idcs.iter().any(|i| i.name == idc) {
        return Err(LabError::Control(format!(
            "unknown idc {idc:?} (known: {})",
            m.idcs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let fault = StackFault::Place {
        idc: idc.to_owned(),
        pid,
    };
    stack_request(&m, fault, Duration::from_secs(10)).await
}

/// Sends `fault` to the stack daemon of `m`; what happened, in one line.
async fn stack_request(
    m: &Manifest,
    fault: StackFault,
    bound: Duration,
) -> Result<String, LabError> {
    let resp = request(
        &m.control,
        &ControlRequest::Stack {
            fault: fault.clone(),
        },
        bound,
    )
    .await?;
    Ok(resp.detail.unwrap_or_else(|| format!("{fault} applied")))
}

/// The two service configurations a stack daemon writes into its directory.
fn service_configs(dir: &Path) -> [PathBuf; 2] {
    [
        dir.join("membership-service.toml"),
        dir.join("membership-service-sh-a.toml"),
    ]
}

/// The options of `--stack`.
#[derive(Debug)]
struct StackArgs {
    admin_token: String,
    no_mq: bool,
}

/// `up`; `stack` is given with `--stack`.
async fn up(
    dir: &Path,
    port_offset: u16,
    wait: Duration,
    stack: Option<&StackArgs>,
) -> Result<ExitCode, LabError> {
    if stack.is_some() && !cfg!(feature = "mariadb") {
        return Err(no_stack());
    }
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
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve").arg("--dir").arg(&dir);
    match stack {
        Some(s) => {
            cmd.arg("--stack").arg("--admin-token").arg(&s.admin_token);
            if s.no_mq {
                cmd.arg("--no-mq");
            }
        }
        None => {
            cmd.arg("--port-offset").arg(port_offset.to_string());
        }
    }
    let mut child = cmd
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
                let what = if stack.is_some() { "stack" } else { "lab" };
                println!("{what} up in {} (daemon pid {pid})", dir.display());
                print_table(&m, None);
                if stack.is_some() {
                    print_service_configs(&dir);
                }
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

fn no_stack() -> LabError {
    LabError::Control(
        "this ha-lab was built without the `mariadb` feature, which the stack needs: \
         cargo run -p ha-lab --features mariadb -- up --dir DIR --stack"
            .into(),
    )
}

fn print_service_configs(dir: &Path) {
    for p in service_configs(dir) {
        if p.exists() {
            println!("service config: {}", p.display());
        }
    }
}

#[cfg(not(feature = "mariadb"))]
async fn serve_stack(_dir: PathBuf, _args: StackArgs) -> Result<ExitCode, LabError> {
    Err(no_stack())
}

/// `serve --stack`: the stack, its service configs, its control socket and `lab.json`, until
/// SIGTERM, SIGINT or a shutdown request.
#[cfg(feature = "mariadb")]
async fn serve_stack(dir: PathBuf, args: StackArgs) -> Result<ExitCode, LabError> {
    use ha_lab::stack::{Stack, StackControl, StackOptions};
    use std::sync::Arc;
    let dir = absolute(&dir)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| LabError::io("install SIGTERM handler", e))?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| LabError::io("install SIGINT handler", e))?;
    // A signal during the start drops it: the servers started so far are killed by pid.
    let stack = tokio::select! {
        r = Stack::start(StackOptions::default().with_dir(&dir).with_mq(!args.no_mq)) => Arc::new(r?),
        _ = term.recv() => return Ok(ExitCode::FAILURE),
        _ = int.recv() => return Ok(ExitCode::FAILURE),
    };
    let t = stack.startup();
    tracing::info!(total = ?t.total, redis = ?t.redis, mariadb = ?t.mariadb, rocketmq = ?t.rocketmq, "stack up");
    for p in stack.write_service_configs(&dir, &args.admin_token)? {
        tracing::info!(path = %p.display(), "service config written");
    }
    let control = StackControl::start(stack.clone(), &dir).await?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
        _ = control.shutdown_requested() => tracing::info!("shutdown requested"),
    }
    control.stop().await;
    // The control connections' tasks hold the stack until the runtime dropped them.
    let mut stack = stack;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match Arc::try_unwrap(stack) {
            Ok(s) => {
                s.stop().await;
                break;
            }
            Err(shared) if tokio::time::Instant::now() < deadline => {
                stack = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                // Dropped at the end: every server is SIGKILLed by pid without waiting.
                tracing::warn!("the stack is still in use; killing its servers");
                break;
            }
        }
    }
    tracing::info!(dir = %dir.display(), "stack stopped");
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
    print_service_configs(dir);
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
            // A stack's stop is bounded by 30 s (ha_lab::stack::STOP_TIMEOUT); a lab's is quick.
            if !wait_gone(&m, Duration::from_secs(35)).await {
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
            "usage: fault <kill|freeze|thaw|restart|blackhole|heal> <target> | latency <MS per round trip> <target> | partition <idc> | heal <idc>; \
             on a stack also: kill redis-master | failover redis | kill mysql-primary | switchover mysql | kill|restart mq-broker@<idc>; \
             kill|freeze|thaw|restart redis@<idc> | sentinel@<idc>, kill|freeze|thaw mysql@<idc>"
                .into(),
        )
    };
    // `redis@<idc>`, `sentinel@<idc>`, `mysql@<idc>`: that IDC's server of a stack, by name.
    let args: Vec<String> = match args.split_last() {
        Some((last, rest)) => {
            let mut v = rest.to_vec();
            v.push(
                m.by_idc(last)
                    .map_or_else(|| last.clone(), |s| s.name.clone()),
            );
            v
        }
        None => Vec::new(),
    };
    let args = args.as_slice();
    // A stack fault by role (`kill redis-master`, `failover redis`, ...); a server of lab.json
    // by its name takes the generic path below, which a stack daemon serves too.
    if let [verb, target] = args
        && m.server(target).is_err()
        && let Some(fault) = StackFault::parse(verb, target)
    {
        println!(
            "{}",
            stack_request(&m, fault, Duration::from_secs(90)).await?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let idc_names = || {
        m.idcs
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    // A stack partitions by IDC across its labs, its cgroups included, and holds the
    // partition in its daemon until the heal.
    if m.stack
        && let [verb, idc] = args
        && (verb == "partition" || verb == "heal")
        && m.idcs.iter().any(|i| i.name == *idc)
    {
        let fault = if verb == "partition" {
            StackFault::Partition { idc: idc.clone() }
        } else {
            StackFault::Heal { idc: idc.clone() }
        };
        println!(
            "{}",
            stack_request(&m, fault, Duration::from_secs(90)).await?
        );
        return Ok(ExitCode::SUCCESS);
    }
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
    let resp = request(
        &m.control,
        &ControlRequest::Fault {
            target: target.clone(),
            action,
        },
        // A stack restarts a broker or a sentinel and waits until it is back.
        Duration::from_secs(60),
    )
    .await?;
    match resp.detail {
        Some(detail) => println!("{detail}"),
        None => println!("{action} applied to {target}"),
    }
    Ok(ExitCode::SUCCESS)
}
