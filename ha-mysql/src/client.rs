//! [`HaMysql`]: the writer pool that follows the primary, its builder, its follower task and
//! the bounded, classified [`HaMysql::write`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{Object, Pool, PoolError};
use futures::future::BoxFuture;
use ha_core::context::Discovery;
use ha_core::{ConfigError, EndpointWatch, EventBus, HaContext, HaError, MasterWatch};
use mysql_async::Conn;
use mysql_async::prelude::Queryable;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{MysqlError, classify_mysql, is_read_only_code};
use crate::manager::{
    ConnSettings, HaConn, MysqlManager, Shared, close_later, connect_primary, keep_standby,
    probe_primary,
};
use crate::reader::{ReadConn, ReplicaService, watch_lag};
use crate::settings::MysqlSettings;
use ha_core::Endpoint;
use ha_core::balance::LocalityBalance;

/// The GTID of the last transaction this session committed (`@@last_gtid`; needs the binlog).
/// Read it inside [`HaMysql::write`], right after the write, for [`HaMysql::reader_after`].
pub async fn last_gtid(conn: &mut Conn) -> mysql_async::Result<String> {
    Ok(conn
        .query_first::<String, _>("SELECT @@last_gtid")
        .await?
        .unwrap_or_default())
}

/// A pooled connection to the verified primary (returned to the pool on drop).
pub type Writer = Object<MysqlManager>;

/// deadpool's non-blocking checkout: no wait for a slot, no timer.
const NON_BLOCKING: deadpool::managed::Timeouts = deadpool::managed::Timeouts {
    wait: Some(Duration::ZERO),
    create: None,
    recycle: None,
};

/// Where the primary is looked for.
#[derive(Clone)]
enum Source {
    /// Fixed candidates; the one that is writable and not replicating is the primary.
    Static(Vec<SocketAddr>),
    /// A host name resolved on every check (the system resolver).
    Host(String, u16),
    /// ha-core's per-region DNS discovery of the primary's name (the HA system repoints it).
    Dns(Discovery),
}

impl Source {
    async fn candidates(&self) -> Vec<SocketAddr> {
        match self {
            Source::Static(v) => v.clone(),
            Source::Host(h, p) => tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::lookup_host((h.as_str(), *p)),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|it| it.collect())
            .unwrap_or_default(),
            Source::Dns(d) => d
                .watch()
                .borrow()
                .endpoints
                .iter()
                .map(|e| e.addr)
                .collect(),
        }
    }

    fn watch(&self) -> Option<EndpointWatch> {
        match self {
            Source::Dns(d) => Some(d.watch()),
            _ => None,
        }
    }

    fn refresh(&self) {
        if let Source::Dns(d) = self
            && let Some(dns) = d.dns()
        {
            dns.refresh_now();
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Static(v) => format!("{v:?}"),
            Source::Host(h, p) => format!("{h}:{p}"),
            Source::Dns(d) => format!("dns {}", d.watch().borrow().dependency),
        }
    }
}

/// Builds an [`HaMysql`] from plain addresses (see [`HaMysql::builder`]) or from a topology
/// dependency ([`HaMysql::from_context`]). Every default is in the setter's doc.
#[must_use]
#[derive(Clone)]
pub struct Builder {
    dependency: String,
    source: Option<Source>,
    settings: MysqlSettings,
    events: EventBus,
    master: Option<MasterWatch>,
    ctx: Option<HaContext>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("dependency", &self.dependency)
            .field("source", &self.source.as_ref().map(Source::describe))
            .field("user", &self.settings.user)
            .field("database", &self.settings.database)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// The dependency's name for events, metrics and logs. Default `mysql`.
    pub fn dependency(mut self, name: impl Into<String>) -> Self {
        self.dependency = name.into();
        self
    }

    /// The primary's candidates as fixed addresses (the primary and its replicas: the one that
    /// is writable and not replicating is the primary).
    pub fn addrs(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.source = Some(Source::Static(addrs.into_iter().collect()));
        self
    }

    /// The primary's DNS name (resolved by the system resolver on every check) and port.
    pub fn host(mut self, host: impl Into<String>, port: u16) -> Self {
        self.source = Some(Source::Host(host.into(), port));
        self
    }

