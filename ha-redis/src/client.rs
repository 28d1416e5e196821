//! [`HaRedis`]: start-up, the follower task, the Sentinel subscriptions, and the master handle.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures::StreamExt;
use ha_core::{EventBus, HaContext, HaError, IdcClassifier, Master, MasterWatch, TopologyEvent};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{StartupError, is_not_master, is_transport, to_redis_error};
use crate::event::{self, SentinelEvent};
use crate::gate::{Gate, Refused};
use crate::node::{self, Credentials, SentinelView};
use crate::vote::{self, Answer, Vote};

// === Builder ===

/// Builds an [`HaRedis`]. Every default is in the setter's doc comment.
#[derive(Debug, Clone)]
#[must_use]
pub struct Builder {
    sentinels: Vec<SocketAddr>,
    master_name: String,
    dependency: Option<String>,
    redis: Credentials,
    sentinel: Credentials,
    timeout: Duration,
    max_hold: Duration,
    poll_interval: Duration,
    sentinel_timeout: Duration,
    connect_timeout: Duration,
    startup_timeout: Duration,
    replica_max_lag: u64,
    source: Option<IpAddr>,
    context: Option<HaContext>,
    events: Option<EventBus>,
    classifier: Option<Arc<IdcClassifier>>,
}

impl Builder {
    /// A builder following `master_name` through `sentinels`.
    pub fn new(sentinels: impl IntoIterator<Item = SocketAddr>, master_name: &str) -> Builder {
        Builder {
            sentinels: sentinels.into_iter().collect(),
            master_name: master_name.to_owned(),
            dependency: None,
            redis: Credentials::default(),
            sentinel: Credentials::default(),
            timeout: Duration::from_secs(1),
            max_hold: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            sentinel_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(500),
            startup_timeout: Duration::from_secs(5),
            replica_max_lag: 1 << 20,
            source: None,
            context: None,
            events: None,
            classifier: None,
        }
    }

    /// Makes every outgoing connection (to the master, the replicas and the sentinels) from
    /// `ip`, a local address (default: none, the kernel picks). A service in an IDC binds to an
    /// address of that IDC so that firewall rules and partitions written per IDC address apply
    /// to it. `build` fails with [`StartupError::Config`] when `ip` cannot be bound here.
    pub fn source_address(mut self, ip: IpAddr) -> Builder {
        self.source = Some(ip);
        self
    }

    /// The dependency name used for the [`MasterWatch`], events and metrics (default: the
    /// master name).
    pub fn dependency(mut self, name: &str) -> Builder {
        self.dependency = Some(name.to_owned());
        self
    }

    /// Username and password for the Redis nodes (default none).
    pub fn redis_auth(mut self, username: Option<&str>, password: Option<&str>) -> Builder {
        self.redis = Credentials {
            username: username.map(str::to_owned),
            password: password.map(str::to_owned),
        };
        self
    }

    /// Username and password for the sentinels (default none).
    pub fn sentinel_auth(mut self, username: Option<&str>, password: Option<&str>) -> Builder {
        self.sentinel = Credentials {
            username: username.map(str::to_owned),
            password: password.map(str::to_owned),
        };
        self
    }

    /// The per-command deadline, including any wait for a master and any hold (default 1 s).
    pub fn timeout(mut self, timeout: Duration) -> Builder {
        self.timeout = timeout;
        self
    }

    /// The longest a write waits while a failover is in progress (default 5 s; the command
    /// deadline bounds it too). A write held that long fails with
    /// [`HaError::DeadlineExceeded`] and was not sent.
    pub fn max_hold(mut self, max_hold: Duration) -> Builder {
        self.max_hold = max_hold;
        self
    }

    /// How often every sentinel is asked again, the safety net for lost events (default 1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Builder {
        self.poll_interval = interval;
        self
    }

    /// The most a replica's replication offset may trail the master's, in bytes of the
    /// replication stream, for it to serve reads (default 1 MiB). Every poll interval each
    /// replica's `INFO replication` is read, then the master's: a replica past the bound, with
    /// its link down, in a full sync or not answering within the sentinel timeout leaves the
    /// read set until a check passes again. A replica can serve reads that old for up to one
    /// poll interval before it is noticed; `0` admits only replicas that were level at the
    /// check. Callers who must read their own writes use [`HaRedis::session`].
    pub fn replica_max_lag(mut self, bytes: u64) -> Builder {
        self.replica_max_lag = bytes;
        self
    }

    /// The bound on one sentinel's answer (default 500 ms).
    pub fn sentinel_timeout(mut self, timeout: Duration) -> Builder {
        self.sentinel_timeout = timeout;
        self
    }

    /// The bound on connecting (and authenticating) to a node (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Builder {
        self.connect_timeout = timeout;
        self
    }

    /// The bound on [`Builder::build`] (default 5 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Builder {
        self.startup_timeout = timeout;
        self
    }

    /// Uses `ctx`'s shared [`MasterWatch`] (classified into its IDCs) and event bus.
    pub fn context(mut self, ctx: &HaContext) -> Builder {
        self.context = Some(ctx.clone());
        self
    }

    /// Publishes on `events` (ignored with [`Builder::context`]; default: a new bus).
    pub fn events(mut self, events: EventBus) -> Builder {
        self.events = Some(events);
        self
    }

    /// Places masters into IDCs with `classifier` (ignored with [`Builder::context`]).
    pub fn classifier(mut self, classifier: Arc<IdcClassifier>) -> Builder {
        self.classifier = Some(classifier);
        self
    }

    /// Discovers the master (majority of the sentinels, verified with `ROLE`), connects, and
    /// starts following. Bounded by the start-up timeout; fails with a [`StartupError`]
    /// naming what was wrong.
    pub async fn build(self) -> Result<HaRedis, StartupError> {
        if self.sentinels.is_empty() {
            return Err(StartupError::Config("no sentinel address given".into()));
        }
        if self.master_name.trim().is_empty() {
            return Err(StartupError::Config("empty master name".into()));
        }
        for (name, d) in [
            ("timeout", self.timeout),
            ("poll_interval", self.poll_interval),
            ("sentinel_timeout", self.sentinel_timeout),
            ("connect_timeout", self.connect_timeout),
            ("startup_timeout", self.startup_timeout),
        ] {
            if d.is_zero() {
                return Err(StartupError::Config(format!("{name} must be more than 0")));
            }
        }
        if let Some(ip) = self.source {
            if let Some(s) = self.sentinels.iter().find(|s| s.is_ipv4() != ip.is_ipv4()) {
                return Err(StartupError::Config(format!(
                    "source_address {ip} and sentinel {s} are of different IP families"
                )));
            }
            node::check_source(ip).map_err(StartupError::Config)?;
        }
        let dependency: Arc<str> = self
            .dependency
            .clone()
            .unwrap_or_else(|| self.master_name.clone())
            .into();
        let (watch, events) = match &self.context {
            Some(ctx) => (ctx.master_watch(&dependency), ctx.events().clone()),
            None => {
                let events = self.events.clone().unwrap_or_default();
                let mut w = MasterWatch::new(dependency.clone(), events.clone());
                if let Some(c) = &self.classifier {
                    w = w.with_classifier(c.clone());
                }
                (w, events)
            }
        };
        let (tx, rx) = mpsc::channel(1024);
        let replicas = self.context.as_ref().map(|ctx| {
            (
                ctx.publisher(&format!("{dependency}-replicas")),
                ctx.topology().classifier().clone(),
            )
        });
        let core = Arc::new(Core {
            replicas,
            sentinel_conns: self
                .sentinels
                .iter()
                .map(|_| ArcSwapOption::empty())
                .collect(),
            dependency,
            watch,
            events,
            gate: Gate::new(),
            tx,
            next_id: AtomicU64::new(1),
            held_now: AtomicU64::new(0),
            stats: StatsInner::default(),
            cfg: self,
        });
        let timeout = core.cfg.startup_timeout;
        let last = Arc::new(ArcSwapOption::<String>::empty());
        let first = tokio::time::timeout(timeout, core.clone().discover_first(last.clone())).await;
        match first {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(StartupError::Timeout {
                    master_name: core.cfg.master_name.clone(),
                    timeout,
                    last: last
                        .load_full()
                        .map_or_else(|| "nothing answered".into(), |s| (*s).clone()),
                });
            }
        }
        let mut prober = crate::replica::Prober::default();
        core.refresh_replicas(&mut prober).await;
        let replica_balance = match (&core.cfg.context, &core.replicas) {
            (Some(ctx), Some((publisher, _))) => {
                let creds = Arc::new(core.cfg.redis.clone());
                let connect = core.cfg.connect_timeout;
                let source = core.cfg.source;
                Some(
                    ctx.balancer_over(publisher.watch())
                        .classifier(crate::error::RedisClassifier)
                        .build(move |ep: &ha_core::Endpoint| {
                            crate::replica::ReplicaConn::new(ep, creds.clone(), source, connect)
                        }),
                )
            }
            _ => None,
        };
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(core.clone().follow(rx)));
        for i in 0..core.cfg.sentinels.len() {
            tasks.push(tokio::spawn(core.clone().subscribe_loop(i)));
        }
        if core.replicas.is_some() {
            tasks.push(tokio::spawn(core.clone().replica_loop(prober)));
        }
        Ok(HaRedis {
            core,
            tasks: Arc::new(Tasks(tasks)),
            replicas: replica_balance,
        })
    }
}

