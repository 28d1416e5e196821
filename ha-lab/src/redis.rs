//! Redis + Sentinel in the lab: a master in `bj-a`, replicas in `bj-b` and `sh-a`, and three
//! sentinels (one per IDC), each bound to an address of its IDC (`--bind` and
//! `bind-source-addr`, so replicas and sentinels see each other by IDC address), with the fast
//! timers of `LAB.md`.
//!
//! Every [`RedisLab`] takes its own *slot*: its own last address octet in each IDC range and a
//! port range probed free, so labs of parallel tests never collide and never touch the
//! machine's own Redis (6379) or a default sentinel (26379). Sentinel config files are written
//! fresh into a temporary directory per lab (sentinel rewrites them), removed on drop. Every
//! server is started through the [`Supervisor`] (by pid, SIGKILLed on drop, also when a test
//! panics). Every wait is bounded polling.
//!
//! The lab talks RESP itself ([`resp_command`]): ha-lab does not depend on a Redis client crate.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ha_lab::LabError> {
//! use ha_lab::redis::{RedisLab, RedisLabOptions};
//! let lab = RedisLab::start(RedisLabOptions::default()).await?;
//! let before = lab.master().await?;
//! lab.failover().await?;
//! let after = lab.wait_switched_from(before, std::time::Duration::from_secs(15)).await?;
//! assert_ne!(before, after);
//! # Ok(()) }
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::LabError;
use crate::process::{ServerSpec, Supervisor};

/// The IDCs of the Redis lab: (IDC, region, third address octet).
pub const REDIS_IDCS: [(&str, &str, u8); 3] = [
    ("bj-a", "north", 1),
    ("bj-b", "north", 2),
    ("sh-a", "south", 3),
];

/// Options of a [`RedisLab`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RedisLabOptions {
    /// The monitored master's name (default `members`).
    pub master_name: String,
    /// `requirepass` and `masterauth` of the Redis nodes (default none).
    pub redis_password: Option<String>,
    /// `requirepass` of the sentinels (default none).
    pub sentinel_password: Option<String>,
    /// `sentinel down-after-milliseconds` (default 1000).
    pub down_after_ms: u64,
    /// `sentinel failover-timeout` (default 5000).
    pub failover_timeout_ms: u64,
    /// `min-replicas-to-write` on every node, the server's half of partition safety: a master
    /// that lost its replicas refuses writes with `-NOREPLICAS` (default 0, off).
    pub min_replicas_to_write: u32,
    /// `min-replicas-max-lag` in seconds (default 2).
    pub min_replicas_max_lag: u32,
    /// Bound on each start-up wait (default 20 s).
    pub ready_timeout: Duration,
    /// Directory of the lab's files (configs, data, logs). Default `None`: a fresh directory
    /// under the system temporary directory, removed on drop (kept when `HA_LAB_KEEP` is set).
    /// A given directory is created if needed and kept; start each lab in an empty one.
    pub dir: Option<PathBuf>,
}

impl RedisLabOptions {
    /// Keeps the lab's files in `dir` (created if needed, not removed).
    #[must_use]
    pub fn with_dir(mut self, dir: impl Into<PathBuf>) -> RedisLabOptions {
        self.dir = Some(dir.into());
        self
    }
}

impl Default for RedisLabOptions {
    fn default() -> Self {
        RedisLabOptions {
            master_name: "members".into(),
            redis_password: None,
            sentinel_password: None,
            down_after_ms: 1000,
            failover_timeout_ms: 5000,
            min_replicas_to_write: 0,
            min_replicas_max_lag: 2,
            ready_timeout: Duration::from_secs(20),
            dir: None,
        }
    }
}

/// One server of the Redis lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisNode {
    /// Supervisor name, e.g. `redis-bj-a` or `sentinel-sh-a`.
    pub name: String,
    /// Its IDC.
    pub idc: String,
    /// Its region.
    pub region: String,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// A running Redis + Sentinel lab. See the [module docs](self).
#[derive(Debug)]
pub struct RedisLab {
    // Declared before `dir`: fields drop in order, so every server is SIGKILLed (by pid)
    // before its directory is removed.
    supervisor: Supervisor,
    dir: TempDir,
    options: RedisLabOptions,
    /// The Redis nodes: the initial master first (`bj-a`), then the replicas.
    pub nodes: Vec<RedisNode>,
    /// The sentinels, one per IDC.
    pub sentinels: Vec<RedisNode>,
}

