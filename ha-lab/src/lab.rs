//! The whole lab: DNS per region, `/who` backends behind fault proxies, optional external
//! processes, the `lab.json` manifest and the control socket.
//!
//! Default addresses (all configurable in [`LabOptions`]):
//!
//! | server | address |
//! |---|---|
//! | `dns-north` (region north, IDC bj-a) | 127.0.1.53:15353 udp+tcp |
//! | `dns-south` (region south, IDC sh-a) | 127.0.3.53:15353 udp+tcp |
//! | `who-<idc>-<n>` | 127.0.{1,2,3}.{11,12}:18080 |
//! | `proxy-<idc>-<n>` (published in DNS as `profile.north.lab.`) | same IP, port 18081 |
//!
//! ```no_run
//! # async fn demo() -> Result<(), ha_lab::LabError> {
//! use ha_lab::{Lab, LabOptions};
//! let lab = Lab::start(LabOptions { dir: "/tmp/lab".into(), ..Default::default() }).await?;
//! lab.proxy("proxy-bj-a-1").unwrap().set_fault(ha_lab::proxy::Fault::Blackhole);
//! lab.stop().await;
//! # Ok(()) }
//! ```

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Mutex, Notify},
    task::JoinHandle,
};

use crate::{
    LabError,
    control::{ControlRequest, ControlResponse, FaultAction},
    dns::{DnsMode, LabDns},
    http::WhoServer,
    process::{ServerSpec, Supervisor},
    proxy::{Fault, FaultProxy},
};

/// One IDC of the lab.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdcSpec {
    /// IDC name, e.g. `bj-a`.
    pub name: String,
    /// Region name, e.g. `north`.
    pub region: String,
    /// The IDC's address range, e.g. `127.0.1.0/24`.
    pub cidr: IpNet,
}

/// One per-region DNS server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSpec {
    /// Region it serves.
    pub region: String,
    /// IDC it sits in.
    pub idc: String,
    /// UDP+TCP address (port 0 allowed).
    pub addr: SocketAddr,
}

/// One `/who` backend and the fault proxy in front of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// Suffix of the names: the servers are `who-<name>` and `proxy-<name>`.
    pub name: String,
    /// Region label.
    pub region: String,
    /// IDC label.
    pub idc: String,
    /// The HTTP server's address (port 0 allowed).
    pub http: SocketAddr,
    /// The proxy's address, which DNS publishes (port 0 allowed).
    pub proxy: SocketAddr,
}

/// What [`Lab::start`] starts. `Default` gives the documented lab in directory `ha-lab-run`.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Directory for `lab.json`, the control socket and logs. Default `ha-lab-run`.
    pub dir: PathBuf,
    /// The zone every DNS server serves. Default `lab.`.
    pub zone: String,
    /// The name published for the backends. Default `profile.north.lab.`.
    pub service: String,
    /// TTL of the published records. Default 1 s.
    pub ttl_secs: u32,
    /// The IDCs. Default bj-a 127.0.1.0/24 and bj-b 127.0.2.0/24 (north), sh-a 127.0.3.0/24 (south).
    pub idcs: Vec<IdcSpec>,
    /// DNS servers. Default north at 127.0.1.53:15353, south at 127.0.3.53:15353.
    pub dns: Vec<DnsSpec>,
    /// Backends. Default two per IDC at 127.0.N.11 and 127.0.N.12, HTTP port 18080, proxy 18081.
    pub backends: Vec<BackendSpec>,
    /// External processes started through a [`Supervisor`] (logs in `dir/logs`). Default none.
    pub processes: Vec<ServerSpec>,
    /// The offset [`LabOptions::with_port_offset`] added to the ports, recorded in `lab.json`
    /// (it names the lab's own nftables table). Default 0.
    pub port_offset: u16,
}

fn sa(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::from(ip), port)
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions::new("ha-lab-run")
    }
}

