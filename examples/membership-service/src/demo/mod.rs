//! `membership-service demo`: the service under faults, measured.
//!
//! Starts the lab stack in-process (Redis + Sentinel, MariaDB with its HA simulator, one
//! RocketMQ cluster per IDC; `ha_lab::stack`), starts the service twice as child processes
//! (`membership-service serve`, this executable: bj-a on `127.0.1.100`, sh-a on
//! `127.0.3.100`, ephemeral ports), each placed in its IDC's cgroup before it connects
//! ([`Stack::place`]: the child is a shell that waits for one line on stdin and then `exec`s
//! the service, and the demo writes that line only once the pid is in the cgroup), so that a
//! partition of an IDC cuts its instance too. This process (the load, the HA simulator, the
//! checks) stays in no IDC: it reaches both instances over HTTP throughout (their listen ports
//! are no lab ports). It drives a steady mixed load (see [`load`]) against both, mostly bj-a,
//! and runs the phases in order, each a few seconds of load around one fault:
//!
//! | phase | fault |
//! |---|---|
//! | `baseline` | none |
//! | `kill-redis-master` | SIGKILL of the Redis master; Sentinel fails over (the old master comes back as a replica after the phase) |
//! | `redis-failover` | a planned `SENTINEL FAILOVER` |
//! | `kill-mysql-primary` | SIGKILL of the MariaDB primary; the HA simulator promotes a replica and repoints DNS |
//! | `mysql-switchover` | a planned switchover to the other running replica |
//! | `kill-broker` | SIGKILL of bj-a's RocketMQ broker, restarted a third of a phase later |
//! | `drain` | `POST /admin/drain {"idc":"bj-a"}` on the bj-a instance, undrained a third of a phase later |
//! | `rate-limit-flood` | many unpaced calls from one client address: expect 429 with `Retry-After` |
//! | `partition-bj-a` | bj-a cut off for [`PARTITION_HOLD`] in the whole stack ([`Stack::partition`]: its Redis node and sentinel, its MariaDB node, its RocketMQ servers, and the bj-a instance); healed, then the stack must settle ([`Stack::settle`]) and both instances be ready |
//! | `kill-lease-holder` | SIGKILL of the instance holding the job's lease (found through `/topology`); the other must hold it within the lease time + [`TAKEOVER_MARGIN`]; the killed one is restarted (same configuration and address) and must be ready |
//!
//! Per phase it counts calls, errors by kind (and per instance), the longest error window
//! ([`report`]), latency, read-your-writes violations, and, when the phase's load stopped,
//! reads back every id acknowledged in the phase (its version must be at least the
//! acknowledged one: else a lost write). After the last phase it looks for every acknowledged
//! `(id, version)` in `/members/{id}/history` (written by the service's RocketMQ consumer)
//! for at most `--history-secs` (default [`HISTORY_WAIT`]). A phase passes with no violation,
//! no lost write, no missing event, at least one acknowledged write and its fault applied (for
//! `partition-bj-a`: cut, healed, settled, both ready; for `kill-lease-holder`: the take-over
//! within its bound and the restart ready); the baseline also with no error; the flood with
//! 429s seen, each with `Retry-After`, and no 5xx. Errors are counted, not judged, in the other
//! phases: calls to a killed instance fail until its restart, and the cut-off bj-a instance
//! answers 503 to what it cannot make durable.
//!
//! Before the first phase a warm-up write waits (at most [`WARMUP_WAIT`]) until the history
//! consumer recorded it: the consumer takes about 20 s after a start to get its queues, which
//! would otherwise be the first phases' event lag. The event lag itself is sampled per phase
//! ([`probe`]) and shown, not judged.
//!
//! Everything started is stopped at the end, also on error: the services get SIGTERM (and
//! SIGKILL when they do not exit within 30 s), then the stack stops.

pub mod client;
pub mod load;
pub mod probe;
pub mod progress;
pub mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ha_lab::LabError;
use ha_lab::stack::{Stack, StackOptions, Switch};
use tokio::time::{Instant, sleep};

use crate::demo::client::DemoClient;
use crate::demo::load::{FloodResult, Load, WorkerSpec, worker_id};
use crate::demo::probe::{ProbeTx, Prober};
use crate::demo::progress::{PhaseLine, Progress};
use crate::demo::report::{PhaseRow, Report, utc_now};
use crate::{ServiceConfig, StartError};

/// The admin token of the demo's instances.
pub const TOKEN: &str = "demo-admin-token-0123456789";
/// The default bound on waiting for every acknowledged version to show in `/history`.
pub const HISTORY_WAIT: Duration = Duration::from_secs(30);
/// Bound on the warm-up: the history consumer's first record.
pub const WARMUP_WAIT: Duration = Duration::from_secs(90);
/// The flood runs at least its share of the phase, and on until it saw a 429, at most this.
pub const FLOOD_MAX: Duration = Duration::from_secs(20);
/// Bound on reading back one acknowledged id at a phase's end (errors are retried until then).
pub const VERIFY_WAIT: Duration = Duration::from_secs(15);
/// Bound on the stack's start.
pub const STACK_START_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on one instance's start.
pub const SERVICE_START_TIMEOUT: Duration = Duration::from_secs(60);
/// The shortest `--phase-secs`.
pub const MIN_PHASE_SECS: f64 = 3.0;
/// Concurrent callers of the flood.
pub const FLOOD_TASKS: usize = 48;
/// The flood's client address (its own per-client bucket, apart from the steady load's).
pub const FLOOD_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 77));
/// How long `partition-bj-a` keeps bj-a cut off.
pub const PARTITION_HOLD: Duration = Duration::from_secs(8);
/// Bound on the stack settling after the heal (Redis stable, MariaDB replicas caught up,
/// brokers registered), and on each instance being ready again.
pub const SETTLE_WAIT: Duration = Duration::from_secs(45);
/// Added to the lease time to bound the take-over (the survivor tries every third of the
/// lease time and its `/topology` view refreshes every job interval, 1 s).
pub const TAKEOVER_MARGIN: Duration = Duration::from_secs(3);

/// One phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No fault.
    Baseline,
    /// SIGKILL of the Redis master.
    KillRedisMaster,
    /// A planned Sentinel failover.
    RedisFailover,
    /// SIGKILL of the MariaDB primary.
    KillMysqlPrimary,
    /// A planned MariaDB switchover.
    MysqlSwitchover,
    /// SIGKILL of bj-a's broker, then its restart.
    KillBroker,
    /// Drain bj-a through the admin route, then undrain.
    Drain,
    /// Flood the per-client rate limit.
    RateLimitFlood,
    /// Cut bj-a off (Redis, MariaDB, RocketMQ, and the bj-a instance with them) for
    /// [`PARTITION_HOLD`], then heal and wait until the stack settled.
    #[value(name = "partition-bj-a")]
    #[serde(rename = "partition-bj-a")]
    PartitionBjA,
    /// SIGKILL of the instance holding the job's lease; the other takes it over; the killed
    /// one is restarted.
    KillLeaseHolder,
}

