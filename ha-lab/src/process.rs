//! A supervisor for external server processes (redis-server, mariadbd, ...), by pid.
//!
//! Every child is started in its own process group with `kill_on_drop`, and signals go to that
//! group (negative pid), so only processes the supervisor started are ever touched; nothing is
//! looked up by name. Dropping the [`Supervisor`] SIGKILLs every child it still owns, which is
//! what cleans up after a panicking test.
//!
//! There is no parent-death signal: `prctl(PR_SET_PDEATHSIG)` would have to run in `pre_exec`,
//! which needs `unsafe` (forbidden here). If the owning process is SIGKILLed its children
//! survive; the `ha-lab` daemon therefore handles SIGTERM/SIGINT itself and stops everything.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ha_lab::LabError> {
//! use ha_lab::process::{Readiness, ServerSpec, Supervisor};
//! let sup = Supervisor::new("/tmp/lab-logs");
//! let addr = "127.0.1.10:16379".parse().unwrap();
//! let mut spec = ServerSpec::new("redis-bj-a", "redis-server", "redis-server", addr);
//! spec.args = vec!["--bind".into(), "127.0.1.10".into(), "--port".into(), "16379".into()];
//! spec.ready = Readiness::TcpConnect(addr);
//! let pid = sup.start(spec).await?;
//! sup.freeze("redis-bj-a")?;
//! sup.thaw("redis-bj-a")?;
//! # Ok(()) }
//! ```

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use tokio::process::{Child, Command};

use crate::LabError;

/// Default bound on waiting for a child to become ready.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How to tell that a started process is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Ready once a TCP connect to this address succeeds.
    TcpConnect(SocketAddr),
    /// Ready as soon as it is spawned.
    Immediate,
}

/// What to run and where it sits in the lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSpec {
    /// Unique name (also the log file name, `<name>.log`).
    pub name: String,
    /// The program, looked up on `PATH` unless it contains a `/`.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// The Debian package that provides `program`, named in [`LabError::MissingBinary`].
    pub package: String,
    /// How to tell it is ready.
    pub ready: Readiness,
    /// Region label (for `lab.json`).
    pub region: String,
    /// IDC label (for `lab.json`).
    pub idc: String,
    /// The address it serves on.
    pub address: SocketAddr,
    /// Role label (e.g. `master`, `replica`, `sentinel`).
    pub role: String,
}

impl ServerSpec {
    /// A spec with no arguments, no environment, [`Readiness::TcpConnect`] on `address`, and
    /// empty region, IDC and role.
    pub fn new(name: &str, program: &str, package: &str, address: SocketAddr) -> ServerSpec {
        ServerSpec {
            name: name.to_owned(),
            program: program.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            package: package.to_owned(),
            ready: Readiness::TcpConnect(address),
            region: String::new(),
            idc: String::new(),
            address,
            role: String::new(),
        }
    }