impl LabOptions {
    /// The default lab in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> LabOptions {
        let idcs = [
            ("bj-a", "north", 1u8),
            ("bj-b", "north", 2),
            ("sh-a", "south", 3),
        ];
        let mut backends = Vec::new();
        for (idc, region, n) in idcs {
            for (i, host) in [(1, 11u8), (2, 12)] {
                backends.push(BackendSpec {
                    name: format!("{idc}-{i}"),
                    region: region.into(),
                    idc: idc.into(),
                    http: sa([127, 0, n, host], 18080),
                    proxy: sa([127, 0, n, host], 18081),
                });
            }
        }
        LabOptions {
            dir: dir.into(),
            zone: "lab.".into(),
            service: "profile.north.lab.".into(),
            ttl_secs: 1,
            idcs: idcs
                .iter()
                .map(|(idc, region, n)| IdcSpec {
                    name: (*idc).into(),
                    region: (*region).into(),
                    cidr: IpNet::new(IpAddr::from([127, 0, *n, 0]), 24)
                        .unwrap_or_else(|_| IpNet::from(IpAddr::from([127, 0, *n, 0]))),
                })
                .collect(),
            dns: vec![
                DnsSpec {
                    region: "north".into(),
                    idc: "bj-a".into(),
                    addr: sa([127, 0, 1, 53], 15353),
                },
                DnsSpec {
                    region: "south".into(),
                    idc: "sh-a".into(),
                    addr: sa([127, 0, 3, 53], 15353),
                },
            ],
            backends,
            processes: Vec::new(),
            port_offset: 0,
        }
    }

    /// Adds `offset` to every non-zero port of the DNS servers and backends (to run a second
    /// lab beside the default one). Fails with [`LabError::PortOverflow`], naming the offset,
    /// the server and its port, when a port would pass 65535.
    ///
    /// ```
    /// let options = ha_lab::LabOptions::new("/tmp/lab").with_port_offset(1000)?;
    /// assert_eq!(options.dns[0].addr.port(), 16353);
    /// assert!(ha_lab::LabOptions::new("/tmp/lab").with_port_offset(60000).is_err());
    /// # Ok::<(), ha_lab::LabError>(())
    /// ```
    pub fn with_port_offset(mut self, offset: u16) -> Result<LabOptions, LabError> {
        let overflow = |server: &str, port: u16| LabError::PortOverflow {
            offset: u32::from(self.port_offset) + u32::from(offset),
            server: server.to_owned(),
            port,
        };
        let total = self
            .port_offset
            .checked_add(offset)
            .ok_or_else(|| overflow("the lab", 0))?;
        let shift = |server: String, a: &mut SocketAddr| {
            if a.port() == 0 {
                return Ok(());
            }
            let port = a
                .port()
                .checked_add(offset)
                // Named as the default port, before any offset, with the total offset.
                .ok_or_else(|| overflow(&server, a.port().saturating_sub(self.port_offset)))?;
            a.set_port(port);
            Ok::<(), LabError>(())
        };
        for d in &mut self.dns {
            shift(format!("dns-{}", d.region), &mut d.addr)?;
        }
        for b in &mut self.backends {
            shift(format!("who-{}", b.name), &mut b.http)?;
            shift(format!("proxy-{}", b.name), &mut b.proxy)?;
        }
        self.port_offset = total;
        Ok(self)
    }
}

/// Kind of a server in `lab.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerKind {
    /// A [`LabDns`].
    Dns,
    /// A [`WhoServer`].
    Http,
    /// A [`FaultProxy`].
    Proxy,
    /// An external process of the [`Supervisor`].
    Process,
}

impl std::fmt::Display for ServerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerKind::Dns => "dns",
            ServerKind::Http => "http",
            ServerKind::Proxy => "proxy",
            ServerKind::Process => "process",
        })
    }
}

