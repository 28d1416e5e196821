//! The whole stack of the example membership service in one call (feature `mariadb`): the
//! Redis + Sentinel lab ([`RedisLab`]), the MariaDB lab with its HA simulator running
//! ([`MariaDbLab`]) and, unless [`StackOptions::with_mq`] is false, the RocketMQ lab
//! ([`RocketMqLab`]), started concurrently; the service's configuration files for it
//! ([`Stack::service_config`], [`Stack::write_service_configs`]); faults by role
//! ([`Stack::kill_redis_master`], [`Stack::mysql_switchover`], ...); and the control socket of
//! `ha-lab up --stack` ([`StackControl`]).
//!
//! Directories: with [`StackOptions::dir`] each lab keeps its files in a subdirectory
//! (`redis/`, `mariadb/`, `rocketmq/`), emptied at start and kept after; without it each lab
//! makes its own temporary directory, removed on drop, as the labs do on their own.
//!
//! The database: the service's database [`SERVICE_DATABASE`] is created on the primary (and
//! replicated), and the lab's application user ([`APP_USER`], without `READ ONLY ADMIN`, so
//! `read_only` fences it after a switch) may do anything in it, creating its tables included.
//!
//! Start-up, measured on a 2-core machine ([`Stack::startup`] reports each run): 3.4–4.4 s.
//! The MariaDB lab is the critical path (three `mariadb-install-db` runs one after the other,
//! 3.4–4.4 s); the Redis lab (1.0–2.1 s) and the RocketMQ lab (0.3–1.3 s) start in its shadow.
//!
//! Partitions: [`Stack::partition`] cuts one IDC off in all three labs at once (Redis and
//! its sentinels, MariaDB with the HA simulator deciding from outside, RocketMQ's name server
//! and broker), for the lab's servers and for the processes placed in the IDC's cgroup
//! ([`Stack::place`]: a service instance moved in before it connects is cut like its IDC).
//! The guard heals on drop, or with [`StackPartition::heal`], which also fences the MariaDB
//! nodes of the IDC that lost the primary; [`Stack::settle`] waits until the stack is whole
//! again.
//!
//! Every server runs under a [`crate::process::Supervisor`] of its lab: dropping the stack
//! SIGKILLs them all by pid (also when a test panics); [`Stack::stop`] does it and waits.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ha_lab::LabError> {
//! use ha_lab::stack::{Stack, StackOptions};
//! let stack = Stack::start(StackOptions::default()).await?;
//! let paths = stack.write_service_configs(std::path::Path::new("/tmp/svc"), "secret")?;
//! println!("configs: {paths:?}, up in {:?}", stack.startup().total);
//! let switch = stack.kill_redis_master().await?;
//! println!("{switch}");
//! stack.stop().await;
//! # Ok(()) }
//! ```

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use mysql_async::prelude::Queryable;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Mutex, Notify},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    LabError,
    cgroup::IdcCgroup,
    control::{ControlRequest, ControlResponse, FaultAction, StackFault},
    lab::{IdcSpec, Manifest, ServerEntry, ServerKind},
    mariadb::{
        APP_PASSWORD, APP_USER, MariaDbLab, MariaDbLabError, MariaDbLabOptions, MariaPartition,
    },
    partition::Scope,
    redis::{REDIS_IDCS, RedisLab, RedisLabOptions, RedisPartition},
    rocketmq::{RocketMqLab, RocketMqLabOptions},
};

/// The database the membership service uses (created by [`Stack::start`]).
pub const SERVICE_DATABASE: &str = "membership";
/// The file name of the bj-a service configuration ([`Stack::write_service_configs`]).
pub const SERVICE_CONFIG: &str = "membership-service.toml";
/// The file name of the sh-a service configuration.
pub const SERVICE_CONFIG_SH_A: &str = "membership-service-sh-a.toml";
/// Where the bj-a service instance listens in the written configuration.
pub const SERVICE_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, 100)), 18090);
/// Where the sh-a service instance listens in the written configuration.
pub const SERVICE_LISTEN_SH_A: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 3, 100)), 18090);
/// The topic of member events in the written configuration.
pub const SERVICE_TOPIC: &str = "member_events";

/// Bound on waiting for a master switch (Sentinel failover, the HA simulator's promotion).
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on [`Stack::stop`].
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

// === options ===

/// What [`Stack::start`] starts.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StackOptions {
    /// Directory of the labs' files: `redis/`, `mariadb/`, `rocketmq/` in it, emptied at start
    /// and kept. Default `None`: each lab's own temporary directory, removed on drop. A `dir`
    /// set in a lab's own options is replaced by its subdirectory.
    pub dir: Option<PathBuf>,
    /// Start the RocketMQ lab (default true).
    pub with_mq: bool,
    /// The Redis lab's options.
    pub redis: RedisLabOptions,
    /// The MariaDB lab's options. Default: semi-synchronous replication on (2 s timeout).
    pub mariadb: MariaDbLabOptions,
    /// The RocketMQ lab's options.
    pub rocketmq: RocketMqLabOptions,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            dir: None,
            with_mq: true,
            redis: RedisLabOptions::default(),
            mariadb: MariaDbLabOptions {
                // A commit acknowledged to the service is on a replica before the answer, so
                // whichever replica the HA simulator promotes holds it.
                semi_sync: Some(Duration::from_secs(2)),
                ..MariaDbLabOptions::default()
            },
            rocketmq: RocketMqLabOptions::default(),
        }
    }
}

impl StackOptions {
    /// Keeps the labs' files in subdirectories of `dir`.
    #[must_use]
    pub fn with_dir(mut self, dir: impl Into<PathBuf>) -> StackOptions {
        self.dir = Some(dir.into());
        self
    }

    /// Starts the RocketMQ lab or not.
    #[must_use]
    pub fn with_mq(mut self, with_mq: bool) -> StackOptions {
        self.with_mq = with_mq;
        self
    }
}

// === the stack ===

/// How long each part of [`Stack::start`] took (the parts start concurrently).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StartupTimes {
    /// The Redis lab, until the sentinels know each other and both replicas.
    pub redis: Duration,
    /// The MariaDB lab, until both replicas replicate, the service database made.
    pub mariadb: Duration,
    /// The RocketMQ lab, until both brokers are registered (`None` without it).
    pub rocketmq: Option<Duration>,
    /// The whole start.
    pub total: Duration,
}

/// One switch of a master: which server was it, which is it now, and how long it took.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Switch {
    /// What switched: `redis master` or `mysql primary`.
    pub what: &'static str,
    /// The old master's server name.
    pub from: String,
    /// The old master's address.
    pub from_addr: SocketAddr,
    /// The new master's server name.
    pub to: String,
    /// The new master's address.
    pub to_addr: SocketAddr,
    /// From the fault (or the request) to the switch being visible (every sentinel names the
    /// new master; the primary's DNS names point at the new primary).
    pub took: Duration,
}

impl std::fmt::Display for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} -> {} {} in {:.2} s",
            self.what,
            self.from,
            self.from_addr,
            self.to,
            self.to_addr,
            self.took.as_secs_f64()
        )
    }
}

