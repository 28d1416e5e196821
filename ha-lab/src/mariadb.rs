//! MariaDB in the lab: a primary in `bj-a`, GTID replicas in `bj-b` and `sh-a`, per-region DNS
//! names for the primary, and an in-process HA-master simulator (feature `mariadb`).
//!
//! Every `mariadbd` gets its own data directory (`mariadb-install-db`, ~0.5 s) under one
//! temporary directory, its own IDC address (`127.0.1.x`, `127.0.2.x`, `127.0.3.x`), a free
//! port probed at start, a distinct `server_id`, the binlog with GTIDs (`--gtid-strict-mode`,
//! `--log-slave-updates`), and `read_only` on the replicas. Servers are started through the
//! [`Supervisor`] (by pid, killed when the lab is dropped, also when a test panics) and the
//! directory is removed on drop.
//!
//! Users (created on every node with `sql_log_bin = 0`, so no GTID is spent on them):
//! [`ADMIN_USER`] (everything, for the simulator and for test checks), [`APP_USER`] (DML and DDL
//! on [`DATABASE`] plus `SLAVE MONITOR` for role checks, and **without** `READ ONLY ADMIN`, so
//! `read_only` fences it), and a replication user.
//!
//! The HA simulator ([`MariaDbLab::start_ha`]) decides from outside, like the production HA-master:
//! it heartbeats the primary every 200 ms (each beat bounded by 200 ms); after 3 misses in a row
//! it promotes the most advanced live replica (`STOP SLAVE; RESET SLAVE ALL; SET GLOBAL
//! read_only = 0`), points the other replica at it and repoints the primary's DNS name in every
//! region. [`MariaDbLab::switchover`] is the planned switch: old primary `read_only = 1`, wait for
//! the target to catch up (`MASTER_GTID_WAIT`), promote, repoint the others, repoint DNS.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ha_lab::mariadb::MariaDbLabError> {
//! use ha_lab::mariadb::{MariaDbLab, MariaDbLabOptions};
//! let lab = MariaDbLab::start(MariaDbLabOptions::default()).await?;
//! lab.start_ha();
//! let primary = lab.primary();
//! lab.kill(&primary.name).await?;
//! let event = lab.wait_ha_event(1, std::time::Duration::from_secs(10)).await?;
//! println!("{} -> {} repointed after {:?}", event.from, event.to, event.repointed_after());
//! # Ok(()) }
//! ```

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use mysql_async::{Conn, OptsBuilder, prelude::Queryable};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

use crate::{
    LabError,
    cgroup::IdcCgroup,
    dns::LabDns,
    process::{Readiness, ServerSpec, Supervisor},
};

/// The administrative user on every node (all privileges, including `READ ONLY ADMIN`).
pub const ADMIN_USER: &str = "halab_admin";
/// [`ADMIN_USER`]'s password.
pub const ADMIN_PASSWORD: &str = "halab-admin-pw";
/// The application user: DML/DDL on [`DATABASE`] and `SLAVE MONITOR`, no `READ ONLY ADMIN`.
pub const APP_USER: &str = "app";
/// [`APP_USER`]'s password.
pub const APP_PASSWORD: &str = "app-pw";
/// The application database, created on the primary and replicated.
pub const DATABASE: &str = "app";
const REPL_USER: &str = "halab_repl";
const REPL_PASSWORD: &str = "halab-repl-pw";

/// The lab's DNS zone.
pub const ZONE: &str = "lab.";
/// TTL of the primary's DNS records, in seconds.
pub const DNS_TTL_SECS: u32 = 1;

/// Heartbeat period of the HA simulator.
pub const HEARTBEAT: Duration = Duration::from_millis(200);
/// Missed heartbeats in a row before the simulator fails over.
pub const MISSES: u32 = 3;

/// What went wrong in the MariaDB lab.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MariaDbLabError {
    /// A lab primitive (process supervisor, DNS) failed.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// A statement failed on a node.
    #[error("{node}: {context}: {source}")]
    Sql {
        /// The node's name.
        node: String,
        /// What was being done.
        context: String,
        /// The driver's error.
        source: mysql_async::Error,
    },
    /// Something did not happen within its bound.
    #[error("{what} did not happen within {timeout:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The bound.
        timeout: Duration,
    },
    /// Setting up a node failed.
    #[error("{0}")]
    Setup(String),
}

/// Options of [`MariaDbLab::start`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MariaDbLabOptions {
    /// The last octet of every node's address (`127.0.1.<host>` etc.). Default 30.
    pub host: u8,
    /// Bound on every node's start-up. Default 20 s.
    pub ready_timeout: Duration,
    /// Directory of the lab's files (data directories, logs). Default `None`: a fresh
    /// directory under the system temporary directory, removed on drop. A given directory is
    /// created if needed and kept; the nodes' data directories in it (`mariadb-<idc>`) are
    /// removed and installed afresh at start.
    pub dir: Option<PathBuf>,
    /// Semi-synchronous replication (`rpl_semi_sync_master_enabled` and `_slave_enabled` on
    /// every node, wait point `AFTER_SYNC`): a commit is acknowledged once a replica has it, so
    /// a promoted replica holds every acknowledged write. The value is
    /// `rpl_semi_sync_master_timeout`, after which a primary with no replica answering falls
    /// back to asynchronous replication. Default `None` (asynchronous).
    pub semi_sync: Option<Duration>,
}

impl Default for MariaDbLabOptions {
    fn default() -> Self {
        MariaDbLabOptions {
            host: 30,
            ready_timeout: Duration::from_secs(20),
            dir: None,
            semi_sync: None,
        }
    }
}