/// One server in `lab.json`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerEntry {
    /// Unique name, the target of faults.
    pub name: String,
    /// Kind.
    pub kind: ServerKind,
    /// Region label.
    pub region: String,
    /// IDC label.
    pub idc: String,
    /// Address it serves on.
    pub address: SocketAddr,
    /// Role label (`dns`, `backend`, `proxy`, or the process spec's role).
    pub role: String,
    /// Pid of the process serving it (the lab's own process for in-process servers).
    pub pid: u32,
}

/// The `lab.json` manifest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Every server.
    pub servers: Vec<ServerEntry>,
    /// Path of the control socket.
    pub control: PathBuf,
    /// Pid of the process running the lab.
    pub daemon_pid: u32,
    /// When that process started ([`crate::process::start_time`]): a pid that runs but started
    /// at another time is not the daemon any more. `None` in a `lab.json` written before it was
    /// recorded.
    #[serde(default)]
    pub daemon_start: Option<u64>,
    /// The zone served by the DNS servers.
    pub zone: String,
    /// The name published for the backends.
    pub service: String,
    /// The IDCs.
    pub idcs: Vec<IdcSpec>,
    /// The port offset of the lab ([`LabOptions::port_offset`]); 0 in a `lab.json` written
    /// before it was recorded.
    #[serde(default)]
    pub port_offset: u16,
    /// True when a stack daemon (`ha-lab up --stack`, [`crate::stack`]) runs the lab: it also
    /// serves partitions by IDC cgroup and the placing of processes into an IDC
    /// ([`crate::control::StackFault::Partition`], [`crate::control::StackFault::Place`]).
    #[serde(default)]
    pub stack: bool,
}

/// What became of the daemon recorded in a [`Manifest`] ([`Manifest::daemon_state`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DaemonState {
    /// The recorded pid runs and is the daemon (same start time, or, for a `lab.json` without
    /// one, a command line `... serve --dir <this lab's dir> ...`).
    Running,
    /// No process has the recorded pid.
    Gone,
    /// The pid runs but is another process (the daemon died and the pid was reused): it must
    /// not be signalled.
    Replaced {
        /// Why it is not the daemon.
        reason: String,
    },
}

impl Manifest {
    /// Whether the recorded daemon still runs, by pid *and* identity, so that a reused pid is
    /// never mistaken for it.
    pub fn daemon_state(&self) -> DaemonState {
        let pid = self.daemon_pid;
        if !crate::process::pid_alive(pid) {
            return DaemonState::Gone;
        }
        if let Some(recorded) = self.daemon_start {
            return match crate::process::start_time(pid) {
                Some(now) if now == recorded => DaemonState::Running,
                Some(now) => DaemonState::Replaced {
                    reason: format!(
                        "it started at tick {now} after boot, the daemon at tick {recorded}"
                    ),
                },
                None => DaemonState::Gone,
            };
        }
        // A lab.json without a start time: the daemon is `ha-lab serve --dir DIR ...`.
        let Some(args) = crate::process::cmdline(pid) else {
            return DaemonState::Gone;
        };
        let dir = self.control.parent().map(|d| d.display().to_string());
        let serves_here = args.iter().any(|a| a == "serve")
            && args
                .windows(2)
                .any(|w| w[0] == "--dir" && Some(&w[1]) == dir.as_ref());
        if serves_here {
            DaemonState::Running
        } else {
            DaemonState::Replaced {
                reason: format!("its command line is {:?}", args.join(" ")),
            }
        }
    }