/// The running stack. See the [module docs](self). Dropping it kills every server.
#[derive(Debug)]
pub struct Stack {
    redis: RedisLab,
    mariadb: MariaDbLab,
    rocketmq: Option<RocketMqLab>,
    dir: Option<PathBuf>,
    startup: StartupTimes,
}

/// Which lab serves a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Redis,
    Sentinel,
    MariaDb,
    MqBroker,
    MqNamesrv,
}

fn maria(e: MariaDbLabError) -> LabError {
    match e {
        MariaDbLabError::Lab(e) => e,
        other => LabError::Control(format!("mariadb lab: {other}")),
    }
}

/// Empties (or makes) `dir`.
fn fresh_dir(dir: &Path) -> Result<(), LabError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(|e| LabError::io(format!("empty {}", dir.display()), e))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| LabError::io(format!("create {}", dir.display()), e))
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The address a service instance in `idc` makes its Redis connections from:
/// `127.0.<idc>.100`, the address the written configurations listen on (`None` for an IDC the
/// lab does not have).
pub fn service_source_address(idc: &str) -> Option<IpAddr> {
    REDIS_IDCS
        .iter()
        .find(|(name, _, _)| *name == idc)
        .map(|&(_, _, third)| IpAddr::V4(Ipv4Addr::new(127, 0, third, 100)))
}

fn toml_list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items
        .into_iter()
        .map(|i| toml_str(&i.to_string()))
        .collect();
    format!("[{}]", items.join(", "))
}

impl Stack {
    /// Starts the Redis, MariaDB (then its HA simulator) and RocketMQ labs concurrently, makes
    /// the service database, and returns when every part is ready. A failure of any part stops
    /// the parts already started (by pid) and is returned.
    pub async fn start(options: StackOptions) -> Result<Stack, LabError> {
        let begin = Instant::now();
        let StackOptions {
            dir,
            with_mq,
            mut redis,
            mut mariadb,
            mut rocketmq,
        } = options;
        if let Some(d) = &dir {
            for (sub, slot) in [
                ("redis", &mut redis.dir),
                ("mariadb", &mut mariadb.dir),
                ("rocketmq", &mut rocketmq.dir),
            ] {
                let path = d.join(sub);
                if sub != "rocketmq" || with_mq {
                    fresh_dir(&path)?;
                }
                *slot = Some(path);
            }
        }
        let redis_fut = async {
            let t = Instant::now();
            let lab = RedisLab::start(redis).await?;
            Ok::<_, LabError>((lab, t.elapsed()))
        };
        let mariadb_fut = async {
            let t = Instant::now();
            let lab = MariaDbLab::start(mariadb).await.map_err(maria)?;
            create_service_database(&lab).await?;
            lab.start_ha();
            Ok::<_, LabError>((lab, t.elapsed()))
        };
        let mq_fut = async {
            if !with_mq {
                return Ok(None);
            }
            let t = Instant::now();
            let lab = RocketMqLab::start(rocketmq).await?;
            Ok::<_, LabError>(Some((lab, t.elapsed())))
        };
        let ((redis, redis_t), (mariadb, mariadb_t), mq) =
            tokio::try_join!(redis_fut, mariadb_fut, mq_fut)?;
        let (rocketmq, mq_t) = match mq {
            Some((lab, t)) => (Some(lab), Some(t)),
            None => (None, None),
        };
        let startup = StartupTimes {
            redis: redis_t,
            mariadb: mariadb_t,
            rocketmq: mq_t,
            total: begin.elapsed(),
        };
        tracing::info!(?startup, "stack started");
        Ok(Stack {
            redis,
            mariadb,
            rocketmq,
            dir,
            startup,
        })
    }

    /// The Redis + Sentinel lab.
    pub fn redis(&self) -> &RedisLab {
        &self.redis
    }

    /// The MariaDB lab (its HA simulator runs).
    pub fn mariadb(&self) -> &MariaDbLab {
        &self.mariadb
    }

    /// The RocketMQ lab, unless started without it.
    pub fn rocketmq(&self) -> Option<&RocketMqLab> {
        self.rocketmq.as_ref()
    }

    /// The directory given in [`StackOptions::dir`].
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// How long the start took, per part.
    pub fn startup(&self) -> StartupTimes {
        self.startup
    }

    /// Stops every server (SIGKILL by pid, each reaped; the HA simulator first) and the
    /// MariaDB lab's DNS servers, bounded by [`STOP_TIMEOUT`]; whatever is left then is
    /// killed without waiting when the stack drops at the end.
    pub async fn stop(self) {
        self.mariadb.stop_ha();
        let all = async {
            let mariadb = async {
                for n in self.mariadb.nodes() {
                    if let Err(e) = self.mariadb.kill(&n.name).await {
                        tracing::warn!(node = n.name, error = %e, "stop");
                    }
                }
            };
            let mq = async {
                if let Some(mq) = &self.rocketmq {
                    mq.supervisor().stop_all().await;
                }
            };
            tokio::join!(self.redis.supervisor().stop_all(), mariadb, mq);
        };
        if tokio::time::timeout(STOP_TIMEOUT, all).await.is_err() {
            tracing::warn!(timeout = ?STOP_TIMEOUT, "stack stop timed out; killing the rest");
        }
        drop(self);
    }