impl MariaDbLabOptions {
    /// Keeps the lab's files in `dir` (created if needed, not removed).
    #[must_use]
    pub fn with_dir(mut self, dir: impl Into<PathBuf>) -> MariaDbLabOptions {
        self.dir = Some(dir.into());
        self
    }
}

/// One `mariadbd` of the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MariaNode {
    /// The supervisor's name, e.g. `mariadb-bj-a`.
    pub name: String,
    /// Its IDC.
    pub idc: String,
    /// Its region.
    pub region: String,
    /// Where it serves.
    pub addr: SocketAddr,
    /// Its `server_id`.
    pub server_id: u32,
    /// Its data directory.
    pub datadir: PathBuf,
}

impl MariaNode {
    fn socket(&self) -> PathBuf {
        self.datadir.join("mysqld.sock")
    }
}

/// What the HA simulator did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HaEventKind {
    /// The primary missed [`MISSES`] heartbeats: a replica was promoted.
    Failover,
    /// A planned switchover.
    Switchover,
}

/// One switch of the primary, with its timings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HaEvent {
    /// Failover or switchover.
    pub kind: HaEventKind,
    /// The old primary's name.
    pub from: String,
    /// The new primary's name.
    pub to: String,
    /// The new primary's address.
    pub to_addr: SocketAddr,
    /// Failover: the first missed heartbeat; switchover: the call.
    pub started_at: Instant,
    /// When the simulator decided (third miss; for a switchover, the call).
    pub decided_at: Instant,
    /// When the new primary was writable.
    pub promoted_at: Instant,
    /// When every region's DNS answered the new primary.
    pub repointed_at: Instant,
}

impl HaEvent {
    /// From the start (first miss, or the switchover call) to the DNS repoint.
    pub fn repointed_after(&self) -> Duration {
        self.repointed_at.saturating_duration_since(self.started_at)
    }
}

struct Shared {
    nodes: Vec<MariaNode>,
    dns: Vec<LabDns>,
    names: Vec<(String, String)>,
    /// Index of the current primary in `nodes`.
    primary: parking_lot::Mutex<usize>,
    events: watch::Sender<Vec<HaEvent>>,
    /// Serialises the simulator's failovers with planned switchovers.
    admin: tokio::sync::Mutex<()>,
    /// Semi-synchronous replication is on (a promotion turns the master side on).
    semi_sync: bool,
    /// The IDC cut off by [`MariaDbLab::partition`], if any: the simulator, deciding from
    /// outside it, sees a primary there as lost.
    partitioned: parking_lot::Mutex<Option<String>>,
}

/// A partition of a [`MariaDbLab`] ([`MariaDbLab::partition`]); healed on drop.
#[must_use = "the partition is healed when the guard is dropped"]
pub struct MariaPartition {
    scope: crate::partition::Scope,
    shared: Arc<Shared>,
    idc: String,
}

impl std::fmt::Debug for MariaPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MariaPartition")
            .field("idc", &self.idc)
            .field("table", &self.scope.table())
            .finish()
    }
}

impl MariaPartition {
    /// Removes the partition, then fences the partitioned IDC's nodes that are no longer the
    /// primary (`read_only = 1`, bounded): returns the nodes fenced. A node that does not
    /// answer (killed earlier) is skipped.
    pub async fn heal(self) -> Result<Vec<String>, MariaDbLabError> {
        // Fenced while still cut off (the admin connection is a Unix socket, never cut): once
        // the rules are gone the old primary must already refuse writes.
        let primary = *self.shared.primary.lock();
        let mut fenced = Vec::new();
        for (i, n) in self.shared.nodes.iter().enumerate() {
            if n.idc == self.idc && i != primary {
                // A node that is not running (killed earlier) has nothing to fence.
                let mut c = match admin(n).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::info!(node = n.name, error = %e, "mariadb lab: heal: node not answering, not fenced");
                        continue;
                    }
                };
                fence(&mut c, n, self.shared.semi_sync).await?;
                fenced.push(n.name.clone());
            }
        }
        self.scope.heal_all()?;
        *self.shared.partitioned.lock() = None;
        tracing::info!(idc = self.idc, ?fenced, "mariadb lab: partition healed");
        Ok(fenced)
    }
}

/// Fences a cut-off old primary without acknowledging anything to a client: commits waiting
/// for a semi-synchronous acknowledgement hold `read_only` back, and releasing them (semi-sync
/// off) would answer OK to clients still waiting for them, acknowledging rows that exist on
/// this node alone. So: new application sessions are refused (`ACCOUNT LOCK`), the existing
/// ones killed (a waiting client sees its connection lost: an unknown outcome, never an OK),
/// then `read_only`, semi-sync off, and the account unlocked (refused writes from now on by
/// `read_only`). The account changes are kept out of the binlog (no errant transaction).
async fn fence(c: &mut Conn, n: &MariaNode, semi_sync: bool) -> Result<(), MariaDbLabError> {
    sql(c, n, "SET SESSION sql_log_bin = 0").await?;
    sql(
        c,
        n,
        &format!("ALTER USER '{APP_USER}'@'127.%' ACCOUNT LOCK"),
    )
    .await?;
    let ids: Vec<u64> = rows(
        c,
        n,
        &format!("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = '{APP_USER}'"),
    )
    .await?;
    for id in ids {
        // A session that ended meanwhile is not an error.
        let _ = sql(c, n, &format!("KILL CONNECTION {id}")).await;
    }
    if semi_sync {
        // Nothing is waiting any more; a commit that still were would only be released
        // locally (its client is gone).
        sql(c, n, "SET GLOBAL rpl_semi_sync_master_enabled = OFF").await?;
    }
    sql(c, n, "SET GLOBAL read_only = 1").await?;
    sql(
        c,
        n,
        &format!("ALTER USER '{APP_USER}'@'127.%' ACCOUNT UNLOCK"),
    )
    .await?;
    Ok(())
}

