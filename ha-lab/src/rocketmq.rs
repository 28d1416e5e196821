//! RocketMQ in the lab: per IDC one name server and one broker (the pure-Rust servers of
//! rocketmq-rust 1.0.0), by default in `bj-a` and `sh-a`. The broker of an IDC registers with
//! its own IDC's name server only, so the lab is two independent clusters (`cluster-bj-a`,
//! `cluster-sh-a`), the shape a client that fails over between regions sees.
//!
//! Addresses: every server of an IDC binds one address of the IDC's range, by default
//! `127.0.1.220` and `127.0.3.220` (the Redis lab takes last octets 10–209, the MariaDB lab 30,
//! the default lab 11, 12 and 53). Ports: IDC `i` takes four ports from the lab's base port,
//! `base + 4i` up: the broker's fast port (listen port − 2, which the broker always opens), the
//! name server, the broker and its HA port (listen port + 1). Like the Redis lab, each
//! [`RocketMqLab`] picks its base port from its pid and a per-process counter and probes every
//! port free on its IDC address first, so labs of parallel test processes never collide;
//! [`RocketMqLabOptions::base_port`] pins it instead.
//!
//! Readiness: a server is started through the [`Supervisor`], which waits until *our* child
//! listens on its port; the lab then asks the IDC's name server for its cluster table
//! (`GET_BROKER_CLUSTER_INFO`, request code 106, over a hand-written remoting frame:
//! [`remoting_request`]) until it lists the broker at its address. That is the moment a
//! client can find a route.
//!
//! Faults go by pid through the supervisor: SIGKILL, SIGSTOP/SIGCONT, restart with the same
//! ports, configuration and store. Dropping the lab SIGKILLs every server (also when a test
//! panics); [`RocketMqLab::stop`] does it and waits for each to be reaped. Every wait is bounded.
//!
//! Files: the lab directory holds `broker-<idc>.toml`, each broker's `ROCKETMQ_HOME` and store
//! (`broker-<idc>/store`), each name server's home and `kvConfig.json` (`namesrv-<idc>/`), and
//! `logs/<server>.log` (the servers log to stdout). A directory the lab made is removed on drop,
//! unless `HA_LAB_KEEP=1`.
//!
//! Measured on a 2-core machine: the lab is ready 0.30–0.59 s after [`RocketMqLab::start`];
//! an idle broker holds ~71 MB resident with 8–10 threads, a name server ~16 MB (the broker's
//! `processMemoryLimitBytes` changes neither). The name server drops a killed broker as soon as
//! its connection closes, so [`RocketMqLab::restart_broker`] is back and registered in ~0.16 s;
//! a restarted name server waits up to one `registerNameServerPeriod` (10 s) for the broker.
//! The default store sizes would make each broker allocate 1.4 GB of disk on its first message;
//! the lab's `broker.toml` shrinks that to ~69 MB (see `broker_toml`).
//!
//! Binaries: `rocketmq-namesrv-rust` and `rocketmq-broker-rust`, looked up on `PATH`, then in
//! [`ROCKETMQ_BIN_DIR`]; [`INSTALL_COMMAND`] builds them (18–46 minutes cold; `scripts/setup`
//! runs it when they are missing).
//!
//! ```no_run
//! # async fn demo() -> Result<(), ha_lab::LabError> {
//! use ha_lab::rocketmq::{RocketMqLab, RocketMqLabOptions};
//! let lab = RocketMqLab::start(RocketMqLabOptions::default()).await?;
//! let namesrv = lab.namesrv_addr("bj-a").expect("bj-a is a default IDC");
//! println!("name server of bj-a: {namesrv}, cluster {:?}", lab.cluster_name("bj-a"));
//! lab.kill_broker("bj-a").await?;
//! lab.restart_broker("bj-a").await?; // same ports and store, registered again
//! lab.stop().await;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::LabError;
use crate::process::{ServerSpec, Supervisor, find_program};

/// The name server program.
pub const NAMESRV_PROGRAM: &str = "rocketmq-namesrv-rust";
/// The broker program.
pub const BROKER_PROGRAM: &str = "rocketmq-broker-rust";
/// Where the project installs the RocketMQ servers, searched after `PATH`.
pub const ROCKETMQ_BIN_DIR: &str = "/var/cache/ha-clients/rocketmq/bin";
/// The command that installs both servers into [`ROCKETMQ_BIN_DIR`].
pub const INSTALL_COMMAND: &str = "cargo install --locked --root /var/cache/ha-clients/rocketmq rocketmq-namesrv@1.0.0 rocketmq-broker@1.0.0";

/// The last address octet of the default IDC addresses (`127.0.1.220`, `127.0.3.220`).
pub const DEFAULT_HOST: u8 = 220;

/// Remoting request code `GET_BROKER_CLUSTER_INFO` (answered by the name server).
pub const GET_BROKER_CLUSTER_INFO: i32 = 106;
/// Remoting request code `GET_BROKER_RUNTIME_INFO` (answered by a broker).
pub const GET_BROKER_RUNTIME_INFO: i32 = 28;

/// The `version` the lab's remoting requests carry (any value is accepted for these codes).
const REMOTING_VERSION: i32 = 501;
/// A remoting frame larger than this is refused (the cluster table of the lab is tiny).
const MAX_FRAME: usize = 16 << 20;
/// Ports per IDC: fast port, name server, broker, HA.
const PORTS_PER_IDC: u16 = 4;
/// The automatically picked base ports lie in `FIRST_PORT..LAST_PORT`, below the ephemeral
/// range (32768 up) so that no outgoing connection of the machine holds one.
const FIRST_PORT: u16 = 10_000;
const LAST_PORT: u16 = 32_000;
/// Bound on one cluster-table query while polling.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(20);