    /// The pid of every running server process, by server name.
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        let sup = self.redis.supervisor();
        for name in sup.names() {
            if let Some(pid) = sup.pid(&name) {
                out.push((name, pid));
            }
        }
        for n in self.mariadb.nodes() {
            if let Some(pid) = self.mariadb.pid(&n.name) {
                out.push((n.name.clone(), pid));
            }
        }
        if let Some(mq) = &self.rocketmq {
            out.extend(mq.pids());
        }
        out
    }

    /// Every server of the stack as `lab.json` lists it: Redis nodes (role `master` or
    /// `replica`, as the sentinels say now), sentinels, MariaDB nodes (`primary`/`replica`),
    /// the MariaDB lab's DNS servers (in-process: this process's pid) and the RocketMQ name
    /// servers and brokers. A server not running has pid 0.
    pub async fn servers(&self) -> Vec<ServerEntry> {
        let me = std::process::id();
        let region_of = |idc: &str| {
            REDIS_IDCS
                .iter()
                .find(|(i, _, _)| *i == idc)
                .map_or("", |(_, r, _)| *r)
                .to_owned()
        };
        let master = self.redis.master().await.ok();
        let sup = self.redis.supervisor();
        let mut out = Vec::new();
        for n in &self.redis.nodes {
            out.push(ServerEntry {
                name: n.name.clone(),
                kind: ServerKind::Process,
                region: n.region.clone(),
                idc: n.idc.clone(),
                address: n.addr,
                role: if master == Some(n.addr) {
                    "master"
                } else {
                    "replica"
                }
                .into(),
                pid: sup.pid(&n.name).unwrap_or(0),
            });
        }
        for n in &self.redis.sentinels {
            out.push(ServerEntry {
                name: n.name.clone(),
                kind: ServerKind::Process,
                region: n.region.clone(),
                idc: n.idc.clone(),
                address: n.addr,
                role: "sentinel".into(),
                pid: sup.pid(&n.name).unwrap_or(0),
            });
        }
        let primary = self.mariadb.primary();
        for n in self.mariadb.nodes() {
            out.push(ServerEntry {
                name: n.name.clone(),
                kind: ServerKind::Process,
                region: n.region.clone(),
                idc: n.idc.clone(),
                address: n.addr,
                role: if n.name == primary.name {
                    "primary"
                } else {
                    "replica"
                }
                .into(),
                pid: self.mariadb.pid(&n.name).unwrap_or(0),
            });
        }
        for (region, addr) in self.mariadb.dns_servers() {
            let idc = if region == "south" { "sh-a" } else { "bj-a" };
            out.push(ServerEntry {
                name: format!("db-dns-{region}"),
                kind: ServerKind::Dns,
                region,
                idc: idc.into(),
                address: addr,
                role: "dns".into(),
                pid: me,
            });
        }
        if let Some(mq) = &self.rocketmq {
            for i in mq.idcs() {
                for (name, addr, role) in [
                    (&i.namesrv_server, i.namesrv, "namesrv"),
                    (&i.broker_server, i.broker, "broker"),
                ] {
                    out.push(ServerEntry {
                        name: name.clone(),
                        kind: ServerKind::Process,
                        region: region_of(&i.idc),
                        idc: i.idc.clone(),
                        address: addr,
                        role: role.into(),
                        pid: mq.supervisor().pid(name).unwrap_or(0),
                    });
                }
            }
        }
        out
    }

    // === service configuration ===

    /// The membership service's configuration (the format of
    /// `examples/membership-service/membership-service.example.toml`) for an instance in `idc`
    /// listening on `listen`: the lab's regions and IDCs with the MariaDB lab's DNS servers as
    /// resolvers, `[dependencies.cache]` (the sentinels), `[dependencies.db]` (the primary's
    /// DNS names, the replicas as they are now, the application user, [`SERVICE_DATABASE`]),
    /// `[dependencies.events]` (one cluster per RocketMQ IDC; absent without RocketMQ), and
    /// `[app]` with instance `<idc>-1` and the IDC share limit on `idc`.
    ///
    /// `[dependencies.events]` also lists every name server as `static_addrs`: a ha-core
    /// dependency needs `dns` or `static_addrs`.
    pub fn service_config(&self, idc: &str, listen: SocketAddr, admin_token: &str) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "# The membership service's configuration for the lab stack, instance {idc}-1.\n\
             # Written by ha-lab (`Stack::service_config`); the addresses are this lab's.\n"
        );
        let _ = writeln!(t, "local_idc = {}\n", toml_str(idc));
        for (region, addr) in self.mariadb.dns_servers() {
            let _ = writeln!(
                t,
                "[[regions]]\nname = {}\nresolvers = {}",
                toml_str(&region),
                toml_list([addr])
            );
        }
        t.push('\n');
        for (name, region, third) in REDIS_IDCS {
            let _ = writeln!(
                t,
                "[[idcs]]\nname = {}\nregion = {}\ncidrs = [\"127.0.{third}.0/24\"]\ncapacity_rps = 2000",
                toml_str(name),
                toml_str(region)
            );
        }
        t.push_str(
            "\n[dns]\nmin_ttl = \"200ms\"\nmax_ttl = \"5s\"\nquery_timeout = \"300ms\"\n\
             retry_interval = \"100ms\"\nserve_stale_for = \"30s\"\n\n",
        );

        let ro = self.redis.options();
        let _ = writeln!(
            t,
            "# Redis through Sentinel: the sentinels.\n[dependencies.cache]\nkind = \"redis\"\n\
             static_addrs = {}\n[dependencies.cache.settings]\nmaster_name = {}\n\
             timeout_ms = 1000\nmax_hold_ms = 5000",
            toml_list(self.redis.sentinel_addrs()),
            toml_str(&ro.master_name)
        );
        if let Some(ip) = service_source_address(idc) {
            let _ = writeln!(
                t,
                "# Connections from an address of {idc}: a partition of {idc} cuts them.\n\
                 source_address = {}",
                toml_str(&ip.to_string())
            );
        }
        if let Some(p) = &ro.redis_password {
            let _ = writeln!(t, "password = {}", toml_str(p));
        }
        if let Some(p) = &ro.sentinel_password {
            let _ = writeln!(t, "sentinel_password = {}", toml_str(p));
        }
        t.push('\n');

        let primary = self.mariadb.primary();
        let names = self
            .mariadb
            .primary_names()
            .into_iter()
            .map(|(r, n)| format!("{r} = {}", toml_str(&n)))
            .collect::<Vec<_>>()
            .join(", ");
        let replicas = self
            .mariadb
            .nodes()
            .iter()
            .filter(|n| n.name != primary.name)
            .map(|n| n.addr);
        let _ = writeln!(
            t,
            "# MySQL: the primary's DNS name per region, repointed by the HA simulator.\n\
             [dependencies.db]\nkind = \"mysql\"\nport = {port}\ndns = {{ {names} }}\n\
             [dependencies.db.settings]\nuser = {user}\npassword = {pass}\ndatabase = {db}\n\
             timeout = \"2s\"\nreplicas = {replicas}\nmax_lag = \"1s\"\n",
            port = primary.addr.port(),
            user = toml_str(APP_USER),
            pass = toml_str(APP_PASSWORD),
            db = toml_str(SERVICE_DATABASE),
            replicas = toml_list(replicas),
        );

        if let Some(mq) = &self.rocketmq {
            let _ = writeln!(
                t,
                "# RocketMQ: one cluster per IDC, each found through its name servers.\n\
                 [dependencies.events]\nkind = \"rocketmq\"\nstatic_addrs = {}\n\
                 [dependencies.events.settings]\ngroup = \"membership\"",
                toml_list(mq.idcs().iter().map(|i| i.namesrv))
            );
            for i in mq.idcs() {
                let _ = writeln!(
                    t,
                    "[[dependencies.events.settings.clusters]]\nidc = {}\nname_servers = {}",
                    toml_str(&i.idc),
                    toml_list([i.namesrv])
                );
            }
            t.push('\n');
        }

        let _ = writeln!(
            t,
            "[app]\nlisten = {listen}\ninstance = {instance}\ntopic = {topic}\n\
             consumer_group = \"membership-history\"\ninstances = 1\ntrusted_proxies = []\n\n\
             [app.admin]\ntoken = {token}\n\n\
             [app.job]\nlease_ttl = \"5s\"\ninterval = \"1s\"\n\n\
             [app.limits]\nstatus = 429\n\
             [[app.limits.limit]]\nname = \"per_ip\"\nkey = \"client_ip\"\nrate = \"500r/s\"\n\
             burst = 1000\nnodelay = true\n\
             [[app.limits.limit]]\nname = \"idc_share\"\nkey = \"server\"\n\
             share = {{ idc = {idc}, fraction = 0.8 }}\nburst = 2000\nnodelay = true",
            listen = toml_str(&listen.to_string()),
            instance = toml_str(&format!("{idc}-1")),
            topic = toml_str(SERVICE_TOPIC),
            token = toml_str(admin_token),
            idc = toml_str(idc),
        );
        t
    }

    /// Writes [`SERVICE_CONFIG`] (bj-a, listening on [`SERVICE_LISTEN`]) and
    /// [`SERVICE_CONFIG_SH_A`] (sh-a, [`SERVICE_LISTEN_SH_A`]) into `dir` (created if needed),
    /// both with the admin token `token`; returns their paths.
    pub fn write_service_configs(&self, dir: &Path, token: &str) -> Result<Vec<PathBuf>, LabError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LabError::io(format!("create {}", dir.display()), e))?;
        let mut paths = Vec::new();
        for (file, idc, listen) in [
            (SERVICE_CONFIG, "bj-a", SERVICE_LISTEN),
            (SERVICE_CONFIG_SH_A, "sh-a", SERVICE_LISTEN_SH_A),
        ] {
            let path = dir.join(file);
            std::fs::write(&path, self.service_config(idc, listen, token))
                .map_err(|e| LabError::io(format!("write {}", path.display()), e))?;
            paths.push(path);
        }
        Ok(paths)
    }

    // === faults ===

    /// Waits (bounded by [`SWITCH_TIMEOUT`]) until the Redis lab is settled
    /// ([`RedisLab::wait_stable`] with the running replicas) and returns the master. A switch
    /// started before that can be undone by a sentinel that still sees a replica promoted
    /// moments ago as a master.
    async fn redis_settled(&self) -> Result<SocketAddr, LabError> {
        let running = self
            .redis
            .nodes
            .iter()
            .filter(|n| self.redis.supervisor().pid(&n.name).is_some())
            .count();
        self.redis
            .wait_stable(running.saturating_sub(1), SWITCH_TIMEOUT)
            .await
    }

    /// Waits until the Redis lab is settled (bounded), SIGKILLs the master and waits (bounded
    /// by [`SWITCH_TIMEOUT`]) until every sentinel names another. The old master stays down
    /// ([`Stack::restart`] brings it back as a replica). `took` counts from the kill.
    pub async fn kill_redis_master(&self) -> Result<Switch, LabError> {
        let old = self.redis_settled().await?;
        let begin = Instant::now();
        let from = self.redis_name(old)?;
        self.redis.kill(&from).await?;
        let new = self.redis.wait_switched_from(old, SWITCH_TIMEOUT).await?;
        Ok(Switch {
            what: "redis master",
            from,
            from_addr: old,
            to: self.redis_name(new)?,
            to_addr: new,
            took: begin.elapsed(),
        })
    }

    /// A planned `SENTINEL FAILOVER`: waits (bounded) until the lab is settled (the command is
    /// refused while replicas resync), asks for it and waits until every sentinel names the new
    /// master.
    pub async fn redis_failover(&self) -> Result<Switch, LabError> {
        let old = self.redis_settled().await?;
        let begin = Instant::now();
        self.redis.failover().await?;
        let new = self.redis.wait_switched_from(old, SWITCH_TIMEOUT).await?;
        Ok(Switch {
            what: "redis master",
            from: self.redis_name(old)?,
            from_addr: old,
            to: self.redis_name(new)?,
            to_addr: new,
            took: begin.elapsed(),
        })
    }

    /// SIGKILLs the MariaDB primary and waits (bounded by [`SWITCH_TIMEOUT`]) until the HA
    /// simulator promoted a replica and repointed DNS. `took` is the simulator's, from the
    /// first missed heartbeat.
    pub async fn kill_mysql_primary(&self) -> Result<Switch, LabError> {
        let seen = self.mariadb.ha_events().len();
        let old = self.mariadb.primary();
        self.mariadb.kill(&old.name).await.map_err(maria)?;
        let ev = self
            .mariadb
            .wait_ha_event(seen + 1, SWITCH_TIMEOUT)
            .await
            .map_err(maria)?;
        Ok(Switch {
            what: "mysql primary",
            from: ev.from.clone(),
            from_addr: old.addr,
            to: ev.to.clone(),
            to_addr: ev.to_addr,
            took: ev.repointed_after(),
        })
    }

    /// A planned MariaDB switchover to the first running replica.
    pub async fn mysql_switchover(&self) -> Result<Switch, LabError> {
        let old = self.mariadb.primary();
        let target = self
            .mariadb
            .nodes()
            .iter()
            .find(|n| n.name != old.name && self.mariadb.pid(&n.name).is_some())
            .map(|n| n.name.clone())
            .ok_or_else(|| LabError::Control("no running mariadb replica to switch to".into()))?;
        let ev = self
            .mariadb
            .switchover(Some(&target))
            .await
            .map_err(maria)?;
        Ok(Switch {
            what: "mysql primary",
            from: ev.from.clone(),
            from_addr: old.addr,
            to: ev.to.clone(),
            to_addr: ev.to_addr,
            took: ev.repointed_after(),
        })
    }

    fn mq(&self) -> Result<&RocketMqLab, LabError> {
        self.rocketmq
            .as_ref()
            .ok_or_else(|| LabError::Control("the stack runs without RocketMQ".into()))
    }

    /// SIGKILLs the RocketMQ broker of `idc`.
    pub async fn kill_broker(&self, idc: &str) -> Result<(), LabError> {
        self.mq()?.kill_broker(idc).await
    }

    /// Starts the RocketMQ broker of `idc` again (killing it first if it runs) and waits
    /// (bounded) until it is registered; returns its pid.
    pub async fn restart_broker(&self, idc: &str) -> Result<u32, LabError> {
        self.mq()?.restart_broker(idc).await
    }

    fn redis_name(&self, addr: SocketAddr) -> Result<String, LabError> {
        self.redis
            .node_at(addr)
            .map(|n| n.name.clone())
            .ok_or_else(|| LabError::Control(format!("no redis node at {addr}")))
    }

    /// The server `server` names, and its lab: a server name (`redis-bj-a`, `sentinel-sh-a`,
    /// `mariadb-bj-b`, `rocketmq-broker-bj-a`, ...) or a role (`redis-master`,
    /// `mysql-primary`, `mq-broker@<idc>`, `mq-namesrv@<idc>`).
    async fn resolve(&self, server: &str) -> Result<(Owner, String), LabError> {
        if server == "redis-master" {
            let m = self.redis.master().await?;
            return Ok((Owner::Redis, self.redis_name(m)?));
        }
        if server == "mysql-primary" {
            return Ok((Owner::MariaDb, self.mariadb.primary().name));
        }
        if let Some(idc) = server.strip_prefix("mq-broker@") {
            let i = self.mq()?.idc(idc).ok_or_else(|| self.unknown(server))?;
            return Ok((Owner::MqBroker, i.broker_server.clone()));
        }
        if let Some(idc) = server.strip_prefix("mq-namesrv@") {
            let i = self.mq()?.idc(idc).ok_or_else(|| self.unknown(server))?;
            return Ok((Owner::MqNamesrv, i.namesrv_server.clone()));
        }
        if self.redis.nodes.iter().any(|n| n.name == server) {
            return Ok((Owner::Redis, server.to_owned()));
        }
        if self.redis.sentinels.iter().any(|n| n.name == server) {
            return Ok((Owner::Sentinel, server.to_owned()));
        }
        if self.mariadb.nodes().iter().any(|n| n.name == server) {
            return Ok((Owner::MariaDb, server.to_owned()));
        }
        if let Some(mq) = &self.rocketmq {
            for i in mq.idcs() {
                if i.broker_server == server {
                    return Ok((Owner::MqBroker, server.to_owned()));
                }
                if i.namesrv_server == server {
                    return Ok((Owner::MqNamesrv, server.to_owned()));
                }
            }
        }
        Err(self.unknown(server))
    }

    fn unknown(&self, server: &str) -> LabError {
        let mut known: Vec<String> = vec![
            "redis-master".into(),
            "mysql-primary".into(),
            "mq-broker@<idc>".into(),
            "mq-namesrv@<idc>".into(),
        ];
        known.extend(self.redis.nodes.iter().map(|n| n.name.clone()));
        known.extend(self.redis.sentinels.iter().map(|n| n.name.clone()));
        known.extend(self.mariadb.nodes().iter().map(|n| n.name.clone()));
        if let Some(mq) = &self.rocketmq {
            for i in mq.idcs() {
                known.push(i.namesrv_server.clone());
                known.push(i.broker_server.clone());
            }
        }
        LabError::UnknownServer {
            name: server.to_owned(),
            known: known.join(", "),
        }
    }

    /// The IDC of the RocketMQ server `name`.
    fn mq_idc(&self, name: &str) -> Result<String, LabError> {
        self.mq()?
            .idcs()
            .iter()
            .find(|i| i.broker_server == name || i.namesrv_server == name)
            .map(|i| i.idc.clone())
            .ok_or_else(|| self.unknown(name))
    }

    /// SIGKILLs `server` (a name or a role, see [`StackFault`]); returns the server's name.
    /// Nothing is waited for beyond the process being reaped.
    pub async fn kill(&self, server: &str) -> Result<String, LabError> {
        let (owner, name) = self.resolve(server).await?;
        match owner {
            Owner::Redis | Owner::Sentinel => self.redis.supervisor().kill(&name).await?,
            Owner::MariaDb => self.mariadb.kill(&name).await.map_err(maria)?,
            Owner::MqBroker | Owner::MqNamesrv => self.mq()?.supervisor().kill(&name).await?,
        }
        Ok(name)
    }

    /// SIGSTOPs `server` (a name or a role); returns the server's name.
    pub async fn freeze(&self, server: &str) -> Result<String, LabError> {
        let (owner, name) = self.resolve(server).await?;
        match owner {
            Owner::Redis | Owner::Sentinel => self.redis.supervisor().freeze(&name)?,
            Owner::MariaDb => self.mariadb.freeze(&name).map_err(maria)?,
            Owner::MqBroker => self.mq()?.freeze_broker(&self.mq_idc(&name)?)?,
            Owner::MqNamesrv => self.mq()?.freeze_namesrv(&self.mq_idc(&name)?)?,
        }
        Ok(name)
    }

    /// SIGCONTs `server` (a name or a role); returns the server's name. Thaw a frozen Redis
    /// master by its name: once the sentinels failed over, `redis-master` names the new one.
    pub async fn thaw(&self, server: &str) -> Result<String, LabError> {
        let (owner, name) = self.resolve(server).await?;
        match owner {
            Owner::Redis | Owner::Sentinel => self.redis.supervisor().thaw(&name)?,
            Owner::MariaDb => self.mariadb.thaw(&name).map_err(maria)?,
            Owner::MqBroker => self.mq()?.thaw_broker(&self.mq_idc(&name)?)?,
            Owner::MqNamesrv => self.mq()?.thaw_namesrv(&self.mq_idc(&name)?)?,
        }
        Ok(name)
    }

    /// Starts `server` again (killing it first if it runs); returns its name and new pid. A
    /// Redis node comes back as a replica of the current master; a sentinel, a broker or a name
    /// server with the same configuration (waited until registered). MariaDB nodes are not
    /// restarted (a switch makes a replica of the old primary; use a switchover).
    pub async fn restart(&self, server: &str) -> Result<(String, u32), LabError> {
        let (owner, name) = self.resolve(server).await?;
        let pid = match owner {
            Owner::Redis => {
                let master = self.redis.master().await?;
                self.redis.restart_as_replica(&name, master).await?;
                self.redis.supervisor().pid(&name).unwrap_or(0)
            }
            Owner::Sentinel => self.redis.supervisor().restart(&name).await?,
            Owner::MariaDb => {
                return Err(LabError::Unsupported {
                    fault: "restart".into(),
                    name,
                    kind: "mariadb".into(),
                    hint: "; switch the primary with `switchover mysql`".into(),
                });
            }
            Owner::MqBroker => self.mq()?.restart_broker(&self.mq_idc(&name)?).await?,
            Owner::MqNamesrv => self.mq()?.restart_namesrv(&self.mq_idc(&name)?).await?,
        };
        Ok((name, pid))
    }

    /// Applies `fault` and says what happened in one line (for the control socket).
    pub async fn apply(&self, fault: &StackFault) -> Result<String, LabError> {
        tracing::info!(%fault, "stack fault");
        Ok(match fault {
            StackFault::KillRedisMaster => self.kill_redis_master().await?.to_string(),
            StackFault::RedisFailover => self.redis_failover().await?.to_string(),
            StackFault::KillMysqlPrimary => self.kill_mysql_primary().await?.to_string(),
            StackFault::MysqlSwitchover => self.mysql_switchover().await?.to_string(),
            StackFault::KillBroker { idc } => {
                self.kill_broker(idc).await?;
                format!("killed the RocketMQ broker of {idc}")
            }
            StackFault::RestartBroker { idc } => {
                let pid = self.restart_broker(idc).await?;
                format!("RocketMQ broker of {idc} restarted (pid {pid}) and registered")
            }
            StackFault::Kill { server } => format!("killed {}", self.kill(server).await?),
            StackFault::Freeze { server } => format!("froze {}", self.freeze(server).await?),
            StackFault::Thaw { server } => format!("thawed {}", self.thaw(server).await?),
            StackFault::Place { idc, pid } => {
                self.place(idc, *pid)?;
                format!("pid {pid} placed in {idc}")
            }
            // A partition lives in its guard: the control socket's daemon holds it between
            // requests; a program holds the one [`Stack::partition`] returns.
            StackFault::Partition { .. } | StackFault::Heal { .. } => {
                return Err(LabError::Control(format!(
                    "{fault}: a partition is held by its guard; call Stack::partition (or send it to a stack daemon)"
                )));
            }
        })
    }

    /// Applies a `lab.json` style fault to the server `target` (`ha-lab fault kill
    /// redis-bj-b`): kill, freeze, thaw (heal), restart; latency and blackhole are for the
    /// default lab's proxies.
    pub async fn apply_action(
        &self,
        target: &str,
        action: FaultAction,
    ) -> Result<String, LabError> {
        match action {
            FaultAction::Kill => Ok(format!("killed {}", self.kill(target).await?)),
            FaultAction::Freeze => Ok(format!("froze {}", self.freeze(target).await?)),
            FaultAction::Thaw | FaultAction::Heal => {
                Ok(format!("thawed {}", self.thaw(target).await?))
            }
            FaultAction::Restart => {
                let (name, pid) = self.restart(target).await?;
                Ok(format!("restarted {name} (pid {pid})"))
            }
            FaultAction::Blackhole
            | FaultAction::Latency { .. }
            | FaultAction::RoundTripLatency { .. } => Err(LabError::Unsupported {
                fault: action.to_string(),
                name: target.to_owned(),
                kind: "stack process".into(),
                hint: "; the stack has no proxies (kill, freeze, thaw, restart apply)".into(),
            }),
        }
    }
}