/// A partition of a [`RedisLab`] ([`RedisLab::partition`]); healed on drop.
#[derive(Debug)]
#[must_use = "the partition is healed when the guard is dropped"]
pub struct RedisPartition {
    scope: crate::partition::Scope,
}

impl RedisPartition {
    /// Removes the partition (the lab's nftables table).
    pub fn heal(self) -> Result<(), LabError> {
        self.scope.heal_all()
    }
}

impl Drop for RedisPartition {
    fn drop(&mut self) {
        if let Err(e) = self.scope.heal_all() {
            tracing::error!(error = %e, table = self.scope.table(), "could not heal a Redis lab partition");
        }
    }
}

/// A RESP reply, as the lab needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resp {
    /// `+OK` and other simple strings.
    Simple(String),
    /// `-ERR ...`.
    Error(String),
    /// `:123`.
    Int(i64),
    /// A bulk string (`None` for a nil bulk).
    Bulk(Option<String>),
    /// An array (`None` for a nil array).
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The text of a simple or bulk string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Resp::Simple(s) | Resp::Bulk(Some(s)) => Some(s),
            _ => None,
        }
    }

    /// The items of an array.
    pub fn items(&self) -> &[Resp] {
        match self {
            Resp::Array(Some(v)) => v,
            _ => &[],
        }
    }
}

static NEXT_SLOT: AtomicU32 = AtomicU32::new(0);

/// How long every replica must have reported `role:slave` to every sentinel before the lab
/// counts as settled: `publish-period × 4` (2 s) plus one `info-period`.
const ROLE_SETTLE_MS: u64 = 3_000;

/// The number of servers of one lab (3 Redis + 3 sentinels).
const SERVERS: u16 = 6;