impl Drop for MariaPartition {
    fn drop(&mut self) {
        if let Err(e) = self.scope.heal_all() {
            tracing::error!(error = %e, table = self.scope.table(), "could not heal a MariaDB lab partition");
        }
        *self.shared.partitioned.lock() = None;
    }
}

/// Removes the lab's directory when dropped (after the supervisor killed the servers), when the
/// lab made it.
struct DirGuard(PathBuf, bool);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if !self.1 {
            return;
        }
        if std::fs::remove_dir_all(&self.0).is_err() {
            // A server killed a moment ago may still be closing files.
            std::thread::sleep(Duration::from_millis(100));
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The MariaDB lab: three servers, two DNS regions, an optional HA simulator. See the
/// [module docs](self).
pub struct MariaDbLab {
    shared: Arc<Shared>,
    sim: parking_lot::Mutex<Option<JoinHandle<()>>>,
    // Field order matters: the supervisor (which SIGKILLs the servers) drops before the
    // directory is removed.
    sup: Supervisor,
    /// Each node's IDC cgroup (see [`crate::cgroup`]), `None` where the machine has none;
    /// after the supervisor, so that they are empty when they are removed.
    cgroups: Vec<Option<IdcCgroup>>,
    _dir: DirGuard,
}

impl std::fmt::Debug for MariaDbLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MariaDbLab")
            .field("nodes", &self.shared.nodes)
            .field("primary", &self.primary().name)
            .finish_non_exhaustive()
    }
}

impl Drop for MariaDbLab {
    fn drop(&mut self) {
        if let Some(task) = self.sim.lock().take() {
            task.abort();
        }
    }
}

static LAB_SEQ: AtomicU64 = AtomicU64::new(0);