    /// The server a by-IDC target names: `redis@<idc>`, `sentinel@<idc>` or `mysql@<idc>` (the
    /// Redis node, the sentinel or the MariaDB instance of a stack in that IDC), or `None` when
    /// `target` is not of that form or names nothing here.
    ///
    /// ```
    /// # use ha_lab::lab::{Manifest, ServerEntry, ServerKind};
    /// let entry = |name: &str, idc: &str| ServerEntry {
    ///     name: name.into(), kind: ServerKind::Process, region: "north".into(), idc: idc.into(),
    ///     address: "127.0.2.9:7000".parse().unwrap(), role: "replica".into(), pid: 1,
    /// };
    /// let m = Manifest {
    ///     servers: vec![entry("redis-bj-b", "bj-b"), entry("sentinel-bj-b", "bj-b"), entry("mariadb-bj-b", "bj-b")],
    ///     control: "/tmp/x.sock".into(), daemon_pid: 1, daemon_start: None, zone: "lab.".into(),
    ///     service: "s".into(), idcs: vec![], port_offset: 0, stack: true,
    /// };
    /// assert_eq!(m.by_idc("redis@bj-b").unwrap().name, "redis-bj-b");
    /// assert_eq!(m.by_idc("sentinel@bj-b").unwrap().name, "sentinel-bj-b");
    /// assert_eq!(m.by_idc("mysql@bj-b").unwrap().name, "mariadb-bj-b");
    /// assert!(m.by_idc("redis@sh-a").is_none());
    /// assert!(m.by_idc("mq-broker@bj-b").is_none());
    /// assert!(m.by_idc("redis-bj-b").is_none());
    /// ```
    pub fn by_idc(&self, target: &str) -> Option<&ServerEntry> {
        let (what, idc) = target.split_once('@')?;
        let prefix = match what {
            "redis" => "redis-",
            "sentinel" => "sentinel-",
            "mysql" => "mariadb-",
            _ => return None,
        };
        self.servers
            .iter()
            .find(|s| s.idc == idc && s.name.starts_with(prefix))
    }

    /// The partition scope of this lab: its own table `halab_<offset>`, cutting only the
    /// ports its servers serve on, so that a partition of this lab leaves every other lab on
    /// the machine alone (see [`crate::partition`]).
    pub fn partition_scope(&self) -> crate::partition::Scope {
        crate::partition::Scope::lab(
            self.port_offset,
            self.servers.iter().map(|s| s.address.port()),
        )
    }