impl Phase {
    /// Every phase, in the demo's order.
    pub const ALL: [Phase; 10] = [
        Phase::Baseline,
        Phase::KillRedisMaster,
        Phase::RedisFailover,
        Phase::KillMysqlPrimary,
        Phase::MysqlSwitchover,
        Phase::KillBroker,
        Phase::Drain,
        Phase::RateLimitFlood,
        Phase::PartitionBjA,
        Phase::KillLeaseHolder,
    ];

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Baseline => "baseline",
            Phase::KillRedisMaster => "kill-redis-master",
            Phase::RedisFailover => "redis-failover",
            Phase::KillMysqlPrimary => "kill-mysql-primary",
            Phase::MysqlSwitchover => "mysql-switchover",
            Phase::KillBroker => "kill-broker",
            Phase::Drain => "drain",
            Phase::RateLimitFlood => "rate-limit-flood",
            Phase::PartitionBjA => "partition-bj-a",
            Phase::KillLeaseHolder => "kill-lease-holder",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The phases, in order.
    pub phases: Vec<Phase>,
    /// Seconds of load per phase (the fault's own time comes on top).
    pub phase_secs: f64,
    /// Steady workers calling the bj-a instance.
    pub workers_bj: usize,
    /// Steady workers calling the sh-a instance.
    pub workers_sh: usize,
    /// Bound on the history check after the last phase.
    pub history_wait: Duration,
    /// Start the sh-a instance too (default true).
    pub with_sh: bool,
    /// Ignored: both instances always run as child processes now (the partition and the
    /// lease holder's kill need them); kept for `--sh-a-process`.
    pub sh_process: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            phases: Phase::ALL.to_vec(),
            phase_secs: 6.0,
            workers_bj: 6,
            workers_sh: 2,
            history_wait: HISTORY_WAIT,
            with_sh: true,
            sh_process: false,
        }
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The lab stack did not start.
    #[error("the lab stack did not start: {0}")]
    Stack(#[source] LabError),
    /// The lab stack did not start in time.
    #[error("the lab stack did not start within {0:?}")]
    StackTimeout(Duration),
    /// The configuration the lab wrote was refused.
    #[error("the {idc} service configuration: {source}")]
    Config {
        /// The instance's IDC.
        idc: &'static str,
        /// Why.
        source: ha_core::ConfigError,
    },
    /// An instance did not start.
    #[error("the {idc} service did not start: {source}")]
    Service {
        /// The instance's IDC.
        idc: &'static str,
        /// Why.
        source: StartError,
    },
    /// An instance did not start in time.
    #[error("the {idc} service did not start within {timeout:?}")]
    ServiceTimeout {
        /// The instance's IDC.
        idc: &'static str,
        /// The bound.
        timeout: Duration,
    },
    /// The options.
    #[error("{0}")]
    Options(String),
    /// A service child process.
    #[error("{0}")]
    Process(String),
}

/// A `--json` file, opened at the start so that a bad path fails before the run.
#[derive(Debug)]
pub struct JsonOut {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonOut {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> std::io::Result<JsonOut> {
        Ok(JsonOut {
            path: path.to_path_buf(),
            file: std::fs::File::create(path)?,
        })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the report.
    pub fn write(self, report: &Report) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut w = std::io::BufWriter::new(self.file);
        serde_json::to_writer_pretty(&mut w, report).map_err(std::io::Error::other)?;
        w.write_all(b"\n")?;
        w.flush()
    }
}

/// A service instance: `membership-service serve` (this executable) as a child process with
/// the lab's configuration for its IDC, placed in the IDC's cgroup before it connects.
struct Instance {
    idc: &'static str,
    /// Where it serves (kept across restarts: `--listen` with the first start's port).
    addr: SocketAddr,
    /// Its configuration file (the same for every start).
    config: PathBuf,
    /// Its temporary directory (configuration, `service.log`).
    dir: PathBuf,
    /// The running process (`None` after a kill, until the restart).
    child: Option<tokio::process::Child>,
    /// `Err` when the process could not be placed in its IDC's cgroup (a partition does not
    /// cut it then).
    placed: Result<(), String>,
}

/// The shell line that waits for one line on stdin, then becomes the service (`exec`: same
/// pid, same cgroup): the demo moves the pid into the IDC's cgroup before it writes that line,
/// so every socket of the service is opened inside the IDC.
const WAIT_THEN_EXEC: &str = "read -r go && exec \"$0\" \"$@\"";

impl Instance {
    /// Writes the lab's configuration for `idc` (listening on `ip`, any port) and starts the
    /// process.
    async fn start(stack: &Stack, idc: &'static str, ip: Ipv4Addr) -> Result<Instance, DemoError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            DemoError::Process(format!("the {idc} service process: {what}: {e}"))
        };
        let dir =
            std::env::temp_dir().join(format!("membership-demo-{}-{idc}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| fail("temporary directory", &e))?;
        let config = dir.join("service.toml");
        let listen = SocketAddr::new(IpAddr::V4(ip), 0);
        std::fs::write(&config, stack.service_config(idc, listen, TOKEN))
            .map_err(|e| fail("write its configuration", &e))?;
        let mut inst = Instance {
            idc,
            addr: listen,
            config,
            dir,
            child: None,
            placed: Ok(()),
        };
        inst.spawn(stack, None).await?;
        Ok(inst)
    }

    /// The job's lease time in its configuration.
    fn lease_ttl(&self) -> Result<Duration, String> {
        let text = std::fs::read_to_string(&self.config)
            .map_err(|e| format!("read {}: {e}", self.config.display()))?;
        ServiceConfig::from_toml_str(&text, self.config.display().to_string())
            .map(|c| c.lease_ttl)
            .map_err(|e| e.to_string())
    }

    /// Starts the process (`listen`: the address to serve on, else the configuration's),
    /// places it in its IDC's cgroup, lets it go on, and waits until it serves.
    async fn spawn(&mut self, stack: &Stack, listen: Option<SocketAddr>) -> Result<(), DemoError> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let idc = self.idc;
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            DemoError::Process(format!("the {idc} service process: {what}: {e}"))
        };
        let exe = std::env::current_exe().map_err(|e| fail("this executable", &e))?;
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(WAIT_THEN_EXEC)
            .arg(exe)
            .arg("serve")
            .arg("--config")
            .arg(&self.config);
        if let Some(l) = listen {
            cmd.arg("--listen").arg(l.to_string());
        }
        let mut child = cmd
            .env("RUST_LOG", "info,rocketmq_client_rust=off")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail("spawn", &e))?;
        // Into the IDC before the service exists: the shell waits for its line.
        self.placed = match child.id() {
            Some(pid) => stack.place(idc, pid).map_err(|e| e.to_string()),
            None => Err("the process has no pid".into()),
        };
        if let Err(e) = &self.placed {
            tracing::warn!(idc, error = %e, "the service process is in no IDC cgroup");
        }
        let Some(mut stdin) = child.stdin.take() else {
            return Err(fail("stdin", &"not piped"));
        };
        stdin
            .write_all(b"go\n")
            .await
            .map_err(|e| fail("write its go line", &e))?;
        drop(stdin);
        let Some(stderr) = child.stderr.take() else {
            return Err(fail("stderr", &"not piped"));
        };
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let ip = self.addr.ip();
        let needle = format!("{ip}:");
        let mut early = Vec::new();
        let found = tokio::time::timeout(SERVICE_START_TIMEOUT, async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.contains("serving")
                    && let Some(pos) = l.find(&needle)
                {
                    let port: String = l[pos + needle.len()..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    if let Ok(port) = port.parse::<u16>() {
                        early.push(l);
                        return Some(port);
                    }
                }
                early.push(l);
            }
            None
        })
        .await;
        let port = match found {
            Ok(Some(p)) => p,
            Ok(None) => {
                let tail: Vec<&String> = early.iter().rev().take(5).collect();
                return Err(fail("exited before serving", &format!("{tail:?}")));
            }
            Err(_) => {
                return Err(DemoError::ServiceTimeout {
                    idc,
                    timeout: SERVICE_START_TIMEOUT,
                });
            }
        };
        let log = self.dir.join("service.log");
        tokio::spawn(async move {
            let Ok(mut f) = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .await
            else {
                return;
            };
            for l in early {
                let _ = f.write_all(format!("{l}\n").as_bytes()).await;
            }
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = f.write_all(format!("{l}\n").as_bytes()).await;
            }
            let _ = f.flush().await;
        });
        self.addr = SocketAddr::new(ip, port);
        self.child = Some(child);
        Ok(())
    }

    /// The running process's pid.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    /// SIGKILL, reaped.
    async fn kill(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Err(format!("the {} instance is not running", self.idc));
        };
        child
            .kill()
            .await
            .map_err(|e| format!("SIGKILL the {} instance: {e}", self.idc))
    }

    /// Starts it again with the same configuration on the same address.
    async fn restart(&mut self, stack: &Stack) -> Result<(), DemoError> {
        if self.child.is_some() {
            let _ = self.kill().await;
        }
        let addr = self.addr;
        self.spawn(stack, Some(addr)).await
    }

    /// Graceful shutdown (SIGTERM, bounded); a problem is returned as a note. The directory
    /// (configuration and log) is removed after a clean exit unless `keep`.
    async fn shutdown(self, keep: bool) -> Option<String> {
        let idc = self.idc;
        let dir = self.dir;
        let Some(mut child) = self.child else {
            return Some(format!(
                "the {idc} service process was not running at the end (log: {})",
                dir.join("service.log").display()
            ));
        };
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(nix::unistd::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let note = match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(Ok(st)) if st.success() => None,
            Ok(Ok(st)) => Some(format!(
                "the {idc} service process exited with {st} (log: {})",
                dir.join("service.log").display()
            )),
            Ok(Err(e)) => Some(format!("the {idc} service process: {e}")),
            Err(_) => {
                let _ = child.kill().await;
                Some(format!(
                    "the {idc} service process did not stop within 30 s of SIGTERM: killed"
                ))
            }
        };
        if keep {
            return Some(note.map_or_else(
                || {
                    format!(
                        "the {idc} service's log is kept: {}",
                        dir.join("service.log").display()
                    )
                },
                |n| format!("{n}; its log is kept"),
            ));
        }
        if note.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        note
    }
}