    /// The user. Default `root`.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.settings.user = user.into();
        self
    }

    /// The password. Default none.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.settings.password = Some(password.into());
        self
    }

    /// The database. Default none.
    pub fn database(mut self, database: impl Into<String>) -> Self {
        self.settings.database = Some(database.into());
        self
    }

    /// All settings at once (as read from `[dependencies.X.settings]`).
    pub fn settings(mut self, settings: MysqlSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Maximum connections of the writer pool. Default 16.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.settings.max_connections = n;
        self
    }

    /// Bound on one connect plus its role check. Default 1 s.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.settings.connect_timeout = d;
        self
    }

    /// Default deadline of [`HaMysql::writer`] and [`HaMysql::write`]. Default 2 s.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.settings.timeout = d;
        self
    }

    /// Bound on the whole start-up ([`Builder::connect`]). Default 5 s.
    pub fn startup_timeout(mut self, d: Duration) -> Self {
        self.settings.startup_timeout = d;
        self
    }

    /// How often a pooled connection's role is re-checked at checkout, at most. Default 1 s.
    pub fn role_check_interval(mut self, d: Duration) -> Self {
        self.settings.role_check_interval = d;
        self
    }

    /// How often the follower verifies the primary when nothing happens. Default 1 s.
    pub fn verify_interval(mut self, d: Duration) -> Self {
        self.settings.verify_interval = d;
        self
    }

    /// The replicas reads may go to ([`HaMysql::reader`]); used with a topology
    /// ([`HaMysql::from_context`]), which places them into IDCs. Default none: reads go to
    /// the primary.
    pub fn replicas(mut self, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.settings.replicas = addrs.into_iter().collect();
        self
    }

    /// Whether the follower keeps a warm connection to each replica (and each fixed
    /// candidate) for its probes ([`MysqlSettings::standby`]). Default true.
    pub fn standby(mut self, on: bool) -> Self {
        self.settings.standby = on;
        self
    }

    /// A replica further behind than this is not read from. Default 1 s.
    pub fn max_lag(mut self, d: Duration) -> Self {
        self.settings.max_lag = d;
        self
    }

    /// The event bus to publish on. Default a new one.
    pub fn events(mut self, events: EventBus) -> Self {
        self.events = events;
        self
    }

    fn validate(&self) -> Result<(), MysqlError> {
        let bad = |field: &str, value: String, reason: &str| {
            MysqlError::Config(ConfigError::new(
                "<ha-mysql builder>",
                format!("dependencies.{}.settings.{field}", self.dependency),
                value,
                reason,
            ))
        };
        if self.settings.max_connections == 0 {
            return Err(bad("max_connections", "0".into(), "must be at least 1"));
        }
        if self.settings.user.is_empty() {
            return Err(bad("user", String::new(), "must not be empty"));
        }
        for (name, d) in [
            ("connect_timeout", self.settings.connect_timeout),
            ("timeout", self.settings.timeout),
            ("startup_timeout", self.settings.startup_timeout),
            ("verify_interval", self.settings.verify_interval),
        ] {
            if d.is_zero() {
                return Err(bad(name, "0".into(), "must be positive"));
            }
        }
        match &self.source {
            None => Err(bad(
                "addrs",
                String::new(),
                "no primary address or name given",
            )),
            Some(Source::Static(v)) if v.is_empty() => {
                Err(bad("addrs", "[]".into(), "no primary address given"))
            }
            Some(Source::Host(h, _)) if h.is_empty() => {
                Err(bad("host", String::new(), "empty host name"))
            }
            _ => Ok(()),
        }
    }

    /// Verifies the primary and starts the pool and its follower. Bounded by the start-up
    /// timeout; fails with a typed [`MysqlError`]: [`MysqlError::Config`],
    /// [`MysqlError::Unresolvable`], [`MysqlError::AccessDenied`],
    /// [`MysqlError::UnknownDatabase`], [`MysqlError::ReadOnly`]/[`MysqlError::Replica`] (the
    /// only candidates are not primaries), [`MysqlError::Unreachable`].
    pub async fn connect(self) -> Result<HaMysql, MysqlError> {
        self.validate()?;
        let source = self.source.clone().ok_or_else(|| {
            MysqlError::Config(ConfigError::new(
                "<ha-mysql builder>",
                "addrs",
                "",
                "missing",
            ))
        })?;
        let s = &self.settings;
        let conn = ConnSettings {
            user: s.user.clone(),
            password: s.password.clone(),
            database: s.database.clone(),
            connect_timeout: s.connect_timeout,
            check_timeout: s.connect_timeout,
            role_check_interval: s.role_check_interval,
        };
        let master = self
            .master
            .clone()
            .unwrap_or_else(|| MasterWatch::new(self.dependency.clone(), self.events.clone()));
        let shared = Arc::new(Shared {
            dependency: self.dependency.clone().into(),
            master,
            conn,
            nudge: tokio::sync::Notify::new(),
            spare: parking_lot::Mutex::new(None),
            connecting: tokio::sync::Semaphore::new(crate::manager::MAX_CONNECTING),
            standby: parking_lot::Mutex::new(std::collections::HashMap::new()),
            role_tick: std::sync::atomic::AtomicU64::new(0),
            suspect: std::sync::atomic::AtomicU64::new(0),
        });
        let started = Instant::now();
        let deadline = started + s.startup_timeout;
        let mut last: Option<MysqlError> = None;
        loop {
            let candidates = source.candidates().await;

            if candidates.is_empty() {
                last = Some(MysqlError::Unresolvable {
                    dependency: self.dependency.clone(),
                    name: source.describe(),
                });
            }
            match find_primary(&shared.conn, &candidates).await {
                Ok(addr) => {
                    shared.master.switch(addr, "initial");
                    break;
                }
                Err(e) => {
                    // A server's definite answer about credentials or the database will not
                    // change by waiting.
                    if matches!(
                        e,
                        MysqlError::AccessDenied { .. }
                            | MysqlError::UnknownDatabase { .. }
                            | MysqlError::Connect {
                                source: mysql_async::Error::Server(_),
                                ..
                            }
                    ) {
                        return Err(e);
                    }
                    if !candidates.is_empty() {
                        last = Some(e);
                    }
                }
            }
            source.refresh();
            if Instant::now() + Duration::from_millis(100) >= deadline {
                let last = last.unwrap_or(MysqlError::NoPrimary {
                    dependency: self.dependency.clone(),
                });
                return Err(match last {
                    e @ (MysqlError::ReadOnly { .. }
                    | MysqlError::Replica { .. }
                    | MysqlError::Unresolvable { .. }) => e,
                    e => MysqlError::Unreachable {
                        dependency: self.dependency.clone(),
                        after: started.elapsed(),
                        last: Box::new(e),
                    },
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pool = Pool::builder(MysqlManager::new(shared.clone()))
            .max_size(s.max_connections)
            .runtime(deadpool::Runtime::Tokio1)
            // No deadpool create/recycle timeouts: `create` and the role check in `recycle`
            // bound themselves (connect and check timeouts), and a deadpool timeout would arm a
            // timer on every checkout.
            .build()
            .map_err(|e| {
                MysqlError::Config(ConfigError::new(
                    "<ha-mysql builder>",
                    "max_connections",
                    s.max_connections,
                    e.to_string(),
                ))
            })?;
        let readers = match (&self.ctx, s.replicas.is_empty()) {
            (Some(ctx), false) => Some(start_readers(ctx, &self.dependency, &shared.conn, s)),
            _ => None,
        };
        let follower = tokio::spawn(follow(
            shared.clone(),
            source.clone(),
            pool.clone(),
            s.verify_interval,
        ));
        let ticker = tokio::spawn(crate::manager::tick_roles(
            Arc::downgrade(&shared),
            s.role_check_interval,
        ));
        // Warm connections for the follower's probes: the replicas (a promoted one is then
        // verified without a connect) and, with fixed addresses, every candidate.
        let mut warm: Vec<SocketAddr> = Vec::new();
        if s.standby {
            warm.extend(s.replicas.iter().copied());
            if let Source::Static(v) = &source {
                warm.extend(v.iter().copied());
            }
        }
        warm.sort_unstable();
        warm.dedup();
        let standby = tokio::spawn(keep_standby(
            Arc::downgrade(&shared),
            warm,
            s.verify_interval,
        ));
        // As `fast_within(s.timeout)`, computed once: `writer()` reads it on every checkout.
        let fast_writer = s.timeout >= shared.conn.check_timeout.saturating_mul(2);
        Ok(HaMysql {
            inner: Arc::new(Inner {
                fast_writer,
                shared,
                pool,
                follower,
                ticker,
                standby,
                timeout: s.timeout,
                readers,
            }),
        })
    }
}

/// The first candidate that is a writable primary; else the most telling error.
async fn find_primary(
    settings: &ConnSettings,
    candidates: &[SocketAddr],
) -> Result<SocketAddr, MysqlError> {
    let probes = candidates.iter().map(|a| async move {
        let r = connect_primary(settings, *a).await;
        (*a, r)
    });
    let results = futures::future::join_all(probes).await;
    let mut last = None;
    for (addr, r) in results {
        match r {
            Ok(conn) => {
                // The probe connection is not pooled: close it in the background.
                close_later(conn);
                return Ok(addr);
            }
            Err(e) => {
                // Prefer the server's answer (credentials, database) over "not reachable".
                let keep = match (&last, &e) {
                    (None, _) => true,
                    (
                        Some(MysqlError::AccessDenied { .. } | MysqlError::UnknownDatabase { .. }),
                        _,
                    ) => false,
                    (_, MysqlError::AccessDenied { .. } | MysqlError::UnknownDatabase { .. }) => {
                        true
                    }
                    (Some(MysqlError::ReadOnly { .. } | MysqlError::Replica { .. }), _) => false,
                    _ => true,
                };
                if keep {
                    last = Some(e);
                }
            }
        }
    }
    Err(last.unwrap_or(MysqlError::NoPrimary {
        dependency: String::new(),
    }))
}

// === the follower ===

/// Re-checks the primary on a nudge (a classified error, a refused connect, a read-only
/// answer), on a change of the DNS answer, and every `verify_interval`; while no primary is
/// known it asks DNS again every few milliseconds ([`lost_poll`]: 2 ms for the first second of
/// the outage, when an HA's repoint is most likely, then less often). A new primary
/// bumps the generation and drops the idle connections of the old one (the others are refused
/// at their next checkout). A probe round that a DNS change overtakes is abandoned, so a
/// frozen candidate (whose probe waits its full connect timeout) never delays the new one.
async fn follow(shared: Arc<Shared>, source: Source, pool: Pool<MysqlManager>, verify: Duration) {
    let mut dns = source.watch();
    let mut pending: Option<&'static str> = None;
    let mut lost_since: Option<Instant> = None;
    loop {
        let lost = shared.master.current().is_none();
        let wait = if lost {
            lost_poll(lost_since.get_or_insert_with(Instant::now).elapsed())
        } else {
            lost_since = None;
            verify
        };
        let cause = match pending.take() {
            Some(c) => c,
            None => tokio::select! {
                _ = shared.nudge.notified() => "error",
                _ = tokio::time::sleep(wait) => if lost { "lost_poll" } else { "verify" },
                changed = dns_changed(&mut dns) => {
                    if !changed {
                        dns = None;
                    }
                    "dns_changed"
                }
            },
        };
        if lost || cause == "error" {
            source.refresh();
        }
        let candidates = source.candidates().await;
        let current = shared.master.current();
        let round = probe_round(
            &shared,
            &candidates,
            current.as_ref().map(|m| m.addr),
            cause,
        );
        // While a round waits on a silent candidate, keep asking DNS: the HA may repoint the
        // name meanwhile, and the change abandons the round.
        let keep_asking = async {
            if lost || cause == "error" {
                let since = lost_since.unwrap_or_else(Instant::now);
                loop {
                    tokio::time::sleep(lost_poll(since.elapsed())).await;
                    source.refresh();
                }
            } else {
                std::future::pending::<()>().await;
            }
        };
        let chosen = tokio::select! {
            chosen = round => chosen,
            () = keep_asking => None,
            changed = dns_changed(&mut dns) => {
                if !changed {
                    dns = None;
                }
                pending = Some("dns_changed");
                continue;
            }
        };
        match chosen {
            Some((addr, conn)) => {
                let before = current.as_ref().map(|m| m.generation);
                let m = shared.master.switch(addr, cause);
                if before == Some(m.generation) {
                    shared.put_standby(addr, conn);
                } else {
                    if let Some((_, old)) = shared.spare.lock().replace((m.clone(), conn)) {
                        close_later(old);
                    }
                    let generation = m.generation;
                    let removed = pool.retain(|c: &HaConn, _| c.stamp().generation == generation);
                    metrics::counter!("ha_mysql_switches_total", "dependency" => shared.dependency.to_string()).increment(1);
                    tracing::warn!(dependency = %shared.dependency, endpoint = %addr, generation, cause, closed = removed.removed.len(), "writer pool follows a new primary");
                    removed
                        .removed
                        .into_iter()
                        .for_each(|c| close_later(c.into_conn()));
                }
            }
            None => {
                if current.is_some() {
                    let generation = shared.master.lose(cause);
                    let removed = pool.retain(|_, _| false);
                    tracing::warn!(dependency = %shared.dependency, generation, cause, closed = removed.removed.len(), candidates = ?candidates, "no writable primary: writes wait");
                    removed
                        .removed
                        .into_iter()
                        .for_each(|c| close_later(c.into_conn()));
                }
                source.refresh();
            }
        }
    }
}

/// How often DNS is asked while no primary is known, `lost_for` into the outage: every 2 ms
/// for the first second (an HA repoints within about a second of its decision; the first
/// write after the repoint waits for this poll), every 5 ms up to 5 s, then every 25 ms (a
/// long outage is the HA's, and every client asking 500 times a second would load the DNS
/// servers for nothing).
fn lost_poll(lost_for: Duration) -> Duration {
    if lost_for < Duration::from_secs(1) {
        Duration::from_millis(2)
    } else if lost_for < Duration::from_secs(5) {
        Duration::from_millis(5)
    } else {
        Duration::from_millis(25)
    }
}

async fn dns_changed(dns: &mut Option<EndpointWatch>) -> bool {
    match dns.as_mut() {
        Some(w) => w.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Probes every candidate at once; the first writable one wins, except that the current
/// primary, when it is a candidate and writable, is kept (several writable candidates are a
/// split brain in the making: stay, and never hop to the other).
async fn probe_round(
    shared: &Shared,
    candidates: &[SocketAddr],
    current: Option<SocketAddr>,
    cause: &str,
) -> Option<(SocketAddr, Conn)> {
    use futures::StreamExt;
    let wait_for_current = current.is_some_and(|c| candidates.contains(&c));
    let mut probes: futures::stream::FuturesUnordered<_> = candidates
        .iter()
        .map(|a| async move { (*a, probe_primary(shared, *a).await) })
        .collect();
    let mut first_other = None;
    while let Some((addr, r)) = probes.next().await {
        match r {
            Ok(conn) => {
                if Some(addr) == current || !wait_for_current {
                    if let Some((other_addr, other)) = first_other.take() {
                        shared.put_standby(other_addr, other);
                    }
                    return Some((addr, conn));
                }
                if first_other.is_none() {
                    first_other = Some((addr, conn));
                } else {
                    shared.put_standby(addr, conn);
                }
            }
            Err(e) => {
                tracing::debug!(dependency = %shared.dependency, endpoint = %addr, error = %e, cause, "candidate is not a primary");
            }
        }
    }
    first_other
}

// === HaMysql ===

struct Inner {
    shared: Arc<Shared>,
    pool: Pool<MysqlManager>,
    follower: JoinHandle<()>,
    ticker: JoinHandle<()>,
    standby: JoinHandle<()>,
    timeout: Duration,
    /// `timeout` covers a role check and a connect: `writer()` may take a free slot without a timer.
    fast_writer: bool,
    readers: Option<Readers>,
}

/// The replica side: the lag watcher and the balancer over what it publishes.
struct Readers {
    balancer: LocalityBalance<ReplicaService>,
    task: JoinHandle<()>,
    rwy_timeout: Duration,
}

fn start_readers(
    ctx: &HaContext,
    dependency: &str,
    conn: &ConnSettings,
    s: &MysqlSettings,
) -> Readers {
    let publisher = ctx.publisher(&format!("{dependency}.replicas"));
    let task = tokio::spawn(watch_lag(
        s.replicas.clone(),
        conn.clone(),
        ctx.topology().classifier().clone(),
        publisher.clone(),
        crate::reader::LagReport {
            dependency: dependency.into(),
            events: ctx.events().clone(),
        },
        s.max_lag,
        s.lag_check_interval,
    ));
    let settings = conn.clone();
    let max = s.replica_connections;
    let balancer = ctx
        .balancer_over(publisher.watch())
        .classifier(crate::MysqlClassifier)
        .build(move |ep: &Endpoint| ReplicaService::new(ep, settings.clone(), max));
    Readers {
        balancer,
        task,
        rwy_timeout: s.read_your_writes_timeout,
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.follower.abort();
        self.ticker.abort();
        self.standby.abort();
        if let Some(r) = &self.readers {
            r.task.abort();
        }
        self.pool.close();
    }
}

/// Options of one [`HaMysql::write_with`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct WriteOptions {
    /// Bound on the whole call: waiting for a primary, the checkout, every try.
    pub timeout: Duration,
    /// The statement may run twice (it is idempotent): a try whose connection broke after
    /// sending is retried instead of returning [`HaError::OutcomeUnknown`]. Default false.
    pub idempotent: bool,
}

impl WriteOptions {
    /// A non-idempotent write bounded by `timeout`.
    pub fn new(timeout: Duration) -> WriteOptions {
        WriteOptions {
            timeout,
            idempotent: false,
        }
    }

    /// The same options, marked idempotent.
    #[must_use]
    pub fn idempotent(mut self) -> WriteOptions {
        self.idempotent = true;
        self
    }
}

/// A MySQL/MariaDB client whose writer pool follows the primary. `Clone` shares it; dropping
/// the last clone stops its follower and closes the pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use ha_mysql::HaMysql;
/// use ha_mysql::mysql_async::prelude::Queryable;
/// use std::time::Duration;
///
/// let db = HaMysql::builder()
///     .addrs(["127.0.1.30:13306".parse()?, "127.0.2.30:13306".parse()?])
///     .user("app").password("app-pw").database("app")
///     .connect().await?;
/// // One bounded, classified statement: retried on the new primary only when it provably did
/// // not run; a broken connection after sending is `HaError::OutcomeUnknown`.
/// db.write(Duration::from_secs(1), |c| Box::pin(async move {
///     c.query_drop("INSERT INTO t (v) VALUES (1)").await
/// })).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct HaMysql {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HaMysql {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaMysql")
            .field("dependency", &self.inner.shared.dependency)
            .field("master", &self.inner.shared.master.current())
            .field("pool", &self.inner.pool.status())
            .finish()
    }
}

impl HaMysql {
    /// A builder over plain addresses or a host name.
    pub fn builder() -> Builder {
        Builder {
            dependency: "mysql".into(),
            source: None,
            settings: MysqlSettings::default(),
            events: EventBus::default(),
            master: None,
            ctx: None,
        }
    }

    /// A builder for the topology dependency `dependency` (`kind = "mysql"`): the primary's
    /// DNS name resolved per region by ha-core's discovery (or its `static_addrs`), the
    /// settings from `[dependencies.NAME.settings]` (see [`MysqlSettings`]), this context's
    /// event bus and master watch. Finish with [`Builder::connect`].
    pub async fn from_context(ctx: &HaContext, dependency: &str) -> Result<Builder, MysqlError> {
        let dep = ctx
            .topology()
            .require_dependency(dependency)
            .map_err(MysqlError::Config)?;
        if let Some(kind) = dep.kind.as_deref()
            && kind != "mysql"
        {
            return Err(MysqlError::Config(ConfigError::new(
                ctx.topology().file(),
                format!("dependencies.{dependency}.kind"),
                kind,
                "ha-mysql serves kind = \"mysql\"",
            )));
        }
        let settings: MysqlSettings = dep
            .settings::<crate::settings::RawSettings>()?
            .validate(ctx.topology().file(), dependency)?;
        let discovery = ctx.discover(dependency).await.map_err(|e| match e {
            HaError::Config(c) => MysqlError::Config(c),
            other => MysqlError::Config(ConfigError::new(
                ctx.topology().file(),
                format!("dependencies.{dependency}"),
                "",
                other.to_string(),
            )),
        })?;
        Ok(Builder {
            dependency: dependency.to_owned(),
            source: Some(Source::Dns(discovery)),
            settings,
            events: ctx.events().clone(),
            master: Some(ctx.master_watch(dependency)),
            ctx: Some(ctx.clone()),
        })
    }

    /// The primary as currently verified (`None` while it is lost).
    pub fn master(&self) -> &MasterWatch {
        &self.inner.shared.master
    }

    /// The writer pool (deadpool), e.g. for its status.
    pub fn pool(&self) -> &Pool<MysqlManager> {
        &self.inner.pool
    }

    /// Tells the follower that something (an error of a statement run on a [`Writer`])
    /// suggests the primary changed: it re-resolves and re-checks at once.
    pub fn report(&self, err: &mysql_async::Error) {
        if is_read_only_code(err) || classify_mysql(err).is_endpoint_failure() {
            self.inner.shared.nudge();
        }
    }

    /// A pooled connection to the verified primary, waiting (within the default timeout) for
    /// one while the primary is being switched.
    ///
    /// (An `async fn` in effect; written as the checkout's own future so that no wrapper
    /// future moves its result once more.)
    pub fn writer(&self) -> impl Future<Output = Result<Writer, HaError>> + Send + '_ {
        self.checkout(None, self.inner.timeout, self.inner.fast_writer)
    }

    /// A checkout within `budget` from `start` (`None`: from now). With `fast`, the fast path
    /// first: a free slot taken without arming a timer (deadpool's non-blocking wait). `fast`
    /// must be true only when the budget covers the most a checkout can take by itself (see
    /// [`HaMysql::fast_within`]). Otherwise, or with no free slot, the bounded wait of
    /// [`HaMysql::writer_until`], boxed so that the fast path's future stays small.
    ///
    /// Without a `start`, the clock is read only when the fast path does not finish in its
    /// first poll (a role check or a connect began: I/O, microseconds at least), so the common
    /// checkout reads no clock (measured: a clock read first made it 1.5× bare deadpool, this
    /// 1.4×); the deadline then counts from that first poll, which is the start but for the
    /// synchronous part of one poll.
    async fn checkout(
        &self,
        start: Option<Instant>,
        budget: Duration,
        fast: bool,
    ) -> Result<Writer, HaError> {
        let mut start = start;
        if fast {
            let mut fast = std::pin::pin!(self.inner.pool.timeout_get(&NON_BLOCKING));
            let got = std::future::poll_fn(|cx| {
                let polled = fast.as_mut().poll(cx);
                if polled.is_pending() && start.is_none() {
                    start = Some(Instant::now());
                }
                polled
            })
            .await;
            match got {
                Ok(w) => return Ok(w),
                Err(PoolError::Closed | PoolError::NoRuntimeSpecified) => {
                    return Err(pool_error(PoolError::Closed));
                }
                // No free slot, or a failed create: the bounded path tries again.
                Err(_) => {}
            }
        }
        self.slow_checkout(start, budget).await
    }

    /// True when `budget` covers the most a checkout can take by itself: one failing role
    /// check in `recycle` (after one fails, the other idle connections of that generation are
    /// dropped without one) and one `create`, each bounded by the connect timeout. Then the
    /// checkout needs no timer of its own.
    fn fast_within(&self, budget: Duration) -> bool {
        budget >= self.inner.shared.conn.check_timeout.saturating_mul(2)
    }

    #[cold]
    async fn slow_checkout(
        &self,
        start: Option<Instant>,
        budget: Duration,
    ) -> Result<Writer, HaError> {
        let deadline = start.unwrap_or_else(Instant::now) + budget;
        metrics::counter!("ha_mysql_pool_waits_total", "dependency" => self.inner.shared.dependency.to_string())
            .increment(1);
        Box::pin(self.writer_until(deadline, budget)).await
    }

    async fn writer_until(&self, deadline: Instant, budget: Duration) -> Result<Writer, HaError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            // Checked here, not only by the timeout below: a checkout that fails at once (no
            // primary known) is ready on its first poll, and tokio's timeout polls the inner
            // future before its deadline, so it would never fire.
            if Instant::now() >= deadline {
                return Err(HaError::DeadlineExceeded {
                    deadline: budget,
                    attempts: attempts - 1,
                    maybe_sent: false,
                });
            }
            let generation = self.inner.shared.master.generation();
            let got = tokio::time::timeout_at(deadline, self.inner.pool.get()).await;
            match got {
                Err(_) => {
                    return Err(HaError::DeadlineExceeded {
                        deadline: budget,
                        attempts,
                        maybe_sent: false,
                    });
                }
                Ok(Ok(w)) => return Ok(w),
                Ok(Err(e)) => {
                    let fatal = match &e {
                        PoolError::Backend(m) => !m.class().is_not_sent(),
                        PoolError::Closed | PoolError::NoRuntimeSpecified => true,
                        _ => false,
                    };
                    if fatal {
                        return Err(pool_error(e));
                    }
                    tracing::debug!(dependency = %self.inner.shared.dependency, error = %e, "writer checkout refused; waiting for the primary");
                    self.wait_for_switch(generation, deadline).await;
                }
            }
        }
    }

    /// Waits until the generation moved past `generation` with a primary known, or 50 ms
    /// passed (a primary that merely refused a connect may be back), or `deadline`.
    async fn wait_for_switch(&self, generation: ha_core::Generation, deadline: Instant) {
        let mut rx = self.inner.shared.master.subscribe();
        let until = deadline.min(Instant::now() + Duration::from_millis(50));
        let _ = tokio::time::timeout_at(
            until,
            rx.wait_for(|m| m.as_ref().is_some_and(|m| m.generation > generation)),
        )
        .await;
    }

    /// Runs `f` on a connection to the primary, bounded by `timeout` (see [`HaMysql::write_with`]).
    pub async fn write<T, F>(&self, timeout: Duration, f: F) -> Result<T, HaError>
    where
        T: Send,
        F: for<'c> FnMut(&'c mut Conn) -> BoxFuture<'c, mysql_async::Result<T>> + Send,
    {
        self.write_with(WriteOptions::new(timeout), f).await
    }

    /// Runs `f` on a connection to the primary, everything bounded by `opts.timeout`:
    ///
    /// - retried on the (new) primary only when it provably did not run: no primary or a
    ///   refused connect at checkout, a fenced connection, a 1290/1836 answer confirmed by the
    ///   node's `@@read_only`; each retry waits for the next generation, so a caller sees at
    ///   most one read-only answer per switch;
    /// - a connection that broke after sending (lost connection, reset, EOF), or the deadline
    ///   passing while a statement ran, is [`HaError::OutcomeUnknown`] (retried instead only
    ///   when `opts.idempotent`); that connection is never reused;
    /// - the deadline passing before anything was sent is [`HaError::DeadlineExceeded`] with
    ///   `maybe_sent: false`;
    /// - any other server error is the answer: [`HaError::Backend`] with the driver's error.
    pub async fn write_with<T, F>(&self, opts: WriteOptions, mut f: F) -> Result<T, HaError>
    where
        T: Send,
        F: for<'c> FnMut(&'c mut Conn) -> BoxFuture<'c, mysql_async::Result<T>> + Send,
    {
        let start = Instant::now();
        let deadline = start + opts.timeout;
        let shared = &self.inner.shared;
        loop {
            let mut w = self
                .checkout(Some(start), opts.timeout, self.fast_within(opts.timeout))
                .await?;
            let endpoint = w.addr();
            let generation = w.stamp().generation;
            w.begin_statement();
            let ran = tokio::time::timeout_at(deadline, f(&mut w)).await;
            let err = match ran {
                Ok(Ok(v)) => {
                    w.end_statement();
                    return Ok(v);
                }
                Err(elapsed) => {
                    // `w` stays marked in flight: the pool closes it.
                    shared.nudge();
                    metrics::counter!("ha_mysql_outcome_unknown_total", "dependency" => shared.dependency.to_string(), "why" => "deadline").increment(1);
                    return Err(HaError::OutcomeUnknown {
                        endpoint: Some(endpoint),
                        source: Box::new(elapsed),
                    });
                }
                Ok(Err(e)) => e,
            };
            w.end_statement();
            if is_read_only_code(&err) {
                // Not executed only if the node says it is read-only now.
                let ro: Result<Result<Option<i64>, _>, _> = tokio::time::timeout_at(
                    deadline.min(Instant::now() + shared.conn.check_timeout),
                    w.query_first("SELECT @@global.read_only"),
                )
                .await;
                if matches!(ro, Ok(Ok(Some(1)))) {
                    w.mark_broken();
                    drop(w);
                    shared.nudge();
                    metrics::counter!("ha_mysql_read_only_refusals_total", "dependency" => shared.dependency.to_string()).increment(1);
                    tracing::info!(dependency = %shared.dependency, %endpoint, generation, "read-only primary: retrying on the next one");
                    self.wait_for_next(generation, deadline).await;
                    continue;
                }
                if !matches!(ro, Ok(Ok(_))) {
                    w.mark_broken();
                }
                return Err(HaError::backend(err));
            }
            let class = classify_mysql(&err);
            if class.is_endpoint_failure() || err.is_fatal() {
                w.mark_broken();
                shared.nudge();
            }
            if class == ha_core::ErrorClass::MaybeSent {
                if opts.idempotent && Instant::now() < deadline {
                    drop(w);
                    self.wait_for_switch(generation, deadline).await;
                    continue;
                }
                metrics::counter!("ha_mysql_outcome_unknown_total", "dependency" => shared.dependency.to_string(), "why" => "connection_lost").increment(1);
                return Err(HaError::OutcomeUnknown {
                    endpoint: Some(endpoint),
                    source: Box::new(err),
                });
            }
            return Err(HaError::backend(err));
        }
    }

    /// A connection for a read: a replica within the lag bound, picked by ha-core's locality
    /// tiers (same IDC, then same region, then the rest) and health; the primary when no
    /// replica qualifies or none is configured. A read that must see this caller's own write
    /// uses [`HaMysql::reader_after`].
    pub async fn reader(&self) -> Result<ReadConn, HaError> {
        if let Some(r) = &self.inner.readers {
            let mut balancer = r.balancer.clone();
            match tower_service::Service::call(&mut balancer, ()).await {
                Ok(conn) => return Ok(ReadConn::Replica(conn)),
                Err(e) => {
                    tracing::debug!(dependency = %self.inner.shared.dependency, error = %e, "no replica for the read: primary");
                }
            }
        }
        metrics::counter!("ha_mysql_reads_total", "served_by" => "primary", "locality" => "primary")
            .increment(1);
        Ok(ReadConn::Primary(self.writer().await?))
    }

    /// A read that sees the write whose GTID is `gtid` (read it in the write with
    /// [`last_gtid`]): a replica that applies it within `read_your_writes_timeout`
    /// (MariaDB `MASTER_GTID_WAIT`), else the primary.
    pub async fn reader_after(&self, gtid: &str) -> Result<ReadConn, HaError> {
        let conn = self.reader().await?;
        let ReadConn::Replica(mut replica) = conn else {
            return Ok(conn);
        };
        let wait = self
            .inner
            .readers
            .as_ref()
            .map_or(Duration::from_millis(100), |r| r.rwy_timeout);
        let waited = tokio::time::timeout(
            wait + self.inner.shared.conn.check_timeout,
            replica.exec_first::<i64, _, _>(
                "SELECT MASTER_GTID_WAIT(?, ?)",
                (gtid, wait.as_secs_f64()),
            ),
        )
        .await;
        match waited {
            Ok(Ok(Some(0))) => Ok(ReadConn::Replica(replica)),
            other => {
                if !matches!(other, Ok(Ok(_))) {
                    replica.mark_broken();
                }
                metrics::counter!("ha_mysql_read_your_writes_primary_total", "dependency" => self.inner.shared.dependency.to_string()).increment(1);
                Ok(ReadConn::Primary(self.writer().await?))
            }
        }
    }

    /// Waits (until `deadline`) for a primary of a generation after `generation`.
    async fn wait_for_next(&self, generation: ha_core::Generation, deadline: Instant) {
        let mut rx = self.inner.shared.master.subscribe();
        let _ = tokio::time::timeout_at(
            deadline,
            rx.wait_for(|m| m.as_ref().is_some_and(|m| m.generation > generation)),
        )
        .await;
    }
}

fn pool_error(e: PoolError<Box<MysqlError>>) -> HaError {
    match e {
        PoolError::Backend(m) => match *m {
            MysqlError::Fenced(h) => h,
            m => HaError::backend(m),
        },
        other => HaError::backend(std::io::Error::other(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_is_asked_most_often_early_in_an_outage() {
        let ms = |m| Duration::from_millis(m);
        assert_eq!(lost_poll(Duration::ZERO), ms(2));
        assert_eq!(lost_poll(ms(999)), ms(2));
        assert_eq!(lost_poll(ms(1000)), ms(5));
        assert_eq!(lost_poll(ms(4999)), ms(5));
        assert_eq!(lost_poll(ms(5000)), ms(25));
        assert_eq!(lost_poll(Duration::MAX), ms(25));
    }
}