static NEXT_SLOT: AtomicU32 = AtomicU32::new(0);
static NEXT_OPAQUE: AtomicI32 = AtomicI32::new(1);

// === options ===

/// Options of a [`RocketMqLab`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RocketMqLabOptions {
    /// Directory of the lab's files (configs, stores, logs). Default `None`: a fresh directory
    /// under the system temporary directory, removed when the lab is dropped (kept when
    /// `HA_LAB_KEEP` is set). A given directory is created if needed and kept.
    pub dir: Option<PathBuf>,
    /// The IDCs, each with the one address all its servers bind. Default `bj-a` at
    /// `127.0.1.220` and `sh-a` at `127.0.3.220`. IPv4 loopback addresses are what the brokers'
    /// `development-insecure-loopback` profile accepts.
    pub idcs: Vec<(String, IpAddr)>,
    /// First port of the lab: IDC `i` uses `base + 4i` (broker fast port), `+1` (name server),
    /// `+2` (broker), `+3` (broker HA). Default `None`: picked per lab, probed free, as the
    /// Redis lab does (pid and a per-process counter select a block in 10000–32000).
    pub base_port: Option<u16>,
    /// The brokers' `registerNameServerPeriod`: how often a broker registers again, which
    /// bounds how long a restarted name server knows no broker. Default 10 s, the broker's
    /// minimum (it clamps the value to 10–60 s).
    pub register_period: Duration,
    /// Bound on each start-up wait (default 20 s).
    pub ready_timeout: Duration,
}

impl Default for RocketMqLabOptions {
    fn default() -> Self {
        let ip = |third| IpAddr::V4(Ipv4Addr::new(127, 0, third, DEFAULT_HOST));
        RocketMqLabOptions {
            dir: None,
            idcs: vec![("bj-a".into(), ip(1)), ("sh-a".into(), ip(3))],
            base_port: None,
            register_period: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(20),
        }
    }
}

impl RocketMqLabOptions {
    /// Keeps the lab's files in `dir` (created if needed, not removed).
    #[must_use]
    pub fn with_dir(mut self, dir: impl Into<PathBuf>) -> RocketMqLabOptions {
        self.dir = Some(dir.into());
        self
    }

    /// Pins the lab's first port (see [`RocketMqLabOptions::base_port`]).
    #[must_use]
    pub fn with_base_port(mut self, port: u16) -> RocketMqLabOptions {
        self.base_port = Some(port);
        self
    }

    /// Sets the bound on each start-up wait.
    #[must_use]
    pub fn with_ready_timeout(mut self, timeout: Duration) -> RocketMqLabOptions {
        self.ready_timeout = timeout;
        self
    }
}

// === the lab ===

/// One IDC of the RocketMQ lab: its name server and its broker.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RocketMqIdc {
    /// The IDC, e.g. `bj-a`.
    pub idc: String,
    /// The address every server of the IDC binds.
    pub ip: IpAddr,
    /// The name server's address.
    pub namesrv: SocketAddr,
    /// The broker's address (its `listenPort`), as it registers with the name server.
    pub broker: SocketAddr,
    /// The broker's fast port (`listenPort - 2`).
    pub broker_fast: SocketAddr,
    /// The broker's HA port (`listenPort + 1`).
    pub broker_ha: SocketAddr,
    /// The broker's cluster, `cluster-<idc>`.
    pub cluster: String,
    /// The broker's name, `broker-<idc>`.
    pub broker_name: String,
    /// The name server's supervisor name, `rocketmq-namesrv-<idc>`.
    pub namesrv_server: String,
    /// The broker's supervisor name, `rocketmq-broker-<idc>`.
    pub broker_server: String,
}

/// A running RocketMQ lab. See the [module docs](self).
#[derive(Debug)]
pub struct RocketMqLab {
    // Declared before `dir`: fields drop in order, so every server is SIGKILLed (by pid)
    // before its directory is removed.
    supervisor: Supervisor,
    dir: LabDir,
    options: RocketMqLabOptions,
    idcs: Vec<RocketMqIdc>,
    namesrv_program: PathBuf,
    broker_program: PathBuf,
}

impl RocketMqLab {
    /// Starts a name server and a broker per IDC and waits (bounded by
    /// [`RocketMqLabOptions::ready_timeout`] per step) until every broker is registered with
    /// its IDC's name server. Fails with [`LabError::MissingProgram`] when a server binary is
    /// missing; whatever was started is killed on failure.
    pub async fn start(options: RocketMqLabOptions) -> Result<RocketMqLab, LabError> {
        check_idcs(&options.idcs)?;
        let namesrv_program = rocketmq_program(NAMESRV_PROGRAM)?;
        let broker_program = rocketmq_program(BROKER_PROGRAM)?;
        let ips: Vec<IpAddr> = options.idcs.iter().map(|(_, ip)| *ip).collect();
        let base = match options.base_port {
            Some(port) => check_base_port(port, ips.len())?,
            None => pick_base_port(&ips)?,
        };
        let dir = match &options.dir {
            Some(d) => LabDir::given(d)?,
            None => LabDir::temp(&format!("ha-lab-rocketmq-{}-{base}", std::process::id()))?,
        };
        let supervisor =
            Supervisor::new(dir.path().join("logs")).with_ready_timeout(options.ready_timeout);
        let idcs = options
            .idcs
            .iter()
            .enumerate()
            .map(|(i, (idc, ip))| {
                // `check_base_port`/`pick_base_port` made sure every port fits.
                let first = base + PORTS_PER_IDC * i as u16;
                RocketMqIdc {
                    idc: idc.clone(),
                    ip: *ip,
                    broker_fast: SocketAddr::new(*ip, first),
                    namesrv: SocketAddr::new(*ip, first + 1),
                    broker: SocketAddr::new(*ip, first + 2),
                    broker_ha: SocketAddr::new(*ip, first + 3),
                    cluster: format!("cluster-{idc}"),
                    broker_name: format!("broker-{idc}"),
                    namesrv_server: format!("rocketmq-namesrv-{idc}"),
                    broker_server: format!("rocketmq-broker-{idc}"),
                }
            })
            .collect();
        let lab = RocketMqLab {
            supervisor,
            dir,
            options,
            idcs,
            namesrv_program,
            broker_program,
        };
        futures::future::try_join_all(lab.idcs.iter().map(|i| lab.start_idc(i))).await?;
        Ok(lab)
    }