/// What the phases share.
struct Env<'a> {
    stack: &'a Stack,
    bj: SocketAddr,
    /// The sh-a instance, when started.
    sh: Option<SocketAddr>,
    /// The instances (bj-a first), for the faults that kill and restart one.
    instances: tokio::sync::Mutex<Vec<Instance>>,
    workers: Vec<WorkerSpec>,
    checker: DemoClient,
    probe: ProbeTx,
    phase_secs: f64,
    history_wait: Duration,
    progress: Progress,
}

/// Starts everything, runs the phases, stops everything; the report (its `pass` says whether
/// every phase passed).
pub async fn run(opts: Options) -> Result<Report, DemoError> {
    if !(opts.phase_secs >= MIN_PHASE_SECS && opts.phase_secs <= 600.0) {
        return Err(DemoError::Options(format!(
            "--phase-secs must be {MIN_PHASE_SECS} to 600, not {}",
            opts.phase_secs
        )));
    }
    if opts.workers_bj == 0 {
        return Err(DemoError::Options("--workers must be at least 1".into()));
    }
    let progress = Progress::detect();
    let started_at = utc_now();
    progress.info(
        "starting the lab stack (Redis + Sentinel, MariaDB + HA simulator, RocketMQ per IDC)...",
    );
    let begin = Instant::now();
    let stack = match tokio::time::timeout(
        STACK_START_TIMEOUT,
        Stack::start(StackOptions::default()),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(DemoError::Stack(e)),
        Err(_) => return Err(DemoError::StackTimeout(STACK_START_TIMEOUT)),
    };
    let stack_secs = begin.elapsed().as_secs_f64();
    let t = stack.startup();
    progress.info(&format!(
        "stack up in {:.1} s (redis {:.1} s, mariadb {:.1} s, rocketmq {})",
        stack_secs,
        t.redis.as_secs_f64(),
        t.mariadb.as_secs_f64(),
        t.rocketmq
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or_else(|| "not started".into()),
    ));
    let result = with_stack(&stack, &opts, progress, started_at, stack_secs).await;
    progress.info("stopping the lab stack...");
    stack.stop().await;
    result
}

async fn with_stack(
    stack: &Stack,
    opts: &Options,
    progress: Progress,
    started_at: String,
    stack_secs: f64,
) -> Result<Report, DemoError> {
    let begin = Instant::now();
    let bj_ip = Ipv4Addr::new(127, 0, 1, 100);
    let sh_ip = Ipv4Addr::new(127, 0, 3, 100);
    let (bj, sh) = tokio::join!(Instance::start(stack, "bj-a", bj_ip), async {
        if opts.with_sh {
            Some(Instance::start(stack, "sh-a", sh_ip).await)
        } else {
            None
        }
    });
    let (bj, sh) = match (bj, sh.transpose()) {
        (Ok(bj), Ok(sh)) => (bj, sh),
        (bj, sh) => {
            let mut first = None;
            for r in [bj.map(Some), sh] {
                match r {
                    Ok(Some(i)) => {
                        if let Some(n) = i.shutdown(false).await {
                            progress.info(&n);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
            return Err(first.unwrap_or_else(|| DemoError::Process("an instance failed".into())));
        }
    };
    let services_secs = begin.elapsed().as_secs_f64();
    for i in std::iter::once(&bj).chain(sh.as_ref()) {
        let pid = i.pid().map(|p| p.to_string()).unwrap_or_else(|| "?".into());
        match &i.placed {
            Ok(()) => progress.info(&format!(
                "the {} instance (pid {pid}) is in {}'s cgroup, placed before it connected",
                i.idc, i.idc
            )),
            Err(e) => progress.info(&format!(
                "the {} instance (pid {pid}) is in no IDC cgroup: {e}; a partition will not cut it",
                i.idc
            )),
        }
    }
    progress.info(&format!(
        "services up in {services_secs:.1} s: bj-a on {}, sh-a on {}",
        bj.addr,
        sh.as_ref()
            .map(|s| s.addr.to_string())
            .unwrap_or_else(|| "(not started)".into())
    ));
    // Clients in their instance's IDC, each IDC's workers from one address.
    let bj_client = DemoClient::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, 10)), 64);
    let sh_client = DemoClient::new(IpAddr::V4(Ipv4Addr::new(127, 0, 3, 10)), 64);
    let mut workers = Vec::new();
    for i in 0..opts.workers_bj {
        workers.push(WorkerSpec {
            index: i,
            instance: "bj-a",
            addr: bj.addr,
            client: bj_client.clone(),
        });
    }
    let workers_sh = if sh.is_some() { opts.workers_sh } else { 0 };
    for (i, addr) in (0..workers_sh).zip(sh.iter().map(|s| s.addr).cycle()) {
        workers.push(WorkerSpec {
            index: opts.workers_bj + i,
            instance: "sh-a",
            addr,
            client: sh_client.clone(),
        });
    }
    let warmup = warm_up(&bj_client, bj.addr, &progress).await;
    let prober = Prober::start(
        DemoClient::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, 12)), 32),
        bj.addr,
    );
    let env = Env {
        stack,
        bj: bj.addr,
        sh: sh.as_ref().map(|s| s.addr),
        instances: tokio::sync::Mutex::new(std::iter::once(bj).chain(sh).collect()),
        workers,
        checker: DemoClient::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, 11)), 32),
        probe: prober.tx(),
        phase_secs: opts.phase_secs,
        history_wait: opts.history_wait,
        progress,
    };
    let mut report = Report {
        started_at,
        stack_startup_secs: stack_secs,
        services_startup_secs: services_secs,
        phase_secs: opts.phase_secs,
        workers: BTreeMap::from([
            ("bj-a".to_string(), opts.workers_bj),
            ("sh-a".to_string(), workers_sh),
        ]),
        history_wait_secs: 0.0,
        consumer_warmup_secs: warmup,
        history_bound_secs: opts.history_wait.as_secs_f64(),
        rows: Vec::new(),
        notes: Vec::new(),
        pass: false,
    };
    run_phases(&env, prober, &opts.phases, &mut report).await;
    progress.info("stopping the services...");
    // A failed phase keeps the services' logs for the evidence (and `HA_LAB_KEEP`, as the
    // labs do).
    let keep = report.rows.iter().any(|r| !r.pass) || std::env::var_os("HA_LAB_KEEP").is_some();
    for inst in env.instances.into_inner() {
        if let Some(n) = inst.shutdown(keep).await {
            report.notes.push(n);
        }
    }
    report.pass = !report.rows.is_empty() && report.rows.iter().all(|r| r.pass);
    Ok(report)
}

