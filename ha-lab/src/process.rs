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
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
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
    /// Ready once a TCP connect to this address succeeds *and* the listening socket belongs to
    /// the child's process group (read from `/proc`), with the child still running. An address
    /// that answers for someone else fails the start with [`LabError::AddressInUse`].
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
    /// Fails with [`LabError::MissingBinary`] when the program is not on `PATH`, with
    /// [`LabError::AddressInUse`] when another process already serves `spec.ready`'s address,
    /// with [`LabError::Exited`] or [`LabError::NotReady`] otherwise; the child is killed.
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
        if let Err(e) = self.wait_ready(&name, pid, &ready, &log).await {
            let _ = self.kill(&name).await;
            return Err(e);
        }
        Ok(pid)
    }

    /// Waits until the address answers *and* a socket of our child's process group listens on
    /// it. An address that answers without our child listening belongs to someone else (a
    /// leftover server): that is [`LabError::AddressInUse`], whether our child then exits (its
    /// bind failed) or stays alive without listening.
    async fn wait_ready(
        &self,
        name: &str,
        pid: u32,
        ready: &Readiness,
        log: &Path,
    ) -> Result<(), LabError> {
        let Readiness::TcpConnect(addr) = ready else {
            return Ok(());
        };
        let addr = *addr;
        let in_use = |status: String| LabError::AddressInUse {
            name: name.to_owned(),
            addr,
            status,
            log: log.to_owned(),
        };
        let deadline = tokio::time::Instant::now() + self.ready_timeout;
        let mut stranger = false;
        loop {
            if let Some(status) = self.exited(name) {
                // A server whose bind failed exits: tell "address taken" from any other exit.
                if stranger || answers(addr).await {
                    return Err(in_use(format!("exited with {status}")));
                }
                return Err(LabError::Exited {
                    name: name.to_owned(),
                    status,
                    log: log.to_owned(),
                });
            }
            if answers(addr).await {
                if group_listens_on(pid, addr) && self.exited(name).is_none() {
                    return Ok(());
                }
                stranger = true;
            }
            if tokio::time::Instant::now() >= deadline {
                if stranger {
                    return Err(in_use(format!("pid {pid}, alive but not listening")));
                }
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

    /// SIGSTOPs `name` (a hung server: connections stay open, nothing answers) and returns
    /// once every thread of it is stopped, or after 2 s (a warning is logged then): SIGSTOP is
    /// delivered asynchronously, and a thread still running could answer one more request.
    pub fn freeze(&self, name: &str) -> Result<(), LabError> {
        let pid = self.running_pid(name)?;
        signal_group(name, pid, Signal::SIGSTOP)?;
        // A sync wait (freeze is sync): at most 2 000 naps of 1 ms (std's Instant is
        // disallowed, so naps are counted).
        for _ in 0..2000 {
            if all_threads_stopped(pid) || !pid_alive(pid) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::warn!(
            name,
            pid,
            "a thread of the frozen process still runs after 2 s"
        );
        Ok(())
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

/// True when every thread of `pid` is stopped (state `T` or `t` in `/proc/<pid>/task/*/stat`).
pub fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| {
                let (_, rest) = s.rsplit_once(')')?;
                rest.trim_start().chars().next()
            })
            .is_some_and(|state| state == 'T' || state == 't')
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

/// True when a TCP connect to `addr` succeeds within 500 ms.
async fn answers(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr)
        )
        .await,
        Ok(Ok(_))
    )
}

// === who listens: /proc ===

/// True when a TCP socket listening on `addr` (or on the unspecified address, same port) is
/// open in a process of the process group `pgid` (our children lead their own group, so this
/// covers a child that forks or runs its server under `sh -c`). Linux only: reads
/// `/proc/<pgid>/net/tcp{,6}` for the listening sockets' inodes and `/proc/<pid>/fd` of the
/// group's processes for those inodes.
fn group_listens_on(pgid: u32, addr: SocketAddr) -> bool {
    let inodes = listening_inodes(pgid, addr);
    if inodes.is_empty() {
        return false;
    }
    group_members(pgid)
        .into_iter()
        .any(|pid| holds_socket(pid, &inodes))
}

/// Inodes of the sockets in state LISTEN on `addr`'s port whose local address is `addr`'s IP,
/// the unspecified address, or (for IPv4) its IPv4-mapped IPv6 form, in the network namespace
/// of `pid`.
fn listening_inodes(pid: u32, addr: SocketAddr) -> Vec<u64> {
    let mut out = Vec::new();
    for file in ["tcp", "tcp6"] {
        let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            const LISTEN: &str = "0A";
            if *state != LISTEN {
                continue;
            }
            let Some((ip, port)) = parse_proc_addr(local) else {
                continue;
            };
            if port != addr.port() || !same_listen_ip(ip, addr.ip()) {
                continue;
            }
            if let Ok(inode) = inode.parse::<u64>() {
                out.push(inode);
            }
        }
    }
    out
}