impl MariaDbLab {
    /// Starts the three servers and two DNS regions, sets up users and replication, and waits
    /// (bounded) until both replicas replicate the application database.
    pub async fn start(opts: MariaDbLabOptions) -> Result<MariaDbLab, MariaDbLabError> {
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let (dir, remove) = match &opts.dir {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!(
                    "ha-lab-mariadb-{}-{seq}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos())
                )),
                true,
            ),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| LabError::io(format!("create {}", dir.display()), e))?;
        let guard = DirGuard(dir.clone(), remove);
        // Declared before the supervisor: on an early return the supervisor (killing the
        // servers) drops first, then the emptied cgroups are removed.
        let mut cgroups: Vec<Option<IdcCgroup>> = Vec::new();
        let sup = Supervisor::new(dir.join("logs")).with_ready_timeout(opts.ready_timeout);
        let layout = [
            ("bj-a", "north", 1u8),
            ("bj-b", "north", 2u8),
            ("sh-a", "south", 3u8),
        ];
        let ips: Vec<Ipv4Addr> = layout
            .iter()
            .map(|(_, _, third)| Ipv4Addr::new(127, 0, *third, opts.host))
            .collect();
        let port = common_free_port(&ips)?;
        let mut nodes = Vec::new();
        for (i, ((idc, region, _), ip)) in layout.iter().zip(&ips).enumerate() {
            let ip = *ip;
            let name = format!("mariadb-{idc}");
            let datadir = dir.join(&name);
            let node = MariaNode {
                name,
                idc: (*idc).to_owned(),
                region: (*region).to_owned(),
                addr: SocketAddr::new(IpAddr::V4(ip), port),
                server_id: u32::try_from(i).unwrap_or(0) + 1,
                datadir,
            };
            if !remove && node.datadir.exists() {
                // A kept directory from an earlier lab: every start installs afresh.
                std::fs::remove_dir_all(&node.datadir).map_err(|e| {
                    LabError::io(format!("remove old {}", node.datadir.display()), e)
                })?;
            }
            install_db(&node).await?;
            let pid = sup.start(spec(&node, i != 0, opts.semi_sync)).await?;
            // In its IDC's cgroup before it opens any connection (a replica's replication
            // connection comes from 127.0.0.1: only the cgroup says which IDC it is in).
            let group = IdcCgroup::create(&format!("{}-{seq}-{port}-{idc}", std::process::id()))
                .and_then(|g| g.add(pid).map(|()| g));
            match group {
                Ok(g) => cgroups.push(Some(g)),
                Err(e) => {
                    tracing::debug!(node = node.name, error = %e, "no IDC cgroup: partitions unavailable");
                    cgroups.push(None);
                }
            }
            nodes.push(node);
        }
        for node in &nodes {
            bootstrap_users(node).await?;
        }
        let primary = &nodes[0];
        // Replication first: with semi-synchronous replication a commit on the primary waits
        // for a replica's acknowledgement.
        for replica in &nodes[1..] {
            let mut conn = admin(replica).await?;
            sql(&mut conn, replica, &change_master(primary, "slave_pos")).await?;
            sql(&mut conn, replica, "START SLAVE").await?;
        }
        let mut conn = admin(primary).await?;
        sql(
            &mut conn,
            primary,
            &format!("CREATE DATABASE IF NOT EXISTS {DATABASE}"),
        )
        .await?;
        drop(conn);
        for replica in &nodes[1..] {
            wait_database(replica, opts.ready_timeout).await?;
        }
        let north = LabDns::start("north", "127.0.1.53:0".parse().map_err(bad_addr)?, ZONE).await?;
        let south = LabDns::start("south", "127.0.3.53:0".parse().map_err(bad_addr)?, ZONE).await?;
        let names = vec![
            ("north".to_owned(), format!("db.north.{ZONE}")),
            ("south".to_owned(), format!("db.south.{ZONE}")),
        ];
        let dns = vec![north, south];
        for (d, (_, name)) in dns.iter().zip(&names) {
            d.set_records(name, &[primary.addr.ip()], DNS_TTL_SECS)?;
        }
        let (events, _) = watch::channel(Vec::new());
        tracing::info!(dir = %dir.display(), "mariadb lab started");
        Ok(MariaDbLab {
            shared: Arc::new(Shared {
                nodes,
                dns,
                names,
                primary: parking_lot::Mutex::new(0),
                events,
                admin: tokio::sync::Mutex::new(()),
                partitioned: parking_lot::Mutex::new(None),
                semi_sync: opts.semi_sync.is_some(),
            }),
            cgroups,
            sim: parking_lot::Mutex::new(None),
            sup,
            _dir: guard,
        })
    }

    /// Every node, primary first as started.
    pub fn nodes(&self) -> &[MariaNode] {
        &self.shared.nodes
    }

    /// The node called `name` (`mariadb-bj-a`, ...) or in IDC `name` (`bj-a`).
    pub fn node(&self, name: &str) -> Option<&MariaNode> {
        self.shared
            .nodes
            .iter()
            .find(|n| n.name == name || n.idc == name)
    }

    /// The current primary (as the simulator knows it).
    pub fn primary(&self) -> MariaNode {
        let i = *self.shared.primary.lock();
        self.shared.nodes[i].clone()
    }

    /// The per-region DNS servers: `(region, address)`.
    pub fn dns_servers(&self) -> Vec<(String, SocketAddr)> {
        self.shared
            .dns
            .iter()
            .map(|d| (d.region().to_owned(), d.addr()))
            .collect()
    }

    /// The primary's DNS name per region: `(region, name)`, e.g. `("north", "db.north.lab.")`.
    pub fn primary_names(&self) -> Vec<(String, String)> {
        self.shared.names.clone()
    }

    /// A topology (TOML) for ha-core with the lab's regions, IDCs and DNS, the local IDC
    /// `local_idc`, and a dependency `dep` of `kind = "mysql"` following the primary's name;
    /// `extra` is appended verbatim (e.g. a `[dependencies.dep.settings]` table).
    pub fn topology_toml(&self, local_idc: &str, dep: &str, extra: &str) -> String {
        let servers = self.dns_servers();
        let resolver = |region: &str| {
            servers
                .iter()
                .find(|(r, _)| r == region)
                .map(|(_, a)| a.to_string())
                .unwrap_or_default()
        };
        // Every node listens on the same port (each on its own IP): a DNS answer carries only
        // the IP.
        let port = self.shared.nodes[0].addr.port();
        let names = self
            .shared
            .names
            .iter()
            .map(|(r, n)| format!("{r} = \"{n}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            r#"
local_idc = "{local_idc}"
[[regions]]
name = "north"
resolvers = ["{north}"]
[[regions]]
name = "south"
resolvers = ["{south}"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[[idcs]]
name = "bj-b"
region = "north"
cidrs = ["127.0.2.0/24"]
[[idcs]]
name = "sh-a"
region = "south"
cidrs = ["127.0.3.0/24"]
[dns]
min_ttl = "200ms"
max_ttl = "5s"
query_timeout = "300ms"
retry_interval = "100ms"
serve_stale_for = "30s"
[dependencies.{dep}]
kind = "mysql"
port = {port}
dns = {{ {names} }}
{extra}
"#,
            north = resolver("north"),
            south = resolver("south"),
        )
    }

    /// An administrative connection to `node` over its Unix socket (bounded by 5 s; never cut
    /// by a partition).
    pub async fn admin_conn(&self, node: &MariaNode) -> Result<Conn, MariaDbLabError> {
        admin(node).await
    }

    /// SIGKILLs `name` (a node name or its IDC).
    pub async fn kill(&self, name: &str) -> Result<(), MariaDbLabError> {
        let node = self.require(name)?;
        Ok(self.sup.kill(&node.name).await?)
    }

    /// SIGSTOPs `name`.
    pub fn freeze(&self, name: &str) -> Result<(), MariaDbLabError> {
        let node = self.require(name)?;
        Ok(self.sup.freeze(&node.name)?)
    }

    /// SIGCONTs `name`.
    pub fn thaw(&self, name: &str) -> Result<(), MariaDbLabError> {
        let node = self.require(name)?;
        Ok(self.sup.thaw(&node.name)?)
    }

    /// The pid of `name` while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.node(name).and_then(|n| self.sup.pid(&n.name))
    }

    fn require(&self, name: &str) -> Result<MariaNode, MariaDbLabError> {
        self.node(name)
            .cloned()
            .ok_or_else(|| MariaDbLabError::Setup(format!("no mariadb node {name:?}")))
    }

    /// The IDC cgroup of `idc`'s node (see [`crate::cgroup`]), `None` when the machine has no
    /// usable cgroup v2 hierarchy. A test moves its own process in (`add(std::process::id())`,
    /// before it connects) to be a client in that IDC for [`MariaDbLab::partition`].
    pub fn cgroup(&self, idc: &str) -> Option<&IdcCgroup> {
        let i = self.shared.nodes.iter().position(|n| n.idc == idc)?;
        self.cgroups.get(i)?.as_ref()
    }

    /// Cuts `idc` off from the other IDCs, as a network partition: its node's address from the
    /// other nodes' addresses, and the processes of the IDC cgroups (the nodes themselves, and
    /// any test process moved into one, see [`MariaDbLab::cgroup`]) from the other side's
    /// addresses, on the lab's port only. The HA simulator decides from outside the
    /// partitioned IDC, as the seed's Raft group does: a primary there is lost to it, and it
    /// promotes the most advanced replica on the other side. Admin connections use Unix
    /// sockets and are never cut. Healed by [`MariaPartition::heal`] or on drop; the heal
    /// fences the nodes of `idc` that are no longer the primary (`read_only = 1`), as the HA
    /// fences a returning old primary. Needs root, `nft` and cgroup v2.
    pub fn partition(&self, idc: &str) -> Result<MariaPartition, MariaDbLabError> {
        let no_cgroups = || {
            MariaDbLabError::Setup(
                "partitions need an IDC cgroup per node (root and cgroup v2 under /sys/fs/cgroup)"
                    .into(),
            )
        };
        let i = self
            .shared
            .nodes
            .iter()
            .position(|n| n.idc == idc)
            .ok_or_else(|| MariaDbLabError::Setup(format!("no mariadb node in IDC {idc:?}")))?;
        let node = &self.shared.nodes[i];
        let member = self.cgroups[i].as_ref().ok_or_else(no_cgroups)?;
        let mut others = Vec::new();
        let mut other_members = Vec::new();
        for (j, n) in self.shared.nodes.iter().enumerate() {
            if j != i {
                others.push(ipnet::IpNet::from(n.addr.ip()));
                other_members.push(self.cgroups[j].as_ref().ok_or_else(no_cgroups)?);
            }
        }
        let scope = crate::partition::Scope::lab(node.addr.port(), [node.addr.port()]);
        let guard = MariaPartition {
            scope: scope.clone(),
            shared: self.shared.clone(),
            idc: idc.to_owned(),
        };
        scope.partition_members(
            ipnet::IpNet::from(node.addr.ip()),
            &[member],
            &others,
            &other_members,
        )?;
        *self.shared.partitioned.lock() = Some(idc.to_owned());
        tracing::info!(idc, "mariadb lab: IDC partitioned");
        Ok(guard)
    }

    /// Points every region's primary name at `ip` (what the HA does after a switch; also for
    /// tests of a stale or wrong answer).
    pub fn set_primary_dns(&self, ip: IpAddr) -> Result<(), MariaDbLabError> {
        set_dns(&self.shared, ip)
    }

    /// Starts the HA simulator (idempotent).
    pub fn start_ha(&self) {
        let mut sim = self.sim.lock();
        if sim.is_none() {
            *sim = Some(tokio::spawn(heartbeat(self.shared.clone())));
        }
    }

    /// Stops the HA simulator (idempotent; [`MariaDbLab::start_ha`] starts it again). Stop it
    /// before killing every node, or it keeps trying to fail over.
    pub fn stop_ha(&self) {
        if let Some(task) = self.sim.lock().take() {
            task.abort();
        }
    }

    /// Every switch so far.
    pub fn ha_events(&self) -> Vec<HaEvent> {
        self.shared.events.borrow().clone()
    }

    /// Waits (bounded) until the simulator has made `n` switches; returns the `n`-th.
    pub async fn wait_ha_event(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<HaEvent, MariaDbLabError> {
        let mut rx = self.shared.events.subscribe();
        let got = tokio::time::timeout(timeout, rx.wait_for(|v| v.len() >= n)).await;
        match got {
            Ok(Ok(v)) => v
                .get(n - 1)
                .cloned()
                .ok_or_else(|| timeout_err("ha event", timeout)),
            _ => Err(timeout_err(&format!("ha event #{n}"), timeout)),
        }
    }

    /// A planned switchover to `target` (a node name or IDC; `None`: the first replica):
    /// old primary `read_only = 1`, wait for the target (`MASTER_GTID_WAIT`, 5 s), promote,
    /// repoint the others and DNS.
    pub async fn switchover(&self, target: Option<&str>) -> Result<HaEvent, MariaDbLabError> {
        let _admin = self.shared.admin.lock().await;
        let started_at = Instant::now();
        let old_i = *self.shared.primary.lock();
        let new_i = match target {
            Some(t) => self
                .shared
                .nodes
                .iter()
                .position(|n| n.name == t || n.idc == t)
                .ok_or_else(|| MariaDbLabError::Setup(format!("no mariadb node {t:?}")))?,
            None => (0..self.shared.nodes.len())
                .find(|i| *i != old_i)
                .unwrap_or(old_i),
        };
        if new_i == old_i {
            return Err(MariaDbLabError::Setup(
                "switchover target is the primary".into(),
            ));
        }
        let old = &self.shared.nodes[old_i];
        let new = &self.shared.nodes[new_i];
        let mut oc = admin(old).await?;
        sql(&mut oc, old, "SET GLOBAL read_only = 1").await?;
        let pos: String = first(&mut oc, old, "SELECT @@gtid_binlog_pos").await?;
        let mut nc = admin(new).await?;
        let waited: i64 = first(
            &mut nc,
            new,
            &format!("SELECT MASTER_GTID_WAIT('{pos}', 5)"),
        )
        .await?;
        if waited != 0 {
            return Err(timeout_err(
                &format!("{} catching up to {pos}", new.name),
                Duration::from_secs(5),
            ));
        }
        promote(&mut nc, new, self.shared.semi_sync).await?;
        let promoted_at = Instant::now();
        for (i, other) in self.shared.nodes.iter().enumerate() {
            if i == new_i {
                continue;
            }
            let mode = if i == old_i {
                "current_pos"
            } else {
                "slave_pos"
            };
            if let Err(e) = repoint(other, new, mode, self.shared.semi_sync).await {
                tracing::warn!(node = other.name, error = %e, "switchover: repoint failed");
            }
        }
        set_dns(&self.shared, new.addr.ip())?;
        let repointed_at = Instant::now();
        *self.shared.primary.lock() = new_i;
        let event = HaEvent {
            kind: HaEventKind::Switchover,
            from: old.name.clone(),
            to: new.name.clone(),
            to_addr: new.addr,
            started_at,
            decided_at: started_at,
            promoted_at,
            repointed_at,
        };
        tracing::info!(from = old.name, to = new.name, took = ?event.repointed_after(), "switchover done");
        self.shared.events.send_modify(|v| v.push(event.clone()));
        Ok(event)
    }
}

// === the HA simulator ===

async fn heartbeat(shared: Arc<Shared>) {
    let mut conn: Option<(usize, Conn)> = None;
    let mut misses = 0u32;
    let mut first_miss: Option<Instant> = None;
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let admin_guard = shared.admin.lock().await;
        let pi = *shared.primary.lock();
        let primary = &shared.nodes[pi];
        if conn.as_ref().is_some_and(|(i, _)| *i != pi) {
            conn = None;
        }
        let cut_off = shared.partitioned.lock().as_deref() == Some(primary.idc.as_str());
        let ok = tokio::time::timeout(HEARTBEAT, async {
            if cut_off {
                // Deciding from outside the partitioned IDC: its primary is lost to us.
                return Err(mysql_async::Error::Other(
                    "primary's IDC partitioned".into(),
                ));
            }
            if conn.is_none() {
                conn = Some((pi, Conn::new(admin_opts(primary)).await?));
            }
            match conn.as_mut() {
                Some((_, c)) => c.query_drop("DO 1").await,
                None => Ok(()),
            }
        })
        .await;
        match ok {
            Ok(Ok(())) => {
                misses = 0;
                first_miss = None;
            }
            _ => {
                conn = None;
                misses += 1;
                let started = *first_miss.get_or_insert_with(Instant::now);
                tracing::debug!(primary = primary.name, misses, "heartbeat missed");
                if misses >= MISSES {
                    match failover(&shared, pi, started).await {
                        Ok(event) => {
                            shared.events.send_modify(|v| v.push(event));
                            misses = 0;
                            first_miss = None;
                        }
                        Err(e) => tracing::warn!(error = %e, "failover failed, retrying"),
                    }
                }
            }
        }
        drop(admin_guard);
    }
}