/// Writes one member through bj-a and waits (at most [`WARMUP_WAIT`]) until its version is in
/// `/history`: the history consumer takes a while to get its queues after a start, which
/// would otherwise show as the first phases' event lag. Returns the seconds waited, `None`
/// when not seen.
async fn warm_up(client: &DemoClient, addr: SocketAddr, progress: &Progress) -> Option<f64> {
    let line = progress.phase("warm-up");
    let begin = Instant::now();
    let id = load::ID_BASE - 1;
    let path = format!("/members/{id}");
    let body = serde_json::json!({
        "name": "demo warm-up",
        "level": "basic",
        "expires_at": "2030-01-01T00:00:00Z",
    });
    let live = load::Live::default();
    let mut version = None;
    while version.is_none() && begin.elapsed() < WARMUP_WAIT {
        match client.put_json(addr, &path, &body).await {
            Ok(a) if a.status == 200 => version = a.version(),
            _ => sleep(Duration::from_millis(200)).await,
        }
    }
    let Some(v) = version else {
        line.note("the warm-up write was not acknowledged");
        line.done();
        return None;
    };
    let history = format!("{path}/history");
    while begin.elapsed() < WARMUP_WAIT {
        if let Ok(a) = client.get(addr, &history).await
            && a.status == 200
            && a.json().is_some_and(|j| {
                j.get("versions")
                    .and_then(serde_json::Value::as_array)
                    .is_some_and(|l| l.iter().any(|x| x.as_u64() == Some(v)))
            })
        {
            let secs = begin.elapsed().as_secs_f64();
            line.note(&format!(
                "the history consumer recorded a first write {secs:.1} s after it was sent"
            ));
            line.done();
            return Some(secs);
        }
        line.update(begin.elapsed(), "waiting for the history consumer", &live);
        sleep(Duration::from_millis(200)).await;
    }
    line.note(&format!(
        "the history consumer recorded nothing within {:.0} s; the phases go on",
        WARMUP_WAIT.as_secs_f64()
    ));
    line.done();
    None
}

/// Every acknowledged write of the run: `(id, version) -> phase index`.
type Acked = BTreeMap<(u64, u64), usize>;