/// Settings read from `[dependencies.NAME.settings]` of a topology (`kind = "redis"`).
///
/// ```toml
/// [dependencies.cache]
/// kind = "redis"
/// static_addrs = ["127.0.1.10:26379", "127.0.2.10:26379", "127.0.3.10:26379"]  # the sentinels
/// [dependencies.cache.settings]
/// master_name = "members"
/// timeout_ms = 1000
/// ```
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisSettings {
    /// The master name the sentinels monitor (required).
    pub master_name: String,
    /// Redis ACL username (default none).
    #[serde(default)]
    pub username: Option<String>,
    /// Redis password (default none).
    #[serde(default)]
    pub password: Option<String>,
    /// Sentinel ACL username (default none).
    #[serde(default)]
    pub sentinel_username: Option<String>,
    /// Sentinel password (default none).
    #[serde(default)]
    pub sentinel_password: Option<String>,
    /// Per-command deadline in milliseconds (default 1000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Maximum hold of a write during a failover, in milliseconds (default 5000).
    #[serde(default)]
    pub max_hold_ms: Option<u64>,
    /// The most a replica's offset may trail the master's for it to serve reads, in bytes
    /// (default 1 MiB; [`Builder::replica_max_lag`]).
    #[serde(default)]
    pub replica_max_lag_bytes: Option<u64>,
    /// The local address every connection is made from (default none;
    /// [`Builder::source_address`]).
    #[serde(default)]
    pub source_address: Option<IpAddr>,
}

// === HaRedis ===

struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A Redis master followed through Sentinel. `Clone` shares everything; the background tasks
/// (one follower, one subscription per sentinel) stop when the last clone and the last
/// [`MasterHandle`] are dropped.
#[derive(Clone)]
pub struct HaRedis {
    core: Arc<Core>,
    tasks: Arc<Tasks>,
    replicas: Option<ha_core::balance::LocalityBalance<crate::replica::ReplicaConn>>,
}

impl std::fmt::Debug for HaRedis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaRedis")
            .field("master_name", &self.core.cfg.master_name)
            .field("master", &self.core.watch.current())
            .finish_non_exhaustive()
    }
}

/// Counters of one [`HaRedis`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Master switches done (verified new master swapped in).
    pub switches: u64,
    /// Holds started (failovers seen).
    pub holds: u64,
    /// Writes that found the gate held and waited.
    pub held_writes: u64,
    /// Commands refused on a fenced connection or answered `-READONLY`/`-MASTERDOWN` and
    /// retried.
    pub retried: u64,
    /// Writes acknowledged by the old master while a hold began, checked against the
    /// promoted node's offset.
    pub in_flight_checked: u64,
}

#[derive(Default)]
struct StatsInner {
    switches: AtomicU64,
    holds: AtomicU64,
    held_writes: AtomicU64,
    retried: AtomicU64,
    in_flight_checked: AtomicU64,
}

impl HaRedis {
    /// A builder following `master_name` through `sentinels`.
    pub fn builder(sentinels: impl IntoIterator<Item = SocketAddr>, master_name: &str) -> Builder {
        Builder::new(sentinels, master_name)
    }