async fn failover(
    shared: &Shared,
    old_i: usize,
    started_at: Instant,
) -> Result<HaEvent, MariaDbLabError> {
    let decided_at = Instant::now();
    let old = &shared.nodes[old_i];
    // The most advanced live replica, after it applied what it received.
    let mut best: Option<(usize, u64, Conn)> = None;
    for (i, node) in shared.nodes.iter().enumerate() {
        if i == old_i {
            continue;
        }
        let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(1), admin(node)).await else {
            continue;
        };
        let io_pos = slave_io_pos(&mut c, node).await.unwrap_or_default();
        if !io_pos.is_empty() {
            let _ = tokio::time::timeout(
                Duration::from_secs(3),
                c.query_drop(format!("DO MASTER_GTID_WAIT('{io_pos}', 2)")),
            )
            .await;
        }
        let pos: String = first(&mut c, node, "SELECT @@gtid_slave_pos")
            .await
            .unwrap_or_default();
        let seq = gtid_seq(&pos);
        if best.as_ref().is_none_or(|(_, s, _)| seq > *s) {
            best = Some((i, seq, c));
        }
    }
    let Some((new_i, _, mut nc)) = best else {
        return Err(MariaDbLabError::Setup("no live replica to promote".into()));
    };
    let new = &shared.nodes[new_i];
    promote(&mut nc, new, shared.semi_sync).await?;
    let promoted_at = Instant::now();
    for (i, other) in shared.nodes.iter().enumerate() {
        if i == new_i || i == old_i {
            continue;
        }
        if let Err(e) = repoint(other, new, "slave_pos", shared.semi_sync).await {
            tracing::warn!(node = other.name, error = %e, "failover: repoint failed");
        }
    }
    set_dns(shared, new.addr.ip())?;
    let repointed_at = Instant::now();
    *shared.primary.lock() = new_i;
    let event = HaEvent {
        kind: HaEventKind::Failover,
        from: old.name.clone(),
        to: new.name.clone(),
        to_addr: new.addr,
        started_at,
        decided_at,
        promoted_at,
        repointed_at,
    };
    tracing::info!(from = old.name, to = new.name, took = ?event.repointed_after(), "failover done");
    Ok(event)
}