// === partitions ===

/// A partition of one IDC across the stack ([`Stack::partition`]). Healed by
/// [`StackPartition::heal`] or, without the MariaDB fencing, when dropped (also when a test
/// panics).
#[derive(Debug)]
#[must_use = "the partition is healed when the guard is dropped"]
pub struct StackPartition {
    idc: String,
    began: Instant,
    /// The rules of the processes placed in IDC cgroups on the Redis ports (the Redis lab's
    /// own partition cuts addresses only).
    redis_members: Option<Scope>,
    /// The RocketMQ cut (addresses and placed processes, on the RocketMQ ports).
    mq: Option<Scope>,
    redis: Option<RedisPartition>,
    mariadb: Option<MariaPartition>,
    /// The pid of the IDC's MariaDB node when the partition began (`None`: not running).
    mysql_pid: Option<u32>,
}

/// What [`StackPartition::heal`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StackHeal {
    /// The IDC that was cut off.
    pub idc: String,
    /// From the partition to the heal.
    pub lasted: Duration,
    /// The MariaDB nodes of the IDC fenced with `read_only = 1` (they lost the primary).
    pub mysql_fenced: Vec<String>,
}

impl StackPartition {
    /// The IDC cut off.
    pub fn idc(&self) -> &str {
        &self.idc
    }