    async fn start_idc(&self, idc: &RocketMqIdc) -> Result<(), LabError> {
        self.supervisor.start(self.namesrv_spec(idc)?).await?;
        self.supervisor.start(self.broker_spec(idc)?).await?;
        self.wait_registered(&idc.idc, self.options.ready_timeout)
            .await
    }

    /// The options the lab was started with.
    pub fn options(&self) -> &RocketMqLabOptions {
        &self.options
    }

    /// The supervisor (pids, logs, and kill/freeze/thaw/restart by server name).
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The directory of the lab's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The IDCs, in the order of [`RocketMqLabOptions::idcs`].
    pub fn idcs(&self) -> &[RocketMqIdc] {
        &self.idcs
    }

    /// The IDC named `idc`.
    pub fn idc(&self, idc: &str) -> Option<&RocketMqIdc> {
        self.idcs.iter().find(|i| i.idc == idc)
    }

    /// The name server of `idc` (what a client's `namesrvAddr` names).
    pub fn namesrv_addr(&self, idc: &str) -> Option<SocketAddr> {
        self.idc(idc).map(|i| i.namesrv)
    }

    /// The broker of `idc`, as registered with its name server.
    pub fn broker_addr(&self, idc: &str) -> Option<SocketAddr> {
        self.idc(idc).map(|i| i.broker)
    }

    /// The cluster of `idc`'s broker, `cluster-<idc>`.
    pub fn cluster_name(&self, idc: &str) -> Option<&str> {
        self.idc(idc).map(|i| i.cluster.as_str())
    }

    /// The name of `idc`'s broker, `broker-<idc>`.
    pub fn broker_name(&self, idc: &str) -> Option<&str> {
        self.idc(idc).map(|i| i.broker_name.as_str())
    }

    /// The pid of `idc`'s name server while it runs.
    pub fn namesrv_pid(&self, idc: &str) -> Option<u32> {
        self.supervisor.pid(&self.idc(idc)?.namesrv_server)
    }

    /// The pid of `idc`'s broker while it runs.
    pub fn broker_pid(&self, idc: &str) -> Option<u32> {
        self.supervisor.pid(&self.idc(idc)?.broker_server)
    }