async fn promote(c: &mut Conn, node: &MariaNode, semi_sync: bool) -> Result<(), MariaDbLabError> {
    sql(c, node, "STOP SLAVE").await?;
    sql(c, node, "RESET SLAVE ALL").await?;
    if semi_sync {
        sql(c, node, "SET GLOBAL rpl_semi_sync_master_enabled = ON").await?;
    }
    sql(c, node, "SET GLOBAL read_only = 0").await
}

async fn repoint(
    node: &MariaNode,
    to: &MariaNode,
    mode: &str,
    semi_sync: bool,
) -> Result<(), MariaDbLabError> {
    let mut c = tokio::time::timeout(Duration::from_secs(1), admin(node))
        .await
        .map_err(|_| timeout_err(&format!("connect to {}", node.name), Duration::from_secs(1)))??;
    sql(&mut c, node, "SET GLOBAL read_only = 1").await?;
    if semi_sync {
        sql(
            &mut c,
            node,
            "SET GLOBAL rpl_semi_sync_master_enabled = OFF",
        )
        .await?;
    }
    sql(&mut c, node, "STOP SLAVE").await?;
    sql(&mut c, node, &change_master(to, mode)).await?;
    sql(&mut c, node, "START SLAVE").await
}

fn set_dns(shared: &Shared, ip: IpAddr) -> Result<(), MariaDbLabError> {
    for (d, (_, name)) in shared.dns.iter().zip(&shared.names) {
        d.set_records(name, &[ip], DNS_TTL_SECS)?;
    }
    Ok(())
}