    /// Removes every rule of the partition (each part is tried; the first error is returned),
    /// then fences the IDC's MariaDB node when it is no longer the primary
    /// ([`MariaPartition::heal`]; a node not running, e.g. killed before, is left alone).
    pub async fn heal(mut self) -> Result<StackHeal, LabError> {
        let mut first: Option<LabError> = None;
        for scope in [self.redis_members.take(), self.mq.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = scope.heal_all() {
                first.get_or_insert(e);
            }
        }
        if let Some(r) = self.redis.take()
            && let Err(e) = r.heal()
        {
            first.get_or_insert(e);
        }
        let mut mysql_fenced = Vec::new();
        // A node that is not running needs no fencing (and cannot be reached to fence): the
        // guard's drop removes its rules.
        let running = self.mysql_pid.is_some_and(crate::process::pid_alive);
        if let Some(m) = self.mariadb.take().filter(|_| running) {
            match m.heal().await {
                Ok(f) => mysql_fenced = f,
                Err(e) => {
                    first.get_or_insert(maria(e));
                }
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
        tracing::info!(idc = self.idc, ?mysql_fenced, "stack partition healed");
        Ok(StackHeal {
            idc: self.idc.clone(),
            lasted: self.began.elapsed(),
            mysql_fenced,
        })
    }
}

impl Drop for StackPartition {
    fn drop(&mut self) {
        for scope in [self.redis_members.take(), self.mq.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = scope.heal_all() {
                tracing::error!(error = %e, table = scope.table(), "could not heal a stack partition");
            }
        }
        // The Redis and MariaDB guards heal themselves when they drop, after this.
    }
}

/// The first of `candidates` not in `used` (then added to it): a table number of its own.
fn own_table(used: &mut Vec<u16>, candidates: impl IntoIterator<Item = u16>) -> Option<u16> {
    let n = candidates.into_iter().find(|c| !used.contains(c))?;
    used.push(n);
    Some(n)
}

/// What [`Stack::settle`] waited for.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settled {
    /// The Redis master every sentinel agrees on.
    pub redis_master: SocketAddr,
    /// The MariaDB primary.
    pub mysql_primary: String,
    /// The MariaDB replicas that applied everything the primary had when the wait began.
    pub mysql_caught_up: Vec<String>,
    /// The running MariaDB nodes that replicate from nothing (an old primary fenced by a heal).
    pub mysql_not_replicating: Vec<String>,
    /// Every RocketMQ broker is registered with its name server (`None` without RocketMQ).
    pub mq_registered: Option<bool>,
    /// How long the wait took.
    pub took: Duration,
}

impl std::fmt::Display for Settled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "redis master {}, mysql primary {}, replicas caught up [{}]",
            self.redis_master,
            self.mysql_primary,
            self.mysql_caught_up.join(", ")
        )?;
        if !self.mysql_not_replicating.is_empty() {
            write!(
                f,
                ", not replicating [{}]",
                self.mysql_not_replicating.join(", ")
            )?;
        }
        write!(f, " in {:.2} s", self.took.as_secs_f64())
    }
}