async fn run_phases(env: &Env<'_>, prober: Prober, phases: &[Phase], report: &mut Report) {
    let mut acked: Acked = BTreeMap::new();
    for (i, &phase) in phases.iter().enumerate() {
        let (row, writes) = run_phase(env, phase, i as u64).await;
        for (id, v, _) in writes {
            acked.entry((id, v)).or_insert(i);
        }
        report.rows.push(row);
    }
    // The history, for every acknowledged (id, version).
    let line = env.progress.phase("history");
    let begin = Instant::now();
    let (history, lags) = tokio::join!(history_check(env, &acked, &line), prober.finish());
    let missing = &history.missing;
    report.history_wait_secs = begin.elapsed().as_secs_f64();
    // Evidence for a missing version: which MariaDB node has its history row, if any.
    let on_nodes = if missing.is_empty() {
        None
    } else {
        let text = history_rows_on_nodes(env.stack, missing).await;
        line.note(&text);
        report.notes.push(text.clone());
        Some(text)
    };
    for (i, row) in report.rows.iter_mut().enumerate() {
        let checked = acked.values().filter(|p| **p == i).count() as u64;
        let miss: Vec<(u64, u64)> = missing
            .iter()
            .filter(|k| acked.get(k) == Some(&i))
            .copied()
            .collect();
        row.events_checked = checked;
        row.events_missing = miss.len() as u64;
        row.history_complete_secs = history.complete_at.get(&i).copied();
        row.set_lags(lags.get(&i).map(Vec::as_slice).unwrap_or_default());
        row.check(
            miss.is_empty(),
            format!(
                "0 acknowledged versions missing from /history within {:.0} s: {} of {checked}{}",
                env.history_wait.as_secs_f64(),
                miss.len(),
                sample_pairs(&miss)
            ),
        );
        if !miss.is_empty()
            && let Some(t) = &on_nodes
        {
            row.notes.push(t.clone());
        }
        row.settle();
    }
    line.note(&format!(
        "{} acknowledged versions, {} missing after {:.1} s ({} rounds of reads); complete per phase after: {}",
        acked.len(),
        missing.len(),
        report.history_wait_secs,
        history.rounds,
        report
            .rows
            .iter()
            .map(|r| format!(
                "{} {}",
                r.phase,
                r.history_complete_secs
                    .map(|s| format!("{s:.1} s"))
                    .unwrap_or_else(|| "never".into())
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    line.done();
}

/// Looks up the `member_history` rows of `missing` on every running MariaDB node (admin
/// connections, never cut): where, if anywhere, the history consumer's write went.
async fn history_rows_on_nodes(stack: &Stack, missing: &BTreeSet<(u64, u64)>) -> String {
    use ha_mysql::mysql_async::prelude::Queryable;
    let ids: BTreeSet<u64> = missing.iter().map(|(id, _)| *id).collect();
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let query = format!(
        "SELECT id, version FROM {}.member_history WHERE id IN ({list})",
        ha_lab::stack::SERVICE_DATABASE
    );
    let primary = stack.mariadb().primary().name;
    let mut parts = Vec::new();
    for n in stack.mariadb().nodes() {
        if stack.mariadb().pid(&n.name).is_none() {
            parts.push(format!("{} down", n.name));
            continue;
        }
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = stack
                .mariadb()
                .admin_conn(n)
                .await
                .map_err(|e| e.to_string())?;
            let rows: Vec<(u64, u64)> = c.query(&query).await.map_err(|e| e.to_string())?;
            let _ = c.disconnect().await;
            Ok::<_, String>(rows)
        })
        .await;
        let role = if n.name == primary { " (primary)" } else { "" };
        match got {
            Ok(Ok(rows)) => {
                let have: Vec<String> = rows
                    .into_iter()
                    .filter(|p| missing.contains(p))
                    .map(|(id, v)| format!("{id} v{v}"))
                    .collect();
                parts.push(format!(
                    "{}{role} has {} of them{}",
                    n.name,
                    have.len(),
                    if have.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", have.join(", "))
                    }
                ));
            }
            Ok(Err(e)) => parts.push(format!("{}{role}: {e}", n.name)),
            Err(_) => parts.push(format!("{}{role}: no answer within 5 s", n.name)),
        }
    }
    format!(
        "the {} versions missing from /history, looked up on every MariaDB node: {}",
        missing.len(),
        parts.join("; ")
    )
}

fn sample_pairs(pairs: &[(u64, u64)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let list: Vec<String> = pairs
        .iter()
        .take(5)
        .map(|(id, v)| format!("{id} v{v}"))
        .collect();
    format!(" (e.g. {})", list.join(", "))
}

/// Waits until every acknowledged version is in its id's `/history`, at most
/// `env.history_wait`; returns those still missing.
async fn history_check(env: &Env<'_>, acked: &Acked, line: &PhaseLine) -> HistoryResult {
    let mut missing: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for &(id, v) in acked.keys() {
        missing.entry(id).or_default().insert(v);
    }
    let begin = Instant::now();
    let deadline = begin + env.history_wait;
    let live = load::Live::default();
    let mut complete_at: BTreeMap<usize, f64> = BTreeMap::new();
    let mut rounds = 0u64;
    loop {
        let ids: Vec<u64> = missing.keys().copied().collect();
        let answers: Vec<(u64, Option<Vec<u64>>)> = futures::stream::iter(ids)
            .map(|id| async move {
                let got = env
                    .checker
                    .get(env.bj, &format!("/members/{id}/history"))
                    .await;
                let versions = match got {
                    Ok(a) if a.status == 200 => a.json().and_then(|v| {
                        v.get("versions")?
                            .as_array()
                            .map(|l| l.iter().filter_map(serde_json::Value::as_u64).collect())
                    }),
                    _ => None,
                };
                (id, versions)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for (id, versions) in answers {
            if let (Some(seen), Some(want)) = (versions, missing.get_mut(&id)) {
                for v in seen {
                    want.remove(&v);
                }
                if want.is_empty() {
                    missing.remove(&id);
                }
            }
        }
        rounds += 1;
        let now = begin.elapsed().as_secs_f64();
        let mut open: BTreeSet<usize> = BTreeSet::new();
        for (id, vs) in &missing {
            for v in vs {
                if let Some(p) = acked.get(&(*id, *v)) {
                    open.insert(*p);
                }
            }
        }
        for p in acked.values() {
            if !open.contains(p) {
                complete_at.entry(*p).or_insert(now);
            }
        }
        let left: usize = missing.values().map(BTreeSet::len).sum();
        tracing::debug!(
            round = rounds,
            at = now,
            left,
            ids = missing.len(),
            sample = ?missing.iter().take(3).collect::<Vec<_>>(),
            "history check"
        );
        line.update(
            env.history_wait
                .saturating_sub(deadline.saturating_duration_since(Instant::now())),
            &format!("{left} versions not yet in /history"),
            &live,
        );
        if missing.is_empty() || Instant::now() >= deadline {
            break;
        }
        sleep(Duration::from_millis(500)).await;
    }
    HistoryResult {
        missing: missing
            .into_iter()
            .flat_map(|(id, vs)| vs.into_iter().map(move |v| (id, v)))
            .collect(),
        complete_at,
        rounds,
    }
}

/// What the history check found.
struct HistoryResult {
    /// The acknowledged `(id, version)` pairs still missing at the end.
    missing: BTreeSet<(u64, u64)>,
    /// Per phase index, seconds from the check's start until every version of the phase was
    /// seen (absent: never).
    complete_at: BTreeMap<usize, f64>,
    /// Rounds of reads.
    rounds: u64,
}

/// What a phase's fault step reported.
#[derive(Default)]
struct FaultLog {
    lines: Vec<String>,
    errors: Vec<String>,
    flood: Option<FloodResult>,
    admin_failures: Vec<String>,
    switch: Option<Switch>,
    /// `kill-lease-holder`: from the SIGKILL to the survivor's `/topology` saying it holds
    /// the lease.
    takeover: Option<Duration>,
    /// The instance a fault killed (its errors do not count against the phase).
    killed: Option<&'static str>,
    /// `partition-bj-a`: when the cut began and when it was healed.
    cut: Option<(Instant, Instant)>,
}

impl FaultLog {
    fn ok(&mut self, line: &PhaseLine, text: String) {
        line.note(&text);
        self.lines.push(text);
    }

    fn err(&mut self, line: &PhaseLine, text: String) {
        line.note(&format!("FAILED: {text}"));
        self.errors.push(text);
    }
}

fn secs(d: f64) -> Duration {
    Duration::from_secs_f64(d.max(0.0))
}

/// Applies the phase's fault while the load runs (`lead` seconds of load before it, the rest
/// of the phase after it).
async fn fault(env: &Env<'_>, phase: Phase, line: &PhaseLine, log: &mut FaultLog) {
    let lead = env.phase_secs / 3.0;
    let tail = env.phase_secs - lead;
    sleep(secs(lead)).await;
    let begin = Instant::now();
    let stack = env.stack;
    match phase {
        Phase::Baseline => {}
        Phase::KillRedisMaster => match stack.kill_redis_master().await {
            Ok(s) => {
                log.ok(line, format!("killed: {s}"));
                log.switch = Some(s);
            }
            Err(e) => log.err(line, format!("kill the redis master: {e}")),
        },
        Phase::RedisFailover => match stack.redis_failover().await {
            Ok(s) => log.ok(line, format!("failover: {s}")),
            Err(e) => log.err(line, format!("sentinel failover: {e}")),
        },
        Phase::KillMysqlPrimary => match stack.kill_mysql_primary().await {
            Ok(s) => log.ok(
                line,
                format!("killed: {s} (from the first missed heartbeat)"),
            ),
            Err(e) => log.err(line, format!("kill the mysql primary: {e}")),
        },
        Phase::MysqlSwitchover => match stack.mysql_switchover().await {
            Ok(s) => log.ok(line, format!("switchover: {s}")),
            Err(e) => log.err(line, format!("mysql switchover: {e}")),
        },
        Phase::KillBroker => {
            match stack.kill_broker("bj-a").await {
                Ok(()) => log.ok(line, "killed the bj-a broker".into()),
                Err(e) => log.err(line, format!("kill the bj-a broker: {e}")),
            }
            sleep(secs(lead)).await;
            let t = Instant::now();
            match stack.restart_broker("bj-a").await {
                Ok(pid) => log.ok(
                    line,
                    format!(
                        "bj-a broker restarted (pid {pid}), registered in {:.2} s, {:.2} s after the kill",
                        t.elapsed().as_secs_f64(),
                        begin.elapsed().as_secs_f64()
                    ),
                ),
                Err(e) => log.err(line, format!("restart the bj-a broker: {e}")),
            }
        }
        Phase::Drain => {
            admin(env, "/admin/drain", line, log).await;
            sleep(secs(lead)).await;
            admin(env, "/admin/undrain", line, log).await;
        }
        Phase::PartitionBjA => partition_bj_a(env, line, log).await,
        Phase::KillLeaseHolder => kill_lease_holder(env, line, log).await,
        Phase::RateLimitFlood => {
            let client = DemoClient::new(FLOOD_CLIENT, FLOOD_TASKS);
            let path = format!("/members/{}", worker_id(0, 0));
            let length = secs(tail - 1.0);
            let r = load::flood(
                client,
                env.bj,
                path,
                FLOOD_TASKS,
                length,
                FLOOD_MAX,
                Arc::new(load::Live::default()),
            )
            .await;
            log.ok(
                line,
                format!(
                    "flood from {FLOOD_CLIENT}: {} calls in {:.1} s ({:.0}/s), {} x 429 ({} with Retry-After, e.g. {:?}), statuses {:?}, transport errors {:?}",
                    r.requests,
                    r.seconds,
                    r.requests as f64 / r.seconds.max(0.001),
                    r.rejected(),
                    r.retry_after_on_429,
                    r.retry_after_sample.as_deref().unwrap_or("-"),
                    r.statuses,
                    r.transport
                ),
            );
            log.flood = Some(r);
            sleep(secs(1.0)).await;
            return;
        }
    }
    sleep(secs(tail)).await;
}

/// The expiry job as one instance's `/topology` shows it.
#[derive(Debug, Clone, Default)]
struct JobSeen {
    holder: Option<String>,
    token: Option<u64>,
    held_here: bool,
}

async fn job_seen(env: &Env<'_>, addr: SocketAddr) -> Result<JobSeen, String> {
    let a = env.checker.get(addr, "/topology").await?;
    if a.status != 200 {
        return Err(a.error_kind());
    }
    let j = a.json().ok_or_else(|| "/topology: not JSON".to_string())?;
    let job = &j["job"];
    Ok(JobSeen {
        holder: job["holder"].as_str().map(str::to_owned),
        token: job["token"].as_u64(),
        held_here: job["held_here"].as_bool().unwrap_or(false),
    })
}

/// Polls `GET /readyz` on `addr` until it answers 200, at most `bound`: the time it took.
async fn wait_ready(env: &Env<'_>, addr: SocketAddr, bound: Duration) -> Result<Duration, String> {
    let begin = Instant::now();
    loop {
        let why = match env.checker.get(addr, "/readyz").await {
            Ok(a) if a.status == 200 => return Ok(begin.elapsed()),
            Ok(a) => format!("{} {}", a.status, String::from_utf8_lossy(&a.body)),
            Err(kind) => kind,
        };
        if begin.elapsed() >= bound {
            return Err(format!(
                "{addr} not ready within {:.0} s: {why}",
                bound.as_secs_f64()
            ));
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// `partition-bj-a`: checks that both instances are in their IDC's cgroup, cuts bj-a off in
/// the whole stack for [`PARTITION_HOLD`] (the load goes on against both instances), heals,
/// and waits until the stack settled and both instances are ready.
async fn partition_bj_a(env: &Env<'_>, line: &PhaseLine, log: &mut FaultLog) {
    let stack = env.stack;
    {
        let insts = env.instances.lock().await;
        for i in insts.iter() {
            let pid = i.pid();
            match (&i.placed, pid) {
                (Ok(()), Some(pid)) if stack.placed(i.idc).contains(&pid) => {}
                (Err(e), _) => {
                    log.err(
                        line,
                        format!("the {} instance is in no IDC cgroup: {e}", i.idc),
                    );
                    return;
                }
                _ => {
                    log.err(
                        line,
                        format!(
                            "the {} instance (pid {pid:?}) is not in {}'s cgroup",
                            i.idc, i.idc
                        ),
                    );
                    return;
                }
            }
        }
    }
    let redis_before = stack.redis().master().await.ok();
    let mysql_before = stack.mariadb().primary().name;
    let ha_seen = stack.mariadb().ha_events().len();
    let t = Instant::now();
    let cut_began = Instant::now();
    let cut = match stack.partition("bj-a") {
        Ok(c) => c,
        Err(e) => {
            log.err(line, format!("partition bj-a: {e}"));
            return;
        }
    };
    log.ok(
        line,
        format!(
            "bj-a cut off in {:.1} ms (its Redis node and sentinel, MariaDB node, RocketMQ name server and broker, and the bj-a instance's process) for {:.0} s; redis master was {}, mysql primary {mysql_before}",
            t.elapsed().as_secs_f64() * 1000.0,
            PARTITION_HOLD.as_secs_f64(),
            redis_before
                .and_then(|a| stack.redis().node_at(a).map(|n| n.name.clone()))
                .unwrap_or_else(|| "?".into()),
        ),
    );
    sleep(PARTITION_HOLD).await;
    let switches: Vec<String> = stack.mariadb().ha_events()[ha_seen..]
        .iter()
        .map(|e| {
            format!(
                "{} -> {} in {:.2} s",
                e.from,
                e.to,
                e.repointed_after().as_secs_f64()
            )
        })
        .collect();
    let healed = cut.heal().await;
    log.cut = Some((cut_began, Instant::now()));
    match healed {
        Ok(h) => log.ok(
            line,
            format!(
                "healed after {:.1} s; the HA's mysql switches during the cut: [{}]; fenced on heal: [{}]",
                h.lasted.as_secs_f64(),
                switches.join(", "),
                h.mysql_fenced.join(", ")
            ),
        ),
        Err(e) => log.err(line, format!("heal bj-a: {e}")),
    }
    match stack.settle(SETTLE_WAIT).await {
        Ok(s) => {
            let name = stack
                .redis()
                .node_at(s.redis_master)
                .map(|n| n.name.clone())
                .unwrap_or_else(|| s.redis_master.to_string());
            log.ok(line, format!("settled: {s} (redis master {name})"));
        }
        Err(e) => log.err(line, format!("the stack did not settle: {e}")),
    }
    for (idc, addr) in std::iter::once(("bj-a", env.bj)).chain(env.sh.map(|a| ("sh-a", a))) {
        match wait_ready(env, addr, SETTLE_WAIT).await {
            Ok(d) => log.ok(
                line,
                format!(
                    "the {idc} instance ready {:.2} s after the settle",
                    d.as_secs_f64()
                ),
            ),
            Err(e) => log.err(line, format!("the {idc} instance: {e}")),
        }
    }
}

/// `kill-lease-holder`: finds the job's lease holder through `/topology`, SIGKILLs its
/// process, waits (bounded by the lease time + [`TAKEOVER_MARGIN`]) until the other instance's
/// `/topology` says it holds the lease, then restarts the killed one (same configuration and
/// address) and waits until it is ready.
async fn kill_lease_holder(env: &Env<'_>, line: &PhaseLine, log: &mut FaultLog) {
    let mut insts = env.instances.lock().await;
    if insts.len() < 2 {
        log.err(line, "needs both instances (not with --no-sh-a)".into());
        return;
    }
    let ttl = match insts[0].lease_ttl() {
        Ok(t) => t,
        Err(e) => {
            log.err(line, format!("the lease time: {e}"));
            return;
        }
    };
    // Who holds it now (one instance says so; bounded: a lease free a moment ago is taken
    // within a renewal).
    let deadline = Instant::now() + ttl * 2 + TAKEOVER_MARGIN;
    let mut last = String::new();
    let holder = loop {
        let mut found = None;
        for (i, inst) in insts.iter().enumerate() {
            match job_seen(env, inst.addr).await {
                Ok(j) if j.held_here => {
                    found = Some((i, j));
                    break;
                }
                Ok(j) => last = format!("{}: holder {:?}", inst.idc, j.holder),
                Err(e) => last = format!("{}: {e}", inst.idc),
            }
        }
        if found.is_some() || Instant::now() >= deadline {
            break found;
        }
        sleep(Duration::from_millis(100)).await;
    };
    let Some((hi, held)) = holder else {
        log.err(
            line,
            format!(
                "no instance held the job's lease within {:.0} s ({last})",
                (ttl * 2 + TAKEOVER_MARGIN).as_secs_f64()
            ),
        );
        return;
    };
    let si = usize::from(hi == 0);
    let (holder_idc, survivor_idc, survivor_addr) = (insts[hi].idc, insts[si].idc, insts[si].addr);
    let pid = insts[hi]
        .pid()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "?".into());
    let begin = Instant::now();
    if let Err(e) = insts[hi].kill().await {
        log.err(line, e);
        return;
    }
    log.killed = Some(holder_idc);
    log.ok(
        line,
        format!(
            "SIGKILL of the {holder_idc} instance (pid {pid}), the lease holder ({} token {})",
            held.holder.as_deref().unwrap_or("?"),
            held.token
                .map(|t| t.to_string())
                .unwrap_or_else(|| "?".into())
        ),
    );
    let bound = ttl + TAKEOVER_MARGIN;
    let took = loop {
        if let Ok(j) = job_seen(env, survivor_addr).await
            && j.held_here
        {
            break Some((begin.elapsed(), j));
        }
        if begin.elapsed() >= bound {
            break None;
        }
        sleep(Duration::from_millis(100)).await;
    };
    match took {
        Some((d, j)) => {
            log.takeover = Some(d);
            log.ok(
                line,
                format!(
                    "takeover: {survivor_idc} holds the lease {:.2} s after the kill (token {} after {}; bound: lease {:.0} s + {:.0} s; seen through its /topology, refreshed every job interval)",
                    d.as_secs_f64(),
                    j.token.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
                    held.token.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
                    ttl.as_secs_f64(),
                    TAKEOVER_MARGIN.as_secs_f64()
                ),
            );
        }
        None => log.err(
            line,
            format!(
                "{survivor_idc} did not take the lease over within {:.0} s of the kill",
                bound.as_secs_f64()
            ),
        ),
    }
    let t = Instant::now();
    match insts[hi].restart(env.stack).await {
        Ok(()) => {
            let addr = insts[hi].addr;
            let placed = match &insts[hi].placed {
                Ok(()) => format!("in {holder_idc}'s cgroup"),
                Err(e) => format!("in no IDC cgroup: {e}"),
            };
            match wait_ready(env, addr, SERVICE_START_TIMEOUT).await {
                Ok(_) => log.ok(
                    line,
                    format!(
                        "{holder_idc} instance restarted (pid {}, same configuration, {addr}, {placed}), ready {:.2} s after the restart, {:.2} s after the kill",
                        insts[hi].pid().map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                        t.elapsed().as_secs_f64(),
                        begin.elapsed().as_secs_f64()
                    ),
                ),
                Err(e) => log.err(line, format!("the restarted {holder_idc} instance: {e}")),
            }
        }
        Err(e) => log.err(line, format!("restart the {holder_idc} instance: {e}")),
    }
}

async fn admin(env: &Env<'_>, route: &str, line: &PhaseLine, log: &mut FaultLog) {
    let body = serde_json::json!({"idc": "bj-a"});
    let t = Instant::now();
    match env.checker.post_admin(env.bj, route, TOKEN, &body).await {
        Ok(a) if a.status == 200 => log.ok(
            line,
            format!(
                "POST {route} bj-a: 200 {} in {:.1} ms",
                String::from_utf8_lossy(&a.body),
                t.elapsed().as_secs_f64() * 1000.0
            ),
        ),
        Ok(a) => {
            let text = format!(
                "POST {route} bj-a: {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
            log.admin_failures.push(text.clone());
            log.err(line, text);
        }
        Err(kind) => {
            let text = format!("POST {route} bj-a: {kind}");
            log.admin_failures.push(text.clone());
            log.err(line, text);
        }
    }
}

/// One phase: the load, the fault in it, then the read-back of its acknowledged writes.
async fn run_phase(
    env: &Env<'_>,
    phase: Phase,
    index: u64,
) -> (PhaseRow, Vec<(u64, u64, &'static str)>) {
    let line = env.progress.phase(phase.name());
    let ids_total = env.workers.len();
    let seed = index.wrapping_add(1).wrapping_mul(0x1000_0000_01B3) ^ std::process::id() as u64;
    let load = Load::start(
        &env.workers,
        ids_total,
        seed,
        Some((env.probe.clone(), index as usize)),
    );
    let live = load.live();
    let begin = Instant::now();
    let mut log = FaultLog::default();
    {
        let step = fault(env, phase, &line, &mut log);
        tokio::pin!(step);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                () = &mut step => break,
                _ = tick.tick() => line.update(begin.elapsed(), "", &live),
            }
        }
    }
    let result = load.stop().await;
    let seconds = begin.elapsed().as_secs_f64();

    let mut row = PhaseRow::from_samples(phase.name(), seconds, &result.samples);
    row.fault = log.lines.clone();
    row.takeover_secs = log.takeover.map(|d| d.as_secs_f64());
    if !row.errors.is_empty() {
        row.notes.push(format!(
            "errors by instance: {}{}",
            row.errors_by_instance_text(),
            log.killed
                .map(|k| format!(
                    " (calls to the killed {k} instance fail until its restart: expected, not judged)"
                ))
                .unwrap_or_default()
        ));
    }
    if let Some((began, healed)) = log.cut {
        row.notes.push(during_cut(&result.samples, began, healed));
    }
    row.writes_acked = result.acked.len() as u64;
    row.ryw_checks = result.ryw_checks;
    row.ryw_violations = result.violations.len() as u64;
    row.violation_samples = result.violations.iter().take(10).cloned().collect();

    // After the load: the killed Redis master comes back as a replica (the later phases want a
    // full lab).
    if phase == Phase::KillRedisMaster {
        after_redis_kill(env, &line, &mut row, &log).await;
    }

    // Read back every id acknowledged in the phase.
    line.update(
        begin.elapsed(),
        "reading back the acknowledged writes",
        &live,
    );
    let mut want: BTreeMap<u64, u64> = BTreeMap::new();
    for &(id, v, _) in &result.acked {
        let e = want.entry(id).or_insert(v);
        *e = (*e).max(v);
    }
    let (lost, unverified) = verify(env, &want).await;
    row.ids_verified = want.len() as u64;
    row.acked_lost = lost.len() as u64;
    row.acked_unverified = unverified.len() as u64;

    // The checks (the history's is added after the last phase).
    row.check(
        log.errors.is_empty(),
        if log.errors.is_empty() {
            "the fault applied".to_string()
        } else {
            format!("the fault applied: {}", log.errors.join("; "))
        },
    );
    row.check(
        row.writes_acked > 0,
        format!("writes acknowledged: {}", row.writes_acked),
    );
    row.check(
        row.ryw_violations == 0,
        format!(
            "0 read-your-writes violations: {} in {} read-backs{}",
            row.ryw_violations,
            row.ryw_checks,
            row.violation_samples
                .first()
                .map(|v| format!(
                    " (e.g. {} acked v{} on {}, read {})",
                    v.id, v.acked, v.instance, v.read
                ))
                .unwrap_or_default()
        ),
    );
    row.check(
        lost.is_empty(),
        format!(
            "0 acknowledged writes lost: {} of {} ids read back older{}",
            lost.len(),
            want.len(),
            lost.first()
                .map(|(id, acked, read)| format!(" (e.g. {id} acked v{acked}, read {read})"))
                .unwrap_or_default()
        ),
    );
    row.check(
        unverified.is_empty(),
        format!(
            "every acknowledged id readable within {:.0} s of the phase's end: {} not{}",
            VERIFY_WAIT.as_secs_f64(),
            unverified.len(),
            unverified
                .first()
                .map(|(id, why)| format!(" (e.g. {id}: {why})"))
                .unwrap_or_default()
        ),
    );
    match phase {
        Phase::Baseline => {
            let errors: u64 = row.errors.values().sum();
            row.check(errors == 0, format!("no errors: {errors}"));
        }
        Phase::Drain => {
            row.check(
                log.admin_failures.is_empty(),
                format!(
                    "drain and undrain answered 200{}",
                    if log.admin_failures.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", log.admin_failures.join("; "))
                    }
                ),
            );
        }
        Phase::RateLimitFlood => {
            let steady_5xx: u64 = row
                .errors
                .iter()
                .filter(|(k, _)| k.starts_with('5'))
                .map(|(_, n)| n)
                .sum();
            let steady_429: u64 = row
                .errors
                .iter()
                .filter(|(k, _)| k.starts_with("429"))
                .map(|(_, n)| n)
                .sum();
            match &log.flood {
                Some(f) => {
                    row.check(
                        f.rejected() > 0,
                        format!("429s seen: {} of {} flood calls", f.rejected(), f.requests),
                    );
                    row.check(
                        f.retry_after_on_429 == f.rejected(),
                        format!(
                            "every 429 with Retry-After: {} of {}",
                            f.retry_after_on_429,
                            f.rejected()
                        ),
                    );
                    row.check(
                        f.server_errors() == 0 && steady_5xx == 0,
                        format!(
                            "no 5xx: {} in the flood, {steady_5xx} in the steady load",
                            f.server_errors()
                        ),
                    );
                }
                None => row.check(false, "the flood ran"),
            }
            if steady_429 > 0 {
                row.notes.push(format!(
                    "the steady load got {steady_429} x 429 too (the IDC-wide share limit, \
                     shared by every client)"
                ));
            }
            row.flood = log.flood.clone();
        }
        _ => {}
    }
    if !result.violations.is_empty() {
        row.notes.push(format!(
            "read-your-writes violations: {}",
            result
                .violations
                .iter()
                .take(5)
                .map(|v| format!(
                    "{} acked v{} on {}, read {}",
                    v.id, v.acked, v.instance, v.read
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if !lost.is_empty() {
        row.notes.push(format!(
            "lost writes: {}",
            lost.iter()
                .take(5)
                .map(|(id, a, r)| format!("{id} acked v{a}, read {r}"))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    line.finish(&row);
    (row, result.acked)
}

/// What the PUTs of each instance got while bj-a was cut off: acknowledged (started and
/// answered inside the cut), failed by kind, and when the first acknowledged one came.
fn during_cut(samples: &[load::Sample], began: Instant, healed: Instant) -> String {
    #[derive(Default)]
    struct Puts {
        acked: u64,
        failed: BTreeMap<String, u64>,
        first_acked: Option<Duration>,
    }
    let mut per: BTreeMap<&str, Puts> = BTreeMap::new();
    for s in samples {
        if s.op != load::Op::Put || s.start < began || s.start + s.latency > healed {
            continue;
        }
        let e = per.entry(s.instance).or_default();
        match &s.error {
            None => {
                e.acked += 1;
                let at = s.start + s.latency - began;
                e.first_acked = Some(e.first_acked.map_or(at, |f| f.min(at)));
            }
            Some(k) => *e.failed.entry(k.clone()).or_default() += 1,
        }
    }
    let parts: Vec<String> = per
        .iter()
        .map(|(i, p)| {
            let (ok, failed, first) = (p.acked, &p.failed, p.first_acked);
            let failed = if failed.is_empty() {
                "none".to_string()
            } else {
                failed
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "{i} {ok} acknowledged{}, failed {failed}",
                first
                    .map(|f| format!(" (the first {:.2} s into the cut)", f.as_secs_f64()))
                    .unwrap_or_default()
            )
        })
        .collect();
    format!(
        "PUTs started and answered during the {:.1} s cut: {}",
        (healed - began).as_secs_f64(),
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join("; ")
        }
    )
}

async fn after_redis_kill(env: &Env<'_>, line: &PhaseLine, row: &mut PhaseRow, log: &FaultLog) {
    let Some(old) = log.switch.as_ref().map(|s| s.from.clone()) else {
        return;
    };
    let t = Instant::now();
    match env.stack.restart(&old).await {
        Ok((name, pid)) => {
            let text = format!(
                "after the load: {name} restarted as a replica (pid {pid}) in {:.2} s",
                t.elapsed().as_secs_f64()
            );
            line.note(&text);
            row.notes.push(text);
        }
        Err(e) => {
            let text = format!("after the load: restarting {old} failed: {e}");
            line.note(&text);
            row.notes.push(text);
        }
    }
}

/// Reads back each id (retrying errors until [`VERIFY_WAIT`]): `(lost, unverified)`, lost as
/// `(id, acked, read)`, unverified as `(id, last error)`.
async fn verify(
    env: &Env<'_>,
    want: &BTreeMap<u64, u64>,
) -> (Vec<(u64, u64, String)>, Vec<(u64, String)>) {
    let results: Vec<(u64, u64, Result<Option<u64>, String>)> =
        futures::stream::iter(want.iter().map(|(&id, &v)| (id, v)))
            .map(|(id, v)| async move {
                let deadline = Instant::now() + VERIFY_WAIT;
                let path = format!("/members/{id}");
                // bj-a first; sh-a after an error (an instance a fault took down).
                let mut addrs = std::iter::once(env.bj).chain(env.sh).cycle();
                loop {
                    let addr = addrs.next().unwrap_or(env.bj);
                    let why = match env.checker.get(addr, &path).await {
                        Ok(a) if a.status == 200 => match a.version() {
                            Some(r) => return (id, v, Ok(Some(r))),
                            None => "200 without a version".to_string(),
                        },
                        Ok(a) if a.status == 404 => return (id, v, Ok(None)),
                        Ok(a) => a.error_kind(),
                        Err(kind) => kind,
                    };
                    if Instant::now() >= deadline {
                        return (id, v, Err(why));
                    }
                    sleep(Duration::from_millis(250)).await;
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
    let mut lost = Vec::new();
    let mut unverified = Vec::new();
    for (id, v, r) in results {
        match r {
            Ok(Some(read)) if read >= v => {}
            Ok(Some(read)) => lost.push((id, v, format!("v{read}"))),
            Ok(None) => lost.push((id, v, "404".into())),
            Err(why) => unverified.push((id, why)),
        }
    }
    lost.sort();
    unverified.sort();
    (lost, unverified)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_cut_note_counts_the_puts_started_and_answered_inside_it() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let call = |instance, op, start: u64, took: u64, error: Option<&str>| load::Sample {
            worker: 0,
            instance,
            op,
            start: t0 + ms(start),
            latency: ms(took),
            error: error.map(str::to_owned),
        };
        let samples = vec![
            call(
                "bj-a",
                load::Op::Put,
                150,
                600,
                Some("503 dependency_unavailable"),
            ),
            call("sh-a", load::Op::Put, 500, 10, None),
            call("sh-a", load::Op::Put, 700, 10, None),
            // Before the cut, a GET, and one answered after the heal: not counted.
            call("sh-a", load::Op::Put, 50, 10, None),
            call(
                "bj-a",
                load::Op::Get,
                200,
                10,
                Some("503 dependency_unavailable"),
            ),
            call("bj-a", load::Op::Put, 900, 500, None),
        ];
        let text = during_cut(&samples, t0 + ms(100), t0 + ms(1000));
        assert!(text.contains("during the 0.9 s cut"), "{text}");
        assert!(
            text.contains("bj-a 0 acknowledged, failed 503 dependency_unavailable: 1"),
            "{text}"
        );
        assert!(
            text.contains("sh-a 2 acknowledged (the first 0.41 s into the cut), failed none"),
            "{text}"
        );
        assert!(during_cut(&[], t0, t0 + ms(1)).ends_with(": none"));
    }
}