/// The sequence number of domain 0 in a GTID position such as `0-1-42` (0 when absent).
fn gtid_seq(pos: &str) -> u64 {
    pos.split(',')
        .filter_map(|g| {
            let mut parts = g.trim().split('-');
            let domain = parts.next()?;
            let _server = parts.next()?;
            let seq = parts.next()?;
            (domain == "0").then(|| seq.parse().ok()).flatten()
        })
        .max()
        .unwrap_or(0)
}

async fn slave_io_pos(c: &mut Conn, node: &MariaNode) -> Result<String, MariaDbLabError> {
    let row: Option<mysql_async::Row> =
        c.query_first("SHOW SLAVE STATUS")
            .await
            .map_err(|source| MariaDbLabError::Sql {
                node: node.name.clone(),
                context: "SHOW SLAVE STATUS".into(),
                source,
            })?;
    Ok(row
        .and_then(|r| r.get_opt::<Option<String>, _>("Gtid_IO_Pos"))
        .and_then(Result::ok)
        .flatten()
        .unwrap_or_default())
}

// === set-up ===

fn bad_addr(e: std::net::AddrParseError) -> MariaDbLabError {
    MariaDbLabError::Setup(e.to_string())
}

fn timeout_err(what: &str, timeout: Duration) -> MariaDbLabError {
    MariaDbLabError::Timeout {
        what: what.to_owned(),
        timeout,
    }
}

/// A port free on every one of `ips` right now (bound and released): the DNS answer carries
/// only the IP, so every node serves on the same port.
fn common_free_port(ips: &[Ipv4Addr]) -> Result<u16, MariaDbLabError> {
    for _ in 0..50 {
        let first = SocketAddr::new(IpAddr::V4(ips[0]), 0);
        let l = std::net::TcpListener::bind(first).map_err(|source| LabError::Bind {
            addr: first,
            source,
        })?;
        let port = l
            .local_addr()
            .map_err(|e| LabError::io("local address", e))?
            .port();
        let others_free = ips[1..]
            .iter()
            .all(|ip| std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(*ip), port)).is_ok());
        if others_free {
            return Ok(port);
        }
    }
    Err(MariaDbLabError::Setup(
        "no port free on every lab address".into(),
    ))
}