impl Stack {
    /// Moves process `pid` into `idc`'s cgroup ([`MariaDbLab::cgroup`]), so that a partition
    /// of the IDC ([`Stack::partition`]) cuts it as it cuts the IDC's servers. Only sockets
    /// opened after the move are matched: move a process before it connects. Needs root and
    /// cgroup v2 under `/sys/fs/cgroup`.
    pub fn place(&self, idc: &str, pid: u32) -> Result<(), LabError> {
        let group = self.cgroup(idc)?;
        group.add(pid)?;
        if !group.pids().contains(&pid) {
            return Err(LabError::Control(format!(
                "pid {pid} is not in {} after the move (did it exit?)",
                group.dir().display()
            )));
        }
        Ok(())
    }

    /// The processes in `idc`'s cgroup now (the lab's MariaDB node of the IDC and every
    /// process [`Stack::place`]d there).
    pub fn placed(&self, idc: &str) -> Vec<u32> {
        self.mariadb
            .cgroup(idc)
            .map(IdcCgroup::pids)
            .unwrap_or_default()
    }

    fn cgroup(&self, idc: &str) -> Result<&IdcCgroup, LabError> {
        self.mariadb.cgroup(idc).ok_or_else(|| {
            LabError::Control(format!(
                "no IDC cgroup for {idc:?} (an IDC of the stack; needs root and cgroup v2 under /sys/fs/cgroup)"
            ))
        })
    }