    /// Path of `lab.json` in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("lab.json")
    }

    /// Reads `dir/lab.json`.
    pub fn read(dir: &Path) -> Result<Manifest, LabError> {
        let path = Manifest::path(dir);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| LabError::io(format!("read {}", path.display()), e))?;
        serde_json::from_str(&text).map_err(|source| LabError::Json {
            context: format!("parse {}", path.display()),
            source,
        })
    }

    /// Writes `dir/lab.json` atomically (write then rename).
    pub fn write(&self, dir: &Path) -> Result<(), LabError> {
        let path = Manifest::path(dir);
        let tmp = dir.join(".lab.json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|source| LabError::Json {
            context: "encode lab.json".into(),
            source,
        })?;
        std::fs::write(&tmp, text)
            .map_err(|e| LabError::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| LabError::io(format!("rename to {}", path.display()), e))
    }

    /// The server named `name`, or [`LabError::UnknownServer`] naming the known ones.
    pub fn server(&self, name: &str) -> Result<&ServerEntry, LabError> {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| LabError::UnknownServer {
                name: name.to_owned(),
                known: self
                    .servers
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

// === impl Lab ===

/// A running lab. [`Lab::stop`] or drop stops everything.
pub struct Lab {
    inner: Arc<Inner>,
    control: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    dir: PathBuf,
    dns: Vec<(String, LabDns)>,
    who: Vec<(String, WhoServer)>,
    proxies: Vec<(String, FaultProxy)>,
    supervisor: Supervisor,
    manifest: Mutex<Manifest>,
    shutdown: Notify,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Starts every server of `options`, publishes the proxies under `options.service` in every
    /// DNS server, opens the control socket `dir/control.sock` and writes `dir/lab.json`.
    pub async fn start(options: LabOptions) -> Result<Lab, LabError> {
        let dir = options.dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| LabError::io(format!("create lab dir {}", dir.display()), e))?;
        let pid = std::process::id();
        let mut servers = Vec::new();

        let mut dns = Vec::new();
        for d in &options.dns {
            let name = format!("dns-{}", d.region);
            let server = LabDns::start(&d.region, d.addr, &options.zone).await?;
            servers.push(ServerEntry {
                name: name.clone(),
                kind: ServerKind::Dns,
                region: d.region.clone(),
                idc: d.idc.clone(),
                address: server.addr(),
                role: "dns".into(),
                pid,
            });
            dns.push((name, server));
        }
        let mut who = Vec::new();
        let mut proxies = Vec::new();
        for b in &options.backends {
            let who_name = format!("who-{}", b.name);
            let w = WhoServer::start(&who_name, &b.idc, b.http).await?;
            let proxy_name = format!("proxy-{}", b.name);
            let p = FaultProxy::start(b.proxy, w.addr()).await?;
            servers.push(ServerEntry {
                name: who_name.clone(),
                kind: ServerKind::Http,
                region: b.region.clone(),
                idc: b.idc.clone(),
                address: w.addr(),
                role: "backend".into(),
                pid,
            });
            servers.push(ServerEntry {
                name: proxy_name.clone(),
                kind: ServerKind::Proxy,
                region: b.region.clone(),
                idc: b.idc.clone(),
                address: p.addr(),
                role: "proxy".into(),
                pid,
            });
            who.push((who_name, w));
            proxies.push((proxy_name, p));
        }
        let published: Vec<IpAddr> = proxies.iter().map(|(_, p)| p.addr().ip()).collect();
        for (_, d) in &dns {
            d.set_records(&options.service, &published, options.ttl_secs)?;
        }
        let supervisor = Supervisor::new(dir.join("logs"));
        for spec in &options.processes {
            let entry = ServerEntry {
                name: spec.name.clone(),
                kind: ServerKind::Process,
                region: spec.region.clone(),
                idc: spec.idc.clone(),
                address: spec.address,
                role: spec.role.clone(),
                pid: 0,
            };
            let child = supervisor.start(spec.clone()).await?;
            servers.push(ServerEntry {
                pid: child,
                ..entry
            });
        }

        let control_path = dir.join("control.sock");
        let _ = std::fs::remove_file(&control_path);
        let listener = UnixListener::bind(&control_path).map_err(|e| {
            LabError::io(format!("bind control socket {}", control_path.display()), e)
        })?;
        let manifest = Manifest {
            servers,
            control: control_path,
            daemon_pid: pid,
            daemon_start: crate::process::start_time(pid),
            zone: options.zone.clone(),
            service: options.service.clone(),
            idcs: options.idcs.clone(),
            port_offset: options.port_offset,
            stack: false,
        };
        let inner = Arc::new(Inner {
            dir: dir.clone(),
            dns,
            who,
            proxies,
            supervisor,
            manifest: Mutex::new(manifest.clone()),
            shutdown: Notify::new(),
        });
        let control = tokio::spawn(control_loop(listener, inner.clone()));
        manifest.write(&dir)?;
        tracing::info!(dir = %dir.display(), servers = manifest.servers.len(), "lab started");
        Ok(Lab {
            inner,
            control: Mutex::new(Some(control)),
        })
    }

    /// The lab directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The current manifest (as written to `lab.json`).
    pub async fn manifest(&self) -> Manifest {
        self.inner.manifest.lock().await.clone()
    }

    /// The DNS server of `region`.
    pub fn dns(&self, region: &str) -> Option<&LabDns> {
        self.inner
            .dns
            .iter()
            .find(|(_, d)| d.region() == region)
            .map(|(_, d)| d)
    }

    /// The `/who` server named `name` (e.g. `who-bj-a-1`).
    pub fn who(&self, name: &str) -> Option<&WhoServer> {
        self.inner
            .who
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, w)| w)
    }

    /// The proxy named `name` (e.g. `proxy-bj-a-1`).
    pub fn proxy(&self, name: &str) -> Option<&FaultProxy> {
        self.inner
            .proxies
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
    }

    /// The supervisor of the lab's external processes.
    pub fn supervisor(&self) -> &Supervisor {
        &self.inner.supervisor
    }

    /// Applies `action` to the server named `target` (see [`FaultAction`] for the meaning per
    /// kind). Unknown names fail with [`LabError::UnknownServer`] listing the known ones.
    pub async fn apply(&self, target: &str, action: FaultAction) -> Result<(), LabError> {
        self.inner.apply(target, action).await
    }

    /// Resolves when a `shutdown` request arrived on the control socket.
    pub async fn shutdown_requested(&self) {
        self.inner.shutdown.notified().await;
    }

    /// Stops every server and process, closes the control socket and removes it and
    /// `lab.json`. Idempotent.
    pub async fn stop(&self) {
        if let Some(control) = self.control.lock().await.take() {
            control.abort();
            let _ = control.await;
        }
        for (_, p) in &self.inner.proxies {
            p.stop().await;
        }
        for (_, w) in &self.inner.who {
            w.stop().await;
        }
        for (_, d) in &self.inner.dns {
            d.stop().await;
        }
        self.inner.supervisor.stop_all().await;
        let manifest = self.inner.manifest.lock().await;
        let _ = std::fs::remove_file(&manifest.control);
        let _ = std::fs::remove_file(Manifest::path(&self.inner.dir));
        tracing::info!(dir = %self.inner.dir.display(), "lab stopped");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The servers' own Drops close their sockets and the supervisor kills its children.
        if let Some(control) = self.control.get_mut().take() {
            control.abort();
            let _ = std::fs::remove_file(self.inner.dir.join("control.sock"));
            let _ = std::fs::remove_file(Manifest::path(&self.inner.dir));
        }
    }
}