async fn install_db(node: &MariaNode) -> Result<(), MariaDbLabError> {
    let program = crate::process::find_program("mariadb-install-db").ok_or_else(|| {
        LabError::MissingBinary {
            program: "mariadb-install-db".into(),
            package: "mariadb-server".into(),
        }
    })?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg("--no-defaults")
        .arg(format!("--datadir={}", node.datadir.display()))
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-test-db")
        .kill_on_drop(true);
    if is_root() {
        cmd.arg("--user=root");
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .map_err(|_| timeout_err("mariadb-install-db", Duration::from_secs(60)))?
        .map_err(|e| LabError::io("run mariadb-install-db", e))?;
    if !out.status.success() {
        return Err(MariaDbLabError::Setup(format!(
            "mariadb-install-db for {} failed ({}): {}",
            node.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn spec(node: &MariaNode, replica: bool, semi_sync: Option<Duration>) -> ServerSpec {
    let program = crate::process::find_program("mariadbd")
        .or_else(|| {
            let p = Path::new("/usr/sbin/mariadbd");
            p.exists().then(|| p.to_path_buf())
        })
        .map_or_else(|| "mariadbd".to_owned(), |p| p.display().to_string());
    let mut spec = ServerSpec::new(&node.name, &program, "mariadb-server", node.addr);
    let d = node.datadir.display();
    spec.args = vec![
        "--no-defaults".into(),
        format!("--datadir={d}"),
        format!("--socket={}", node.socket().display()),
        format!("--pid-file={d}/mysqld.pid"),
        format!("--port={}", node.addr.port()),
        format!("--bind-address={}", node.addr.ip()),
        format!("--server-id={}", node.server_id),
        "--log-bin=mysql-bin".into(),
        "--gtid-strict-mode=1".into(),
        "--log-slave-updates".into(),
        "--skip-name-resolve".into(),
        "--skip-slave-start".into(),
        "--innodb-buffer-pool-size=32M".into(),
        "--performance-schema=OFF".into(),
        "--max-connections=500".into(),
    ];
    if replica {
        spec.args.push("--read-only=1".into());
    }
    if let Some(timeout) = semi_sync {
        // The primary waits for a replica; a replica only acknowledges. (A replica with the
        // master side on would make its own SQL thread wait for acknowledgements nobody
        // sends, with log-slave-updates.) A promotion turns the master side on, a repoint
        // off.
        spec.args.extend([
            format!(
                "--rpl-semi-sync-master-enabled={}",
                if replica { "OFF" } else { "ON" }
            ),
            "--rpl-semi-sync-slave-enabled=ON".into(),
            "--rpl-semi-sync-master-wait-point=AFTER_SYNC".into(),
            format!(
                "--rpl-semi-sync-master-timeout={}",
                timeout.as_millis().max(1)
            ),
        ]);
    }
    if is_root() {
        spec.args.insert(1, "--user=root".into());
    }
    spec.ready = Readiness::TcpConnect(node.addr);
    spec.idc = node.idc.clone();
    spec.region = node.region.clone();
    spec.role = if replica { "replica" } else { "primary" }.into();
    spec
}

async fn bootstrap_users(node: &MariaNode) -> Result<(), MariaDbLabError> {
    let opts = OptsBuilder::default()
        .socket(Some(node.socket().display().to_string()))
        .user(Some("root"));
    let mut c = tokio::time::timeout(Duration::from_secs(5), Conn::new(opts))
        .await
        .map_err(|_| {
            timeout_err(
                &format!("root socket connect to {}", node.name),
                Duration::from_secs(5),
            )
        })?
        .map_err(|source| MariaDbLabError::Sql {
            node: node.name.clone(),
            context: "root connect over the socket".into(),
            source,
        })?;
    let statements = [
        "SET sql_log_bin = 0".to_owned(),
        format!(
            "CREATE USER IF NOT EXISTS '{ADMIN_USER}'@'127.%' IDENTIFIED BY '{ADMIN_PASSWORD}'"
        ),
        format!("GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'127.%' WITH GRANT OPTION"),
        format!(
            "CREATE USER IF NOT EXISTS '{ADMIN_USER}'@'localhost' IDENTIFIED BY '{ADMIN_PASSWORD}'"
        ),
        format!("GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'localhost' WITH GRANT OPTION"),
        format!("CREATE USER IF NOT EXISTS '{REPL_USER}'@'127.%' IDENTIFIED BY '{REPL_PASSWORD}'"),
        format!("GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'127.%'"),
        format!("CREATE USER IF NOT EXISTS '{APP_USER}'@'127.%' IDENTIFIED BY '{APP_PASSWORD}'"),
        format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, INDEX, ALTER ON {DATABASE}.* TO '{APP_USER}'@'127.%'"
        ),
        format!("GRANT SLAVE MONITOR ON *.* TO '{APP_USER}'@'127.%'"),
        "SET sql_log_bin = 1".to_owned(),
    ];
    for s in &statements {
        sql(&mut c, node, s).await?;
    }
    let _ = c.disconnect().await;
    Ok(())
}

fn change_master(to: &MariaNode, mode: &str) -> String {
    format!(
        "CHANGE MASTER TO MASTER_HOST = '{}', MASTER_PORT = {}, MASTER_USER = '{REPL_USER}', \
         MASTER_PASSWORD = '{REPL_PASSWORD}', MASTER_USE_GTID = {mode}, MASTER_CONNECT_RETRY = 1",
        to.addr.ip(),
        to.addr.port()
    )
}

async fn wait_database(node: &MariaNode, bound: Duration) -> Result<(), MariaDbLabError> {
    let deadline = Instant::now() + bound;
    loop {
        if let Ok(mut c) = admin(node).await {
            let n: Result<i64, _> = first(
                &mut c,
                node,
                &format!(
                    "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = '{DATABASE}'"
                ),
            )
            .await;
            if matches!(n, Ok(1)) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(timeout_err(
                &format!("{} replicating database {DATABASE}", node.name),
                bound,
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The simulator's and the tests' admin connections go over the node's Unix socket: no
/// partition (nftables) ever cuts them, as the HA system's own network is not the one a
/// partition of the data network cuts.
fn admin_opts(node: &MariaNode) -> OptsBuilder {
    OptsBuilder::default()
        .socket(Some(node.socket().display().to_string()))
        .user(Some(ADMIN_USER))
        .pass(Some(ADMIN_PASSWORD))
}

async fn admin(node: &MariaNode) -> Result<Conn, MariaDbLabError> {
    let bound = Duration::from_secs(5);
    tokio::time::timeout(bound, Conn::new(admin_opts(node)))
        .await
        .map_err(|_| timeout_err(&format!("admin connect to {}", node.name), bound))?
        .map_err(|source| MariaDbLabError::Sql {
            node: node.name.clone(),
            context: "admin connect".into(),
            source,
        })
}

async fn sql(c: &mut Conn, node: &MariaNode, q: &str) -> Result<(), MariaDbLabError> {
    let bound = Duration::from_secs(10);
    tokio::time::timeout(bound, c.query_drop(q))
        .await
        .map_err(|_| timeout_err(&format!("{q} on {}", node.name), bound))?
        .map_err(|source| MariaDbLabError::Sql {
            node: node.name.clone(),
            context: q.to_owned(),
            source,
        })
}

async fn rows<T>(c: &mut Conn, node: &MariaNode, q: &str) -> Result<Vec<T>, MariaDbLabError>
where
    T: mysql_async::prelude::FromRow + Send + 'static,
{
    let bound = Duration::from_secs(10);
    tokio::time::timeout(bound, c.query(q))
        .await
        .map_err(|_| timeout_err(&format!("{q} on {}", node.name), bound))?
        .map_err(|source| MariaDbLabError::Sql {
            node: node.name.clone(),
            context: q.to_owned(),
            source,
        })
}

async fn first<T>(c: &mut Conn, node: &MariaNode, q: &str) -> Result<T, MariaDbLabError>
where
    T: mysql_async::prelude::FromRow + Send + 'static,
{
    let bound = Duration::from_secs(10);
    let row: Option<T> = tokio::time::timeout(bound, c.query_first(q))
        .await
        .map_err(|_| timeout_err(&format!("{q} on {}", node.name), bound))?
        .map_err(|source| MariaDbLabError::Sql {
            node: node.name.clone(),
            context: q.to_owned(),
            source,
        })?;
    row.ok_or_else(|| MariaDbLabError::Setup(format!("{q} on {}: no row", node.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_seq_reads_domain_zero() {
        assert_eq!(gtid_seq(""), 0);
        assert_eq!(gtid_seq("0-1-42"), 42);
        assert_eq!(gtid_seq("1-3-7,0-2-43"), 43);
    }
}