    /// Cuts `idc` off from the stack's other IDCs, in all three labs at once: Redis
    /// ([`RedisLab::partition`] with no extra ranges, and the placed processes on the Redis
    /// ports: those in `idc`'s cgroup reach only `idc`'s node and sentinel, those in the other
    /// cgroups everything but them), MariaDB ([`MariaDbLab::partition`]: the HA simulator
    /// decides from outside `idc` and promotes there), and RocketMQ (`idc`'s name server and
    /// broker addresses from the other IDCs', and the placed processes likewise, on the
    /// RocketMQ ports). Connections of processes in no IDC (this one: the load, the HA
    /// simulator, the admin connections) are not cut. Needs root, `nft` and cgroup v2.
    ///
    /// Each lab's rules live in a table of their own (`halab_<n>`, with distinct `n`), so the
    /// parts heal independently; a failure part-way heals what was applied (the guard drops).
    pub fn partition(&self, idc: &str) -> Result<StackPartition, LabError> {
        if !REDIS_IDCS.iter().any(|(n, _, _)| *n == idc) {
            return Err(LabError::Control(format!(
                "no IDC {idc:?} in the stack (bj-a, bj-b, sh-a)"
            )));
        }
        let member = self.cgroup(idc)?;
        let other_members: Vec<&IdcCgroup> = REDIS_IDCS
            .iter()
            .filter(|(n, _, _)| *n != idc)
            .map(|(n, _, _)| self.cgroup(n))
            .collect::<Result<_, _>>()?;
        // The labs' own tables: the Redis lab's (its lowest node port) and the MariaDB lab's
        // (its port).
        let mut used: Vec<u16> = vec![self.mariadb.primary().addr.port()];
        used.extend(self.redis.nodes.iter().map(|n| n.addr.port()).min());
        let mut guard = StackPartition {
            idc: idc.to_owned(),
            began: Instant::now(),
            redis_members: None,
            mq: None,
            redis: None,
            mariadb: None,
            mysql_pid: self.mariadb.pid(idc),
        };

        // Redis: the servers by address, then the placed processes.
        guard.redis = Some(self.redis.partition(idc, &[], &[])?);
        let redis_net = self
            .redis
            .idc_net(idc)
            .ok_or_else(|| LabError::Control(format!("no IDC {idc} in the Redis lab")))?;
        let redis_others: Vec<IpNet> = self
            .redis
            .nodes
            .iter()
            .filter(|n| n.idc != idc)
            .map(|n| IpNet::from(n.addr.ip()))
            .collect();
        let mut redis_ports: Vec<u16> = self
            .redis
            .nodes
            .iter()
            .chain(&self.redis.sentinels)
            .map(|n| n.addr.port())
            .collect();
        redis_ports.sort_unstable();
        let table = own_table(&mut used, redis_ports.iter().rev().copied())
            .ok_or_else(|| LabError::Control("no table number left for the Redis cut".into()))?;
        let scope = Scope::lab(table, redis_ports.iter().copied());
        guard.redis_members = Some(scope.clone());
        scope.partition_members(redis_net, &[member], &redis_others, &other_members)?;

        // MariaDB: its own partition (nodes are in their cgroups; the HA decides outside).
        guard.mariadb = Some(self.mariadb.partition(idc).map_err(maria)?);

        // RocketMQ: the IDC's servers from the other IDCs' and the placed processes.
        if let Some(mq) = &self.rocketmq {
            let third = REDIS_IDCS
                .iter()
                .find(|(n, _, _)| *n == idc)
                .map_or(0, |(_, _, t)| *t);
            let side = mq.idc(idc).map_or_else(
                || {
                    IpNet::new(IpAddr::from([127, 0, third, 0]), 24)
                        .unwrap_or_else(|_| IpNet::from(IpAddr::from([127, 0, third, 0])))
                },
                |i| IpNet::from(i.ip),
            );
            let others: Vec<IpNet> = mq
                .idcs()
                .iter()
                .filter(|i| i.idc != idc)
                .map(|i| IpNet::from(i.ip))
                .collect();
            let mut ports: Vec<u16> = mq
                .idcs()
                .iter()
                .flat_map(|i| [i.broker_fast, i.namesrv, i.broker, i.broker_ha])
                .map(|a| a.port())
                .collect();
            ports.sort_unstable();
            let table = own_table(&mut used, ports.iter().copied()).ok_or_else(|| {
                LabError::Control("no table number left for the RocketMQ cut".into())
            })?;
            let scope = Scope::lab(table, ports);
            guard.mq = Some(scope.clone());
            scope.partition_members(side, &[member], &others, &other_members)?;
        }
        tracing::info!(idc, "stack partitioned");
        Ok(guard)
    }

    /// Waits (bounded by `timeout` in all) until the stack is whole again, e.g. after a heal:
    /// the Redis lab settled ([`RedisLab::wait_stable`] with every running replica), every
    /// running MariaDB replica applied what the primary had when the wait began
    /// (`MASTER_GTID_WAIT` on it, its SQL thread running; a node that replicates from nothing,
    /// an old primary fenced by a heal, is listed apart), and every RocketMQ broker registered.
    pub async fn settle(&self, timeout: Duration) -> Result<Settled, LabError> {
        let begin = Instant::now();
        let deadline = begin + timeout;
        let running = self
            .redis
            .nodes
            .iter()
            .filter(|n| self.redis.supervisor().pid(&n.name).is_some())
            .count();
        let redis_master = self
            .redis
            .wait_stable(running.saturating_sub(1), timeout)
            .await?;
        let (mysql_caught_up, mysql_not_replicating) = self.mysql_caught_up(deadline).await?;
        let mq_registered = match &self.rocketmq {
            None => None,
            Some(mq) => {
                for i in mq.idcs() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    mq.wait_registered(&i.idc, left.max(Duration::from_millis(100)))
                        .await?;
                }
                Some(true)
            }
        };
        Ok(Settled {
            redis_master,
            mysql_primary: self.mariadb.primary().name,
            mysql_caught_up,
            mysql_not_replicating,
            mq_registered,
            took: begin.elapsed(),
        })
    }

    /// `(caught up, not replicating)` of the running non-primary MariaDB nodes, by
    /// `deadline`.
    async fn mysql_caught_up(
        &self,
        deadline: Instant,
    ) -> Result<(Vec<String>, Vec<String>), LabError> {
        let bounded = |what: String| {
            let left = deadline.saturating_duration_since(Instant::now());
            move || {
                LabError::Control(format!(
                    "{what}: not within the settle bound ({left:?} left)"
                ))
            }
        };
        let primary = self.mariadb.primary();
        let mut pc = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            self.mariadb.admin_conn(&primary),
        )
        .await
        .map_err(|_| bounded(format!("connect to {}", primary.name))())?
        .map_err(maria)?;
        let pos: String = pc
            .query_first("SELECT @@gtid_binlog_pos")
            .await
            .map_err(|e| LabError::Control(format!("gtid_binlog_pos on {}: {e}", primary.name)))?
            .unwrap_or_default();
        let _ = pc.disconnect().await;
        let mut caught_up = Vec::new();
        let mut apart = Vec::new();
        for n in self.mariadb.nodes() {
            if n.name == primary.name || self.mariadb.pid(&n.name).is_none() {
                continue;
            }
            let check = async {
                let mut c = self.mariadb.admin_conn(n).await.map_err(maria)?;
                loop {
                    let row: Option<mysql_async::Row> =
                        c.query_first("SHOW SLAVE STATUS").await.map_err(|e| {
                            LabError::Control(format!("SHOW SLAVE STATUS on {}: {e}", n.name))
                        })?;
                    let Some(row) = row else {
                        let _ = c.disconnect().await;
                        return Ok::<bool, LabError>(false);
                    };
                    let field = |name: &str| {
                        row.get_opt::<Option<String>, _>(name)
                            .and_then(Result::ok)
                            .flatten()
                            .unwrap_or_default()
                    };
                    if field("Slave_SQL_Running") == "Yes" && field("Slave_IO_Running") == "Yes" {
                        let waited: Option<i64> = c
                            .query_first(format!("SELECT MASTER_GTID_WAIT('{pos}', 1)"))
                            .await
                            .map_err(|e| {
                                LabError::Control(format!("MASTER_GTID_WAIT on {}: {e}", n.name))
                            })?;
                        if waited == Some(0) {
                            let _ = c.disconnect().await;
                            return Ok(true);
                        }
                    } else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let replicating = tokio::time::timeout(left, check)
                .await
                .map_err(|_| bounded(format!("{} catching up to {pos}", n.name))())??;
            if replicating {
                caught_up.push(n.name.clone());
            } else {
                apart.push(n.name.clone());
            }
        }
        Ok((caught_up, apart))
    }
}