impl RedisLab {
    /// Starts the lab and waits (bounded) until both replicas are in sync and every sentinel
    /// knows both replicas and the two other sentinels.
    pub async fn start(options: RedisLabOptions) -> Result<RedisLab, LabError> {
        let (octet, port) = pick_slot().await?;
        let dir = match &options.dir {
            Some(d) => TempDir::given(d)?,
            None => TempDir::new(&format!(
                "ha-lab-redis-{}-{octet}-{port}",
                std::process::id()
            ))?,
        };
        let supervisor =
            Supervisor::new(dir.path().join("logs")).with_ready_timeout(options.ready_timeout);
        let addr = |idc: u8, i: u16| {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, idc, octet)), port + i)
        };
        let nodes: Vec<RedisNode> = REDIS_IDCS
            .iter()
            .enumerate()
            .map(|(i, (idc, region, third))| RedisNode {
                name: format!("redis-{idc}"),
                idc: (*idc).into(),
                region: (*region).into(),
                addr: addr(*third, i as u16),
            })
            .collect();
        let sentinels: Vec<RedisNode> = REDIS_IDCS
            .iter()
            .enumerate()
            .map(|(i, (idc, region, third))| RedisNode {
                name: format!("sentinel-{idc}"),
                idc: (*idc).into(),
                region: (*region).into(),
                addr: addr(*third, 3 + i as u16),
            })
            .collect();
        let lab = RedisLab {
            supervisor,
            dir,
            options,
            nodes,
            sentinels,
        };
        let master = lab.nodes[0].addr;
        for (i, node) in lab.nodes.iter().enumerate() {
            let spec = lab.redis_spec(node, (i > 0).then_some(master))?;
            lab.supervisor.start(spec).await?;
        }
        lab.wait_replicas_synced(master, 2, lab.options.ready_timeout)
            .await?;
        for node in &lab.sentinels {
            let spec = lab.sentinel_spec(node, master)?;
            lab.supervisor.start(spec).await?;
            lab.sentinel_cmd(
                node.addr,
                &[
                    "SENTINEL",
                    "DEBUG",
                    "info-period",
                    "1000",
                    "publish-period",
                    "500",
                    "ask-period",
                    "200",
                    "ping-period",
                    "200",
                ],
            )
            .await?;
        }
        lab.wait_sentinels_ready(lab.options.ready_timeout).await?;
        Ok(lab)
    }

    /// The options the lab was started with.
    pub fn options(&self) -> &RedisLabOptions {
        &self.options
    }

    /// The supervisor (kill, freeze, thaw, restart by name).
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The sentinels' addresses.
    pub fn sentinel_addrs(&self) -> Vec<SocketAddr> {
        self.sentinels.iter().map(|n| n.addr).collect()
    }

    /// The directory of the lab's files (configs, logs); removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The node listening on `addr`.
    pub fn node_at(&self, addr: SocketAddr) -> Option<&RedisNode> {
        self.nodes.iter().find(|n| n.addr == addr)
    }

    /// The address of `idc` in this lab as a `/32`: its Redis node and its sentinel share it,
    /// and no other lab uses it.
    pub fn idc_net(&self, idc: &str) -> Option<ipnet::IpNet> {
        self.nodes
            .iter()
            .find(|n| n.idc == idc)
            .map(|n| ipnet::IpNet::from(n.addr.ip()))
    }

    /// Cuts `idc` (its Redis node and sentinel) off from the lab's other IDCs, with
    /// nftables (root and `nft` needed). `inside` are extra ranges on `idc`'s side, `outside`
    /// extra ranges on the other side: a test's client connects from `127.0.0.1`, so
    /// `inside = [127.0.0.1/32]` puts it in the isolated IDC, `outside = [127.0.0.1/32]` with
    /// the majority, and neither leaves it reaching everything. Only packets to or from this
    /// lab's ports are dropped (its own table, `halab_<first port>`), so other labs and the
    /// machine's own servers are not cut. The partition lasts until [`RedisPartition::heal`]
    /// or the guard is dropped (also when a test panics).
    pub fn partition(
        &self,
        idc: &str,
        inside: &[ipnet::IpNet],
        outside: &[ipnet::IpNet],
    ) -> Result<RedisPartition, LabError> {
        let cut = self
            .idc_net(idc)
            .ok_or_else(|| LabError::Control(format!("no IDC {idc} in the Redis lab")))?;
        let mut side: Vec<ipnet::IpNet> = vec![cut];
        side.extend_from_slice(inside);
        let mut others: Vec<ipnet::IpNet> = self
            .nodes
            .iter()
            .filter(|n| n.idc != idc)
            .map(|n| ipnet::IpNet::from(n.addr.ip()))
            .collect();
        others.extend_from_slice(outside);
        let ports: Vec<u16> = self
            .nodes
            .iter()
            .chain(&self.sentinels)
            .map(|n| n.addr.port())
            .collect();
        self.cut(&side, &others, &ports)
    }

    /// The finer tool under [`RedisLab::partition`]: drops packets between every range of
    /// `side` and every range of `others` whose source or destination port is one of `ports`.
    /// E.g. cutting a replica's IDC from the master's IDC on the master's port alone stops its
    /// replication while every sentinel still reaches it: a replica that lags and still
    /// answers. Healed when the guard is dropped.
    pub fn cut(
        &self,
        side: &[ipnet::IpNet],
        others: &[ipnet::IpNet],
        ports: &[u16],
    ) -> Result<RedisPartition, LabError> {
        let base = self.nodes.iter().map(|n| n.addr.port()).min().unwrap_or(0);
        let scope = crate::partition::Scope::lab(base, ports.iter().copied());
        let guard = RedisPartition {
            scope: scope.clone(),
        };
        for net in side {
            scope.partition(*net, others)?;
        }
        Ok(guard)
    }

    fn redis_spec(
        &self,
        node: &RedisNode,
        replica_of: Option<SocketAddr>,
    ) -> Result<ServerSpec, LabError> {
        let data = self.dir.path().join(&node.name);
        std::fs::create_dir_all(&data)
            .map_err(|e| LabError::io(format!("create {}", data.display()), e))?;
        let mut spec = ServerSpec::redis(&node.name, node.addr, &data);
        let ip = node.addr.ip().to_string();
        spec.args.extend(
            [
                "--bind-source-addr",
                &ip,
                // Protected mode only trusts 127.0.0.1 itself, not the lab's other 127.x
                // addresses.
                "--protected-mode",
                "no",
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
                "--min-replicas-to-write",
                &self.options.min_replicas_to_write.to_string(),
                "--min-replicas-max-lag",
                &self.options.min_replicas_max_lag.to_string(),
            ]
            .map(String::from),
        );
        if let Some(pass) = &self.options.redis_password {
            spec.args
                .extend(["--requirepass", pass, "--masterauth", pass].map(String::from));
        }
        if let Some(m) = replica_of {
            spec.args.extend([
                "--replicaof".to_string(),
                m.ip().to_string(),
                m.port().to_string(),
            ]);
        }
        spec.idc = node.idc.clone();
        spec.region = node.region.clone();
        spec.role = if replica_of.is_some() {
            "replica"
        } else {
            "master"
        }
        .into();
        Ok(spec)
    }

    fn sentinel_spec(&self, node: &RedisNode, master: SocketAddr) -> Result<ServerSpec, LabError> {
        let name = &self.options.master_name;
        let conf = self.dir.path().join(format!("{}.conf", node.name));
        let mut text = format!(
            "port {port}\nbind {ip}\nbind-source-addr {ip}\nprotected-mode no\ndaemonize no\ndir {dir}\n\
             sentinel resolve-hostnames no\n\
             sentinel monitor {name} {mip} {mport} 2\n\
             sentinel down-after-milliseconds {name} {down}\n\
             sentinel failover-timeout {name} {fo}\n\
             sentinel parallel-syncs {name} 1\n",
            port = node.addr.port(),
            ip = node.addr.ip(),
            dir = self.dir.path().display(),
            mip = master.ip(),
            mport = master.port(),
            down = self.options.down_after_ms,
            fo = self.options.failover_timeout_ms,
        );
        if let Some(pass) = &self.options.redis_password {
            text.push_str(&format!("sentinel auth-pass {name} {pass}\n"));
        }
        if let Some(pass) = &self.options.sentinel_password {
            text.push_str(&format!(
                "requirepass {pass}\nsentinel sentinel-pass {pass}\n"
            ));
        }
        std::fs::write(&conf, text)
            .map_err(|e| LabError::io(format!("write {}", conf.display()), e))?;
        let mut spec = ServerSpec::new(&node.name, "redis-server", "redis-sentinel", node.addr);
        spec.args = vec![conf.display().to_string(), "--sentinel".into()];
        spec.idc = node.idc.clone();
        spec.region = node.region.clone();
        spec.role = "sentinel".into();
        Ok(spec)
    }

    /// SIGKILLs the Redis node `name` (e.g. `redis-bj-a`).
    pub async fn kill(&self, name: &str) -> Result<(), LabError> {
        self.supervisor.kill(name).await
    }

    /// Starts the (killed) Redis node `name` again as a replica of `master`, with the same
    /// address and settings; waits until it accepts connections.
    pub async fn restart_as_replica(&self, name: &str, master: SocketAddr) -> Result<(), LabError> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| LabError::Control(format!("no redis node {name}")))?
            .clone();
        self.supervisor.kill(name).await?;
        let spec = self.redis_spec(&node, Some(master))?;
        self.supervisor.start(spec).await?;
        Ok(())
    }

    /// Sends one command to a Redis node (with the node password when set).
    pub async fn redis_cmd(&self, addr: SocketAddr, args: &[&str]) -> Result<Resp, LabError> {
        resp_command(addr, self.options.redis_password.as_deref(), args).await
    }

    /// Sends one command to a sentinel (with the sentinel password when set).
    pub async fn sentinel_cmd(&self, addr: SocketAddr, args: &[&str]) -> Result<Resp, LabError> {
        resp_command(addr, self.options.sentinel_password.as_deref(), args).await
    }

    /// The master as the first reachable sentinel reports it.
    pub async fn master(&self) -> Result<SocketAddr, LabError> {
        let mut last = None;
        for s in &self.sentinels {
            match self.sentinel_master_of(s.addr).await {
                Ok(a) => return Ok(a),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| LabError::Control("no sentinel".into())))
    }

    async fn sentinel_master_of(&self, sentinel: SocketAddr) -> Result<SocketAddr, LabError> {
        let r = self
            .sentinel_cmd(
                sentinel,
                &[
                    "SENTINEL",
                    "get-master-addr-by-name",
                    &self.options.master_name,
                ],
            )
            .await?;
        let items = r.items();
        let ip = items.first().and_then(Resp::as_str);
        let port = items.get(1).and_then(Resp::as_str);
        match (ip, port) {
            (Some(ip), Some(port)) => format!("{ip}:{port}")
                .parse()
                .map_err(|_| LabError::Control(format!("bad master address {ip}:{port}"))),
            _ => Err(LabError::Control(format!("{sentinel}: no master: {r:?}"))),
        }
    }

    /// `SENTINEL FAILOVER <name>` on the first sentinel that accepts it.
    pub async fn failover(&self) -> Result<(), LabError> {
        let mut last = String::new();
        for s in &self.sentinels {
            match self
                .sentinel_cmd(s.addr, &["SENTINEL", "FAILOVER", &self.options.master_name])
                .await
            {
                Ok(Resp::Error(e)) => last = format!("{}: {e}", s.addr),
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(LabError::Control(format!(
            "SENTINEL FAILOVER refused: {last}"
        )))
    }

    /// Waits (bounded) until every reachable sentinel names a master other than `old`, and
    /// returns it.
    pub async fn wait_switched_from(
        &self,
        old: SocketAddr,
        timeout: Duration,
    ) -> Result<SocketAddr, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for s in &self.sentinels {
                if let Ok(a) = self.sentinel_master_of(s.addr).await {
                    seen.push(a);
                }
            }
            if let Some(first) = seen.first()
                && *first != old
                && seen.iter().all(|a| a == first)
            {
                return Ok(*first);
            }
            if Instant::now() >= deadline {
                return Err(LabError::Control(format!(
                    "sentinels still report {old} (or disagree: {seen:?}) after {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) until the lab is settled: every sentinel agrees on one master, it says
    /// `ROLE master` with `replicas` replicas connected and in sync, every other running node
    /// says it is a replica with its link up, and no failover is in progress. Returns the
    /// master. Call it between failovers: `SENTINEL FAILOVER` refuses while replicas resync.
    pub async fn wait_stable(
        &self,
        replicas: usize,
        timeout: Duration,
    ) -> Result<SocketAddr, LabError> {
        let deadline = Instant::now() + timeout;
        let mut why;
        loop {
            why = match self.stable_once(replicas).await {
                Ok(m) => return Ok(m),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(LabError::Control(format!(
                    "redis lab not stable after {timeout:?}: {why}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stable_once(&self, replicas: usize) -> Result<SocketAddr, String> {
        let mut masters = Vec::new();
        for s in &self.sentinels {
            if self.supervisor.pid(&s.name).is_none() {
                continue;
            }
            let m = self
                .sentinel_master_of(s.addr)
                .await
                .map_err(|e| e.to_string())?;
            let info = self
                .sentinel_cmd(s.addr, &["SENTINEL", "MASTER", &self.options.master_name])
                .await
                .map_err(|e| e.to_string())?;
            let flags = field(&info, "flags").unwrap_or_default();
            if flags.contains("failover") || flags.contains("o_down") || flags.contains("s_down") {
                return Err(format!("sentinel {} flags {flags}", s.addr));
            }
            if field(&info, "num-slaves").and_then(|n| n.parse::<usize>().ok()) < Some(replicas) {
                return Err(format!("sentinel {} knows too few replicas", s.addr));
            }
            // Sentinel turns a replica that reports `role:master` back into a replica once it
            // has reported that role for `publish-period × 4` (2 s here); a replica converted
            // moments ago can still look like that to a sentinel, which then demotes it right
            // after a new failover promotes it. Settled means every replica has reported
            // `slave` for longer than that.
            let replicas_info = self
                .sentinel_cmd(s.addr, &["SENTINEL", "REPLICAS", &self.options.master_name])
                .await
                .map_err(|e| e.to_string())?;
            for r in replicas_info.items() {
                let ip = field(r, "name").unwrap_or_default();
                let flags = field(r, "flags").unwrap_or_default();
                if flags.contains("s_down") || flags.contains("disconnected") {
                    continue;
                }
                let role = field(r, "role-reported").unwrap_or_default();
                let since: u64 = field(r, "role-reported-time")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                if role != "slave" || since < ROLE_SETTLE_MS {
                    return Err(format!(
                        "sentinel {} sees replica {ip} as {role} for {since} ms",
                        s.addr
                    ));
                }
            }
            masters.push(m);
        }
        let Some(master) = masters.first().copied() else {
            return Err("no sentinel running".into());
        };
        if masters.iter().any(|m| *m != master) {
            return Err(format!("sentinels disagree: {masters:?}"));
        }
        self.wait_replicas_synced_once(master, replicas).await?;
        for n in &self.nodes {
            if n.addr == master || self.supervisor.pid(&n.name).is_none() {
                continue;
            }
            let info = self
                .redis_cmd(n.addr, &["INFO", "replication"])
                .await
                .map_err(|e| e.to_string())?;
            let text = info.as_str().unwrap_or_default().to_owned();
            let want = format!("master_host:{}", master.ip());
            if !text.contains("role:slave")
                || !text.contains(&want)
                || !text.contains("master_link_status:up")
            {
                return Err(format!("{} not yet a synced replica of {master}", n.addr));
            }
        }
        Ok(master)
    }

    async fn wait_replicas_synced_once(
        &self,
        master: SocketAddr,
        replicas: usize,
    ) -> Result<(), String> {
        let info = self
            .redis_cmd(master, &["INFO", "replication"])
            .await
            .map_err(|e| e.to_string())?;
        let text = info.as_str().unwrap_or_default();
        if !text.contains("role:master") {
            return Err(format!("{master} is not a master"));
        }
        let online = text
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count();
        if online < replicas {
            return Err(format!("{master}: {online}/{replicas} replicas online"));
        }
        Ok(())
    }

    async fn wait_replicas_synced(
        &self,
        master: SocketAddr,
        replicas: usize,
        timeout: Duration,
    ) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let why = match self.wait_replicas_synced_once(master, replicas).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(LabError::Control(format!("after {timeout:?}: {why}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_sentinels_ready(&self, timeout: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut ready = true;
            for s in &self.sentinels {
                let info = self
                    .sentinel_cmd(s.addr, &["SENTINEL", "MASTER", &self.options.master_name])
                    .await?;
                let slaves = field(&info, "num-slaves").and_then(|n| n.parse::<usize>().ok());
                let others =
                    field(&info, "num-other-sentinels").and_then(|n| n.parse::<usize>().ok());
                if slaves < Some(2) || others < Some(2) {
                    ready = false;
                }
            }
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::Control(format!(
                    "sentinels did not discover each other and the replicas within {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every key `prefix*` on `addr` with its value (`SCAN` + `MGET`).
    pub async fn dump(
        &self,
        addr: SocketAddr,
        prefix: &str,
    ) -> Result<std::collections::HashMap<String, String>, LabError> {
        let mut out = std::collections::HashMap::new();
        let mut cursor = "0".to_string();
        let pattern = format!("{prefix}*");
        loop {
            let r = self
                .redis_cmd(addr, &["SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"])
                .await?;
            let items = r.items();
            cursor = items
                .first()
                .and_then(Resp::as_str)
                .unwrap_or("0")
                .to_owned();
            let keys: Vec<&str> = items
                .get(1)
                .map(Resp::items)
                .unwrap_or_default()
                .iter()
                .filter_map(Resp::as_str)
                .collect();
            if !keys.is_empty() {
                let mut args = vec!["MGET"];
                args.extend(keys.iter().copied());
                let vals = self.redis_cmd(addr, &args).await?;
                for (k, v) in keys.iter().zip(vals.items()) {
                    if let Some(v) = v.as_str() {
                        out.insert((*k).to_owned(), v.to_owned());
                    }
                }
            }
            if cursor == "0" {
                return Ok(out);
            }
        }
    }
}

/// The value of `name` in a flat `[k, v, k, v, ...]` array reply (`SENTINEL MASTER`).
pub fn field(reply: &Resp, name: &str) -> Option<String> {
    reply
        .items()
        .chunks(2)
        .find(|kv| kv.first().and_then(Resp::as_str) == Some(name))
        .and_then(|kv| kv.get(1))
        .and_then(Resp::as_str)
        .map(str::to_owned)
}

/// Picks a free slot: an address octet and a port range bindable on every IDC address.
async fn pick_slot() -> Result<(u8, u16), LabError> {
    let pid = std::process::id();
    for _ in 0..64 {
        let slot = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        let octet = 10 + ((pid.wrapping_add(slot)) % 200) as u8;
        let port = 20_000 + ((pid.wrapping_mul(7).wrapping_add(slot * 13)) % 2_000) as u16 * 8;
        let mut free = true;
        'probe: for (_, _, third) in REDIS_IDCS {
            for i in 0..SERVERS {
                let a = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, third, octet)), port + i);
                if std::net::TcpListener::bind(a).is_err() {
                    free = false;
                    break 'probe;
                }
            }
        }
        if free {
            return Ok((octet, port));
        }
    }
    Err(LabError::Control(
        "no free redis lab slot after 64 tries".into(),
    ))
}

/// Sends one command over a fresh connection (bounded: 2 s connect + 2 s reply), after `AUTH`
/// when a password is given, and returns the reply. A server error reply is `Ok(Resp::Error)`.
pub async fn resp_command(
    addr: SocketAddr,
    password: Option<&str>,
    args: &[&str],
) -> Result<Resp, LabError> {
    let ctx = || format!("redis {addr} {}", args.first().copied().unwrap_or_default());
    let io = |e: std::io::Error| LabError::io(ctx(), e);
    let stream = tokio::time::timeout(Duration::from_secs(2), control_connect(addr))
        .await
        .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
        .map_err(io)?;
    let mut stream = BufReader::new(stream);
    let fut = async {
        if let Some(p) = password {
            stream.get_mut().write_all(&encode(&["AUTH", p])).await?;
            if let Resp::Error(e) = read_reply(&mut stream).await? {
                return Err(std::io::Error::other(format!("AUTH: {e}")));
            }
        }
        stream.get_mut().write_all(&encode(args)).await?;
        read_reply(&mut stream).await
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
        .map_err(io)
}

/// The lab's own connections to a loopback server come from [`CONTROL_ADDR`], so that a
/// partition cutting a test's client (which connects from `127.0.0.1`) never cuts the lab's
/// control of its servers.
async fn control_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    match addr {
        SocketAddr::V4(v4) if v4.ip().is_loopback() => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(IpAddr::V4(CONTROL_ADDR), 0))?;
            socket.connect(addr).await
        }
        _ => TcpStream::connect(addr).await,
    }
}

/// The source address of the lab's control connections ([`resp_command`]) to loopback servers.
pub const CONTROL_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n", a.len()).as_bytes());
        out.extend(a.as_bytes());
        out.extend(b"\r\n");
    }
    out
}

fn read_reply<'a>(
    r: &'a mut BufReader<TcpStream>,
) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<Resp>> + Send + 'a>> {
    Box::pin(async move {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let bad = || std::io::Error::other(format!("bad reply line {line:?}"));
        let (tag, rest) = line.split_at_checked(1).ok_or_else(bad)?;
        match tag {
            "+" => Ok(Resp::Simple(rest.into())),
            "-" => Ok(Resp::Error(rest.into())),
            ":" => Ok(Resp::Int(rest.parse().map_err(|_| bad())?)),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    return Ok(Resp::Bulk(None));
                }
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf).await?;
                buf.truncate(n as usize);
                Ok(Resp::Bulk(Some(String::from_utf8_lossy(&buf).into_owned())))
            }
            "*" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    return Ok(Resp::Array(None));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(read_reply(r).await?);
                }
                Ok(Resp::Array(Some(v)))
            }
            _ => Err(bad()),
        }
    })
}

/// The lab's directory: removed (recursively) on drop when the lab made it.
#[derive(Debug)]
struct TempDir(PathBuf, bool);

impl TempDir {
    fn new(name: &str) -> Result<TempDir, LabError> {
        let p = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)
            .map_err(|e| LabError::io(format!("create {}", p.display()), e))?;
        Ok(TempDir(p, true))
    }

    fn given(p: &Path) -> Result<TempDir, LabError> {
        std::fs::create_dir_all(p)
            .map_err(|e| LabError::io(format!("create {}", p.display()), e))?;
        Ok(TempDir(p.to_owned(), false))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.1 {
            return;
        }
        // `HA_LAB_KEEP=1` keeps the configs and logs for a look.
        if std::env::var_os("HA_LAB_KEEP").is_some() {
            tracing::warn!(dir = %self.0.display(), "redis lab files kept");
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