impl Inner {
    async fn apply(&self, target: &str, action: FaultAction) -> Result<(), LabError> {
        let kind = self.manifest.lock().await.server(target)?.kind;
        let unsupported = |hint: &str| LabError::Unsupported {
            fault: action.to_string(),
            name: target.to_owned(),
            kind: kind.to_string(),
            hint: hint.to_owned(),
        };
        tracing::info!(target, %action, "fault");
        match kind {
            ServerKind::Dns => {
                let d = find(&self.dns, target)?;
                match action {
                    FaultAction::Kill => d.stop().await,
                    FaultAction::Freeze | FaultAction::Blackhole => d.set_mode(DnsMode::Silent),
                    FaultAction::Thaw | FaultAction::Heal => d.set_mode(DnsMode::Serve),
                    FaultAction::Restart => d.restart().await?,
                    FaultAction::Latency { .. } | FaultAction::RoundTripLatency { .. } => {
                        return Err(unsupported("; latency applies to proxies"));
                    }
                }
            }
            ServerKind::Proxy => {
                let p = find(&self.proxies, target)?;
                match action {
                    FaultAction::Kill => p.stop().await,
                    FaultAction::Freeze | FaultAction::Blackhole => p.set_fault(Fault::Blackhole),
                    FaultAction::Thaw | FaultAction::Heal => p.set_fault(Fault::Pass),
                    FaultAction::Restart => p.restart().await?,
                    FaultAction::Latency { ms } => {
                        p.set_fault(Fault::Latency(Duration::from_millis(ms)))
                    }
                    FaultAction::RoundTripLatency { ms } => {
                        p.set_fault(Fault::RoundTrip(Duration::from_millis(ms)))
                    }
                }
            }
            ServerKind::Http => {
                let w = find(&self.who, target)?;
                let hint = format!("; apply it to {}", target.replacen("who-", "proxy-", 1));
                match action {
                    FaultAction::Kill => w.stop().await,
                    FaultAction::Restart => w.restart().await?,
                    FaultAction::Thaw | FaultAction::Heal => {}
                    FaultAction::Freeze
                    | FaultAction::Blackhole
                    | FaultAction::Latency { .. }
                    | FaultAction::RoundTripLatency { .. } => {
                        return Err(unsupported(&hint));
                    }
                }
            }
            ServerKind::Process => match action {
                FaultAction::Kill => self.supervisor.kill(target).await?,
                FaultAction::Freeze => self.supervisor.freeze(target)?,
                FaultAction::Thaw | FaultAction::Heal => self.supervisor.thaw(target)?,
                FaultAction::Restart => {
                    let pid = self.supervisor.restart(target).await?;
                    let mut manifest = self.manifest.lock().await;
                    if let Some(s) = manifest.servers.iter_mut().find(|s| s.name == target) {
                        s.pid = pid;
                    }
                    manifest.write(&self.dir)?;
                }
                FaultAction::Blackhole
                | FaultAction::Latency { .. }
                | FaultAction::RoundTripLatency { .. } => {
                    return Err(unsupported("; put a proxy in front of it"));
                }
            },
        }
        Ok(())
    }
}