    /// A builder for the topology dependency `dependency` of `ctx` (`kind = "redis"`; its
    /// `static_addrs` are the sentinels, or its DNS names resolve to them; the master name
    /// and credentials come from its `settings`), wired to `ctx`.
    pub async fn builder_from_context(
        ctx: &HaContext,
        dependency: &str,
    ) -> Result<Builder, StartupError> {
        let dep = ctx
            .topology()
            .require_dependency(dependency)
            .map_err(|e| StartupError::Config(e.to_string()))?;
        if let Some(kind) = dep.kind.as_deref()
            && kind != "redis"
        {
            return Err(StartupError::Config(format!(
                "dependency {dependency} has kind {kind:?}, not \"redis\""
            )));
        }
        let s: RedisSettings = dep
            .settings()
            .map_err(|e| StartupError::Config(e.to_string()))?;
        let discovery = ctx
            .discover(dependency)
            .await
            .map_err(|e| StartupError::Config(e.to_string()))?;
        let sentinels: Vec<SocketAddr> = discovery
            .watch()
            .borrow()
            .endpoints
            .iter()
            .map(|e| e.addr)
            .collect();
        let mut b = Builder::new(sentinels, &s.master_name)
            .dependency(dependency)
            .context(ctx)
            .redis_auth(s.username.as_deref(), s.password.as_deref())
            .sentinel_auth(
                s.sentinel_username.as_deref(),
                s.sentinel_password.as_deref(),
            );
        if let Some(ms) = s.timeout_ms {
            b = b.timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = s.max_hold_ms {
            b = b.max_hold(Duration::from_millis(ms));
        }
        if let Some(bytes) = s.replica_max_lag_bytes {
            b = b.replica_max_lag(bytes);
        }
        if let Some(ip) = s.source_address {
            b = b.source_address(ip);
        }
        Ok(b)
    }

    /// A handle to the master with the configured deadline.
    pub fn master(&self) -> MasterHandle {
        MasterHandle {
            core: self.core.clone(),
            _tasks: self.tasks.clone(),
            timeout: self.core.cfg.timeout,
            idempotent: false,
            durable: None,
            wrote: None,
        }
    }

    /// A handle for reads from the nearest healthy replica, when the client was built with a
    /// topology ([`Builder::context`]); `None` without one (there are no IDCs to prefer).
    /// With no replica usable, a read goes to the master.
    pub fn replicas(&self) -> Option<crate::replica::ReplicaHandle> {
        self.replicas
            .clone()
            .map(|balance| crate::replica::ReplicaHandle {
                balance,
                timeout: self.core.cfg.timeout,
                master: self.master(),
                read_your_writes: None,
            })
    }

    /// A master handle and a replica handle that share one write clock: for `window` after
    /// a write through the session's master handle was acknowledged, reads through its replica
    /// handle go to the master, so the caller reads its own writes although replication is
    /// asynchronous. `None` without a topology (as [`HaRedis::replicas`]).
    ///
    /// ```no_run
    /// # async fn f(client: ha_redis::HaRedis) -> Result<(), ha_core::HaError> {
    /// use ha_redis::redis::AsyncCommands;
    /// use std::time::Duration;
    /// let mut s = client.session(Duration::from_secs(1)).expect("a topology");
    /// let _: () = s.master.set("member:7", "gold").await.map_err(ha_redis::error::into_ha_error)?;
    /// // Within the window: answered by the master, never by a replica that lags.
    /// let level: String = s.replicas.query(ha_redis::redis::cmd("GET").arg("member:7")).await?;
    /// # let _ = level; Ok(()) }
    /// ```
    pub fn session(&self, window: Duration) -> Option<Session> {
        let clock = Arc::new(WriteClock::new());
        let mut replicas = self.replicas()?;
        replicas.read_your_writes = Some((clock.clone(), window));
        let mut master = self.master();
        master.wrote = Some(clock);
        Some(Session { master, replicas })
    }

    /// The master watch this client publishes on.
    pub fn master_watch(&self) -> &MasterWatch {
        &self.core.watch
    }

    /// The current verified master, `None` while none is.
    pub fn current_master(&self) -> Option<Arc<Master>> {
        self.core.gate.state().conn.map(|c| c.master.clone())
    }

    /// True while writes are held (a failover is in progress).
    pub fn is_holding(&self) -> bool {
        self.core.gate.is_held()
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        let s = &self.core.stats;
        Stats {
            switches: s.switches.load(Ordering::Relaxed),
            holds: s.holds.load(Ordering::Relaxed),
            held_writes: s.held_writes.load(Ordering::Relaxed),
            retried: s.retried.load(Ordering::Relaxed),
            in_flight_checked: s.in_flight_checked.load(Ordering::Relaxed),
        }
    }
}

// === Core and the follower ===

pub(crate) struct Conn {
    id: u64,
    master: Arc<Master>,
    conn: MultiplexedConnection,
    broken: AtomicBool,
}

enum Input {
    Event(SocketAddr, SentinelEvent),
    Kick { conn: u64, reason: &'static str },
    Resubscribed(SocketAddr),
}

struct Core {
    cfg: Builder,
    dependency: Arc<str>,
    watch: MasterWatch,
    events: EventBus,
    gate: Gate<Conn>,
    tx: mpsc::Sender<Input>,
    sentinel_conns: Vec<ArcSwapOption<MultiplexedConnection>>,
    next_id: AtomicU64,
    stats: StatsInner,
    /// Writes that waited during the current hold (for [`TopologyEvent::WritesReleased`]),
    /// taken when it ends.
    held_now: AtomicU64,
    /// With a topology: where the usable replicas are published, classified into its IDCs.
    replicas: Option<(ha_core::Publisher, Arc<IdcClassifier>)>,
}

/// What the follower remembers between inputs.
#[derive(Default)]
struct FollowState {
    /// The master we switched away from and the highest config epoch seen when we did: a poll
    /// naming it again at an epoch no higher is a lagging sentinel, never a reason to go back
    /// (the old master still says `ROLE master` until Sentinel converts it).
    demoted: Option<(SocketAddr, u64)>,
    /// The highest config epoch any sentinel reported.
    epoch: u64,
    /// Sentinels currently reported degraded by the poll.
    poll_degraded: bool,
    /// Consecutive polls that showed no failover of the current master, since the last time
    /// a hold may have begun.
    clean_polls: u32,
    /// The hold epoch the clean polls were counted under.
    clean_since: u64,
    /// When the last poll started.
    last_poll: Option<Instant>,
    /// The last node a verification failed on, and when.
    verify_failed: Option<(SocketAddr, Instant)>,
    /// The replica whose promotion is being watched.
    watching: Option<(SocketAddr, JoinHandle<()>)>,
}

impl Core {
    fn name(&self) -> &str {
        &self.cfg.master_name
    }

    async fn sentinel_conn(&self, i: usize) -> Result<MultiplexedConnection, RedisError> {
        if let Some(c) = self.sentinel_conns[i].load_full() {
            return Ok((*c).clone());
        }
        let c = node::connect(
            self.cfg.sentinels[i],
            &self.cfg.sentinel,
            self.cfg.source,
            self.cfg.connect_timeout,
        )
        .await?;
        self.sentinel_conns[i].store(Some(Arc::new(c.clone())));
        Ok(c)
    }

    /// Asks every sentinel (concurrently, each bounded).
    async fn ask(&self) -> Vec<(SocketAddr, SentinelView)> {
        let futs = (0..self.cfg.sentinels.len()).map(|i| async move {
            let view = match tokio::time::timeout(self.cfg.sentinel_timeout, self.ask_one(i)).await
            {
                Ok(v) => v,
                Err(_) => SentinelView {
                    answer: Answer::Failed(
                        vote::FailKind::Unreachable,
                        format!("no answer within {:?}", self.cfg.sentinel_timeout),
                    ),
                    epoch: 0,
                    flags: String::new(),
                    record: None,
                },
            };
            (self.cfg.sentinels[i], view)
        });
        futures::future::join_all(futs).await
    }

    async fn ask_one(&self, i: usize) -> SentinelView {
        let r = async {
            let mut c = self.sentinel_conn(i).await?;
            node::ask_sentinel(&mut c, self.name(), self.cfg.sentinel_timeout).await
        }
        .await;
        match r {
            Ok(v) => v,
            Err(e) => {
                self.sentinel_conns[i].store(None);
                SentinelView {
                    answer: node::failed(&e),
                    epoch: 0,
                    flags: String::new(),
                    record: None,
                }
            }
        }
    }