    /// The pid of every running server, by supervisor name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.supervisor
            .names()
            .into_iter()
            .filter_map(|n| self.supervisor.pid(&n).map(|p| (n, p)))
            .collect()
    }

    fn require(&self, idc: &str) -> Result<&RocketMqIdc, LabError> {
        self.idc(idc).ok_or_else(|| LabError::UnknownServer {
            name: format!("idc {idc}"),
            known: self
                .idcs
                .iter()
                .map(|i| i.idc.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    // === faults ===

    /// SIGKILLs `idc`'s broker (by pid) and reaps it. The name server drops its registration
    /// when it notices the closed connection.
    pub async fn kill_broker(&self, idc: &str) -> Result<(), LabError> {
        let i = self.require(idc)?;
        self.supervisor.kill(&i.broker_server).await
    }

    /// Kills `idc`'s broker if it runs and starts it again with the same ports, configuration
    /// and store; returns its new pid. Waits (bounded) until the name server has dropped the
    /// old registration and lists the new broker, when the name server runs and is not frozen
    /// (otherwise only until the broker listens).
    pub async fn restart_broker(&self, idc: &str) -> Result<u32, LabError> {
        let i = self.require(idc)?;
        let timeout = self.options.ready_timeout;
        self.supervisor.kill(&i.broker_server).await?;
        let namesrv_serves = self.namesrv_serves(i);
        if namesrv_serves {
            self.wait_unregistered(i, timeout).await?;
        }
        let pid = self.supervisor.start(self.broker_spec(i)?).await?;
        if namesrv_serves {
            self.wait_registered(idc, timeout).await?;
        }
        Ok(pid)
    }

    /// SIGSTOPs `idc`'s broker: connections stay open (the kernel even accepts new ones),
    /// nothing answers. Returns once every thread of it is stopped ([`Supervisor::freeze`]).
    pub fn freeze_broker(&self, idc: &str) -> Result<(), LabError> {
        self.supervisor.freeze(&self.require(idc)?.broker_server)
    }

    /// SIGCONTs `idc`'s broker.
    pub fn thaw_broker(&self, idc: &str) -> Result<(), LabError> {
        self.supervisor.thaw(&self.require(idc)?.broker_server)
    }

    /// SIGKILLs `idc`'s name server (by pid) and reaps it.
    pub async fn kill_namesrv(&self, idc: &str) -> Result<(), LabError> {
        let i = self.require(idc)?;
        self.supervisor.kill(&i.namesrv_server).await
    }

    /// Kills `idc`'s name server if it runs and starts it again on the same address (it starts
    /// empty); returns its new pid. When the broker runs and is not frozen, waits until it has
    /// registered again, which takes up to [`RocketMqLabOptions::register_period`] (the wait
    /// is bounded by that plus [`RocketMqLabOptions::ready_timeout`]).
    pub async fn restart_namesrv(&self, idc: &str) -> Result<u32, LabError> {
        let i = self.require(idc)?;
        let pid = self.supervisor.restart(&i.namesrv_server).await?;
        if self
            .supervisor
            .pid(&i.broker_server)
            .is_some_and(|p| !is_stopped(p))
        {
            let bound = self.options.register_period + self.options.ready_timeout;
            self.wait_registered(idc, bound).await?;
        }
        Ok(pid)
    }

    /// SIGSTOPs `idc`'s name server; returns once every thread of it is stopped.
    pub fn freeze_namesrv(&self, idc: &str) -> Result<(), LabError> {
        self.supervisor.freeze(&self.require(idc)?.namesrv_server)
    }

    /// SIGCONTs `idc`'s name server.
    pub fn thaw_namesrv(&self, idc: &str) -> Result<(), LabError> {
        self.supervisor.thaw(&self.require(idc)?.namesrv_server)
    }

    /// SIGKILLs every server of the lab (by pid, frozen ones too) and waits until each is
    /// reaped (bounded: 10 s each), then removes the lab's directory if the lab made it.
    /// Dropping the lab kills the servers as well, without waiting.
    pub async fn stop(self) {
        self.supervisor.stop_all().await;
    }

    // === registration ===

    /// The cluster table of `idc`'s name server (`GET_BROKER_CLUSTER_INFO`, bounded: 1 s).
    pub async fn cluster_info(&self, idc: &str) -> Result<ClusterInfo, LabError> {
        broker_cluster_info(self.require(idc)?.namesrv, QUERY_TIMEOUT).await
    }

    /// True when `idc`'s name server lists `idc`'s broker at its address.
    pub async fn is_registered(&self, idc: &str) -> Result<bool, LabError> {
        let i = self.require(idc)?;
        Ok(self
            .cluster_info(idc)
            .await?
            .lists(&i.broker_name, i.broker))
    }

    /// Waits (bounded) until `idc`'s name server lists `idc`'s broker at its address.
    /// Fails with [`LabError::NotReady`] (naming the broker's log) after `timeout`.
    pub async fn wait_registered(&self, idc: &str, timeout: Duration) -> Result<(), LabError> {
        let i = self.require(idc)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(true) = self.is_registered(idc).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::NotReady {
                    name: format!("{} (registration with {})", i.broker_server, i.namesrv),
                    timeout,
                    log: self.supervisor.log_path(&i.broker_server),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits (bounded) until the name server no longer lists the (killed) broker, so that a
    /// registration seen afterwards is the new broker's.
    async fn wait_unregistered(&self, i: &RocketMqIdc, timeout: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.cluster_info(&i.idc).await {
                Ok(info) if !info.lists(&i.broker_name, i.broker) => return Ok(()),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(LabError::Control(format!(
                    "{} still lists {} {timeout:?} after it was killed",
                    i.namesrv, i.broker
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn namesrv_serves(&self, i: &RocketMqIdc) -> bool {
        self.supervisor
            .pid(&i.namesrv_server)
            .is_some_and(|p| !is_stopped(p))
    }

    // === specs ===

    fn namesrv_spec(&self, i: &RocketMqIdc) -> Result<ServerSpec, LabError> {
        let home = self.dir.path().join(format!("namesrv-{}", i.idc));
        create_dir(&home)?;
        let mut spec = ServerSpec::new(
            &i.namesrv_server,
            &self.namesrv_program.display().to_string(),
            "rocketmq-namesrv@1.0.0 (cargo install)",
            i.namesrv,
        );
        spec.args = vec![
            "--listenPort".into(),
            i.namesrv.port().to_string(),
            "--bindAddress".into(),
            i.ip.to_string(),
            "--rocketmqHome".into(),
            home.display().to_string(),
            // Without it every name server shares one file in $HOME.
            "--kvConfigPath".into(),
            home.join("kvConfig.json").display().to_string(),
        ];
        // The name server reads a config file under $HOME (`~/rocketmq-namesrv/`): keep that
        // per server, inside the lab.
        spec.env = vec![("HOME".into(), home.display().to_string())];
        spec.idc = i.idc.clone();
        spec.role = "namesrv".into();
        Ok(spec)
    }

    fn broker_spec(&self, i: &RocketMqIdc) -> Result<ServerSpec, LabError> {
        let home = self.dir.path().join(format!("broker-{}", i.idc));
        let store = home.join("store");
        create_dir(&store)?;
        let conf = self.dir.path().join(format!("broker-{}.toml", i.idc));
        let text = broker_toml(i, &store, self.options.register_period);
        std::fs::write(&conf, text)
            .map_err(|e| LabError::io(format!("write {}", conf.display()), e))?;
        let mut spec = ServerSpec::new(
            &i.broker_server,
            &self.broker_program.display().to_string(),
            "rocketmq-broker@1.0.0 (cargo install)",
            i.broker,
        );
        spec.args = vec![
            "-c".into(),
            conf.display().to_string(),
            "-n".into(),
            i.namesrv.to_string(),
        ];
        spec.env = vec![
            ("ROCKETMQ_HOME".into(), home.display().to_string()),
            // Whatever the broker puts under $HOME stays inside the lab too.
            ("HOME".into(), home.display().to_string()),
            // Listeners on loopback only, no authentication: the lab's profile.
            (
                "ROCKETMQ_SECURITY_PROFILE".into(),
                "development-insecure-loopback".into(),
            ),
        ];
        spec.idc = i.idc.clone();
        spec.role = "broker".into();
        Ok(spec)
    }
}

/// The broker's `broker.toml`: identity, addresses (`brokerIp2` too, or the broker registers
/// the machine's eth0 address as its HA address), store under `store`, sized for a lab.
///
/// With the default sizes the first message makes a broker allocate 1.4 GB of disk: a 1 GiB
/// commit log file (preallocated, not sparse) and a 420 MB index file (5 M hash slots, 20 M
/// entries); here they are 64 MiB (still 16 × the 4 MiB largest message) and ~4 MB. A consume
/// queue file (per topic and queue) shrinks from 6 MB (300 000 entries) to 600 kB.
fn broker_toml(i: &RocketMqIdc, store: &Path, register_period: Duration) -> String {
    let q = |s: &str| serde_json::Value::from(s).to_string();
    let ip = q(&i.ip.to_string());
    let store = q(&store.display().to_string());
    format!(
        "[broker]\n\
         namesrvAddr = {namesrv}\n\
         brokerIp1 = {ip}\n\
         brokerIp2 = {ip}\n\
         listenPort = {port}\n\
         storePathRootDir = {store}\n\
         registerNameServerPeriod = {period}\n\
         \n\
         [broker.brokerServerConfig]\n\
         bindAddress = {ip}\n\
         \n\
         [broker.brokerIdentity]\n\
         brokerName = {name}\n\
         brokerClusterName = {cluster}\n\
         brokerId = 0\n\
         \n\
         [store]\n\
         storeType = \"LocalFile\"\n\
         brokerRole = \"ASYNC_MASTER\"\n\
         storePathRootDir = {store}\n\
         haListenAddress = {ip}\n\
         haListenPort = {ha}\n\
         mappedFileSizeCommitLog = {commit_log}\n\
         mappedFileSizeConsumeQueue = 600000\n\
         maxHashSlotNum = 50000\n\
         maxIndexNum = 200000\n",
        namesrv = q(&i.namesrv.to_string()),
        port = i.broker.port(),
        period = register_period.as_millis(),
        commit_log = 64u64 << 20,
        name = q(&i.broker_name),
        cluster = q(&i.cluster),
        ha = i.broker_ha.port(),
    )
}

/// Looks `program` up on `PATH`, then in [`ROCKETMQ_BIN_DIR`]; a miss is
/// [`LabError::MissingProgram`] naming [`INSTALL_COMMAND`].
///
/// ```
/// let e = ha_lab::rocketmq::rocketmq_program("no-such-rocketmq-server").unwrap_err();
/// assert!(e.is_missing_binary());
/// assert!(e.to_string().contains(ha_lab::rocketmq::INSTALL_COMMAND));
/// ```
pub fn rocketmq_program(program: &str) -> Result<PathBuf, LabError> {
    if let Some(p) = find_program(program) {
        return Ok(p);
    }
    let p = Path::new(ROCKETMQ_BIN_DIR).join(program);
    if p.is_file() {
        return Ok(p);
    }
    Err(LabError::MissingProgram {
        program: program.to_owned(),
        searched: PathBuf::from(ROCKETMQ_BIN_DIR),
        install: INSTALL_COMMAND.to_owned(),
    })
}

fn check_idcs(idcs: &[(String, IpAddr)]) -> Result<(), LabError> {
    if idcs.is_empty() {
        return Err(LabError::Control("rocketmq lab: no IDC given".into()));
    }
    let names: BTreeSet<&str> = idcs.iter().map(|(n, _)| n.as_str()).collect();
    if names.len() != idcs.len() {
        return Err(LabError::Control(format!(
            "rocketmq lab: IDC names repeat: {:?}",
            idcs.iter().map(|(n, _)| n).collect::<Vec<_>>()
        )));
    }
    Ok(())
}

/// `port` if every IDC's four ports fit below 65536.
fn check_base_port(port: u16, idcs: usize) -> Result<u16, LabError> {
    let span = u32::from(PORTS_PER_IDC) * idcs as u32;
    if u32::from(port) + span > u32::from(u16::MAX) + 1 || port == 0 {
        return Err(LabError::PortOverflow {
            offset: span,
            server: "rocketmq lab".into(),
            port,
        });
    }
    Ok(port)
}

/// Picks a base port whose every port is bindable on its IDC's address, as the Redis lab
/// picks its slot: pid and a per-process counter select a block, probed before use.
fn pick_base_port(ips: &[IpAddr]) -> Result<u16, LabError> {
    let block = u32::from(PORTS_PER_IDC) * ips.len() as u32;
    let blocks = (u32::from(LAST_PORT - FIRST_PORT) / block).max(1);
    let pid = std::process::id();
    for _ in 0..64 {
        let slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        let k = pid.wrapping_mul(7).wrapping_add(slot.wrapping_mul(13)) % blocks;
        let Ok(base) = u16::try_from(u32::from(FIRST_PORT) + k * block) else {
            continue;
        };
        let free = ips.iter().enumerate().all(|(i, ip)| {
            (0..PORTS_PER_IDC).all(|p| {
                let port = base + PORTS_PER_IDC * i as u16 + p;
                std::net::TcpListener::bind(SocketAddr::new(*ip, port)).is_ok()
            })
        });
        if free {
            return Ok(base);
        }
    }
    Err(LabError::Control(
        "no free rocketmq lab port block after 64 tries".into(),
    ))
}

fn create_dir(p: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(p).map_err(|e| LabError::io(format!("create {}", p.display()), e))
}

/// True when `pid` is stopped (SIGSTOP): state `T` in `/proc/<pid>/stat`.
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let (_, rest) = s.rsplit_once(')')?;
            rest.trim_start().chars().next()
        })
        .is_some_and(|state| state == 'T' || state == 't')
}

// === the cluster table ===

/// A name server's cluster table (the body of `GET_BROKER_CLUSTER_INFO`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterInfo {
    /// Registered brokers by broker name.
    pub brokers: BTreeMap<String, RegisteredBroker>,
    /// Broker names by cluster name.
    pub clusters: BTreeMap<String, BTreeSet<String>>,
}

/// One broker name in a [`ClusterInfo`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegisteredBroker {
    /// Its cluster.
    pub cluster: String,
    /// Its addresses by broker id (0 is the master).
    pub addrs: BTreeMap<u64, String>,
}

#[derive(serde::Deserialize)]
struct RawClusterInfo {
    #[serde(rename = "brokerAddrTable", default)]
    broker_addr_table: Option<BTreeMap<String, RawBrokerData>>,
    #[serde(rename = "clusterAddrTable", default)]
    cluster_addr_table: Option<BTreeMap<String, BTreeSet<String>>>,
}

#[derive(serde::Deserialize)]
struct RawBrokerData {
    #[serde(default)]
    cluster: String,
    #[serde(rename = "brokerAddrs", default)]
    broker_addrs: BTreeMap<u64, String>,
}

impl ClusterInfo {
    /// Parses the JSON body of a `GET_BROKER_CLUSTER_INFO` response.
    ///
    /// ```
    /// let body = br#"{"brokerAddrTable":{"broker-bj-a":{"cluster":"cluster-bj-a","brokerName":"broker-bj-a","brokerAddrs":{"0":"127.0.1.220:10002"}}},"clusterAddrTable":{"cluster-bj-a":["broker-bj-a"]}}"#;
    /// let info = ha_lab::rocketmq::ClusterInfo::parse(body).unwrap();
    /// assert!(info.lists("broker-bj-a", "127.0.1.220:10002".parse().unwrap()));
    /// ```
    pub fn parse(body: &[u8]) -> Result<ClusterInfo, LabError> {
        let raw: RawClusterInfo =
            serde_json::from_slice(body).map_err(|source| LabError::Json {
                context: "parse GET_BROKER_CLUSTER_INFO body".into(),
                source,
            })?;
        Ok(ClusterInfo {
            brokers: raw
                .broker_addr_table
                .unwrap_or_default()
                .into_iter()
                .map(|(name, b)| {
                    (
                        name,
                        RegisteredBroker {
                            cluster: b.cluster,
                            addrs: b.broker_addrs,
                        },
                    )
                })
                .collect(),
            clusters: raw.cluster_addr_table.unwrap_or_default(),
        })
    }

    /// True when the broker `broker_name` is registered with `addr` among its addresses.
    pub fn lists(&self, broker_name: &str, addr: SocketAddr) -> bool {
        let addr = addr.to_string();
        self.brokers
            .get(broker_name)
            .is_some_and(|b| b.addrs.values().any(|a| *a == addr))
    }
}

/// Asks the name server at `namesrv` for its cluster table (`GET_BROKER_CLUSTER_INFO`),
/// bounded by `timeout`.
pub async fn broker_cluster_info(
    namesrv: SocketAddr,
    timeout: Duration,
) -> Result<ClusterInfo, LabError> {
    let r = remoting_request(namesrv, GET_BROKER_CLUSTER_INFO, timeout).await?;
    if r.code != 0 {
        return Err(LabError::Control(format!(
            "{namesrv}: GET_BROKER_CLUSTER_INFO answered code {} ({})",
            r.code,
            r.remark.as_deref().unwrap_or("no remark")
        )));
    }
    ClusterInfo::parse(&r.body)
}

// === remoting ===

/// A RocketMQ remoting response.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemotingResponse {
    /// The response code (0 is success).
    pub code: i32,
    /// The remark (the error text of a failure).
    pub remark: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// Sends one remoting request with request code `code`, no extension fields and no body, over
/// a fresh connection, and returns the response; the whole exchange is bounded by `timeout`.
/// Any response, even "request code not supported", shows that the server answers.
///
/// The frame: a 4-byte big-endian length of what follows, a 4-byte header length whose high
/// byte is the serialize type (0, JSON), the JSON header, the body.
pub async fn remoting_request(
    addr: SocketAddr,
    code: i32,
    timeout: Duration,
) -> Result<RemotingResponse, LabError> {
    let ctx = || format!("rocketmq remoting {addr} code {code}");
    let opaque = NEXT_OPAQUE.fetch_add(1, Ordering::Relaxed);
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(&encode_request(code, opaque)).await?;
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
        if len > MAX_FRAME {
            return Err(std::io::Error::other(format!("frame of {len} bytes")));
        }
        let mut frame = vec![0u8; len];
        stream.read_exact(&mut frame).await?;
        decode_response(&frame, opaque).map_err(std::io::Error::other)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| LabError::io(ctx(), std::io::ErrorKind::TimedOut.into()))?
        .map_err(|e| LabError::io(ctx(), e))
}

fn encode_request(code: i32, opaque: i32) -> Vec<u8> {
    let header = serde_json::json!({
        "code": code,
        "language": "RUST",
        "version": REMOTING_VERSION,
        "opaque": opaque,
        "flag": 0,
        "remark": null,
        "extFields": {},
        "serializeTypeCurrentRPC": "JSON",
    })
    .to_string();
    // The header is a few hundred bytes: the lengths fit.
    let header_len = header.len() as u32;
    let mut out = Vec::with_capacity(8 + header.len());
    out.extend((4 + header_len).to_be_bytes());
    out.extend((header_len & 0x00ff_ffff).to_be_bytes());
    out.extend(header.as_bytes());
    out
}

/// Decodes a response frame (everything after the length word), with its header in either
/// serialize type: JSON (0) or RocketMQ's binary layout (1).
fn decode_response(frame: &[u8], opaque: i32) -> Result<RemotingResponse, String> {
    let marker = frame
        .get(..4)
        .ok_or("frame shorter than its header length")?;
    let marker = u32::from_be_bytes([marker[0], marker[1], marker[2], marker[3]]);
    let header_len = (marker & 0x00ff_ffff) as usize;
    let header = frame
        .get(4..4 + header_len)
        .ok_or_else(|| format!("header of {header_len} bytes in a frame of {}", frame.len()))?;
    let head = match marker >> 24 {
        0 => json_header(header)?,
        1 => binary_header(header)?,
        other => return Err(format!("unknown serialize type {other}")),
    };
    if head.flag & 1 == 0 {
        return Err("a request came back instead of a response".into());
    }
    if head.opaque != opaque {
        return Err(format!(
            "response for opaque {}, sent {opaque}",
            head.opaque
        ));
    }
    Ok(RemotingResponse {
        code: head.code,
        remark: head.remark,
        body: frame.get(4 + header_len..).unwrap_or_default().to_vec(),
    })
}

struct Head {
    code: i32,
    opaque: i32,
    flag: i32,
    remark: Option<String>,
}

fn json_header(header: &[u8]) -> Result<Head, String> {
    let header: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("response header: {e}"))?;
    let int = |k: &str| {
        header
            .get(k)
            .and_then(serde_json::Value::as_i64)
            .and_then(|v| i32::try_from(v).ok())
    };
    Ok(Head {
        code: int("code").ok_or("response without a code")?,
        opaque: int("opaque").ok_or("response without an opaque")?,
        flag: int("flag").unwrap_or(0),
        remark: header
            .get("remark")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned),
    })
}

/// The binary header: code i16, language u8, version i16, opaque i32, flag i32, remark
/// (i32 length + UTF-8), then the extension fields, which the lab does not need.
fn binary_header(h: &[u8]) -> Result<Head, String> {
    let short = "binary header too short";
    let be32 = |at: usize| -> Result<i32, String> {
        let b = h.get(at..at + 4).ok_or(short)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let code = h.get(..2).ok_or(short)?;
    let code = i32::from(i16::from_be_bytes([code[0], code[1]]));
    let remark_len = usize::try_from(be32(13)?).map_err(|_| "negative remark length")?;
    let remark = match remark_len {
        0 => None,
        n => Some(String::from_utf8_lossy(h.get(17..17 + n).ok_or(short)?).into_owned()),
    };
    Ok(Head {
        code,
        opaque: be32(5)?,
        flag: be32(9)?,
        remark,
    })
}

// === files ===

/// The lab's directory; removed on drop when the lab made it.
#[derive(Debug)]
struct LabDir {
    path: PathBuf,
    remove: bool,
}

impl LabDir {
    fn temp(name: &str) -> Result<LabDir, LabError> {
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&path);
        create_dir(&path)?;
        Ok(LabDir { path, remove: true })
    }

    fn given(path: &Path) -> Result<LabDir, LabError> {
        create_dir(path)?;
        Ok(LabDir {
            path: path.to_owned(),
            remove: false,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LabDir {
    fn drop(&mut self) {
        if !self.remove {
            return;
        }
        // `HA_LAB_KEEP=1` keeps the configs, stores and logs for a look.
        if std::env::var_os("HA_LAB_KEEP").is_some() {
            tracing::warn!(dir = %self.path.display(), "rocketmq lab files kept");
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn idc() -> RocketMqIdc {
        let ip: IpAddr = "127.0.1.220".parse().unwrap();
        RocketMqIdc {
            idc: "bj-a".into(),
            ip,
            broker_fast: SocketAddr::new(ip, 10_000),
            namesrv: SocketAddr::new(ip, 10_001),
            broker: SocketAddr::new(ip, 10_002),
            broker_ha: SocketAddr::new(ip, 10_003),
            cluster: "cluster-bj-a".into(),
            broker_name: "broker-bj-a".into(),
            namesrv_server: "rocketmq-namesrv-bj-a".into(),
            broker_server: "rocketmq-broker-bj-a".into(),
        }
    }

    #[test]
    fn request_frame_has_lengths_and_a_json_header() {
        let f = encode_request(106, 7);
        let total = u32::from_be_bytes(f[..4].try_into().unwrap()) as usize;
        assert_eq!(total, f.len() - 4);
        let marker = u32::from_be_bytes(f[4..8].try_into().unwrap());
        assert_eq!(marker >> 24, 0, "serialize type JSON");
        assert_eq!(marker as usize, f.len() - 8);
        let header: serde_json::Value = serde_json::from_slice(&f[8..]).unwrap();
        assert_eq!(header["code"], 106);
        assert_eq!(header["opaque"], 7);
        assert_eq!(header["flag"], 0);
        assert_eq!(header["language"], "RUST");
    }

    fn response(header: &str, body: &[u8]) -> Vec<u8> {
        let mut f = (header.len() as u32).to_be_bytes().to_vec();
        f.extend(header.as_bytes());
        f.extend(body);
        f
    }

    #[test]
    fn responses_decode_and_mismatches_are_refused() {
        let ok = response(r#"{"code":0,"flag":1,"opaque":7,"remark":null}"#, b"{}");
        let r = decode_response(&ok, 7).unwrap();
        assert_eq!((r.code, r.remark, r.body), (0, None, b"{}".to_vec()));
        let err = response(r#"{"code":1,"flag":1,"opaque":7,"remark":"no"}"#, b"");
        assert_eq!(
            decode_response(&err, 7).unwrap().remark.as_deref(),
            Some("no")
        );
        assert!(decode_response(&ok, 8).is_err(), "other opaque");
        let request = response(r#"{"code":0,"flag":0,"opaque":7}"#, b"");
        assert!(decode_response(&request, 7).is_err());
        let mut unknown = ok.clone();
        unknown[0] = 2;
        assert!(decode_response(&unknown, 7).is_err());
        // The binary layout: code 0, language, version, opaque 7, flag 1, remark "hi", no ext.
        let mut head = vec![0, 0, 12, 0, 1];
        head.extend(7i32.to_be_bytes());
        head.extend(1i32.to_be_bytes());
        head.extend(2i32.to_be_bytes());
        head.extend(b"hi");
        head.extend(0i32.to_be_bytes());
        let mut binary = (head.len() as u32 | 1 << 24).to_be_bytes().to_vec();
        binary.extend(&head);
        binary.extend(b"body");
        let r = decode_response(&binary, 7).unwrap();
        assert_eq!(
            (r.code, r.remark.as_deref(), &r.body[..]),
            (0, Some("hi"), &b"body"[..])
        );
        assert!(decode_response(&binary[..10], 7).is_err());
        assert!(decode_response(&[0, 0], 7).is_err());
        assert!(decode_response(&[0, 0, 0, 9, b'{'], 7).is_err());
    }

    #[test]
    fn cluster_table_parses_and_lists_by_name_and_address() {
        let body = br#"{"brokerAddrTable":{"broker-bj-a":{"cluster":"cluster-bj-a","brokerName":"broker-bj-a","brokerAddrs":{"0":"127.0.1.220:10002"},"zoneName":null,"enableActingMaster":false}},"clusterAddrTable":{"cluster-bj-a":["broker-bj-a"]}}"#;
        let info = ClusterInfo::parse(body).unwrap();
        let a: SocketAddr = "127.0.1.220:10002".parse().unwrap();
        assert!(info.lists("broker-bj-a", a));
        assert!(!info.lists("broker-sh-a", a));
        assert!(!info.lists("broker-bj-a", "127.0.1.220:10003".parse().unwrap()));
        assert_eq!(info.brokers["broker-bj-a"].cluster, "cluster-bj-a");
        assert!(info.clusters["cluster-bj-a"].contains("broker-bj-a"));
        let empty = ClusterInfo::parse(br#"{"brokerAddrTable":{},"clusterAddrTable":{}}"#).unwrap();
        assert_eq!(empty, ClusterInfo::default());
        assert!(ClusterInfo::parse(b"not json").is_err());
    }

    #[test]
    fn broker_config_names_the_idc_addresses_and_ports() {
        let text = broker_toml(
            &idc(),
            Path::new("/tmp/lab/broker-bj-a/store"),
            Duration::from_secs(10),
        );
        for line in [
            "namesrvAddr = \"127.0.1.220:10001\"",
            "brokerIp1 = \"127.0.1.220\"",
            "brokerIp2 = \"127.0.1.220\"",
            "listenPort = 10002",
            "registerNameServerPeriod = 10000",
            "bindAddress = \"127.0.1.220\"",
            "brokerName = \"broker-bj-a\"",
            "brokerClusterName = \"cluster-bj-a\"",
            "haListenAddress = \"127.0.1.220\"",
            "haListenPort = 10003",
            "mappedFileSizeCommitLog = 67108864",
            "storePathRootDir = \"/tmp/lab/broker-bj-a/store\"",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn base_ports_are_checked_and_picked_free() {
        assert!(check_base_port(65_530, 2).unwrap_err().is_port_overflow());
        assert_eq!(check_base_port(65_528, 2).unwrap(), 65_528);
        let ips: Vec<IpAddr> = vec![
            "127.0.1.220".parse().unwrap(),
            "127.0.3.220".parse().unwrap(),
        ];
        let a = pick_base_port(&ips).unwrap();
        assert!((FIRST_PORT..LAST_PORT).contains(&a));
        // A port of the block taken: the next pick avoids it.
        let _held = std::net::TcpListener::bind(SocketAddr::new(ips[1], a + 5)).unwrap();
        let b = pick_base_port(&ips).unwrap();
        assert!(!(b..b + 8).contains(&(a + 5)));
    }

    #[test]
    fn idcs_must_be_named_once() {
        assert!(check_idcs(&[]).is_err());
        let ip: IpAddr = "127.0.1.220".parse().unwrap();
        assert!(check_idcs(&[("a".into(), ip), ("a".into(), ip)]).is_err());
        assert!(check_idcs(&RocketMqLabOptions::default().idcs).is_ok());
    }

    #[test]
    fn a_missing_program_names_the_install_command() {
        let e = rocketmq_program("no-such-rocketmq-server").unwrap_err();
        assert!(matches!(e, LabError::MissingProgram { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("no-such-rocketmq-server") && text.contains(INSTALL_COMMAND));
    }
}