fn same_listen_ip(listening: IpAddr, wanted: IpAddr) -> bool {
    if listening == wanted || listening.is_unspecified() {
        return true;
    }
    match (listening, wanted) {
        (IpAddr::V6(l), IpAddr::V4(w)) => l.to_ipv4_mapped() == Some(w),
        _ => false,
    }
}

/// Parses a `/proc/net/tcp{,6}` address: hex words in host byte order, then `:PORT` in hex.
fn parse_proc_addr(text: &str) -> Option<(IpAddr, u16)> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port))
}

/// The pids whose process group is `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat_fields(*pid).and_then(|f| f.get(2)?.parse::<u32>().ok()) == Some(pgid))
        .collect()
}

/// The fields of `/proc/<pid>/stat` after the command name: `[0]` is the state (field 3 of
/// proc(5)), `[2]` the process group, `[19]` the start time in clock ticks since boot.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// True when one of `pid`'s open file descriptors is a socket with one of `inodes`.
fn holds_socket(pid: u32, inodes: &[u64]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse::<u64>()
                .ok()
        })
        .any(|inode| inodes.contains(&inode))
}

/// When `pid` started, in clock ticks after boot (field 22 of `/proc/<pid>/stat`): with the pid,
/// it names one process for the life of the machine, since a reused pid starts later.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// The command line of `pid` (`/proc/<pid>/cmdline`), one string per argument.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn proc_net_addresses_parse() {
        // 127.0.1.1:16379 as the kernel prints it on a little-endian machine.
        let v4 = u32::from_ne_bytes([127, 0, 1, 1]);
        let text = format!("{v4:08X}:3FFB");
        assert_eq!(
            parse_proc_addr(&text),
            Some(("127.0.1.1".parse().unwrap(), 16379))
        );
        let v6 = format!(
            "{:08X}{:08X}{:08X}{:08X}",
            0,
            0,
            0,
            u32::from_ne_bytes([0, 0, 0, 1])
        );
        assert_eq!(
            parse_proc_addr(&format!("{v6}:0050")),
            Some(("::1".parse().unwrap(), 80))
        );
        assert_eq!(parse_proc_addr("zz:1"), None);
        assert!(same_listen_ip(
            "0.0.0.0".parse().unwrap(),
            "127.0.1.1".parse().unwrap()
        ));
        assert!(same_listen_ip(
            "::ffff:127.0.1.1".parse().unwrap(),
            "127.0.1.1".parse().unwrap()
        ));
        assert!(!same_listen_ip(
            "127.0.1.2".parse().unwrap(),
            "127.0.1.1".parse().unwrap()
        ));
    }

    #[tokio::test]
    async fn our_own_listener_is_found_and_a_port_without_one_is_not() {
        let l = std::net::TcpListener::bind("127.0.1.217:0").unwrap();
        let addr = l.local_addr().unwrap();
        let me = std::process::id();
        assert!(!listening_inodes(me, addr).is_empty());
        assert!(holds_socket(me, &listening_inodes(me, addr)));
        drop(l);
        assert!(listening_inodes(me, addr).is_empty());
    }
}