    /// A standalone `redis-server` on `address` (its own IP, so that it can be told apart from
    /// others by address, and its port), keeping nothing on disk (`save ""`, `appendonly no`),
    /// with `dir` as its working directory; ready once it accepts a connection. Set `idc`,
    /// `region` and `role` as needed.
    ///
    /// ```
    /// let spec = ha_lab::process::ServerSpec::redis("redis-bj-a", "127.0.1.10:16379".parse().unwrap(), "/tmp/lab".as_ref());
    /// assert_eq!(spec.args[..4], ["--bind", "127.0.1.10", "--port", "16379"]);
    /// ```
    pub fn redis(name: &str, address: SocketAddr, dir: &Path) -> ServerSpec {
        let mut spec = ServerSpec::new(name, "redis-server", "redis-server", address);
        spec.args = vec![
            "--bind".into(),
            address.ip().to_string(),
            "--port".into(),
            address.port().to_string(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        spec
    }
}

struct Entry {
    spec: ServerSpec,
    child: Option<Child>,
    pid: Option<u32>,
}

/// Starts, signals and stops child processes, by pid. See the [module docs](self).
pub struct Supervisor {
    log_dir: PathBuf,
    ready_timeout: Duration,
    // A std mutex on purpose: it guards a small map, is never held across an await, and must be
    // usable from the synchronous `pid`/`freeze`/`thaw` and from `Drop`.
    #[allow(clippy::disallowed_types)]
    entries: std::sync::Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("log_dir", &self.log_dir)
            .field("names", &self.names())
            .finish()
    }
}

impl Supervisor {
    /// A supervisor writing each child's stdout and stderr to `log_dir/<name>.log`, with the
    /// default ready timeout of 10 s.
    pub fn new(log_dir: impl Into<PathBuf>) -> Supervisor {
        Supervisor {
            log_dir: log_dir.into(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            #[allow(clippy::disallowed_types)]
            entries: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Sets the bound on waiting for readiness (default 10 s).
    #[must_use]
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Supervisor {
        self.ready_timeout = timeout;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The names of every spec started so far (running or not), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// The spec registered under `name`.
    pub fn spec(&self, name: &str) -> Option<ServerSpec> {
        self.lock().get(name).map(|e| e.spec.clone())
    }

    /// The log file of `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    /// Starts `spec` and waits (bounded) until it is ready; returns its pid.
    /// Fails with [`LabError::MissingBinary`] when the program is not on `PATH`.
    pub async fn start(&self, spec: ServerSpec) -> Result<u32, LabError> {
        let name = spec.name.clone();
        if let Some(pid) = self.pid(&name) {
            return Err(LabError::AlreadyRunning { name, pid });
        }
        let program = find_program(&spec.program).ok_or_else(|| LabError::MissingBinary {
            program: spec.program.clone(),
            package: spec.package.clone(),
        })?;
        std::fs::create_dir_all(&self.log_dir)
            .map_err(|e| LabError::io(format!("create log dir {}", self.log_dir.display()), e))?;
        let log = self.log_path(&name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| LabError::io(format!("open log {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| LabError::io(format!("open log {}", log.display()), e))?;
        let mut cmd = Command::new(&program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            name: name.clone(),
            program: spec.program.clone(),
            source,
        })?;
        let pid = child.id().ok_or_else(|| LabError::Exited {
            name: name.clone(),
            status: "unknown status".into(),
            log: log.clone(),
        })?;
        let ready = spec.ready.clone();
        tracing::info!(name, pid, program = %program.display(), "process started");
        self.lock().insert(
            name.clone(),
            Entry {
                spec,
                child: Some(child),
                pid: Some(pid),
            },
        );
        if let Err(e) = self.wait_ready(&name, &ready, &log).await {
            let _ = self.kill(&name).await;
            return Err(e);
        }
        Ok(pid)
    }

    async fn wait_ready(&self, name: &str, ready: &Readiness, log: &Path) -> Result<(), LabError> {
        let Readiness::TcpConnect(addr) = ready else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + self.ready_timeout;
        loop {
            if let Some(status) = self.exited(name) {
                return Err(LabError::Exited {
                    name: name.to_owned(),
                    status,
                    log: log.to_owned(),
                });
            }
            let attempt = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await;
            if let Ok(Ok(_)) = attempt {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LabError::NotReady {
                    name: name.to_owned(),
                    timeout: self.ready_timeout,
                    log: log.to_owned(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `Some(status)` when the child of `name` has exited (it is then reaped and forgotten).
    fn exited(&self, name: &str) -> Option<String> {
        let mut map = self.lock();
        let entry = map.get_mut(name)?;
        let child = entry.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                entry.child = None;
                entry.pid = None;
                Some(status.to_string())
            }
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// The pid of `name` while it runs (a child that exited is reaped and reports `None`).
    pub fn pid(&self, name: &str) -> Option<u32> {
        let _ = self.exited(name);
        self.lock().get(name).and_then(|e| e.pid)
    }

    /// SIGKILLs `name`'s process group (by pid) and reaps it. Killing a stopped process works.
    pub async fn kill(&self, name: &str) -> Result<(), LabError> {
        let child = {
            let mut map = self.lock();
            if !map.contains_key(name) {
                return Err(self.unknown(name, &map));
            }
            let Some(entry) = map.get_mut(name) else {
                return Ok(());
            };
            entry.pid = None;
            entry.child.take()
        };
        let Some(mut child) = child else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            signal_group(name, pid, Signal::SIGKILL)?;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        tracing::info!(name, "process killed");
        Ok(())
    }

    /// SIGSTOPs `name` (a hung server: connections stay open, nothing answers).
    pub fn freeze(&self, name: &str) -> Result<(), LabError> {
        let pid = self.running_pid(name)?;
        signal_group(name, pid, Signal::SIGSTOP)
    }

    /// SIGCONTs `name`.
    pub fn thaw(&self, name: &str) -> Result<(), LabError> {
        let pid = self.running_pid(name)?;
        signal_group(name, pid, Signal::SIGCONT)
    }

    /// Kills `name` if alive, then starts the same spec again; returns the new pid.
    pub async fn restart(&self, name: &str) -> Result<u32, LabError> {
        let spec = self.spec(name).ok_or_else(|| {
            let map = self.lock();
            self.unknown(name, &map)
        })?;
        self.kill(name).await?;
        self.start(spec).await
    }

    /// Kills every child this supervisor started.
    pub async fn stop_all(&self) {
        for name in self.names() {
            if let Err(e) = self.kill(&name).await {
                tracing::warn!(name, error = %e, "stop");
            }
        }
    }

    fn running_pid(&self, name: &str) -> Result<u32, LabError> {
        if let Some(pid) = self.pid(name) {
            return Ok(pid);
        }
        let map = self.lock();
        if map.contains_key(name) {
            Err(LabError::NotRunning {
                name: name.to_owned(),
            })
        } else {
            Err(self.unknown(name, &map))
        }
    }

    fn unknown(&self, name: &str, map: &HashMap<String, Entry>) -> LabError {
        let mut known: Vec<&str> = map.keys().map(String::as_str).collect();
        known.sort_unstable();
        LabError::UnknownServer {
            name: name.to_owned(),
            known: known.join(", "),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let map = self.entries.get_mut().unwrap_or_else(|e| e.into_inner());
        for (name, entry) in map.iter_mut() {
            if let Some(child) = entry.child.as_mut() {
                if let Some(pid) = child.id() {
                    let _ = signal_group(name, pid, Signal::SIGKILL);
                }
                let _ = child.start_kill();
            }
        }
    }
}

/// Signals the process group led by `pid` (the child was started with `process_group(0)`),
/// falling back to the pid alone if the group is gone.
fn signal_group(name: &str, pid: u32, signal: Signal) -> Result<(), LabError> {
    let raw = i32::try_from(pid).map_err(|_| LabError::Signal {
        name: name.to_owned(),
        pid,
        signal: signal.as_str(),
        source: nix::errno::Errno::EINVAL,
    })?;
    let p = Pid::from_raw(raw);
    killpg(p, signal)
        .or_else(|_| kill(p, signal))
        .map_err(|source| LabError::Signal {
            name: name.to_owned(),
            pid,
            signal: signal.as_str(),
            source,
        })
}

/// Looks `program` up on `PATH` (or checks the path itself when it contains a `/`).
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// True when `pid` exists and is not a zombie (an exited child nobody reaped yet).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 || kill(Pid::from_raw(raw), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