fn find<'a, T>(list: &'a [(String, T)], name: &str) -> Result<&'a T, LabError> {
    list.iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| LabError::NotRunning {
            name: name.to_owned(),
        })
}

async fn control_loop(listener: UnixListener, inner: Arc<Inner>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                conns.spawn(control_conn(stream, inner.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn control_conn(stream: UnixStream, inner: Arc<Inner>) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut shutdown = false;
        let resp = match serde_json::from_str::<ControlRequest>(&line) {
            Err(e) => ControlResponse::error(format!("bad request {line:?}: {e}")),
            Ok(ControlRequest::Ping) => ControlResponse::from_result(Ok(())),
            Ok(ControlRequest::Shutdown) => {
                shutdown = true;
                ControlResponse::from_result(Ok(()))
            }
            Ok(ControlRequest::Fault { target, action }) => {
                ControlResponse::from_result(inner.apply(&target, action).await)
            }
            Ok(ControlRequest::Stack { fault }) => ControlResponse::error(format!(
                "{fault}: this lab runs no stack (start one with `ha-lab up --stack`)"
            )),
        };
        let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
        out.push('\n');
        let _ = w.write_all(out.as_bytes()).await;
        if shutdown {
            // notify_one stores a permit, so a waiter that arrives later still sees it.
            inner.shutdown.notify_one();
        }
    }
}

// === probes ===

/// True when the server of `entry` answers: a DNS query (any answer) for dns, a TCP connect
/// for http and proxy, pid alive and a TCP connect for processes. Bounded by `wait`.
pub async fn probe(entry: &ServerEntry, wait: Duration) -> bool {
    let fut = async {
        match entry.kind {
            ServerKind::Dns => probe_dns(entry.address).await,
            ServerKind::Http | ServerKind::Proxy => {
                tokio::net::TcpStream::connect(entry.address).await.is_ok()
            }
            ServerKind::Process => {
                crate::process::pid_alive(entry.pid)
                    && tokio::net::TcpStream::connect(entry.address).await.is_ok()
            }
        }
    };
    tokio::time::timeout(wait, fut).await.unwrap_or(false)
}

async fn probe_dns(addr: SocketAddr) -> bool {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RecordType},
    };
    let Ok(name) = Name::from_ascii(".") else {
        return false;
    };
    let mut msg = Message::query();
    msg.add_query(Query::query(name, RecordType::SOA));
    let Ok(bytes) = msg.to_vec() else {
        return false;
    };
    let bind = if addr.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    };
    let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
        return false;
    };
    if sock.connect(addr).await.is_err() || sock.send(&bytes).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    sock.recv(&mut buf).await.is_ok()
}