/// Makes [`SERVICE_DATABASE`] on the primary (replicated) and lets [`APP_USER`] do anything in
/// it.
async fn create_service_database(lab: &MariaDbLab) -> Result<(), LabError> {
    let primary = lab.primary();
    let mut c = lab.admin_conn(&primary).await.map_err(maria)?;
    for q in [
        format!("CREATE DATABASE IF NOT EXISTS {SERVICE_DATABASE}"),
        format!("GRANT ALL PRIVILEGES ON {SERVICE_DATABASE}.* TO '{APP_USER}'@'127.%'"),
    ] {
        let bound = Duration::from_secs(10);
        tokio::time::timeout(bound, c.query_drop(&q))
            .await
            .map_err(|_| {
                LabError::Control(format!("{q} on {}: no answer in {bound:?}", primary.name))
            })?
            .map_err(|e| LabError::Control(format!("{q} on {}: {e}", primary.name)))?;
    }
    let _ = c.disconnect().await;
    Ok(())
}

// === the control socket of `ha-lab up --stack` ===

/// The control socket (`dir/control.sock`) and manifest (`dir/lab.json`) of a stack daemon:
/// the same protocol ([`crate::control`]) and files as the default lab's, so `ha-lab status`,
/// `fault` and `down` work on it. It serves `stack` requests ([`Stack::apply`]), `fault`
/// requests on the stack's servers ([`Stack::apply_action`]), `ping` and `shutdown`; after
/// every fault it writes `lab.json` again (pids and roles change).
#[derive(Debug)]
pub struct StackControl {
    task: JoinHandle<()>,
    shared: Arc<ControlShared>,
}

#[derive(Debug)]
struct ControlShared {
    stack: Arc<Stack>,
    dir: PathBuf,
    shutdown: Notify,
    /// One fault at a time.
    faults: Mutex<()>,
    /// The partitions the daemon holds, by IDC ([`StackFault::Partition`]); dropped (healed)
    /// with the daemon.
    partitions: Mutex<std::collections::HashMap<String, StackPartition>>,
}

impl ControlShared {
    async fn manifest(&self) -> Manifest {
        let pid = std::process::id();
        Manifest {
            servers: self.stack.servers().await,
            control: self.dir.join("control.sock"),
            daemon_pid: pid,
            daemon_start: crate::process::start_time(pid),
            zone: crate::mariadb::ZONE.into(),
            service: format!("db.north.{}", crate::mariadb::ZONE),
            idcs: REDIS_IDCS
                .iter()
                .map(|(name, region, third)| IdcSpec {
                    name: (*name).into(),
                    region: (*region).into(),
                    cidr: IpNet::new(IpAddr::from([127, 0, *third, 0]), 24)
                        .unwrap_or_else(|_| IpNet::from(IpAddr::from([127, 0, *third, 0]))),
                })
                .collect(),
            port_offset: 0,
            stack: true,
        }
    }

    async fn write_manifest(&self) -> Result<(), LabError> {
        self.manifest().await.write(&self.dir)
    }

    /// A stack fault; partitions and heals keep their guard here, between requests.
    async fn apply(&self, fault: &StackFault) -> Result<String, LabError> {
        match fault {
            StackFault::Partition { idc } => {
                let mut held = self.partitions.lock().await;
                if held.contains_key(idc) {
                    return Ok(format!("{idc} is already partitioned"));
                }
                let p = self.stack.partition(idc)?;
                held.insert(idc.clone(), p);
                Ok(format!(
                    "partitioned {idc} from the other IDCs (its servers, and the processes placed in its cgroup)"
                ))
            }
            StackFault::Heal { idc } => {
                let p = self.partitions.lock().await.remove(idc);
                match p {
                    None => Ok(format!("{idc} was not partitioned")),
                    Some(p) => {
                        let h = p.heal().await?;
                        Ok(format!(
                            "healed {idc} after {:.1} s; MariaDB fenced: {}",
                            h.lasted.as_secs_f64(),
                            if h.mysql_fenced.is_empty() {
                                "none".to_owned()
                            } else {
                                h.mysql_fenced.join(", ")
                            }
                        ))
                    }
                }
            }
            StackFault::Place { idc, pid } => {
                self.stack.place(idc, *pid)?;
                Ok(format!("pid {pid} placed in {idc}"))
            }
            other => self.stack.apply(other).await,
        }
    }
}

impl StackControl {
    /// Binds `dir/control.sock`, writes `dir/lab.json` and serves requests until
    /// [`StackControl::stop`].
    pub async fn start(stack: Arc<Stack>, dir: &Path) -> Result<StackControl, LabError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LabError::io(format!("create {}", dir.display()), e))?;
        let socket = dir.join("control.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .map_err(|e| LabError::io(format!("bind control socket {}", socket.display()), e))?;
        let shared = Arc::new(ControlShared {
            stack,
            dir: dir.to_owned(),
            shutdown: Notify::new(),
            faults: Mutex::new(()),
            partitions: Mutex::new(std::collections::HashMap::new()),
        });
        shared.write_manifest().await?;
        let task = tokio::spawn(control_loop(listener, shared.clone()));
        Ok(StackControl { task, shared })
    }

    /// Resolves when a `shutdown` request arrived.
    pub async fn shutdown_requested(&self) {
        self.shared.shutdown.notified().await;
    }

    /// Stops serving, heals the partitions it holds, and removes the socket and `lab.json`.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
        let held: Vec<StackPartition> = self
            .shared
            .partitions
            .lock()
            .await
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in held {
            if let Err(e) = p.heal().await {
                tracing::warn!(error = %e, "healing a partition at shutdown");
            }
        }
        let _ = std::fs::remove_file(self.shared.dir.join("control.sock"));
        let _ = std::fs::remove_file(Manifest::path(&self.shared.dir));
    }
}

async fn control_loop(listener: UnixListener, shared: Arc<ControlShared>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                conns.spawn(control_conn(stream, shared.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn control_conn(stream: UnixStream, shared: Arc<ControlShared>) {
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
            Ok(ControlRequest::Stack { fault }) => {
                let _one = shared.faults.lock().await;
                let r = shared.apply(&fault).await;
                let _ = shared.write_manifest().await;
                ControlResponse::from_detail(r.map(Some))
            }
            Ok(ControlRequest::Fault { target, action }) => {
                let _one = shared.faults.lock().await;
                let r = shared.stack.apply_action(&target, action).await;
                let _ = shared.write_manifest().await;
                ControlResponse::from_detail(r.map(Some))
            }
        };
        let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
        out.push('\n');
        let _ = w.write_all(out.as_bytes()).await;
        if shutdown {
            shared.shutdown.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::own_table;

    #[test]
    fn each_cut_gets_a_table_number_no_other_uses() {
        let mut used = vec![100, 200];
        assert_eq!(own_table(&mut used, [200, 100, 201, 202]), Some(201));
        assert_eq!(own_table(&mut used, [201, 202]), Some(202));
        assert_eq!(own_table(&mut used, [100, 202]), None);
        assert_eq!(used, vec![100, 200, 201, 202]);
    }
}