    /// Start-up: vote, verify, connect. Retries (bounded by the caller's timeout) only while
    /// the answer may still change (a failover in progress, a node not yet master).
    async fn discover_first(
        self: Arc<Self>,
        last: Arc<ArcSwapOption<String>>,
    ) -> Result<(), StartupError> {
        let name = self.name().to_owned();
        loop {
            let views = self.ask().await;
            let answers: Vec<(SocketAddr, Answer)> =
                views.iter().map(|(s, v)| (*s, v.answer.clone())).collect();
            match vote::tally(&answers) {
                Vote::Master { addr, .. } => {
                    let epoch = views.iter().map(|(_, v)| v.epoch).max().unwrap_or(0);
                    match self.connect_verified(addr).await {
                        Ok(conn) => {
                            self.install(addr, conn, "initial", epoch, true);
                            return Ok(());
                        }
                        Err(e) if node::is_auth_error(&e) => {
                            return Err(StartupError::RedisAuth {
                                addr,
                                reason: e.to_string(),
                            });
                        }
                        Err(e) => last.store(Some(Arc::new(format!("master {addr}: {e}")))),
                    }
                }
                Vote::UnknownMaster => {
                    return Err(StartupError::UnknownMaster { master_name: name });
                }
                Vote::AuthFailed { errors } => {
                    return Err(StartupError::SentinelAuth {
                        master_name: name,
                        errors,
                    });
                }
                Vote::NoneReachable { errors } => {
                    return Err(StartupError::NoSentinelReachable {
                        master_name: name,
                        errors,
                    });
                }
                Vote::NoMajority { answers } => {
                    // Sentinels disagree during a failover for a moment; a persistent split is
                    // an error. Ask again a few times within the start-up bound.
                    if views.iter().all(|(_, v)| !v.failover_in_progress()) {
                        return Err(StartupError::NoMajority {
                            master_name: name,
                            answers,
                        });
                    }
                    last.store(Some(Arc::new(format!("no majority: {answers:?}"))));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Connects to `addr` and checks `ROLE` on that very connection: `Ok` only for a master.
    async fn connect_verified(
        &self,
        addr: SocketAddr,
    ) -> Result<MultiplexedConnection, RedisError> {
        let mut conn = node::connect(
            addr,
            &self.cfg.redis,
            self.cfg.source,
            self.cfg.connect_timeout,
        )
        .await?;
        let role = node::role(&mut conn, self.cfg.sentinel_timeout).await?;
        if role != "master" {
            return Err(RedisError::from((
                redis::ErrorKind::Client,
                "node is not a master",
                format!("{addr} says ROLE {role}"),
            )));
        }
        Ok(conn)
    }

    /// Publishes `addr` through the master watch, swaps the connection in and releases any
    /// hold, in one step of the gate.
    fn install(
        &self,
        addr: SocketAddr,
        conn: MultiplexedConnection,
        cause: &str,
        epoch: u64,
        release: bool,
    ) {
        let before = self.watch.current();
        let master = match self.watch.observe(addr, epoch, cause) {
            ha_core::master::Observed::Switched(m) | ha_core::master::Observed::Unchanged(m) => m,
            _ => self.watch.switch(addr, cause),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(Conn {
            id,
            master: master.clone(),
            conn,
            broken: AtomicBool::new(false),
        });
        let ended = self.gate.install(Some(c), release);
        if before.as_ref().map(|m| m.generation) != Some(master.generation) {
            self.stats.switches.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("ha_redis_switches_total", "dependency" => self.dependency.to_string())
                .increment(1);
        }
        if let Some(h) = ended {
            let aborted = before.as_ref().map(|m| m.addr) == Some(addr);
            self.released(addr, &h, aborted);
            tracing::info!(dependency = %self.dependency, master = %addr, generation = master.generation,
                reason = %h.reason, held_ms = h.since.elapsed().as_millis() as u64, cause, "writes released");
        }
    }

    /// A hold ended: its metrics and event.
    fn released(&self, addr: SocketAddr, h: &crate::gate::Hold, aborted: bool) {
        let held_for = h.since.elapsed();
        metrics::histogram!("ha_redis_hold_seconds", "dependency" => self.dependency.to_string())
            .record(held_for.as_secs_f64());
        let held = self.held_now.swap(0, Ordering::Relaxed);
        self.events.publish(TopologyEvent::writes_released(
            self.dependency.clone(),
            addr,
            held,
            held_for,
            aborted,
        ));
    }

    fn start_hold(&self, reason: &str) {
        // The gate counts every hold in the step that closes it, so a write whose reply
        // arrives after the hold began always sees the change (a spurious count only costs
        // an extra check).
        if self.gate.hold(reason) {
            self.stats.holds.fetch_add(1, Ordering::Relaxed);
            self.events
                .publish(TopologyEvent::writes_held(self.dependency.clone(), reason));
        }
    }

    fn current(&self) -> Option<Arc<Conn>> {
        self.gate.state().conn
    }

    /// Verifies `addr` and makes it the master. Up to three quick tries: a promoted replica
    /// may take a moment to answer `ROLE master`.
    async fn switch_to(
        &self,
        addr: SocketAddr,
        cause: &str,
        st: &mut FollowState,
        release: bool,
    ) -> bool {
        if let Some(c) = self.current()
            && c.master.addr == addr
            && !c.broken.load(Ordering::Relaxed)
        {
            return true;
        }
        // An event names a node that is becoming master: try a few times. A poll tries once,
        // and not again within a poll interval of a failed try, so a dead or frozen node never
        // keeps the follower from its events.
        let from_poll = cause == "sentinel_poll";
        if from_poll
            && let Some((a, at)) = st.verify_failed
            && a == addr
            && at.elapsed() < self.cfg.poll_interval
        {
            return false;
        }
        let old = self.current().map(|c| c.master.addr);
        let attempts = if from_poll { 1 } else { 3 };
        for attempt in 0..attempts {
            match self.connect_verified(addr).await {
                Ok(conn) => {
                    if let Some(old) = old
                        && old != addr
                    {
                        st.demoted = Some((old, st.epoch));
                    }
                    self.install(addr, conn, cause, 0, release);
                    return true;
                }
                Err(e) => {
                    tracing::debug!(dependency = %self.dependency, master = %addr, attempt, error = %e, "verify failed");
                    if attempt + 1 < attempts {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        st.verify_failed = Some((addr, Instant::now()));
        false
    }

    /// A poll asked for by an event: the same event comes from every sentinel, so one poll
    /// answers all of them that arrive within 200 ms.
    async fn poll_soon(&self, st: &mut FollowState) {
        if st
            .last_poll
            .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        self.poll(st).await;
    }

    async fn follow(self: Arc<Self>, mut rx: mpsc::Receiver<Input>) {
        let mut st = FollowState::default();
        let mut tick = tokio::time::interval(self.cfg.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Events first: a poll must never delay a `+promoted-slave`.
                biased;
                input = rx.recv() => match input {
                    Some(i) => self.on_input(i, &mut st).await,
                    None => return,
                },
                _ = tick.tick() => self.poll(&mut st).await,
            }
        }
    }

    async fn on_input(&self, input: Input, st: &mut FollowState) {
        match input {
            Input::Event(from, ev) => {
                tracing::debug!(dependency = %self.dependency, sentinel = %from, event = ?ev, "sentinel event");
                match ev {
                    SentinelEvent::FailoverStarted {
                        step,
                        master,
                        replica,
                    } => {
                        let cur = self.current().map(|c| c.master.addr);
                        // Only a failover of the master we write to holds writes (a late event
                        // about the master we already left does not).
                        if cur.is_none() || cur == Some(master) {
                            self.start_hold(step);
                            if let Some(replica) = replica {
                                self.watch_promotion(replica, st);
                            }
                        }
                    }
                    SentinelEvent::Promoted { addr } => {
                        if self.current().map(|c| c.master.addr) != Some(addr) {
                            self.start_hold("+promoted-slave");
                            self.switch_to(addr, "sentinel_promoted_slave", st, true)
                                .await;
                        }
                    }
                    SentinelEvent::SwitchMaster { to, .. } => {
                        if self.current().map(|c| c.master.addr) != Some(to) {
                            self.start_hold("+switch-master");
                        }
                        self.switch_to(to, "sentinel_switch_master", st, true).await;
                    }
                    SentinelEvent::FailoverAborted { step } => {
                        tracing::warn!(dependency = %self.dependency, step, "failover aborted");
                        if !self.confirm_and_release(&step).await {
                            self.poll(st).await;
                        }
                    }
                    SentinelEvent::MasterSubjectivelyDown | SentinelEvent::Reconcile { .. } => {
                        self.poll_soon(st).await
                    }
                }
            }
            Input::Kick { conn, reason } => {
                let Some(c) = self.current() else {
                    return;
                };
                if c.id != conn {
                    return;
                }
                tracing::info!(dependency = %self.dependency, master = %c.master.addr, reason, "re-verifying the master");
                c.broken.store(true, Ordering::Relaxed);
                self.gate.clear_if(|x| x.id == conn);
                match self.connect_verified(c.master.addr).await {
                    Ok(conn) => self.install_same(c.master.addr, conn),
                    Err(e) => {
                        if e.to_string().contains("ROLE") {
                            self.watch.lose("role_not_master");
                        }
                        self.poll(st).await;
                    }
                }
            }
            Input::Resubscribed(sentinel) => {
                tracing::debug!(dependency = %self.dependency, sentinel = %sentinel, "subscribed: reconciling");
                self.poll_soon(st).await
            }
        }
    }

    /// Sentinel notices the promotion only at its next `INFO` of the replica (up to
    /// `info-period` later, 1 s in the lab): ask the chosen replica's `ROLE` ourselves every
    /// 10 ms, so held writes go to it as soon as it is a master.
    fn watch_promotion(&self, replica: SocketAddr, st: &mut FollowState) {
        if st
            .watching
            .as_ref()
            .is_some_and(|(a, t)| *a == replica && !t.is_finished())
        {
            return;
        }
        if let Some((_, t)) = st.watching.take() {
            t.abort();
        }
        let tx = self.tx.clone();
        let creds = self.cfg.redis.clone();
        let source = self.cfg.source;
        let connect = self.cfg.connect_timeout;
        let answer = self.cfg.sentinel_timeout;
        let bound = self.cfg.max_hold.max(Duration::from_secs(1));
        let task = tokio::spawn(async move {
            let until = Instant::now() + bound;
            let mut conn = None;
            while Instant::now() < until {
                if conn.is_none() {
                    conn = node::connect(replica, &creds, source, connect).await.ok();
                }
                if let Some(c) = conn.as_mut() {
                    match node::role(c, answer).await {
                        Ok(r) if r == "master" => {
                            let _ = tx
                                .send(Input::Event(
                                    replica,
                                    SentinelEvent::Promoted { addr: replica },
                                ))
                                .await;
                            return;
                        }
                        Ok(_) => {}
                        Err(_) => conn = None,
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        st.watching = Some((replica, task));
    }

    /// A fresh connection to the same master (the old one broke); keeps any hold.
    fn install_same(&self, addr: SocketAddr, conn: MultiplexedConnection) {
        let master = self.watch.switch(addr, "reconnect");
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(Conn {
            id,
            master,
            conn,
            broken: AtomicBool::new(false),
        });
        self.gate.install(Some(c), false);
    }

    /// An aborted failover: the old master, verified again, takes the held writes. False when
    /// it could not be verified (the caller polls).
    async fn confirm_and_release(&self, why: &str) -> bool {
        let Some(c) = self.current() else {
            return false;
        };
        let mut conn = c.conn.clone();
        match node::role(&mut conn, self.cfg.sentinel_timeout).await {
            Ok(r) if r == "master" => {
                if let Some(h) = self.gate.release() {
                    self.released(c.master.addr, &h, true);
                    tracing::info!(dependency = %self.dependency, master = %c.master.addr, reason = %h.reason, why,
                        held_ms = h.since.elapsed().as_millis() as u64, "writes released to the same master");
                }
                true
            }
            _ => false,
        }
    }

    /// The replicas' own task: the read set is checked every poll interval, apart from the
    /// follower so that a frozen replica never delays a failover step.
    async fn replica_loop(self: Arc<Self>, mut prober: crate::replica::Prober) {
        let mut tick = tokio::time::interval(self.cfg.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.refresh_replicas(&mut prober).await;
        }
    }

    /// Publishes the replicas that may serve reads: those `SENTINEL REPLICAS` (of the first
    /// sentinel that answers) reports up with their link ok, each checked on its own
    /// connection against the master's offset ([`Builder::replica_max_lag`]). When no sentinel
    /// answers, the set stays as it is.
    async fn refresh_replicas(&self, prober: &mut crate::replica::Prober) {
        let Some((publisher, classifier)) = &self.replicas else {
            return;
        };
        let mut listed = None;
        for i in 0..self.cfg.sentinels.len() {
            let r = async {
                let mut c = self.sentinel_conn(i).await?;
                node::run(
                    &mut c,
                    redis::cmd("SENTINEL").arg("REPLICAS").arg(self.name()),
                    self.cfg.sentinel_timeout,
                )
                .await
            }
            .await;
            if let Ok(reply) = r {
                listed = Some(crate::replica::usable_replicas(&reply));
                break;
            }
        }
        let Some(listed) = listed else {
            return;
        };
        let infos = prober
            .infos(
                &listed,
                &self.cfg.redis,
                self.cfg.source,
                self.cfg.connect_timeout,
                self.cfg.sentinel_timeout,
            )
            .await;
        // The master's offset is read after every replica's: the lag is never underestimated.
        let master = match self.current() {
            Some(c) => {
                let mut conn = c.conn.clone();
                node::run(
                    &mut conn,
                    redis::cmd("INFO").arg("replication"),
                    self.cfg.sentinel_timeout,
                )
                .await
                .ok()
                .and_then(|v| redis::from_redis_value::<String>(v).ok())
                .and_then(|info| crate::replica::master_offset(&info))
            }
            None => None,
        };
        prober.out.retain(|a, _| listed.contains(a));
        let mut eps = Vec::with_capacity(infos.len());
        for (addr, info) in infos {
            let ep = classifier
                .endpoint(addr)
                .with_role(ha_core::Role::Replica)
                .with_cluster(self.name());
            let verdict =
                info.and_then(|i| crate::replica::judge(&i, master, self.cfg.replica_max_lag));
            match verdict {
                Ok(lag) => {
                    metrics::gauge!("ha_redis_replica_lag_bytes", "replica" => addr.to_string())
                        .set(lag as f64);
                    if let Some(since) = prober.out.remove(&addr) {
                        self.events.publish(TopologyEvent::replica_caught_up(
                            self.dependency.clone(),
                            addr,
                            ep.idc_name(),
                            since.elapsed(),
                        ));
                    }
                    eps.push(ep);
                }
                Err(reason) => {
                    if let std::collections::hash_map::Entry::Vacant(v) = prober.out.entry(addr) {
                        v.insert(Instant::now());
                        self.events.publish(TopologyEvent::replica_lagging(
                            self.dependency.clone(),
                            addr,
                            ep.idc_name(),
                            reason,
                        ));
                    }
                }
            }
        }
        publisher.publish(eps);
    }

    /// The safety net: every sentinel, majority, `ROLE`.
    async fn poll(&self, st: &mut FollowState) {
        st.last_poll = Some(Instant::now());
        let views = self.ask().await;
        let answers: Vec<(SocketAddr, Answer)> =
            views.iter().map(|(s, v)| (*s, v.answer.clone())).collect();
        let cur_addr = self.current().map(|c| c.master.addr);
        // A failover of the master we write to (while we have none: any failover).
        let failover = views.iter().any(|(_, v)| {
            (v.failover_in_progress() || v.odown()) && cur_addr.is_none_or(|a| v.record == Some(a))
        });
        let max_epoch = views.iter().map(|(_, v)| v.epoch).max().unwrap_or(0);
        st.epoch = st.epoch.max(max_epoch);
        if failover {
            tracing::debug!(dependency = %self.dependency, ?views, "poll: failover of the current master");
            self.start_hold("poll: failover in progress");
        }
        match vote::tally(&answers) {
            Vote::Master { addr, answered, .. } => {
                let majority_answered = answered * 2 > self.cfg.sentinels.len();
                let epoch = self.gate.holds();
                if failover || !majority_answered || epoch != st.clean_since {
                    st.clean_since = epoch;
                    st.clean_polls = 0;
                } else {
                    st.clean_polls += 1;
                }
                if st.poll_degraded {
                    st.poll_degraded = false;
                    self.events.publish(TopologyEvent::watcher_restored(
                        self.dependency.clone(),
                        "sentinel-poll",
                    ));
                }
                let addr_epoch = views
                    .iter()
                    .filter(|(_, v)| v.answer == Answer::Master(addr))
                    .map(|(_, v)| v.epoch)
                    .max()
                    .unwrap_or(0);
                if let Some((old, at)) = st.demoted
                    && old == addr
                    && addr_epoch <= at
                {
                    return;
                }
                let cur = self.current();
                match cur {
                    Some(c) if c.master.addr == addr => {
                        // Two clean polls in a row, from a majority of the sentinels: a
                        // sentinel that failed to answer once cannot hide a failover.
                        if self.gate.is_held() && st.clean_polls >= 2 {
                            self.confirm_and_release("poll: no failover in progress")
                                .await;
                        }
                    }
                    // A failover is under way: its events (and the promotion watcher) bring
                    // the new master; trying the old one again here would only stall the
                    // follower on a node that may be dead or frozen.
                    _ if failover => {}
                    _ => {
                        self.switch_to(addr, "sentinel_poll", st, true).await;
                    }
                }
            }
            other => {
                if !st.poll_degraded {
                    st.poll_degraded = true;
                    self.events.publish(TopologyEvent::watcher_degraded(
                        self.dependency.clone(),
                        "sentinel-poll",
                        format!("{other:?}"),
                    ));
                }
            }
        }
    }

    async fn subscribe_loop(self: Arc<Self>, i: usize) {
        let sentinel = self.cfg.sentinels[i];
        let watcher: Arc<str> = format!("sentinel {sentinel}").into();
        let mut backoff = Duration::from_millis(100);
        let mut degraded = false;
        loop {
            let sub = async {
                let mut ps = node::pubsub(sentinel, &self.cfg.sentinel, self.cfg.source).await?;
                ps.subscribe(event::CHANNELS).await?;
                ps.psubscribe(event::ABORT_PATTERN).await?;
                Ok::<_, RedisError>(ps)
            };
            let why = match tokio::time::timeout(self.cfg.connect_timeout * 2, sub).await {
                Ok(Ok(ps)) => {
                    if degraded {
                        self.events.publish(TopologyEvent::watcher_restored(
                            self.dependency.clone(),
                            watcher.clone(),
                        ));
                    }
                    degraded = false;
                    backoff = Duration::from_millis(100);
                    let _ = self.tx.try_send(Input::Resubscribed(sentinel));
                    self.read_events(sentinel, ps).await
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "subscribe timed out".to_owned(),
            };
            if !degraded {
                degraded = true;
                tracing::warn!(dependency = %self.dependency, sentinel = %sentinel, reason = %why, "sentinel subscription lost");
                self.events.publish(TopologyEvent::watcher_degraded(
                    self.dependency.clone(),
                    watcher.clone(),
                    why,
                ));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Forwards parsed events until the subscription ends or stops answering pings.
    async fn read_events(&self, sentinel: SocketAddr, ps: redis::aio::PubSub) -> String {
        let (mut sink, mut stream) = ps.split();
        let mut ping = tokio::time::interval(Duration::from_secs(1));
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { return "subscription closed".into() };
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if let Some(ev) = event::parse(msg.get_channel_name(), &payload, self.name()) {
                        let _ = self.tx.send(Input::Event(sentinel, ev)).await;
                    }
                }
                _ = ping.tick() => {
                    match tokio::time::timeout(self.cfg.sentinel_timeout, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return format!("ping: {e}"),
                        Err(_) => return "ping timed out".into(),
                    }
                }
            }
        }
    }
}

// === MasterHandle ===

/// A handle to the current master: `Clone`, and a [`redis::aio::ConnectionLike`], so every
/// [`redis::AsyncCommands`] method and [`redis::Pipeline`] work on it unchanged.
///
/// Every command is bounded by the handle's deadline (waiting for a master and any hold
/// included). Writes (see [`crate::command`]) are held while a failover is in progress and
/// sent only to a master verified with `ROLE`; reads are not held. A command answered
/// `-READONLY`/`-MASTERDOWN` was not executed: it triggers re-discovery and is retried once on
/// the next verified master within the deadline. A write whose connection broke after it was
/// sent fails with [`HaError::OutcomeUnknown`] unless the handle is
/// [`idempotent`](Self::idempotent). Through `ConnectionLike` our errors come wrapped in a
/// `RedisError` (see [`crate::error`]); [`query`](Self::query) returns them typed.
#[derive(Clone)]
pub struct MasterHandle {
    core: Arc<Core>,
    _tasks: Arc<Tasks>,
    timeout: Duration,
    idempotent: bool,
    durable: Option<(usize, Duration)>,
    /// A session's write clock ([`HaRedis::session`]).
    wrote: Option<Arc<WriteClock>>,
}

/// A master handle and a replica handle whose reads follow its writes; see
/// [`HaRedis::session`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Session {
    /// Writes (and reads) on the master; each acknowledged write starts the window.
    pub master: MasterHandle,
    /// Reads: from the master within the window after a write, else the nearest replica.
    pub replicas: crate::replica::ReplicaHandle,
}

/// When a session last had a write acknowledged.
#[derive(Debug)]
pub(crate) struct WriteClock {
    base: Instant,
    /// Nanoseconds after `base`, plus one; 0 for never.
    last: AtomicU64,
}

impl WriteClock {
    fn new() -> WriteClock {
        WriteClock {
            base: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn mark(&self) {
        let n = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.last.fetch_max(n.saturating_add(1), Ordering::Relaxed);
    }

    /// True when a write was acknowledged less than `window` ago.
    pub(crate) fn within(&self, window: Duration) -> bool {
        match self.last.load(Ordering::Relaxed) {
            0 => false,
            n => {
                let at = self.base + Duration::from_nanos(n - 1);
                at.elapsed() < window
            }
        }
    }
}

impl std::fmt::Debug for MasterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterHandle")
            .field("timeout", &self.timeout)
            .field("idempotent", &self.idempotent)
            .finish_non_exhaustive()
    }
}

enum Req<'a> {
    One(&'a Cmd),
    Many(&'a Pipeline, usize, usize),
}

/// What a command takes of the gate's connection ([`Gate::acquire_with`]).
struct Taken {
    id: u64,
    addr: SocketAddr,
    conn: MultiplexedConnection,
}

enum Reply {
    One(Value),
    Many(Vec<Value>),
}

/// What went wrong in [`MasterHandle::exec`].
enum ExecError {
    Ha(HaError),
    Redis(RedisError),
}

impl MasterHandle {
    /// The same handle with another per-command deadline.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> MasterHandle {
        self.timeout = timeout;
        self
    }

    /// The same handle, marking its commands idempotent: a write whose connection broke after
    /// sending is retried once instead of failing with [`HaError::OutcomeUnknown`].
    #[must_use]
    pub fn idempotent(mut self) -> MasterHandle {
        self.idempotent = true;
        self
    }

    /// The same handle with durable acknowledgements: a write is acknowledged only after
    /// `WAIT replicas timeout` reports it on at least `replicas` replicas; otherwise it fails
    /// with [`HaError::OutcomeUnknown`] around a [`crate::error::NotDurable`] naming both
    /// numbers and the timeout. `WAIT 1` with two replicas may be satisfied by the replica
    /// Sentinel does not promote: ask for every replica to be safe across any failover.
    /// Reads are unaffected.
    #[must_use]
    pub fn durable(mut self, replicas: usize, timeout: Duration) -> MasterHandle {
        self.durable = Some((replicas, timeout));
        self
    }

    /// Runs `cmd` and converts the reply, with typed errors.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, HaError> {
        match self.exec(Req::One(cmd)).await {
            Ok(Reply::One(v)) => v
                .extract_error()
                .and_then(|v| redis::from_redis_value(v).map_err(RedisError::from))
                .map_err(HaError::backend),
            Ok(Reply::Many(_)) => Err(HaError::backend("unexpected pipeline reply")),
            Err(ExecError::Ha(e)) => Err(e),
            Err(ExecError::Redis(e)) => Err(HaError::backend(e)),
        }
    }

    /// Runs `pipeline` and converts the reply, with typed errors.
    pub async fn query_pipeline<T: FromRedisValue>(
        &self,
        pipeline: &Pipeline,
    ) -> Result<T, HaError> {
        let mut me = self.clone();
        pipeline
            .query_async(&mut me)
            .await
            .map_err(crate::error::into_ha_error)
    }

    async fn exec(&self, req: Req<'_>) -> Result<Reply, ExecError> {
        let core = &self.core;
        let write = match &req {
            Req::One(c) => crate::command::is_write(c),
            Req::Many(p, ..) => crate::command::pipeline_is_write(p),
        };
        let deadline = Instant::now() + self.timeout;
        let mut attempts = 0u32;
        let mut failed: Option<u64> = None;
        let mut counted_hold = false;
        loop {
            // What a command needs of the gate's connection (its id, address and a clone of
            // the multiplexed connection), taken without an `Arc` count on it: one contended
            // atomic pair less per command.
            let usable = |c: &Conn| {
                Some(c.id) != failed
                    && !c.broken.load(Ordering::Relaxed)
                    && c.master.generation == core.watch.generation()
            };
            let take = |c: &Arc<Conn>| Taken {
                id: c.id,
                addr: c.master.addr,
                conn: c.conn.clone(),
            };
            // The common case synchronously; the wait (a hold, a switch) boxed, so that this
            // future, allocated per command, stays small.
            let c = match core.gate.try_take(write, usable, take) {
                Some(got) => Ok(got),
                None => {
                    Box::pin(core.gate.acquire_with(
                        write,
                        deadline,
                        core.cfg.max_hold,
                        usable,
                        take,
                        || {
                            if !counted_hold {
                                counted_hold = true;
                                core.stats.held_writes.fetch_add(1, Ordering::Relaxed);
                                core.held_now.fetch_add(1, Ordering::Relaxed);
                                metrics::counter!("ha_redis_held_writes_total", "dependency" => core.dependency.to_string())
                                    .increment(1);
                            }
                        },
                    ))
                    .await
                }
            };
            let (c, holds_at_send) = match c {
                Ok(c) => c,
                Err(Refused::Deadline { .. } | Refused::MaxHold | Refused::Closed) => {
                    // A connection of an older generation is what we had: say so once.
                    if let Some(stale) = core.gate.state().conn
                        && stale.master.generation != core.watch.generation()
                    {
                        let _ = core.watch.check(&stale.master);
                    }
                    return Err(ExecError::Ha(HaError::DeadlineExceeded {
                        deadline: self.timeout,
                        attempts,
                        maybe_sent: false,
                    }));
                }
            };
            attempts += 1;
            let Taken { id, addr, mut conn } = c;
            let sent = async {
                match req {
                    // The inherent methods, not `ConnectionLike`'s: its boxed future would be a
                    // second allocation per command inside the one of this handle's.
                    Req::One(cmd) => conn.send_packed_command(cmd).await.map(Reply::One),
                    Req::Many(p, offset, count) => conn
                        .send_packed_commands(p, offset, count)
                        .await
                        .map(Reply::Many),
                }
            };
            let result = match tokio::time::timeout_at(deadline, sent).await {
                Ok(r) => r,
                Err(_) => {
                    // A master that stops answering (SIGSTOP, a partition) gets checked now.
                    let _ = core.tx.try_send(Input::Kick {
                        conn: id,
                        reason: "timeout",
                    });
                    return Err(ExecError::Ha(HaError::DeadlineExceeded {
                        deadline: self.timeout,
                        attempts,
                        maybe_sent: true,
                    }));
                }
            };
            let not_master = match &result {
                Ok(Reply::One(Value::ServerError(e))) => {
                    matches!(e.kind(), Some(redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown))
                }
                Ok(Reply::Many(vs)) => vs.iter().any(|v| {
                    matches!(v, Value::ServerError(e) if matches!(e.kind(), Some(redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown)))
                }),
                Err(e) => is_not_master(e),
                _ => false,
            };
            if not_master {
                let _ = core.tx.try_send(Input::Kick {
                    conn: id,
                    reason: "READONLY/MASTERDOWN",
                });
                metrics::counter!("ha_redis_fenced_total", "dependency" => core.dependency.to_string())
                    .increment(1);
                if failed.is_none() {
                    failed = Some(id);
                    core.stats.retried.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                return result.map_err(ExecError::Redis);
            }
            match result {
                Ok(r) => {
                    if write && core.gate.holds() != holds_at_send {
                        // A hold began while this write was in flight: the old master's
                        // acknowledgement may have come after the replica's promotion.
                        Box::pin(self.confirm_in_flight(addr, &conn, deadline)).await?;
                    }
                    if write && let Some((n, wait)) = self.durable {
                        Box::pin(self.wait_durable(addr, &conn, n, wait, deadline)).await?;
                    }
                    if write && let Some(clock) = &self.wrote {
                        clock.mark();
                    }
                    return Ok(r);
                }
                Err(e) if is_transport(&e) => {
                    if let Some(c) = core.gate.current().filter(|c| c.id == id) {
                        c.broken.store(true, Ordering::Relaxed);
                    }
                    let _ = core.tx.try_send(Input::Kick {
                        conn: id,
                        reason: "connection broke",
                    });
                    if (!write || self.idempotent) && failed.is_none() {
                        failed = Some(id);
                        continue;
                    }
                    if write && !self.idempotent {
                        return Err(ExecError::Ha(HaError::OutcomeUnknown {
                            endpoint: Some(addr),
                            source: Box::new(e),
                        }));
                    }
                    return Err(ExecError::Redis(e));
                }
                Err(e) => return Err(ExecError::Redis(e)),
            }
        }
    }
}

impl MasterHandle {
    /// A write acknowledged by the old master while a failover began: it counts only if it
    /// reached the node that is promoted. The old master's replication offset after the write
    /// (`ROLE`, on the same connection, so it covers the write) is compared with the offset
    /// at which the new master was promoted (`second_repl_offset` of its `INFO replication`).
    /// An aborted failover keeps the old master, and the write with it. Anything that cannot
    /// be shown within the deadline is [`HaError::OutcomeUnknown`].
    async fn confirm_in_flight(
        &self,
        addr: SocketAddr,
        conn: &MultiplexedConnection,
        deadline: Instant,
    ) -> Result<(), ExecError> {
        let core = &self.core;
        core.stats.in_flight_checked.fetch_add(1, Ordering::Relaxed);
        let unknown = |why: String| {
            ExecError::Ha(HaError::OutcomeUnknown {
                endpoint: Some(addr),
                source: why.into(),
            })
        };
        let mut conn = conn.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        let offset =
            match tokio::time::timeout(left, conn.req_packed_command(&redis::cmd("ROLE"))).await {
                Ok(Ok(Value::Array(items))) => match items.get(1) {
                    Some(Value::Int(o)) => *o,
                    _ => return Err(unknown("unexpected ROLE reply from the old master".into())),
                },
                _ => {
                    return Err(unknown(
                        "old master's offset not read within the deadline".into(),
                    ));
                }
            };
        // Wait (bounded) until the hold ends: by a switch or by a release to this master.
        let mut rx = core.gate.subscribe();
        loop {
            let (cur, held) = {
                let st = rx.borrow_and_update();
                (st.conn.clone(), st.hold.is_some())
            };
            match cur {
                Some(n) if n.master.addr != addr => {
                    let mut nc = n.conn.clone();
                    let left = deadline.saturating_duration_since(Instant::now());
                    let info = tokio::time::timeout(
                        left,
                        nc.req_packed_command(redis::cmd("INFO").arg("replication")),
                    )
                    .await;
                    let promoted_at = match info {
                        Ok(Ok(v)) => redis::from_redis_value::<String>(v).ok().and_then(|t| {
                            t.lines().find_map(|l| {
                                l.strip_prefix("second_repl_offset:")
                                    .and_then(|x| x.trim().parse::<i64>().ok())
                            })
                        }),
                        _ => None,
                    };
                    return match promoted_at {
                        Some(p) if p > offset => Ok(()),
                        Some(p) => Err(unknown(format!(
                            "acknowledged by {} at offset {offset}, but {} was promoted at offset {p}",
                            addr, n.master.addr
                        ))),
                        None => Err(unknown(format!(
                            "promotion offset of {} not read",
                            n.master.addr
                        ))),
                    };
                }
                Some(n) if !held && n.master.addr == addr => return Ok(()),
                _ => {}
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(unknown(
                        "the failover that began while it was in flight had not ended at the deadline"
                            .into(),
                    ));
                }
            }
        }
    }

    /// `WAIT n timeout` on the connection that carried the write (it counts every earlier
    /// write of that connection, so ours too).
    async fn wait_durable(
        &self,
        addr: SocketAddr,
        conn: &MultiplexedConnection,
        needed: usize,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<(), ExecError> {
        let mut conn = conn.clone();
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(needed).arg(timeout.as_millis() as u64);
        let bound = (Instant::now() + timeout + Duration::from_millis(200)).min(deadline);
        let unknown = |source: ha_core::BoxError| {
            ExecError::Ha(HaError::OutcomeUnknown {
                endpoint: Some(addr),
                source,
            })
        };
        match tokio::time::timeout_at(bound, conn.req_packed_command(&cmd)).await {
            Ok(Ok(Value::Int(k))) if k >= 0 && k as usize >= needed => Ok(()),
            Ok(Ok(Value::Int(k))) => Err(unknown(Box::new(crate::error::NotDurable {
                needed,
                acked: k.max(0) as usize,
                timeout,
            }))),
            Ok(Ok(other)) => Err(unknown(format!("unexpected WAIT reply {other:?}").into())),
            Ok(Err(e)) => Err(unknown(Box::new(e))),
            Err(_) => Err(unknown(
                format!("WAIT not answered within the deadline ({timeout:?} asked)").into(),
            )),
        }
    }
}

fn redis_err(e: ExecError) -> RedisError {
    match e {
        ExecError::Ha(h) => to_redis_error(h),
        ExecError::Redis(r) => r,
    }
}

impl ConnectionLike for MasterHandle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match self.exec(Req::One(cmd)).await.map_err(redis_err)? {
                Reply::One(v) => Ok(v),
                Reply::Many(_) => Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "unexpected pipeline reply",
                ))),
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match self
                .exec(Req::Many(pipeline, offset, count))
                .await
                .map_err(redis_err)?
            {
                Reply::Many(v) => Ok(v),
                Reply::One(_) => Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "unexpected single reply",
                ))),
            }
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_write_clock_opens_a_window_after_each_write() {
        let c = WriteClock::new();
        let w = Duration::from_millis(500);
        assert!(!c.within(w), "no write yet");
        c.mark();
        assert!(c.within(w));
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(c.within(w));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!c.within(w), "the window is half-open");
        c.mark();
        assert!(c.within(w), "a new write opens it again");
        assert!(
            !c.within(Duration::ZERO),
            "a zero window never sends reads to the master"
        );
    }
}
